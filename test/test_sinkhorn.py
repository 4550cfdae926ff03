"""Sinkhorn (dense) against POT and a float64 reference, both backends, on fresh random inputs."""
import numpy as np
import ot
import pytest
import torch

from ros_ot_fusion.ot import sinkhorn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(n, m, d, seed, uniform):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g) + 5.0                # offset: coordinates are not centred
    y = torch.rand(m, d, generator=g) * 0.8 + 5.1
    a = None if uniform else torch.rand(n, generator=g) + 0.2
    b = None if uniform else torch.rand(m, generator=g) + 0.2
    if not uniform:
        a, b = a / a.sum(), b / b.sum()
    return x, y, a, b


def dense_plan(res, x, y, a, b, eps):
    """float64 plan pi_ij = a_i b_j exp((f_i + g_j - C_ij)/eps) from the returned potentials."""
    a = torch.full((len(x),), 1 / len(x)) if a is None else a
    b = torch.full((len(y),), 1 / len(y)) if b is None else b
    C = ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1)
    f, g = res.f.double().cpu(), res.g.double().cpu()
    return a.double()[:, None] * b.double()[None] * torch.exp((f[:, None] + g[None] - C) / eps), C


CASES = [  # (n, m, d, uniform, rho)
    (60, 45, 3, True, None), (50, 70, 2, False, None), (64, 48, 3, False, 0.5), (40, 55, 2, True, 2.0)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n, m, d, uniform, rho", CASES)
def test_matches_pot(backend, n, m, d, uniform, rho):
    seed = int(np.random.default_rng().integers(1 << 30))   # fresh inputs every run
    x, y, a, b = problem(n, m, d, seed, uniform)
    eps = 0.1 if backend == "triton" else 0.04               # the interpreter is slow: fewer iterations
    res = sinkhorn(x.to(DEVICE), y.to(DEVICE), None if a is None else a.to(DEVICE),
                   None if b is None else b.to(DEVICE), eps=eps, rho=rho, tol=1e-5, backend=backend)
    assert res.marginal_error < 1e-5, (seed, res.marginal_error)   # float32 floor: ~1e-6
    plan, C = dense_plan(res, x, y, a, b, eps)
    aw = np.full(n, 1 / n) if a is None else a.double().numpy()
    bw = np.full(m, 1 / m) if b is None else b.double().numpy()
    if rho is None:
        ref = ot.sinkhorn(aw, bw, C.numpy(), eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-10)
    else:
        ref = ot.unbalanced.sinkhorn_unbalanced(aw, bw, C.numpy(), eps, rho, method="sinkhorn_stabilized",
                                                numItermax=20000, stopThr=1e-10)
    assert np.abs(plan.numpy() - ref).sum() < 5e-5, seed
    assert res.cost == pytest.approx(float((ref * C.numpy()).sum()), rel=1e-4), seed
    # the reported marginal error bounds the returned plan's (which had one more row update)
    target = torch.as_tensor(aw) * (1 if rho is None else torch.exp(-res.f.double().cpu() / rho))
    assert (plan.sum(1) - target).abs().sum().item() <= res.marginal_error + 1e-6
    # apply: barycentric transfer without the plan
    v = torch.randn(m, 4, dtype=torch.float64)
    want = (plan @ v) / plan.sum(1, keepdim=True)
    torch.testing.assert_close(res.apply(v.float().to(DEVICE)).double().cpu(), want, atol=1e-4, rtol=0)


def test_small_eps_cost_approaches_exact_ot():
    x, y, _, _ = problem(40, 40, 3, 3, True)
    C = ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1).numpy()
    exact = ot.emd2(np.full(40, 1 / 40), np.full(40, 1 / 40), C)
    res = sinkhorn(x, y, eps=1e-3, tol=1e-5, max_iter=5000, backend="torch")
    assert res.cost == pytest.approx(exact, rel=2e-2)
    assert res.cost >= exact * (1 - 1e-6)                    # the exact optimum is a lower bound


def test_float64_reference_potentials():
    """Against plain alternating log-domain Sinkhorn in float64 (potentials up to a constant)."""
    x, y, a, b = problem(70, 50, 3, 4, False)
    eps = 0.05
    C = ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1)
    f, g = torch.zeros(70, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    for _ in range(20000):
        g = -eps * torch.logsumexp(torch.log(a.double())[:, None] + (f[:, None] - C) / eps, 0)
        f = -eps * torch.logsumexp(torch.log(b.double())[None] + (g[None] - C) / eps, 1)
    res = sinkhorn(x, y, a, b, eps=eps, tol=1e-7, backend="torch")
    shift = (res.f.double() - f).mean()
    torch.testing.assert_close(res.f.double() - shift, f, atol=2e-5 * 1, rtol=0)
    torch.testing.assert_close(res.g.double() + shift, g, atol=2e-5, rtol=0)


def test_warm_start_same_solution_fewer_iterations():
    x, y, _, _ = problem(80, 90, 3, 5, True)
    cold = sinkhorn(x, y, eps=0.01, tol=1e-5, backend="torch")
    moved = x + 0.002 * torch.randn_like(x)
    ref = sinkhorn(moved, y, eps=0.01, tol=1e-5, backend="torch")
    warm = sinkhorn(moved, y, eps=0.01, tol=1e-5, init=(cold.f, cold.g), backend="torch")
    assert warm.iterations < ref.iterations
    assert warm.cost == pytest.approx(ref.cost, rel=1e-4)


def test_bad_input_is_rejected_with_a_reason():
    x = torch.rand(5, 3)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(x, x, eps=0)
    with pytest.raises(ValueError, match=r"\(n, 2\) or \(n, 3\)"):
        sinkhorn(torch.rand(5, 4), x, eps=0.1)
    with pytest.raises(ValueError, match="positive"):
        sinkhorn(x, x, torch.tensor([1.0, 0, 1, 1, 1]), eps=0.1)
    with pytest.raises(ValueError, match="backend"):
        sinkhorn(x, x, eps=0.1, backend="cuda")


def test_over_relaxation_falls_back_instead_of_diverging():
    """omega close to 2 overshoots on a hard unbalanced problem: the solver must still converge."""
    x, y, _, _ = problem(60, 80, 3, 6, True)
    y = torch.cat([y, y[:10] + 3.0])                          # far outliers: large unbalanced potentials
    res = sinkhorn(x, y, eps=0.005, rho=0.05, tol=1e-4, omega=1.99, max_iter=3000, backend="torch")
    assert res.marginal_error < 1e-4
    plain = sinkhorn(x, y, eps=0.005, rho=0.05, tol=1e-4, omega=1.0, max_iter=3000, backend="torch")
    assert res.cost == pytest.approx(plain.cost, rel=1e-3)
