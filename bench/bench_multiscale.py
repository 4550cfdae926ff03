"""Multi-scale sparse solve on a simulated street drive: cold vs warm-started, per frame.

    python bench/bench_multiscale.py [--device cuda] [--frames 12] [--eps 1e-3] [--rho 0.1]
    python bench/bench_multiscale.py --device cpu --points 20000     # CPU fallback, voxelised
    python bench/bench_multiscale.py --no-point-lists   # whole block pairs at the target eps

A 128-beam LiDAR sweep against a 640x480 depth-camera cloud (bench/scene.py), both in the LiDAR
frame, unbalanced OT (the camera sees a part of the sweep). Cold: full pyramid and eps-scaling.
Warm: previous frame's WarmStart (the vehicle moved `--speed` m). Times are wall-clock medians
with the device synchronised, after warm-up runs (compilation, allocator).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import scene  # noqa: E402

from ros_ot_fusion.ot.multiscale import MultiscaleSinkhorn, cluster, voxel_keys  # noqa: E402


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def voxelise(points: torch.Tensor, target: int) -> torch.Tensor:
    """Voxel-grid centroids, voxel size searched so that about `target` remain."""
    lo, hi = 0.01, 5.0
    for _ in range(30):
        size = (lo * hi) ** 0.5
        n = len(torch.unique(voxel_keys(points, size)))
        lo, hi = (size, hi) if n > target else (lo, size)
    return cluster(points, torch.zeros(len(points), device=points.device), hi)[0]


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, 1e3 * (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--points", type=int, default=0, help="voxelise both clouds to about this many")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--block", type=int, default=None, help="points per block (default: by device)")
    p.add_argument("--no-point-lists", action="store_true",
                   help="iterate over whole block pairs at the target eps (the solve before point lists)")
    args = p.parse_args()
    dev = args.device
    frames = []
    for k in range(args.frames + 1):
        x, y = scene.frame(k, args.speed, device=dev)
        if args.points:
            x, y = voxelise(x, args.points), voxelise(y, args.points)
        frames.append((x.contiguous(), y.contiguous()))
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {name}; lidar {len(frames[0][0])} x camera {len(frames[0][1])} points; eps {args.eps:g}, "
          f"rho {args.rho:g}, tol {args.tol:g}, block {args.block or 'default'}")
    solver = MultiscaleSinkhorn(args.eps, rho=args.rho, tol=args.tol, block=args.block,
                                point_lists=not args.no_point_lists)
    x, y = frames[0]
    for _ in range(2):                                   # warm-up: compilation, allocator
        solver(x, y)
    cold_ms = []
    for _ in range(args.repeat):
        res, ms = timed(lambda: solver(x, y), dev)
        cold_ms.append(ms)
    print(f"cold frame 0: median {statistics.median(cold_ms):.2f} ms over {args.repeat}, "
          f"{res.iterations} iterations, marginal error {res.marginal_error:.1e}")
    for lv in res.levels:
        print(f"   level {lv['points']}: eps {lv['eps'][0]:.3g} -> {lv['eps'][1]:.3g}, "
              f"{lv['iterations']} iterations, block pairs kept {lv.get('pairs', 1.0):.3f}"
              + (f", entries kept {lv['entries']:.2e} in {lv['selections']} selections "
                 f"(last margin {lv['margin']:.0f})" if "entries" in lv else ""))
    if not args.no_point_lists:          # what the lists change: the same frame over whole block pairs
        ref = MultiscaleSinkhorn(args.eps, rho=args.rho, tol=args.tol, block=args.block, point_lists=False)(x, y)
        df = ((res.f - ref.f).abs().max() / args.eps).item()
        print(f"against whole block pairs: cost rel. diff {abs(res.cost - ref.cost) / ref.cost:.1e}, "
              f"max |f - f_pairs| {df:.2e} eps, {ref.iterations} iterations")
    print("\n| frame | cold ms | cold it | warm ms | warm it | warm err | cost rel. diff |")
    print("|------:|--------:|--------:|--------:|--------:|---------:|---------------:|")
    warm = res.warm
    rows = []
    for k, (x, y) in enumerate(frames[1:], 1):
        cold, c_ms = timed(lambda: solver(x, y), dev)
        hot, w_ms = timed(lambda: solver(x, y, warm=warm), dev)
        warm = hot.warm
        rows.append((c_ms, cold.iterations, w_ms, hot.iterations))
        print(f"| {k} | {c_ms:.2f} | {cold.iterations} | {w_ms:.2f} | {hot.iterations} | "
              f"{hot.marginal_error:.1e} | {abs(hot.cost - cold.cost) / cold.cost:.1e} |")
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"| median | {med[0]:.2f} | {med[1]:.0f} | {med[2]:.2f} | {med[3]:.0f} | | |")


if __name__ == "__main__":
    main()
