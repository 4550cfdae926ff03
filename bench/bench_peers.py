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
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from ros_ot_fusion.ot.sinkhorn import sinkhorn

try:
    from flash_sinkhorn.sinkhorn_solvers import sinkhorn_flashstyle_alternating
except ImportError:                      # the peer is optional
    sinkhorn_flashstyle_alternating = None


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
    args = ap.parse_args()
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
