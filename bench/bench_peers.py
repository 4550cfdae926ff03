"""Dense Sinkhorn side by side with its peers: ours, FlashSinkhorn, POT and plain torch, one run.

    python bench/bench_peers.py [--sizes 4096 16384 65536] [--iters 100] [--eps 0.01]
                                [--torch-max 32768] [--pot-max 16384] [--check-size 1024]

Inputs: two noisy samplings of a wavy 8 m sheet (d = 3, fp32), centred on the origin (the problem
does not change under a shift, and a peer that does not centre should not pay for our choice of
frame). Each solver runs `--iters` plain alternating iterations (balanced, uniform weights, fixed
eps, no early stop, no over-relaxation) from zero potentials; ms an iteration, median of repeated
solves after warm-up (CUDA events). FlashSinkhorn (`flash-sinkhorn`, if installed) runs with and
without TF32 and never autotunes (`autotune=False`: a new size would otherwise spend seconds to
minutes tuning on the hot path). POT runs `ot.sinkhorn_log` on torch tensors with the dense cost
matrix, plain torch a logsumexp loop on it, both where the matrix fits (`--torch-max`, `--pot-max`).

Accuracy first, at `--check-size` points and `--check-eps` (where 500 iterations converge, so that
the solvers' orders of updates do not matter): each solver's transport cost <P, C> after 500
iterations against a float64 torch loop of the same iterations. With TRITON_INTERPRET=1 the Triton solvers run
on the CPU (tiny sizes only: a check of this script, not a timing).

    python bench/bench_peers.py --multiscale [--ms-eps 1e-2 1e-3] [--tol 1e-3] [--frames 4]

Multi-scale instead: our MultiscaleSinkhorn against FlashSinkhorn's `solve_multiscale` on the street
scene (bench/scene.py: a 128-beam sweep against a 640x480 depth cloud), balanced (theirs is balanced
only), uniform weights, to marginal error `--tol`. Balanced transport needs both clouds to cover the
same surfaces, which a sweep and a forward camera do not (the whole sweep, balanced, did not converge
for either solver): both are cut to the co-visible part, the points in voxels of `--covisible` m that
hold points of both clouds. Even so, LiDAR scan lines lie farther apart than the blur, so mass must
move across them: `--clouds camera-camera` pairs the camera's depth cloud with the next frame's
(pixel pitch under the blur), a balanced problem both solvers can finish. Both get the same points:
each frame centred on the
joint centroid and rounded to TF32 by FlashSinkhorn's own `preprocess_coordinates` (its solver requires
it). FlashSinkhorn's first call per eps (its autotuning) is timed apart; then medians of `--frames`
frames, ours cold and warm-started from the previous frame. Both plans are then checked by the same
float64 pass over all pairs: the L1 errors of their row and column sums.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from ros_ot_fusion.ot.sinkhorn import sinkhorn

try:
    from flash_sinkhorn.multiscale import preprocess_coordinates, solve_multiscale
    from flash_sinkhorn.sinkhorn_solvers import sinkhorn_flashstyle_alternating
except ImportError:                      # the peer is optional
    sinkhorn_flashstyle_alternating = solve_multiscale = preprocess_coordinates = None


def sheet(n: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    uv = torch.rand(n, 2, generator=g) * 8
    z = 0.5 * torch.sin(uv[:, 0]) * torch.cos(0.7 * uv[:, 1])
    p = torch.cat([uv, z[:, None]], 1) + 0.01 * torch.randn(n, 3, generator=g)
    return (p - p.mean(0)).to(device)


def cost_matrix(x, y):
    return ((x[:, None, :] - y[None]) ** 2).sum(-1)


def plan_cost(f, g, x, y, eps) -> float:
    """<P, C> of P = a b exp((f + g - C) / eps) (uniform weights; f, g in that convention)."""
    C = cost_matrix(x.double(), y.double())
    logP = (f.double()[:, None] + g.double()[None] - C) / eps - math.log(len(x)) - math.log(len(y))
    return float((logP.exp() * C).sum())


def torch_loop(x, y, eps, iters):
    """f_i = -eps LSE_j (g_j - C_ij) / eps + log b_j, then g from the new f: the reference loop."""
    C = cost_matrix(x, y)
    la, lb = -math.log(len(x)), -math.log(len(y))
    f, g = x.new_zeros(len(x)), x.new_zeros(len(y))
    for _ in range(iters):
        f = -eps * torch.logsumexp((g[None] - C) / eps + lb, 1)
        g = -eps * torch.logsumexp((f[:, None] - C) / eps + la, 0)
    return f, g


def ours(x, y, eps, iters):
    r = sinkhorn(x, y, eps=eps, eps_start=eps, tol=0.0, max_iter=iters, check_every=iters, omega=1.0,
                 backend="triton")
    return r.f, r.g


def flash(tf32: bool):
    def run(x, y, eps, iters):
        a = torch.full((len(x),), 1 / len(x), device=x.device)
        b = torch.full((len(y),), 1 / len(y), device=x.device)
        return sinkhorn_flashstyle_alternating(x, y, a, b, eps=eps, n_iters=iters, allow_tf32=tf32, autotune=False)
    return run


def pot(x, y, eps, iters):
    import ot
    a = torch.full((len(x),), 1 / len(x), device=x.device)
    b = torch.full((len(y),), 1 / len(y), device=x.device)
    _, log = ot.bregman.sinkhorn_log(a, b, cost_matrix(x, y), reg=eps, numItermax=iters, stopThr=0.0, log=True,
                                    warn=False)
    # POT's log potentials are those of P = exp(log_u + log_v - C / eps); back to f, g
    return eps * (log["log_u"] - math.log(1 / len(x))), eps * (log["log_v"] - math.log(1 / len(y)))


def timed(fn, *args, repeat=5):
    """Median ms of a whole call, after one warm-up call (CUDA events on the GPU)."""
    fn(*args)
    out = []
    for _ in range(repeat):
        if args[0].is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn(*args)
            out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)[len(out) // 2]


def marginal_errors(f, g, x, y, eps, rows=512) -> tuple[float, float]:
    """L1 errors of the row and column sums of P = a b exp((f + g - C) / eps), uniform a, b, in float64
    over every pair (row chunks; C from the float64 points)."""
    x, y, f, g = x.double(), y.double(), f.double(), g.double()
    la, lb = -math.log(len(x)), -math.log(len(y))
    yy, col = (y * y).sum(1), torch.zeros_like(g)
    row_err = 0.0
    for i in range(0, len(x), rows):
        xi = x[i:i + rows]
        C = ((xi * xi).sum(1)[:, None] + yy[None] - 2 * xi @ y.T).clamp_min(0)
        P = ((f[i:i + rows, None] + g[None] - C) / eps + la + lb).exp()
        row_err += float((P.sum(1) - math.exp(la)).abs().sum())
        col += P.sum(0)
    return row_err, float((col - math.exp(lb)).abs().sum())


def sync_ms(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, 1e3 * (time.perf_counter() - t)


def covisible(x: torch.Tensor, y: torch.Tensor, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The points of x and of y in voxels (edge `size`) that hold points of both."""
    from ros_ot_fusion.ot.multiscale import voxel_keys

    kx, ky = voxel_keys(x, size), voxel_keys(y, size)
    return x[torch.isin(kx, ky)], y[torch.isin(ky, kx)]


def multiscale(args) -> None:
    """Our multi-scale solver against FlashSinkhorn's on the street scene (module docstring)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import scene
    from ros_ot_fusion.ot.multiscale import MultiscaleSinkhorn

    if solve_multiscale is None or not torch.cuda.is_available():
        raise SystemExit("--multiscale needs flash-sinkhorn and a CUDA device")
    frames = []
    for k in range(args.frames + 1):
        x, y = scene.frame(k, 1.0, device="cuda")
        if args.clouds == "camera-camera":
            x = scene.frame(k + 1, 1.0, device="cuda")[1]
            x, y = y, x
        x, y = covisible(x, y, args.covisible)
        a = torch.full((len(x),), 1 / len(x), device="cuda")
        b = torch.full((len(y),), 1 / len(y), device="cuda")
        frames.append(preprocess_coordinates(x, y, a, b) + (a, b))
    x, y = frames[0][:2]
    print(f"# {torch.cuda.get_device_name()}; {args.clouds}: {len(x)} x {len(y)} points, balanced, uniform "
          f"weights, tol {args.tol:g}, co-visible in {args.covisible:g} m voxels; ms (wall clock, synchronised); errors: L1 of row / column sums, float64")
    print("\n| eps | solver | first call ms | median ms | iterations | row err | col err | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for eps in args.ms_eps:
        ours = MultiscaleSinkhorn(eps, rho=None, tol=args.tol)
        res, first = sync_ms(lambda: ours(*frames[0]))
        ours(*frames[0])                                   # second warm-up: allocator, graphs
        cold, warm, it_c, it_w = [], [], [], []
        for k in range(1, len(frames)):
            r, ms = sync_ms(lambda: ours(*frames[k]))
            cold.append(ms), it_c.append(r.iterations)
            w, ms = sync_ms(lambda: ours(*frames[k], warm=res.warm))
            warm.append(ms), it_w.append(w.iterations)
            res = w
        x, y = frames[-1][:2]
        err_c, err_w = marginal_errors(r.f, r.g, x, y, eps), marginal_errors(w.f, w.g, x, y, eps)
        med = statistics.median
        print(f"| {eps:g} | ours cold | {first:.0f} | {med(cold):.1f} | {med(it_c):.0f} | {err_c[0]:.1e} | "
              f"{err_c[1]:.1e} | own check {r.marginal_error:.1e} |")
        print(f"| {eps:g} | ours warm | | {med(warm):.1f} | {med(it_w):.0f} | {err_w[0]:.1e} | {err_w[1]:.1e} | "
              f"own check {w.marginal_error:.1e} |", flush=True)
        if args.ours_only:
            continue
        (f, g, info), first = sync_ms(lambda: solve_multiscale(*frames[0], eps, args.tol))
        times, updates, stops = [], [], set()
        for k in range(1, len(frames)):
            (f, g, info), ms = sync_ms(lambda: solve_multiscale(*frames[k], eps, args.tol))
            times.append(ms), updates.append(info.fine_updates), stops.add(f"{info.stop}, accepted {info.accepted}")
        err = marginal_errors(f, g, x, y, eps)
        print(f"| {eps:g} | FlashSinkhorn | {first:.0f} | {med(times):.1f} | {med(updates):.0f} fine | "
              f"{err[0]:.1e} | {err[1]:.1e} | {'; '.join(sorted(stops))} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--torch-max", type=int, default=32768)
    ap.add_argument("--pot-max", type=int, default=16384)
    ap.add_argument("--check-size", type=int, default=1024)
    ap.add_argument("--check-eps", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--multiscale", action="store_true", help="the multi-scale comparison instead (docstring)")
    ap.add_argument("--ms-eps", type=float, nargs="+", default=[1e-2, 1e-3])
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--covisible", type=float, default=0.25)
    ap.add_argument("--clouds", choices=["sweep-camera", "camera-camera"], default="sweep-camera")
    ap.add_argument("--ours-only", action="store_true", help="--multiscale without FlashSinkhorn's solves")
    args = ap.parse_args()
    if args.multiscale:
        return multiscale(args)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    solvers = {"ours": ours, "torch dense": torch_loop, "POT sinkhorn_log": pot}
    if sinkhorn_flashstyle_alternating is None or dev.type != "cuda":
        print("FlashSinkhorn left out: " + ("flash-sinkhorn is not installed" if dev.type == "cuda" else
                                            "it runs on CUDA tensors only"))
    else:
        solvers.update({"FlashSinkhorn fp32": flash(False), "FlashSinkhorn TF32": flash(True)})

    n, eps = args.check_size, args.check_eps
    x, y = sheet(n, dev, 1), sheet(n, dev, 2)
    f64 = torch_loop(x.double(), y.double(), eps, 500)
    ref = plan_cost(*f64, x, y, eps)
    P = ((f64[0][:, None] + f64[1][None] - cost_matrix(x.double(), y.double())) / eps).exp() / n / n
    print(f"accuracy, n = m = {n}, eps {eps:g}, 500 iterations: <P, C> relative to float64 ({ref:.6g}; "
          f"its row marginal error {float((P.sum(1) - 1 / n).abs().sum()):.1e})")
    for name, solve in solvers.items():
        f, g = solve(x, y, eps, 500)
        print(f"  {name:20s} {abs(plan_cost(f, g, x, y, eps) - ref) / ref:.2e}")
    eps = args.eps

    print(f"\n{args.iters} iterations, eps {eps:g}, device {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}"
          f"; ms an iteration (whole solve / iterations)\n")
    print("| n = m | " + " | ".join(solvers) + " |")
    print("|---:|" + "---:|" * len(solvers))
    for n in args.sizes:
        x, y = sheet(n, dev, 1), sheet(n, dev, 2)
        row = []
        for name, solve in solvers.items():
            limit = {"torch dense": args.torch_max, "POT sinkhorn_log": args.pot_max}.get(name)
            if limit is not None and n > limit:
                row.append("–")
                continue
            row.append(f"{timed(solve, x, y, eps, args.iters, repeat=args.repeat) / args.iters:.3f}")
        print(f"| {n} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
