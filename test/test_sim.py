"""Simulator: transforms, scene ray casting, sensor geometry and noise, the prior, the bag and the picture."""
import math

import numpy as np
import pytest
import yaml

from ros_ot_fusion import transforms as tf
from ros_ot_fusion.sim import (KINDS, CameraConfig, Drive, DriveConfig, LidarConfig, Scene, SpinningLidar,
                               ground_height, miscalibrate, params_path, true_extrinsic)
from ros_ot_fusion.sim.drive import EPOCH_NS

SMALL_LIDAR = dict(beams=16)
SMALL_CAMERA = dict(width=160, height=120)


@pytest.fixture(scope="module")
def scene():
    return Scene(seed=0, length=60.0)


def small_drive(scene, noise=True, frames=3, seed=0):
    lidar = LidarConfig(**SMALL_LIDAR) if noise else LidarConfig(**SMALL_LIDAR, range_noise=0.0, dropout=0.0)
    camera = CameraConfig(**SMALL_CAMERA) if noise else CameraConfig(**SMALL_CAMERA, depth_noise=0.0)
    return Drive(DriveConfig(frames=frames, seed=seed, lidar=lidar, camera=camera), scene=scene)


def random_rotations(rng, n):
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- transforms

def test_quaternion_matrix_round_trip():
    rng = np.random.default_rng(1)
    q = random_rotations(rng, 500)
    # include the hard cases: identity, half turns (w = 0), tiny angles
    q = np.concatenate([q, [[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1e-9, 0, 0, 1],
                            [0.6, 0.8, 0, 1e-12]]])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    R = tf.quat_to_matrix(q)
    np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    back = tf.matrix_to_quat(R)
    assert np.all(back[:, 3] >= 0)
    np.testing.assert_allclose(np.abs(np.sum(back * q, axis=1)), 1.0, atol=1e-12)   # same rotation, ±q
    np.testing.assert_allclose(tf.quat_to_matrix(back), R, atol=1e-12)
    np.testing.assert_allclose(tf.matrix_to_quat(R[7]), back[7])                    # single item = batch item


def test_quaternion_matches_axis_angle():
    rng = np.random.default_rng(2)
    for _ in range(50):
        axis, angle = rng.normal(size=3), rng.uniform(-math.pi, math.pi)
        k = axis / np.linalg.norm(axis)
        q = np.r_[math.sin(angle / 2) * k, math.cos(angle / 2)]
        R = tf.axis_angle_to_matrix(axis, angle)
        np.testing.assert_allclose(tf.quat_to_matrix(q), R, atol=1e-12)
        np.testing.assert_allclose(R @ k, k, atol=1e-12)                           # the axis is fixed
        assert tf.rotation_angle_deg(R) == pytest.approx(abs(math.degrees(angle)), abs=1e-9)
    for tiny in (1e-7, 1e-4, 179.99):
        assert tf.rotation_angle_deg(tf.axis_angle_to_matrix([1, 2, 3], math.radians(tiny))) == \
            pytest.approx(tiny, rel=1e-6)


def test_pose_matrix_round_trip_and_inverse():
    rng = np.random.default_rng(3)
    poses = np.concatenate([rng.normal(size=(200, 3)) * 10, random_rotations(rng, 200)], axis=1)
    poses[:, 3:] *= np.where(poses[:, 6:] < 0, -1, 1)                                  # canonical w >= 0
    T = tf.pose_to_matrix(poses)
    np.testing.assert_allclose(tf.matrix_to_pose(T), poses, atol=1e-12)
    np.testing.assert_allclose(T @ tf.invert(T), np.broadcast_to(np.eye(4), T.shape), atol=1e-12)
    p = rng.normal(size=(10, 3))
    np.testing.assert_allclose(tf.transform_points(T[0], p), p @ T[0, :3, :3].T + T[0, :3, 3])
    with pytest.raises(ValueError, match="7 numbers"):
        tf.pose_to_matrix([1, 2, 3])


# ---------------------------------------------------------------------------- scene

def test_scene_raycast_hits_the_right_things(scene):
    xs = np.arange(5.0, 50.0, 5.0)
    down = scene.cast(np.stack([xs, np.full_like(xs, -2.0), np.full_like(xs, 10.0)], 1),
                      np.tile([0.0, 0.0, -1.0], (len(xs), 1)))
    np.testing.assert_allclose(down.t, 10.0 - ground_height(xs, -2.0), atol=0.01)
    assert np.all(scene.kind[down.geometry_id] == KINDS.index("ground"))
    np.testing.assert_allclose(down.normal[:, 2], 1.0, atol=0.05)

    sideways = scene.cast(np.stack([xs, np.zeros_like(xs), np.full_like(xs, 8.0)], 1),
                          np.tile([0.0, 1.0, 0.0], (len(xs), 1)))               # above cars and trees
    facades = scene.kind[sideways.geometry_id[sideways.hit]] == KINDS.index("facade")
    assert facades.mean() > 0.5 and np.all(sideways.t[sideways.hit][facades] > 9.0)

    sky = scene.cast(np.array([[20.0, 0.0, 2.0]]), np.array([[0.0, 0.0, 1.0]]))
    assert not sky.hit[0] and sky.geometry_id[0] == np.uint32(0xFFFFFFFF)
    with pytest.raises(ValueError, match="hit nothing"):
        scene.colour(sky.geometry_id, sky.primitive_id)


def test_scene_colours_vary_along_surfaces(scene):
    # across the road at x = 1 (a centre dash): asphalt, the white dash, the white lane edge
    ys = np.array([-2.0, 0.0, 2.0, 4.0])
    hits = scene.cast(np.stack([np.full(4, 1.0), ys, np.full(4, 5.0)], 1), np.tile([0, 0, -1.0], (4, 1)))
    grey = scene.colour(hits.geometry_id, hits.primitive_id).astype(int).mean(1)
    assert grey[1] > grey[0] + 80 and grey[3] > grey[2] + 80
    # and every facade has at least two clearly different colours (walls and windows)
    for gid in np.flatnonzero(scene.kind == KINDS.index("facade")):
        first, last = scene._offset[gid], (scene._offset[gid + 1] if gid + 1 < len(scene._offset)
                                           else scene.triangle_count)
        colours = scene._colour[first:last].astype(int)
        assert np.ptp(colours.sum(1)) > 150


def test_scene_is_seeded():
    a, b, c = Scene(seed=4, length=20.0), Scene(seed=4, length=20.0), Scene(seed=5, length=20.0)
    assert a.triangle_count == b.triangle_count and a.names == b.names
    np.testing.assert_array_equal(a._colour, b._colour)
    assert a.names != c.names or a.triangle_count != c.triangle_count


# ---------------------------------------------------------------------------- sensors

def test_lidar_layout():
    assert SpinningLidar(LidarConfig(beams=128)).azimuth_steps == 2048
    assert SpinningLidar(LidarConfig(beams=64)).azimuth_steps == 1024
    lidar = SpinningLidar(LidarConfig(beams=32, azimuth_steps=360))
    elevation = np.degrees(np.arcsin(lidar.directions[:, 2]))
    assert lidar.directions.shape == (32 * 360, 3)
    assert elevation.min() == pytest.approx(-25, abs=1e-4) and elevation.max() == pytest.approx(15, abs=1e-4)
    assert len(np.unique(np.round(elevation, 3))) == 32


def test_both_clouds_lie_on_the_scene_with_the_true_extrinsic(scene):
    drive = small_drive(scene, noise=False)
    frame = drive.frame(1)
    lidar, camera = frame.lidar, frame.camera
    assert lidar.xyz.dtype == np.float32 and camera.xyz.dtype == np.float32 and camera.rgb.dtype == np.uint8
    assert 5_000 < len(lidar) <= 16 * 1024 and 5_000 < len(camera) <= 160 * 120

    # LiDAR frame -> world: on a surface to float32 precision
    assert scene.distance(tf.transform_points(frame.world_T_lidar, lidar.xyz)).max() < 2e-3
    # camera frame -> LiDAR frame by the TRUE extrinsic -> world: on a surface too ...
    camera_in_lidar = tf.transform_points(drive.truth, camera.xyz)
    world = tf.transform_points(frame.world_T_lidar, camera_in_lidar)
    assert scene.distance(world).max() < 2e-3
    # ... and on the surface that was hit, with that surface's colour
    assert np.mean(scene.closest(world)[0] == camera.geometry_id) > 0.98
    assert np.mean(np.all(scene.colour_at(world) == camera.rgb, axis=1)) > 0.95
    # by the prior instead, it is not (so the checks above can fail)
    off = scene.distance(tf.transform_points(frame.world_T_lidar @ drive.prior, camera.xyz))
    assert np.median(off) > 0.05
    # the two sensors see the same objects
    assert len(np.intersect1d(lidar.geometry_id, camera.geometry_id)) >= 5

    # frames, fields of view and ranges
    z = camera.xyz[:, 2]
    assert z.min() >= 0.2 and z.max() <= 40.0
    assert np.abs(camera.xyz[:, 0] / z).max() <= math.tan(math.radians(87 / 2)) + 1e-5
    assert np.mean(camera_in_lidar[:, 0] > 0) > 0.99                    # the camera looks forward
    r = np.linalg.norm(lidar.xyz, axis=1)
    assert r.max() <= 100.0 and r.min() >= 0.5
    elevation = np.degrees(np.arcsin(lidar.xyz[:, 2] / r))
    assert elevation.min() >= -25.001 and elevation.max() <= 15.001
    assert np.all(lidar.intensity >= 0) and np.all(lidar.intensity <= 255) and np.ptp(lidar.intensity) > 50


def test_sensor_noise_and_dropout_statistics(scene):
    noisy, clean = small_drive(scene, noise=True), small_drive(scene, noise=False)
    frame, exact = noisy.frame(2), clean.frame(2)
    assert exact.world_T_lidar.tolist() == frame.world_T_lidar.tolist()

    # LiDAR: range error along the beam ~ N(0, 0.02 m), about 2 % of returns dropped
    r_exact = np.full(len(clean.lidar.directions), np.nan)
    r_exact[exact.lidar.ray] = np.linalg.norm(exact.lidar.xyz, axis=1)
    error = np.linalg.norm(frame.lidar.xyz, axis=1) - r_exact[frame.lidar.ray]
    assert abs(error.mean()) < 0.002 and error.std() == pytest.approx(0.02, rel=0.1)
    assert 1 - len(frame.lidar) / len(exact.lidar) == pytest.approx(0.02, abs=0.006)

    # camera: depth error ~ N(0, k z²) along each pixel ray; pixel rays unchanged
    z_exact = np.full(160 * 120, np.nan)
    z_exact[exact.camera.ray] = exact.camera.xyz[:, 2]
    z = z_exact[frame.camera.ray]
    ok = np.isfinite(z)
    assert ok.mean() > 0.99
    scaled = (frame.camera.xyz[ok, 2] - z[ok]) / (0.0015 * z[ok] ** 2)
    assert abs(scaled.mean()) < 0.1 and scaled.std() == pytest.approx(1.0, rel=0.1)
    rays = clean.camera.directions[frame.camera.ray]
    np.testing.assert_allclose(frame.camera.xyz[:, :2] / frame.camera.xyz[:, 2:], rays[:, :2], atol=1e-5)


def test_frames_are_reproducible_and_differ(scene):
    a, b = small_drive(scene).frame(1), small_drive(scene).frame(1)
    np.testing.assert_array_equal(a.lidar.xyz, b.lidar.xyz)
    np.testing.assert_array_equal(a.camera.rgb, b.camera.rgb)
    c = small_drive(scene).frame(2)
    moved = c.world_T_lidar[:3, 3] - a.world_T_lidar[:3, 3]
    assert moved[0] == pytest.approx(0.8, abs=0.03)                      # 8 m/s at 10 Hz
    assert tf.rotation_angle_deg(c.world_T_lidar[:3, :3] @ a.world_T_lidar[:3, :3].T) > 0.05
    base = a.world_T_lidar @ tf.make_transform(t=[0, 0, -1.9])          # roof mount, 1.9 m up
    assert base[2, 3] == pytest.approx(ground_height(*base[:2, 3]), abs=1e-9)


# ---------------------------------------------------------------------------- extrinsics

def test_true_extrinsic_convention():
    T = true_extrinsic()
    np.testing.assert_allclose(T[:3, 3], [0.25, -0.10, -0.35])
    R = T[:3, :3]
    # optical z (forward) ~ LiDAR +x, optical x (right) ~ -y, optical y (down) ~ -z, within 3°
    for optical, body in (([0, 0, 1], [1, 0, 0]), ([1, 0, 0], [0, -1, 0]), ([0, 1, 0], [0, 0, -1])):
        assert np.degrees(np.arccos(np.dot(R @ optical, body))) < 3.0
    assert 1.0 < tf.rotation_angle_deg(R @ np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0.0]])) < 3.0   # a real tilt
    assert (R @ [0, 0, 1])[2] < 0                                         # pitched down, not up


@pytest.mark.parametrize("deg, m", [(3.0, 0.15), (0.5, 0.02), (10.0, 1.0), (0.0, 0.0)])
def test_prior_is_off_by_exactly_the_requested_amount(deg, m):
    truth = true_extrinsic()
    priors = [miscalibrate(truth, deg, m, np.random.default_rng(seed)) for seed in range(5)]
    for prior in priors:
        angle, offset = tf.pose_error(prior, truth)
        assert angle == pytest.approx(deg, abs=1e-9) and offset == pytest.approx(m, abs=1e-12)
        np.testing.assert_allclose(prior[:3, :3] @ prior[:3, :3].T, np.eye(3), atol=1e-12)
    if deg > 0:                                                           # random axes, random directions
        assert len({tuple(np.round(p[:3, 3], 9)) for p in priors}) == 5


# ---------------------------------------------------------------------------- the command and the bag

def test_simulate_command_writes_bag_and_params(tmp_path, capsys):
    from ros_ot_fusion.cli import main
    from ros_ot_fusion.io import pointcloud2 as pc2
    from ros_ot_fusion.io.bag import bag_topics, read_bag

    bag = tmp_path / "drive"
    args = ["simulate", str(bag), "--frames", "3", "--seed", "7", "--lidar-beams", "16",
            "--camera-width", "160", "--camera-height", "120", "--miscalib-deg", "2", "--miscalib-m", "0.1"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "frame 3/3" in err and str(params_path(bag)) in out and "2.000 deg" in out

    assert bag_topics(bag) == {"/lidar/points": ("sensor_msgs/msg/PointCloud2", 3),
                               "/camera/points": ("sensor_msgs/msg/PointCloud2", 3),
                               "/calibration/ground_truth": ("geometry_msgs/msg/TransformStamped", 3)}
    stamps = {}
    for topic, bag_ns, msg in read_bag(bag):
        header_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        assert header_ns == bag_ns
        stamps.setdefault(topic, []).append(bag_ns)
        if topic == "/calibration/ground_truth":
            assert (msg.header.frame_id, msg.child_frame_id) == ("lidar", "camera")
            t, q = msg.transform.translation, msg.transform.rotation
            truth = tf.pose_to_matrix([t.x, t.y, t.z, q.x, q.y, q.z, q.w])
            np.testing.assert_allclose(truth, true_extrinsic(), atol=1e-12)
        else:
            cloud = pc2.decode(msg)
            names = [f.name for f in msg.fields]
            if topic == "/lidar/points":
                assert cloud.frame_id == "lidar" and names == ["x", "y", "z", "intensity"]
                assert len(cloud) > 5_000
            else:
                assert cloud.frame_id == "camera" and names == ["x", "y", "z", "rgb"]
                assert 5_000 < len(cloud) <= 160 * 120 and cloud.rgb is not None
    expected = [EPOCH_NS + k * 100_000_000 for k in range(3)]
    assert all(v == expected for v in stamps.values())

    params = yaml.safe_load(params_path(bag).read_text())
    prior = params["ros_ot_fusion"]["ros__parameters"]["prior_extrinsic"]
    assert len(prior) == 7 and all(isinstance(v, float) for v in prior)
    angle, offset = tf.pose_error(tf.pose_to_matrix(prior), truth)
    assert angle == pytest.approx(2.0, abs=1e-9) and offset == pytest.approx(0.1, abs=1e-12)

    before = sorted(p.name for p in bag.iterdir())
    assert main(args) == 2                                                # never overwrite
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in bag.iterdir()) == before


def test_sqlite3_storage(tmp_path, scene):
    from ros_ot_fusion.io.bag import bag_topics
    from ros_ot_fusion.sim import write_bag

    config = DriveConfig(frames=1, lidar=LidarConfig(beams=16), camera=CameraConfig(width=32, height=24))
    write_bag(tmp_path / "b", config, storage="sqlite3", scene=scene)
    assert list((tmp_path / "b").glob("*.db3")) and bag_topics(tmp_path / "b")["/lidar/points"][1] == 1


# ---------------------------------------------------------------------------- picture

def test_plot_alignment_draws_both_clouds_in_both_panels(tmp_path, scene):
    import matplotlib.image

    from ros_ot_fusion.viz import plot_alignment

    drive = small_drive(scene)
    frame = drive.frame(0)
    before = tf.transform_points(drive.prior, frame.camera.xyz)
    after = tf.transform_points(drive.truth, frame.camera.xyz)

    def pixels(lidar):
        image = matplotlib.image.imread(plot_alignment(tmp_path / "a.png", lidar, before, after,
                                                       title="t", dpi=60))[..., :3]
        orange = (image[..., 0] > 0.8) & (image[..., 1] > 0.35) & (image[..., 1] < 0.75) & (image[..., 2] < 0.4)
        dark = (np.ptp(image, axis=-1) < 0.08) & (image.max(-1) < 0.85)     # grey dots (and text)
        half = image.shape[1] // 2
        return [(orange[:, p].sum(), dark[:, p].sum()) for p in (slice(0, half), slice(half, None))]

    without_lidar = pixels(np.zeros((0, 3)))       # text, axes and legend only
    for (orange, dark), (_, dark_text) in zip(pixels(frame.lidar.xyz), without_lidar):
        assert orange > 150 and dark > dark_text + 300, (orange, dark, dark_text)
