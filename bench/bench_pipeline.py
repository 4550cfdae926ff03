"""Per-frame alignment + fusion latency and extrinsic error over a drive, on any device.

The clouds come from the analytic street of `scene.py` (torch only: runs where open3d does not),
full size by default (128 x 1024 LiDAR ~130k points, 640 x 480 camera ~276k points). The camera
cloud is given in its optical frame through a true extrinsic; the aligner starts from a prior off
by --miscalib-deg / --miscalib-m and runs warm from frame to frame, as the node does. Reported:
per-stage latency percentiles after the first (cold) frame, iterations, and the error per frame.

    python bench/bench_pipeline.py --device cuda --frames 200
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import scene  # noqa: E402

from ros_ot_fusion import params as P  # noqa: E402
from ros_ot_fusion.fusion.align import Aligner, AlignConfig  # noqa: E402
from ros_ot_fusion.fusion.fuse import fuse  # noqa: E402
from ros_ot_fusion.transforms import axis_angle_to_matrix, make_transform, pose_error  # noqa: E402

TRUTH = scene.TRUTH


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--beams", type=int, default=128)
    ap.add_argument("--miscalib-deg", type=float, default=3.0)
    ap.add_argument("--miscalib-m", type=float, default=0.15)
    ap.add_argument("--speed", type=float, default=0.4, help="metres per frame")
    ap.add_argument("-p", action="append", default=[], metavar="NAME:=VALUE", help="a parameter (YAML value)")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="profile the last K frames (torch.profiler) and print where the time goes")
    args = ap.parse_args()
    overrides = P.overrides(args.p)
    params = P.validate(overrides)
    dev = torch.device(args.device)
    rng = np.random.default_rng(0)
    axis, direction = rng.normal(size=3), rng.normal(size=3)
    prior = make_transform(axis_angle_to_matrix(axis, math.radians(args.miscalib_deg)) @ TRUTH[:3, :3],
                           TRUTH[:3, 3] + args.miscalib_m * direction / np.linalg.norm(direction))
    aligner = Aligner(AlignConfig.from_params(params), dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows, state = [], None
    print(f"device {dev}, {args.frames} frames, params {overrides}", file=sys.stderr)
    profiler = None
    for k in range(args.frames):
        if args.profile and k == args.frames - args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            profiler = profile(activities=activities, with_stack=False)
            profiler.__enter__()
        lidar, camera, rgb = scene.sensor_frame(k, speed=args.speed, device=dev, beams=args.beams)
        sync()
        t0 = time.perf_counter()
        a = aligner.align(lidar, camera, rgb, state=state, prior=prior)
        sync()
        t1 = time.perf_counter()
        fuse(aligner, lidar, None, camera, rgb, a.T, a, params["fused_content"])
        sync()
        t2 = time.perf_counter()
        state = a.state if a.ok else None
        rot, trans = pose_error(a.T, TRUTH)
        rows.append((k, (t1 - t0) * 1e3, (t2 - t1) * 1e3, a.iterations, rot, trans, a.ok))
        print(f"frame {k:3d}: align {rows[-1][1]:8.1f} ms  fuse {rows[-1][2]:7.1f} ms  it {a.iterations:4d}  "
              f"err {rot:.3f} deg {100 * trans:.2f} cm  {a.reason}  ({len(lidar)} + {len(camera)} points)",
              file=sys.stderr)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
        print(profiler.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
    warm = np.array([r[1:6] for r in rows[1:]])
    pct = lambda v, q: float(np.percentile(v, q))  # noqa: E731
    print("\n| frames | align p50 / p99 ms | fuse p50 / p99 ms | total p50 / p99 ms | iterations p50 | "
          "rot err p50 deg | trans err p50 cm |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    total = warm[:, 0] + warm[:, 1]
    settled = warm[len(warm) // 4:]
    print(f"| {len(warm)} warm | {pct(warm[:, 0], 50):.1f} / {pct(warm[:, 0], 99):.1f} | {pct(warm[:, 1], 50):.1f} / "
          f"{pct(warm[:, 1], 99):.1f} | {pct(total, 50):.1f} / {pct(total, 99):.1f} | {pct(warm[:, 2], 50):.0f} | "
          f"{pct(settled[:, 3], 50):.3f} | {100 * pct(settled[:, 4], 50):.2f} |")
    print(f"cold first frame: align {rows[0][1]:.0f} ms, {rows[0][3]} iterations; prior error "
          f"{pose_error(prior, TRUTH)[0]:.2f} deg {100 * pose_error(prior, TRUTH)[1]:.1f} cm")


if __name__ == "__main__":
    main()
