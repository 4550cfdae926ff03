"""Dense iterations replayed from CUDA graphs against the same iterations launched one by one
(GPU only; skipped without one). A graph is captured once and replayed on other inputs of the
same size, so the second case checks that nothing of the first inputs is baked into it."""
import math

import pytest
import torch

from ros_ot_fusion.ot import graphed
from ros_ot_fusion.ot.layout import Layout
from ros_ot_fusion.ot.sinkhorn import Problem, iterations, sinkhorn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _surface(n, seed, offset=20.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    uv = torch.rand(n, 2, device="cuda", generator=g) * 6
    z = 0.4 * torch.sin(uv[:, 0]) * torch.cos(0.8 * uv[:, 1])
    return torch.cat([uv, z[:, None]], 1) + 0.02 * torch.randn(n, 3, device="cuda", generator=g) + offset


@pytest.mark.parametrize("rho", [None, 0.05])
def test_graph_replays_match_launched_iterations_on_new_inputs(rho):
    graphed._GRAPHS.clear()
    graphed._SEEN.clear()
    eps = 0.01
    # the second problem is smaller but rounds up to the same static sizes: it replays the first's
    # graph, whose buffers still hold the first problem's points beyond its own
    for seed, (n, m) in ((1, (3001, 2500)), (2, (2100, 2300))):
        x, y = _surface(n, seed), _surface(m, 10 + seed)
        w = torch.rand(m, device="cuda") + 0.5
        p = Problem(Layout.build(x, None, 128), Layout.build(y, w / w.sum(), 128), "triton")
        f = 0.01 * torch.randn(p.x.n_pad, device="cuda")
        g = 0.01 * torch.randn(p.y.n_pad, device="cuda")
        want = iterations(p, f, g, eps, rho, 1.6, 5)
        if seed == 1:       # asked for the first time: launched, nothing captured
            graphed.graphed_iterations(p, f, g, eps, rho, 1.6, 5)
            assert len(graphed._GRAPHS) == 0
        got = graphed.graphed_iterations(p, f, g, eps, rho, 1.6, 5)
        assert len(graphed._GRAPHS) == 1
        for a, b in zip(got[:3], want[:3]):
            ok = torch.isfinite(b)
            assert torch.equal(ok, torch.isfinite(a))
            assert float((a[ok] - b[ok]).abs().max()) / eps < 1e-4
        assert math.isclose(float(got[3]), float(want[3]), rel_tol=1e-3)


def test_dense_solve_with_graphs_is_the_solve_without():
    x, y = _surface(4096, 3), _surface(4096, 4)
    runs = [sinkhorn(x, y, eps=0.01, rho=0.1, tol=1e-5, max_iter=400, cuda_graphs=on) for on in (False, True)]
    assert runs[0].iterations == runs[1].iterations < 400
    assert float((runs[0].f - runs[1].f).abs().max()) / 0.01 < 1e-3
    assert runs[1].marginal_error < 1e-5
