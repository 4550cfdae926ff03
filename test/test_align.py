"""The aligner and the fused cloud on small simulated frames (CPU, seconds), and the offline
pipeline end to end: simulate -> process-bag."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from ros_ot_fusion import params as P
from ros_ot_fusion import transforms as tf
from ros_ot_fusion.fusion.align import Aligner, AlignConfig, point_to_plane_step, view_bounds
from ros_ot_fusion.fusion.fuse import fuse
from ros_ot_fusion.sim import CameraConfig, Drive, DriveConfig, LidarConfig

SMALL = dict(lidar=LidarConfig(beams=32, azimuth_steps=720), camera=CameraConfig(width=240, height=180))


@pytest.fixture(scope="module")
def drive():
    return Drive(DriveConfig(frames=2, seed=3, miscalib_deg=2.0, miscalib_m=0.1, **SMALL))


def test_point_to_plane_step_recovers_a_known_motion_in_one_step():
    rng = np.random.default_rng(0)
    # three orthogonal families of planes: every direction is observable
    n = np.eye(3)[rng.integers(0, 3, 3000)] * rng.choice([-1.0, 1.0], (3000, 1))
    y = rng.uniform(-5, 5, (3000, 3))
    D = tf.make_transform(tf.axis_angle_to_matrix(rng.normal(size=3), math.radians(0.5)), rng.normal(size=3) * 0.02)
    x = tf.transform_points(D, y) + 0.3 * np.cross(n, rng.normal(size=(3000, 3)))   # slide along the planes
    step = point_to_plane_step(*(torch.tensor(v) for v in (x, y, n)), torch.ones(3000))
    rot, trans = tf.pose_error(step.matrix(), D)
    assert rot < 0.01 and trans < 1e-3, (rot, trans)


def test_aligner_recovers_the_true_extrinsic_from_a_miscalibrated_prior(drive):
    frame = drive.frame(0)
    before = tf.pose_error(drive.prior, drive.truth)
    assert before[0] == pytest.approx(2.0) and before[1] == pytest.approx(0.1)
    aligner = Aligner(AlignConfig.from_params(P.validate({"rigid_steps": 6})), "cpu")
    a = aligner.align(frame.lidar.xyz, frame.camera.xyz, frame.camera.rgb, prior=drive.prior)
    rot, trans = tf.pose_error(a.T, drive.truth)
    assert a.ok, a.reason
    assert rot < 0.5 and trans < 0.05, (rot, trans)
    assert a.steps[-1]["residual_m"] < 0.05


def test_fused_lidar_colours_come_from_the_surfaces_they_lie_on(drive):
    frame = drive.frame(1)
    aligner = Aligner(AlignConfig.from_params(P.validate({})), "cpu")
    a = aligner.align(frame.lidar.xyz, frame.camera.xyz, frame.camera.rgb, prior=drive.truth)
    cols = fuse(aligner, frame.lidar.xyz, frame.lidar.intensity, frame.camera.xyz, frame.camera.rgb,
                a.T, a, "lidar")
    cols = {k: v.numpy() for k, v in cols.items()}
    assert len(cols["xyz"]) == len(frame.lidar.xyz)
    confident = cols["confidence"] > 0.5
    assert confident.sum() > 200
    world = tf.transform_points(frame.world_T_lidar, cols["xyz"][confident])
    true = drive.scene.colour_at(world).astype(int)
    got = cols["rgb"][confident].astype(int)
    close = np.abs(got - true).max(1) <= 40
    # the blur mixes colours across stripes and edges; most points must still get their own surface's
    assert close.mean() > 0.6, close.mean()
    # and far better than chance: the same colours shuffled over the points miss at least three
    # times as often (a miss rate, since a scene of mostly grey road makes chance hits common)
    chance = (np.abs(got[np.random.default_rng(0).permutation(len(got))] - true).max(1) <= 40).mean()
    assert 1 - close.mean() < (1 - chance) / 3, (close.mean(), chance)


def test_camera_voxels_weigh_by_their_points():
    # three points in one 1 m voxel, one in another: column masses 3/4 and 1/4
    cam = torch.tensor([[0.1, 0.1, 5.1], [0.2, 0.2, 5.2], [0.3, 0.3, 5.3], [0.5, 0.5, 8.5]])
    aligner = Aligner(AlignConfig(camera_voxel_m=1.0), "cpu", min_points=1)
    c, _, _, _, b, _ = aligner.preprocess_camera(cam)
    assert torch.allclose(b[c[:, 2].argsort()], torch.tensor([0.75, 0.25]))


def test_lidar_stops_short_of_the_camera_range_cut():
    z = torch.linspace(5.0, 19.9, 200)
    bounds = view_bounds(torch.stack([0.01 * z, 0.01 * z, z], 1))     # a camera that sees out to ~20 m
    lidar = torch.tensor([[0.0, 0.0, r] for r in (10.0, 17.5, 18.5, 19.5)])
    aligner = Aligner(AlignConfig(camera_max_range_m=20.0), "cpu")
    assert aligner.crop_lidar(lidar, np.eye(4), bounds).tolist() == [True] * 4
    assert aligner.crop_lidar(lidar, np.eye(4), bounds, range_margin=2.0).tolist() == [True, True, False, False]


def test_simulate_then_process_bag_round_trip(tmp_path):
    bag, out = tmp_path / "drive", tmp_path / "fused"
    cli = [sys.executable, "-m", "ros_ot_fusion.cli"]
    subprocess.run([*cli, "simulate", str(bag), "--frames", "3", "--lidar-beams", "16",
                    "--camera-width", "160", "--camera-height", "120"], check=True, capture_output=True)
    done = subprocess.run([*cli, "process-bag", str(bag), str(out), "--params-file", f"{bag}.params.yaml",
                           "--json", "--png", str(tmp_path / "top.png")], check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout)
    assert summary["frames"] == 3
    assert all("rot_err_deg" in f and "align_ms" in f for f in summary["per_frame"])
    assert (tmp_path / "top.png").stat().st_size > 10_000
    from ros_ot_fusion.io import pointcloud2 as pc2
    from ros_ot_fusion.io.bag import bag_topics, read_bag
    assert {t: c for t, (_, c) in bag_topics(out).items()} == {"/ros_ot_fusion/fused": 3, "/ros_ot_fusion/extrinsic": 3}
    fused = next(m for t, _, m in read_bag(out, ["/ros_ot_fusion/fused"]))
    assert [f.name for f in fused.fields] == ["x", "y", "z", "intensity", "rgb", "confidence"]
    assert pc2.decode(fused).frame_id == "lidar"


def test_closed_form_eigen_matches_eigh_on_planar_linear_and_random_covariances():
    from ros_ot_fusion.kernels.normals import smallest_eigenvector

    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    R = torch.linalg.qr(torch.randn(600, 3, 3, generator=g, dtype=torch.float64))[0]
    scales = torch.cat([torch.rand(200, 3, generator=g, dtype=torch.float64),                 # random
                        torch.tensor([[1e-6, 0.5, 2.0]], dtype=torch.float64).expand(200, 3),   # a plane
                        torch.tensor([[1e-4, 1e-4, 3.0]], dtype=torch.float64).expand(200, 3)])  # a line
    A = R @ torch.diag_embed(scales) @ R.transpose(1, 2)
    evals, v = smallest_eigenvector(A)
    ref_vals, ref_vecs = torch.linalg.eigh(A)
    # a repeated eigenvalue costs the cubic's solution ~sqrt(machine eps) of the largest one
    assert torch.allclose(evals, ref_vals, atol=1e-7 * ref_vals[:, 2:].abs().max())
    assert torch.allclose(v.norm(dim=1), torch.ones(600, dtype=torch.float64))
    # eigenvector up to sign, where the smallest eigenvalue is distinct (not for the lines)
    cos = (v[:400] * ref_vecs[:400, :, 0]).sum(1).abs()
    gap = (ref_vals[:400, 1] - ref_vals[:400, 0]) / ref_vals[:400, 2]
    assert (cos[gap > 1e-3] > 1 - 1e-6).all()
    # A v = l_min v for all, lines included
    assert torch.allclose(A @ v[:, :, None], evals[:, :1, None] * v[:, :, None], atol=1e-6)


def test_warm_up_aligns_its_synthetic_room_and_leaves_no_state():
    from ros_ot_fusion.pipeline import OK, Pipeline

    pipe = Pipeline({"prior_extrinsic": [0.4, 0.1, 1.5, -0.5, 0.5, -0.5, 0.5], "lidar_frame": "velodyne"})
    out = pipe.warm_up(points=30_000)
    assert out.level == OK, out.message
    assert out.stats["solves"] >= 3 and out.stats["residual_m"] < 0.03
    assert pipe.state is None and pipe.estimate is None and pipe.last_stamp_ns == -1
