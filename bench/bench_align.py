"""Our OT aligner against Open3D ICP baselines: same frames, same priors, one frame each (cold).

    python bench/bench_align.py                       # full sweep (long: `ot` takes 30-90 s a run on 2 CPU cores)
    python bench/bench_align.py --quick               # smoke test: 1 seed, 64 beams, 2 levels, 1 frame
    python bench/bench_align.py --sanity              # only the sanity checks (see below)
    python bench/bench_align.py --seeds 0 1 --beams 64 --levels 3:0.2 10:0.5 --frames 0 \\
        -p rigid_steps=5 --json out.json

Scenes: simulated drives (`ros_ot_fusion.sim`), one street per seed, a `--beams` LiDAR and the
default 640x480 depth camera, frames `--frames` of the drive (hardware-triggered, so the two
clouds differ only by the extrinsic). Miscalibration ladder `--levels DEG:M ...`: the prior of
(seed, level) is `sim.miscalibrate(truth, DEG, M, rng([seed, 1]))`, the prior a bag simulated with
that seed and level gets (exact angle and offset; the axis and direction depend on the seed only).
Every method starts from that prior on the same frame, with no state from other frames.

Methods (all return the camera->LiDAR extrinsic T, p_lidar = T p_camera):
  ot        `Aligner(AlignConfig.from_params(params.validate({...})))`, the node's defaults plus
            `-p name=value` overrides, `align(lidar, camera, rgb, state=None, prior=prior)`.
  icp_p2p   Open3D point-to-point ICP.
  icp_p2l   Open3D point-to-plane ICP (normals of the camera cloud).
  gicp      Open3D generalized ICP (covariances of both clouds).
ICP set-up, chosen to make the baselines as strong as is fair (the same information as ours):
  - target: the camera points within `camera_max_range_m` (20 m by default), moved into the LiDAR
    frame by the prior, voxel-downsampled (`--icp-voxel`, 0.1 m);
  - source: the LiDAR points cropped exactly as ours crops them (range, and the camera's view
    under the prior widened by `crop_margin_m`: `Aligner.crop_lidar`), same voxel size, so that
    LiDAR points outside the camera's view cannot pair with the edge of the camera cloud;
  - normals (target) and covariances (both, GICP) from a hybrid KD-tree search (`--icp-radius`
    0.5 m, at most 30 neighbours: the LiDAR is sparse far away); GICP's covariances take the
    plane model of the GICP paper (eigenvalues set to 1e-3, 1, 1): raw covariances of the nearly
    noise-free camera surfaces are singular, and Open3D's GICP then diverges to NaN;
  - coarse to fine max-correspondence distances `--icp-dist` (1.0 -> 0.5 -> 0.2 -> 0.1 m), up to
    `--icp-iters` (100) iterations each, starting from the identity;
  - robust kernels with k = half the current distance: Tukey for point-to-plane, Huber for GICP
    (`--p2l-kernel`, `--gicp-kernel`; Open3D's point-to-point takes none). Tried on seed 0, frames
    0 and 10 at 0°, 3° and 10°: the 0.1 m level about halved point-to-plane's translation error,
    and Tukey halved it again; Huber helped GICP a little, Tukey made it diverge from 3° up.
  Algebra: ICP returns A with A x ≈ y for LiDAR points x and target points y = P c (P: prior,
  c: camera points). With x = T c that is A T c ≈ P c, so T = A⁻¹ P. Checked by `--sanity`
  (also run before every sweep): (1) the camera cloud itself as the "LiDAR" (x = truth · c) from a
  3°/0.2 m prior, where the ICP baselines must land on the truth; (2) a real frame with the exact
  prior, where every method must stay close to the truth (1°, 15 cm: point-to-point ICP's own
  bias exceeds the success bounds there).
Timing: wall clock of the whole call, preprocessing (crop, voxels, normals) included, on the CPU.
Errors: `transforms.pose_error(estimate, truth)`; success = within 0.5° and 5 cm.
Output: a markdown table per beams × level × method (medians, success rate) on stdout,
progress per run on stderr, all rows in `--json PATH`.
"""
from __future__ import annotations

import os

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import open3d as o3d  # noqa: E402
import torch  # noqa: E402

from ros_ot_fusion import params as P  # noqa: E402
from ros_ot_fusion import transforms as tf  # noqa: E402
from ros_ot_fusion.fusion.align import Aligner, AlignConfig, in_range, view_bounds  # noqa: E402
from ros_ot_fusion.sim import Drive, DriveConfig, LidarConfig, miscalibrate  # noqa: E402

METHODS = ("ot", "icp_p2p", "icp_p2l", "gicp")
SUCCESS_DEG, SUCCESS_M = 0.5, 0.05


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- methods

class Methods:
    def __init__(self, params: dict, icp_voxel: float, icp_radius: float, icp_dist: list[float],
                 icp_iters: int, kernels: dict[str, str] | None = None):
        self.params = params
        self.aligner = Aligner(AlignConfig.from_params(params), "cpu")
        self.voxel, self.radius, self.dist, self.iters = icp_voxel, icp_radius, icp_dist, icp_iters
        self.kernels = kernels or {}          # method -> "none" | "tukey" | "huber"

    def run(self, method: str, lidar_xyz, camera_xyz, camera_rgb, prior) -> dict:
        t0 = time.perf_counter()
        if method == "ot":
            a = self.aligner.align(lidar_xyz, camera_xyz, camera_rgb, state=None, prior=prior)
            out = {"T": a.T, "ok": bool(a.ok), "reason": a.reason, "iterations": a.iterations,
                   "steps": len(a.steps)}
        else:
            out = self.icp(method, lidar_xyz, camera_xyz, prior)
        out["time_s"] = time.perf_counter() - t0
        return out

    def icp(self, method: str, lidar_xyz, camera_xyz, prior) -> dict:
        reg = o3d.pipelines.registration
        cfg = self.aligner.config
        cam = torch.as_tensor(np.asarray(camera_xyz), dtype=torch.float32)
        cam = cam[in_range(cam, cfg.min_range_m, cfg.camera_range_m)]
        lidar = torch.as_tensor(np.asarray(lidar_xyz), dtype=torch.float32)
        lidar = lidar[self.aligner.crop_lidar(lidar, prior, view_bounds(cam))]
        if len(cam) < 50 or len(lidar) < 50:
            return {"T": prior.copy(), "ok": False, "reason": "too few points"}
        target = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(tf.transform_points(prior, cam.numpy())))
        source = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(lidar.numpy().astype(np.float64)))
        target, source = target.voxel_down_sample(self.voxel), source.voxel_down_sample(self.voxel)
        search = o3d.geometry.KDTreeSearchParamHybrid(radius=self.radius, max_nn=30)
        if method == "icp_p2p":
            estimation = reg.TransformationEstimationPointToPoint()
        elif method == "icp_p2l":
            target.estimate_normals(search)
            estimation = reg.TransformationEstimationPointToPlane()
        elif method == "gicp":
            for cloud in (source, target):
                cloud.estimate_covariances(search)
                cloud.covariances = o3d.utility.Matrix3dVector(plane_covariances(np.asarray(cloud.covariances)))
            estimation = reg.TransformationEstimationForGeneralizedICP()
        else:
            raise ValueError(f"unknown method {method!r}")
        A = np.eye(4)
        for d in self.dist:
            kernel = self.kernels.get(method, "none")
            if kernel != "none" and method != "icp_p2p":     # Open3D's point-to-point takes no kernel
                loss = {"tukey": reg.TukeyLoss, "huber": reg.HuberLoss}[kernel](k=d / 2)
                estimation = (reg.TransformationEstimationPointToPlane(loss) if method == "icp_p2l" else
                              reg.TransformationEstimationForGeneralizedICP(1e-3, loss))
            criteria = reg.ICPConvergenceCriteria(relative_fitness=1e-7, relative_rmse=1e-7,
                                                  max_iteration=self.iters)
            if method == "gicp":
                res = reg.registration_generalized_icp(source, target, d, A, estimation, criteria)
            else:
                res = reg.registration_icp(source, target, d, A, estimation, criteria)
            A = np.asarray(res.transformation)
        # A x ≈ P c and x = T c  =>  T = A⁻¹ P
        return {"T": tf.invert(A) @ prior, "ok": bool(res.fitness > 0), "reason": "",
                "fitness": float(res.fitness), "inlier_rmse": float(res.inlier_rmse),
                "points": [len(source.points), len(target.points)]}


def plane_covariances(C: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """GICP's plane model: each (3, 3) covariance with its eigenvalues set to (eps, 1, 1)."""
    _, V = np.linalg.eigh(C)                                          # ascending: V[:, :, 0] ~ normal
    return (V * np.array([eps, 1.0, 1.0])) @ np.swapaxes(V, 1, 2)


def errors(T, truth) -> tuple[float, float, bool]:
    rot, trans = tf.pose_error(T, truth)
    return rot, trans, bool(rot <= SUCCESS_DEG and trans <= SUCCESS_M)


# ----------------------------------------------------------------------------------------- sanity

def sanity(m: Methods, methods, beams: int) -> bool:
    """(1) algebra: the camera cloud as its own "LiDAR"; (2) zero miscalibration on a real frame."""
    drive = Drive(DriveConfig(frames=1, seed=0, lidar=LidarConfig(beams=beams)))
    frame, truth = drive.frame(0), drive.truth
    good = True
    cam = frame.camera.xyz
    fake_lidar = tf.transform_points(truth, cam).astype(np.float32)
    prior = miscalibrate(truth, 3.0, 0.2, np.random.default_rng([0, 1]))
    for method in [x for x in methods if x != "ot"]:
        out = m.run(method, fake_lidar, cam, None, prior)
        rot, trans, _ = errors(out["T"], truth)
        ok = rot < 0.1 and trans < 0.01         # a wrong composition is off by about the prior's error
        good &= ok
        log(f"sanity algebra  {method:8s} camera as LiDAR, prior 3°/0.2 m: {rot:.4f}° {trans * 100:.2f} cm "
            f"{'ok' if ok else 'FAILED (want < 0.1°, 1 cm)'}")
    for method in methods:
        out = m.run(method, frame.lidar.xyz, cam, frame.camera.rgb, truth.copy())
        rot, trans, success = errors(out["T"], truth)
        ok = rot < 1.0 and trans < 0.15         # "close": a method's own bias may exceed the success bounds
        good &= ok
        verdict = ("FAILED (want < 1°, 15 cm)" if not ok else "ok" if success
                   else "ok (close, but outside the success bounds)")
        log(f"sanity exact    {method:8s} {beams}-beam frame 0, prior = truth: {rot:.4f}° {trans * 100:.2f} cm "
            f"{out['time_s']:.1f} s {verdict}")
    return good


# ---------------------------------------------------------------------------------------- the sweep

def table(rows: list[dict]) -> str:
    lines = ["| beams | prior off | method | runs | median rot ° | median trans cm | success | median s |",
             "|------:|----------:|:-------|-----:|-------------:|----------------:|--------:|---------:|"]
    keys = []
    for r in rows:
        k = (r["beams"], r["level_deg"], r["level_m"], r["method"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (k[0], k[1], k[2], METHODS.index(k[3])))
    for beams, deg, m, method in keys:
        sel = [r for r in rows if (r["beams"], r["level_deg"], r["level_m"], r["method"]) == (beams, deg, m, method)]
        succ = sum(r["success"] for r in sel)
        lines.append(f"| {beams} | {deg:g}° / {m:g} m | {method} | {len(sel)} | "
                     f"{statistics.median(r['rot_deg'] for r in sel):.3f} | "
                     f"{100 * statistics.median(r['trans_m'] for r in sel):.2f} | "
                     f"{succ}/{len(sel)} ({100 * succ / len(sel):.0f}%) | "
                     f"{statistics.median(r['time_s'] for r in sel):.2f} |")
    return "\n".join(lines)


def parse_level(text: str) -> tuple[float, float]:
    deg, sep, m = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"a level is DEG:M (e.g. 3:0.2), got {text!r}")
    return float(deg), float(m)


def parse_params(items: list[str]) -> dict:
    try:    # NAME=VALUE is taken too
        out = P.overrides([i if ":=" in i else i.replace("=", ":=", 1) for i in items])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return P.validate(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--beams", type=int, nargs="+", default=[64, 128])
    p.add_argument("--levels", type=parse_level, nargs="+", default=[(1, 0.1), (3, 0.2), (5, 0.3), (10, 0.5)],
                   metavar="DEG:M", help="miscalibration ladder, rotation:translation")
    p.add_argument("--frames", type=int, nargs="+", default=[0, 10, 20], help="frame indices of each drive")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a node parameter for `ot` (and the shared ranges/crop)")
    p.add_argument("--icp-voxel", type=float, default=0.1)
    p.add_argument("--icp-radius", type=float, default=0.5)
    p.add_argument("--icp-dist", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    p.add_argument("--icp-iters", type=int, default=100)
    p.add_argument("--p2l-kernel", choices=("none", "tukey", "huber"), default="tukey")
    p.add_argument("--gicp-kernel", choices=("none", "tukey", "huber"), default="huber")
    p.add_argument("--quick", action="store_true", help="1 seed, 64 beams, 2 levels, 1 frame")
    p.add_argument("--sanity", action="store_true", help="only the sanity checks")
    p.add_argument("--no-sanity", action="store_true", help="skip the sanity checks before the sweep")
    p.add_argument("--json", metavar="PATH", help="write every run here (rewritten after each run)")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.beams, args.levels, args.frames = [0], [64], [(1, 0.1), (5, 0.3)], [0]
    torch.set_num_threads(2)
    m = Methods(parse_params(args.param), args.icp_voxel, args.icp_radius, args.icp_dist, args.icp_iters,
                {"icp_p2l": args.p2l_kernel, "gicp": args.gicp_kernel})
    t_start = time.perf_counter()
    if args.sanity or not args.no_sanity:
        if not sanity(m, args.methods, args.beams[0]):
            log("sanity check FAILED")
            return 1
        if args.sanity:
            return 0
    rows = []
    total = len(args.seeds) * len(args.beams) * len(args.frames) * len(args.levels) * len(args.methods)
    n_frames = max(args.frames) + 1
    for seed in args.seeds:
        scene = None
        for beams in args.beams:
            drive = Drive(DriveConfig(frames=n_frames, seed=seed, lidar=LidarConfig(beams=beams)), scene=scene)
            scene, truth = drive.scene, drive.truth
            for k in args.frames:
                frame = drive.frame(k)
                for deg, off in args.levels:
                    prior = miscalibrate(truth, deg, off, np.random.default_rng([seed, 1]))
                    for method in args.methods:
                        out = m.run(method, frame.lidar.xyz, frame.camera.xyz, frame.camera.rgb, prior)
                        rot, trans, ok = errors(out.pop("T"), truth)
                        row = {"seed": seed, "beams": beams, "frame": k, "level_deg": deg, "level_m": off,
                               "method": method, "rot_deg": rot, "trans_m": trans, "success": ok, **out}
                        rows.append(row)
                        log(f"[{len(rows)}/{total}] seed {seed} beams {beams} frame {k} prior {deg:g}°/{off:g} m "
                            f"{method:8s} {rot:7.3f}° {100 * trans:6.2f} cm {out['time_s']:5.1f} s "
                            f"{'ok' if ok else 'FAIL'}{'' if out['ok'] else ' (' + out['reason'] + ')'}")
                        if args.json:
                            with open(args.json, "w") as fh:
                                json.dump({"args": {k2: v for k2, v in vars(args).items() if k2 != "param"},
                                           "params": m.params, "rows": rows}, fh, indent=1)
    print(f"# {len(rows)} runs, seeds {args.seeds}, frames {args.frames}, CPU ({torch.get_num_threads()} threads), "
          f"{(time.perf_counter() - t_start) / 60:.1f} min; success = within {SUCCESS_DEG}° and "
          f"{100 * SUCCESS_M:g} cm; ICP: voxel {args.icp_voxel} m, distances {args.icp_dist} m, "
          f"{args.icp_iters} iterations each, kernels p2l {args.p2l_kernel}, gicp {args.gicp_kernel}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
