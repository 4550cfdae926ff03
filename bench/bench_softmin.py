"""The softmin kernel on the GPU: correctness against float64, then time per Sinkhorn iteration.

    python bench/bench_softmin.py [--sizes 4096 16384 65536] [--sweep] [--torch-max 65536]
                                  [--split-sweep 4096 8192] [--solve-sizes 4096 8192]
                                  [--one-launch-sweep 4096 8192]

One Sinkhorn iteration = two soft-mins (column then row update), dense, d = 3, fp32.
Side by side in one run: our Triton kernel, a plain torch log-domain iteration (materialised
cost matrix + logsumexp), and the floor set by fp32 exp throughput (measured on this GPU by
an ex2-only kernel, and the nominal 2*n*m / (132 SMs * 16/clk * 1.98 GHz)).
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from ros_ot_fusion.kernels import softmin as softmin_module
from ros_ot_fusion.kernels.softmin import iterations_triton, softmin_torch, softmin_triton
from ros_ot_fusion.ot import graphed
from ros_ot_fusion.ot.layout import morton_order
from ros_ot_fusion.ot.sinkhorn import sinkhorn

NOMINAL_EXP_PER_S = 132 * 16 * 1.98e9


@triton.jit
def _ex2_throughput(OUT, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    x = tl.arange(0, BLOCK).to(tl.float32) * 1e-6 + tl.program_id(0) * 1e-9
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(ITERS):
        x = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                      dtype=tl.float32, is_pure=True, pack=1) - 1.0
        acc += x
    tl.store(OUT + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc)


def measured_exp_rate() -> float:
    """ex2 per second of this GPU (dependent chains, many warps: the special-function ceiling)."""
    blocks, block, iters = 132 * 64, 256, 4096
    out = torch.empty(blocks * block, device="cuda")
    ms = triton.testing.do_bench(lambda: _ex2_throughput[(blocks,)](out, ITERS=iters, BLOCK=block),
                                 warmup=50, rep=200, return_mode="median")
    return blocks * block * iters / (ms * 1e-3)


def reference(x, y, h, eps):
    """float64 soft-min by exact differences, chunked."""
    X, Y, H = x.double().t(), y.double().t(), h.double()
    out = []
    for s in range(0, len(X), 1024):
        C = ((X[s:s + 1024, None, :] - Y[None]) ** 2).sum(-1)
        out.append(-eps * torch.logsumexp(H[None] - C / eps, 1))
    return torch.cat(out)


def scene(n, m, offset=30.0, seed=0):
    """Two noisy samplings of one wavy surface, metres from the origin (a realistic, hard case)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def sample(k):
        uv = torch.rand(k, 2, device="cuda", generator=g) * 8
        z = 0.5 * torch.sin(uv[:, 0]) * torch.cos(0.7 * uv[:, 1])
        p = torch.cat([uv, z[:, None]], 1) + 0.01 * torch.randn(k, 3, device="cuda", generator=g)
        return (p[morton_order(p)] + offset).t().contiguous()     # the solver's layout: Z-order
    return sample(n), sample(m)


def check(n, m, eps, pairs_fraction=None, config=None):
    x, y = scene(n, m, seed=n)
    h = torch.randn(m, device="cuda") * 0.5
    pairs = None
    if pairs_fraction is not None:          # random block-sparse pattern, every row block non-empty
        nb, mb = n // 128, m // 128
        keep = torch.rand(nb, mb, device="cuda") < pairs_fraction
        keep[torch.arange(nb), torch.randint(0, mb, (nb,), device="cuda")] = True
        rows, cols = keep.nonzero(as_tuple=True)
        row_ptr = torch.zeros(nb + 1, dtype=torch.int32, device="cuda")
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=nb), 0)
        pairs = (row_ptr, cols.int())
    got = softmin_triton(x, y, h, eps, pairs, config=config)
    ref = softmin_torch(x.double(), y.double(), h.double(), eps, pairs) if pairs else reference(x, y, h, eps)
    err = ((got.double() - ref).abs().max() / eps).item()
    return err


def time_iteration(fn, warm=10, rep=100):
    return triton.testing.do_bench(fn, warmup=warm, rep=rep, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--torch-max", type=int, default=65536)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--sweep", action="store_true", help="time tile configurations at 65536")
    parser.add_argument("--split-sweep", type=int, nargs="*", default=[],
                        help="time splits and warps of one soft-min at these (small) sizes")
    parser.add_argument("--solve-sizes", type=int, nargs="*", default=[4096, 8192],
                        help="time whole 100-iteration dense solves at these sizes")
    parser.add_argument("--one-launch-sweep", type=int, nargs="*", default=[],
                        help="time tile configurations of the one-launch iterations at these sizes")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")

    print("\n## correctness: max |softmin - float64| / eps (error in the exponent)")
    for n, m in [(1024, 2048), (4096, 4096), (8192, 2560)]:
        for eps in (1.0, 0.01, 1e-4):
            print(f"  dense  {n}x{m} eps={eps:g}: {check(n, m, eps):.2e}"
                  f"   sparse(30% of block pairs): {check(n, m, eps, 0.3):.2e}")

    rate = measured_exp_rate()
    print(f"\n## ex2 throughput measured: {rate / 1e12:.2f} T/s (nominal {NOMINAL_EXP_PER_S / 1e12:.2f})")

    config = None
    if args.sweep:
        n = 65536
        x, y = scene(n, n)
        h = torch.randn(n, device="cuda")
        print("\n## tile sweep, one soft-min at 65536^2 (ms); exact: cost from differences")
        best = (float("inf"), None)
        for exact in (False, True):
            for bm, bn, warps, split in [(bm, bn, w, s) for bm, bn in ((128, 32), (64, 32), (128, 16), (128, 64))
                                         for w in (2, 4) for s in (1, 2, 4, 8)]:
                cfg = (bm, bn, warps, split, exact)
                try:
                    ms = time_iteration(lambda: softmin_triton(x, y, h, args.eps, config=cfg), 3, 30)
                    err = check(4096, 4096, 1e-4, config=cfg)
                    print(f"  BM={bm:3d} BN={bn:3d} warps={warps} split={split} exact={exact:d}: {ms:7.3f} ms  "
                          f"err(eps=1e-4) {err:.1e}")
                    if ms < best[0]:
                        best = (ms, cfg)
                except Exception as exc:  # noqa: BLE001 (a config that does not compile)
                    print(f"  BM={bm:3d} BN={bn:3d} warps={warps} split={split} exact={exact}: failed {type(exc).__name__}: {exc}"[:200])
        config = best[1]
        print(f"  best: {config}")

    for n in args.split_sweep:
        x, y = scene(n, n)
        h = torch.randn(n, device="cuda")
        print(f"\n## split sweep, one soft-min at {n}^2 (us), 3-FMA form")
        for bm, warps in ((128, 2), (128, 4), (64, 2)):
            row = []
            for split in (4, 8, 16, 32, 64):
                cfg = (bm, 32, warps, split, False)
                row.append(f"split {split}: {1e3 * time_iteration(lambda: softmin_triton(x, y, h, args.eps, config=cfg)):6.1f}")
            print(f"  BM={bm} warps={warps}  " + "  ".join(row))

    print(f"\n## one dense Sinkhorn iteration (row + column soft-min), d=3, fp32, median ms, config {config}")
    print("| n = m | ours 3-FMA | ours exact | one launch 3-FMA | torch dense | torch/ours | exp floor (measured) | ours/floor |")
    print("|------:|-----------:|-----------:|-----------------:|------------:|-----------:|---------------------:|-----------:|")
    for n in args.sizes:
        x, y = scene(n, n)
        f = torch.randn(n, device="cuda") * 0.01
        logw = torch.full((n,), -float(torch.log(torch.tensor(float(n)))), device="cuda")
        eps = args.eps

        def ours(exact):
            gg = softmin_triton(y, x, logw + f / eps, eps, exact=exact, config=config)
            softmin_triton(x, y, logw + gg / eps, eps, exact=exact, config=config)
        t_ours = time_iteration(lambda: ours(False))
        t_exact = time_iteration(lambda: ours(True))
        t_one = one_launch(x, y, eps) if n <= 65536 else float("nan")
        t_torch = float("nan")
        if n <= args.torch_max:
            X, Y = x.t().contiguous(), y.t().contiguous()
            C = torch.cdist(X - X.mean(0), Y - X.mean(0)) ** 2          # materialised once
            del X, Y

            def plain():
                gg = -eps * torch.logsumexp((logw + f / eps)[:, None] - C / eps, 0)
                -eps * torch.logsumexp((logw + gg / eps)[None, :] - C / eps, 1)
            t_torch = time_iteration(plain, 3, 20)
            del C
            torch.cuda.empty_cache()
        floor = 1e3 * 2 * n * n / rate
        print(f"| {n} | {t_ours:.3f} | {t_exact:.3f} | {t_one:.3f} | {t_torch:.3f} | {t_torch / t_ours:.1f} | {floor:.3f} | {t_ours / floor:.2f} |")

    for n in args.one_launch_sweep:
        x, y = scene(n, n)
        print(f"\n## one-launch iterations at {n}^2, tile configurations (us an iteration, k = 100, 3-FMA)")
        for cfg in [(32, 32, 8, 4, False), (16, 32, 8, 8, False), (32, 32, 4, 4, True), (32, 32, 8, 4, True),
                    (32, 32, 8, 8, True), (16, 32, 8, 8, True), (16, 32, 4, 4, True), (32, 64, 8, 4, True),
                    (64, 32, 8, 4, True), (64, 32, 8, 8, True), (32, 32, 16, 8, True)]:
            try:
                print(f"  BM={cfg[0]:3d} BN={cfg[1]:3d} warps={cfg[2]:2d} runs={cfg[3]:2d} guess={cfg[4]:d}: {1e3 * one_launch(x, y, args.eps, cfg=cfg):7.2f}")
            except Exception as exc:  # noqa: BLE001 (a config that does not compile)
                print(f"  {cfg}: failed {type(exc).__name__}: {exc}"[:200])

    print("\n## whole dense solves of 100 iterations at eps (unbalanced rho = 0.1, over-relaxed), median ms;"
          " checks: marginal-error checks (one host sync each); kernels: two soft-min kernels a half-iteration;"
          " one launch: all iterations between checks in one persistent kernel")
    print("| n = m | checks | kernels | kernels, CUDA graphs | one launch | one launch, CUDA graphs | the kernel alone |")
    print("|------:|-------:|--------:|---------------------:|-----------:|------------------------:|-----------------:|")
    keep = softmin_module.PERSISTENT_MAX
    for n in args.solve_sizes:
        x, y = (p.t().contiguous() for p in scene(n, n, seed=7))
        zero = (torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda"))
        alone = 100 * one_launch(x.t().contiguous(), y.t().contiguous(), args.eps)
        for every in (10, 50):
            def solve(graphs):
                r = sinkhorn(x, y, eps=args.eps, rho=0.1, tol=1e-30, max_iter=100, init=zero,
                             check_every=every, cuda_graphs=graphs, block=128)
                assert r.iterations == 100
            t = []
            for persistent in (0, keep):
                softmin_module.PERSISTENT_MAX = persistent
                graphed._GRAPHS.clear()         # graphs captured with the other path
                t += [time_iteration(lambda: solve(on), 3, 50) for on in (False, True)]
            softmin_module.PERSISTENT_MAX = keep
            print(f"| {n} | {100 // every} | " + " | ".join(f"{v:.3f}" for v in t) + f" | {alone:.3f} |")


def one_launch(x, y, eps, k=100, cfg=None):
    """ms an iteration of `iterations_triton` (k iterations in one launch), points (3, n)."""
    n, m = x.shape[1], y.shape[1]
    lx = torch.full((n,), -float(torch.log(torch.tensor(float(n)))), device="cuda")
    ly = torch.full((m,), -float(torch.log(torch.tensor(float(m)))), device="cuda")
    f, g = torch.zeros(n, device="cuda"), torch.zeros(m, device="cuda")
    run = lambda: iterations_triton(x, y, lx, ly, f, g, eps, 0.9, 1.6, k, 128, config=cfg)  # noqa: E731
    return time_iteration(run, 3, 30) / k


if __name__ == "__main__":
    main()
