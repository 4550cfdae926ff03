"""The soft-min kernels (Triton: on the GPU, else Triton's CPU interpreter) against float64 references."""
import pytest
import torch

from ros_ot_fusion.kernels import lists as lists_module
from ros_ot_fusion.kernels.lists import select_torch, select_triton, softmin_lists_torch, softmin_lists_triton
from ros_ot_fusion.kernels.softmin import (balanced_order, barycenter_torch, barycenter_triton,
                                           iterations_triton, needs_exact, softmin_torch, softmin_triton)
from ros_ot_fusion.ot.layout import Layout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cloud(n, seed, offset=30.0, spread=1.0):
    """Points on a wavy sheet metres from the origin (the hard case for float32 costs), Z-ordered."""
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(n, 2, generator=g) * spread
    z = 0.2 * spread * torch.sin(3 * uv[:, 0] / spread)
    p = torch.cat([uv, z[:, None]], 1) + 0.01 * torch.randn(n, 3, generator=g) + offset
    return p


def laid_out(n, seed, block, **kw):
    lay = Layout.build(cloud(n, seed, **kw), None, block)
    return lay.pts.to(DEVICE), lay


def reference(x, y, h, eps, pairs=None, block=None):
    """float64 soft-min from exact differences; block pairs outside `pairs` masked out."""
    X, Y, H = x.double().t().cpu(), y.double().t().cpu(), h.double().cpu()
    logits = H[None] - ((X[:, None] - Y[None]) ** 2).sum(-1) / eps
    if pairs is not None:
        row_ptr, cols = (t.cpu().long() for t in pairs)
        mask = torch.zeros(len(X) // block, len(Y) // block, dtype=torch.bool)
        for i in range(len(row_ptr) - 1):
            mask[i, cols[row_ptr[i]:row_ptr[i + 1]]] = True
        mask = mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
        logits = logits.masked_fill(~mask, -torch.inf)
    return -eps * torch.logsumexp(logits, 1), logits


def random_pairs(nb, mb, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(nb, mb, generator=g) < 0.5
    keep[torch.arange(nb), torch.randint(0, mb, (nb,), generator=g)] = True   # no empty row block
    keep[torch.randint(0, nb, (mb,), generator=g), torch.arange(mb)] = True   # nor column block
    rows, cols = keep.nonzero(as_tuple=True)
    row_ptr = torch.zeros(nb + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=nb), 0)
    return row_ptr.to(DEVICE), cols.int().to(DEVICE)


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_column_weights_and_relaxation_match_the_plain_update(sparse):
    """softmin_triton(pot=g, relax=(prev, lam, omega)) is the update a solver would otherwise
    write as three steps: h = logw + g / eps, soft = softmin(h), prev + omega (lam soft - prev)."""
    block, eps, lam, omega = 64, 1e-2, 0.9, 1.6
    x, _ = laid_out(192, 5, block)
    y, _ = laid_out(256, 6, block)
    gen = torch.Generator().manual_seed(7)
    logw = torch.log(torch.rand(256, generator=gen) + 0.1).to(DEVICE)
    logw[-7:] = -torch.inf
    g, prev = (0.01 * torch.randn(k, generator=gen).to(DEVICE) for k in (256, 192))
    pairs = random_pairs(3, 4, 8) if sparse else None
    want, _ = reference(x, y, logw + g / eps, eps, pairs, block)
    soft, relaxed = softmin_triton(x, y, logw, eps, pairs, block, pot=g, relax=(prev, lam, omega))
    assert float((soft.double().cpu() - want).abs().max()) / eps < 1e-4
    want_relaxed = prev.double().cpu() + omega * (lam * want - prev.double().cpu())
    assert float((relaxed.double().cpu() - want_relaxed).abs().max()) / eps < 2e-4


@pytest.mark.parametrize("eps", [1.0, 1e-2, 1e-3])
@pytest.mark.parametrize("sparse", [False, True])
def test_softmin_matches_float64(eps, sparse):
    block = 64
    x, lx = laid_out(192, 1, block)
    y, ly = laid_out(256, 2, block)
    h = torch.randn(256, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    h[-7:] = -torch.inf                                     # padding carries h = -inf
    pairs = random_pairs(3, 4, 4) if sparse else None
    want, _ = reference(x, y, h, eps, pairs, block)
    for fn in (softmin_triton, softmin_torch):
        for exact in (True, False):
            got = fn(x, y, h, eps, pairs, block, exact).double().cpu()
            # error in the exponent: exact ~ float32 rounding of C/eps; expanded ~ 1e-7 extent^2/eps
            # (of the column blocks for the kernel, of the row blocks for the torch reference)
            bound = 1e-5 * max(1.0, 0.1 / eps) if exact else 1e-5 + 3e-7 * max(lx.extent2, ly.extent2) / eps
            err = ((got - want).abs() / eps).max().item()
            assert err < bound, (fn.__name__, exact, err, bound)


@pytest.mark.parametrize("sparse", [False, True])
def test_torch_softmin_scaled_by_a_guess_matches_float64(sparse):
    """The torch soft-min scaled by guessed log-sums: right whatever the guess, since row blocks
    whose sums left range are redone (guesses 0-1000 off, inf, NaN; an unchecked guess 60 off
    would overflow or lose the row)."""
    block, eps = 64, 1e-2
    x, _ = laid_out(192, 1, block)
    y, _ = laid_out(256, 2, block)
    h = torch.randn(256, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    h[-7:] = -torch.inf
    pairs = random_pairs(3, 4, 4) if sparse else None
    want, _ = reference(x, y, h, eps, pairs, block)
    lse = (want / -eps).to(DEVICE)
    gen = torch.Generator().manual_seed(5)
    for off in (0.0, 5.0, 60.0, 1000.0):
        guess = lse + off * torch.randn(192, generator=gen, dtype=lse.dtype).to(DEVICE)
        guess[-1] = (torch.nan, torch.inf, -torch.inf, 0.0)[int(off) % 4]
        got = softmin_torch(x, y, h, eps, pairs, block, guess=guess.float()).double().cpu()
        err = ((got - want).abs() / eps).max().item()
        assert err < 1e-4, (off, err)     # float32 rounding of C / eps, as in the exact test


def test_expanded_form_needs_centring_to_be_exact():
    """The reason for centring: un-centred, metre-scale coordinates lose the cost entirely."""
    assert needs_exact(extent2=1.0, eps=1e-4) and not needs_exact(extent2=0.01, eps=1e-3)


@pytest.mark.parametrize("sparse", [False, True])
def test_barycenter_matches_float64_plan(sparse, monkeypatch):
    """Both backends; the torch one also a pair at a time (its running merge across chunks)."""
    import ros_ot_fusion.kernels.softmin as sm
    block, eps = 64, 0.01
    x, _ = laid_out(128, 5, block)
    y, _ = laid_out(192, 6, block)
    h = torch.randn(192, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    v = torch.randn(192, 5, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    pairs = random_pairs(2, 3, 9) if sparse else None
    _, logits = reference(x, y, h, eps, pairs, block)
    plan = torch.softmax(logits, 1)
    cost = ((x.double().t().cpu()[:, None] - y.double().t().cpu()[None]) ** 2).sum(-1)
    whole = sm.pair_costs
    one_pair = lambda x, y, pairs, block: whole(x, y, pairs, block, block * block)  # noqa: E731
    for fn, chunked in ((barycenter_triton, False), (barycenter_torch, False), (barycenter_torch, True)):
        if chunked:
            monkeypatch.setattr(sm, "pair_costs", one_pair)
        lse, mean_v, mean_c = (t.double().cpu() for t in fn(x, y, h, eps, v, pairs, block))
        torch.testing.assert_close(lse, torch.logsumexp(logits, 1), rtol=0, atol=1e-3)
        torch.testing.assert_close(mean_v, plan @ v.double().cpu(), rtol=0, atol=1e-4)
        torch.testing.assert_close(mean_c, (plan * cost).sum(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("split", [1, 2, 4])
def test_columns_split_over_programs_give_the_same_softmin(split):
    block = 64
    x, _ = laid_out(128, 12, block)
    y, _ = laid_out(320, 13, block)                       # 5 column blocks: uneven shares
    h = torch.randn(320, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    pairs = random_pairs(2, 5, 15)
    for p in (None, pairs):
        want = softmin_triton(x, y, h, 0.05, p, block, config=(64, 32, 2, 1, True))
        got = softmin_triton(x, y, h, 0.05, p, block, config=(64, 32, 2, split, True))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_all_pairs_sparse_equals_dense():
    block = 64
    x, _ = laid_out(128, 10, block)
    y, _ = laid_out(192, 11, block)
    h = torch.randn(192).to(DEVICE)
    everything = (torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE),
                  torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32, device=DEVICE))
    dense = softmin_triton(x, y, h, 0.05, None, block)
    sparse = softmin_triton(x, y, h, 0.05, everything, block)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-6)


def reference_iterations(x, y, lx, ly, f, g, eps, lam, omega, k, pairs=None, block=None):
    """`sinkhorn.iterations` in float64: (f, g, f_soft), the last f update left undone;
    pairs: (CSR x -> y, CSR y -> x) block pairs, or None (dense)."""
    f, g, lx, ly = (t.double().cpu() for t in (f, g, lx, ly))
    xy, yx = pairs if pairs is not None else (None, None)
    for i in range(k):
        g = g + omega * (lam * reference(y, x, lx + f / eps, eps, yx, block)[0] - g)
        soft = reference(x, y, ly + g / eps, eps, xy, block)[0]
        if i < k - 1:
            f = f + omega * (lam * soft - f)
    return f, g, soft


# on the GPU the sizes give every multiprocessor's program one or two row tiles of each side
SIZES = (3000, 5000) if DEVICE == "cuda" else (150, 230)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("rho, start, block", [(None, 0.01, 64), (0.05, 0.01, 64), (None, 2.0, 64),
                                               (None, 0.01, 32), (0.05, 0.01, 128)])
def test_iterations_in_one_launch_match_float64(sparse, exact, rho, start, block):
    """The persistent kernel (programs waiting for each other between half-iterations), dense or
    over random block pairs, against k float64 iterations; run again, it must give the same
    bits (a missed wait would not). Blocks of 32 (one column tile a block) to 128 (the GPU default).
    Potentials starting 200 eps off are far from their soft-mins, so sums scaled by a guess
    from them leave their range: those tiles must be redone with a running maximum."""
    eps, omega, k = 1e-2, 1.6, 4
    lam = 1.0 if rho is None else rho / (rho + eps)
    (n, m), gen = SIZES, torch.Generator().manual_seed(21)
    x, _ = laid_out(n, 22, block)
    y, ly = laid_out(m, 23, block, offset=30.05)
    lx = torch.full((x.shape[1],), -torch.inf)
    lx[:n] = -torch.log(torch.tensor(float(n)))
    lx, wy = lx.to(DEVICE), ly.logw.to(DEVICE)
    f, g = (start * torch.randn(p.shape[1], generator=gen).to(DEVICE) for p in (x, y))
    pairs = None
    if sparse:
        nb, mb = x.shape[1] // block, y.shape[1] // block
        xy = random_pairs(nb, mb, 24)
        pairs = (xy, transpose(xy, nb, mb))
    want = reference_iterations(x, y, lx, wy, f, g, eps, lam, omega, k, pairs, block)
    runs = [iterations_triton(x, y, lx, wy, f, g, eps, lam, omega, k, block, pairs,
                              exact_above=0.0 if exact else float("inf"))
            for _ in range(5 if DEVICE == "cuda" else 1)]
    for got in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, runs[0]))
    for a, b in zip(runs[0], want):
        err = float((a.double().cpu() - b).abs().max()) / eps
        # float32 potentials of 1000 eps (the far start) carry ~1e-3 eps of rounding
        assert err < (1e-4 if exact else 1e-3) + 4e-6 * float(b.abs().max()) / eps, err


def test_one_launch_chooses_the_cost_form_tile_by_tile():
    """Rows on a 1 m sheet and on a 24 m one (sparse, so its 32-row tiles span metres), against
    columns on both: the wide tiles need the exact form, the compact ones do not. Choosing per
    tile must be as accurate as exact everywhere, where the 3-FMA form everywhere is not. (From
    nearly settled potentials: far from them every tile is redone, in the exact form.)"""
    block, eps, lam, omega, k = 64, 3e-3, 1.0, 1.6, 2
    n = 1024 if DEVICE == "cuda" else 256
    pts = lambda seed: torch.cat([cloud(n, seed), cloud(n // 2, seed + 1, spread=24.0)])  # noqa: E731
    x, y = (Layout.build(pts(s), None, block) for s in (31, 33))
    X, Y, lx, ly = x.pts.to(DEVICE), y.pts.to(DEVICE), x.logw.to(DEVICE), y.logw.to(DEVICE)
    f, g, _ = reference_iterations(X, Y, lx, ly, torch.zeros(x.n_pad), torch.zeros(y.n_pad), eps, lam, 1.0, 8)
    f, g = f.float().to(DEVICE), g.float().to(DEVICE)
    want = reference_iterations(X, Y, lx, ly, f, g, eps, lam, omega, k)
    err = {}
    for mode, above in (("exact", 0.0), ("per tile", 1e3), ("3-FMA", float("inf"))):
        got = iterations_triton(X, Y, lx, ly, f, g, eps, lam, omega, k, block, exact_above=above)
        err[mode] = max(float((a.double().cpu() - b).abs().max()) / eps for a, b in zip(got, want))
    assert err["per tile"] < 2 * err["exact"] + 1e-4 and err["3-FMA"] > 10 * err["per tile"], err


def test_balanced_order_deals_every_tile_once_and_evens_the_work():
    """Row blocks whose pair counts grow along storage order (as a Morton-sorted scene's do
    where it gets dense): dealt out in storage order, the last program gets the most."""
    work = torch.arange(1, 301) ** 2                          # 1200 tiles: ~9 rounds of 132
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(work, 0)]).int()
    order = balanced_order(row_ptr, 4, 132).long()
    assert torch.equal(order.sort().values, torch.arange(1200))
    tiles = work.repeat_interleave(4).double()

    def busiest(o):
        per = torch.zeros(132, dtype=torch.double).index_add_(0, torch.arange(1200) % 132, tiles[o])
        return float(per.max() / per.mean())
    assert busiest(order) < 1.03 and busiest(torch.arange(1200)) > 1.15     # measured 1.023, 1.165


def transpose(pairs, nb, mb):
    row_ptr, cols = (t.cpu().long() for t in pairs)
    keep = torch.zeros(nb, mb, dtype=torch.bool)
    for i in range(nb):
        keep[i, cols[row_ptr[i]:row_ptr[i + 1]]] = True
    r, c = keep.t().nonzero(as_tuple=True)
    ptr = torch.zeros(mb + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(torch.bincount(r, minlength=mb), 0)
    return ptr.to(DEVICE), c.int().to(DEVICE)


def point_lists_case(seed, eps):
    """Rows x, columns y (32-point blocks), weights with padding, random block pairs both ways."""
    block = 32
    x, _ = laid_out(160, seed, block, spread=0.3)
    y, _ = laid_out(224, seed + 1, block, spread=0.3)
    gen = torch.Generator().manual_seed(seed + 2)
    logw_x, logw_y = (torch.log(torch.rand(k, generator=gen) + 0.1).to(DEVICE) for k in (160, 224))
    logw_x[-3:], logw_y[-5:] = -torch.inf, -torch.inf
    f, g = (0.01 * torch.randn(k, generator=gen).to(DEVICE) for k in (160, 224))
    pairs = random_pairs(5, 7, seed + 3)
    return block, x, y, logw_x, logw_y, f, g, pairs, transpose(pairs, 5, 7)


@pytest.mark.parametrize("tau", [4.0, 12.0])
def test_point_lists_keep_the_entries_near_their_rows_or_columns_largest(tau):
    """Within the block pairs, an entry is kept exactly when it is within tau of its row's largest
    term or of its column's (float64 decides, up to float32 rounding at the threshold); the two
    groupings hold one set; both backends."""
    eps = 2e-3
    block, x, y, logw_x, logw_y, f, g, pairs, pairs_t = point_lists_case(20, eps)
    hx, hy = logw_x + f / eps, logw_y + g / eps
    _, s = reference(x, y, hy, eps, pairs, block)
    _, t = reference(y, x, hx, eps, pairs_t, block)
    t = t.t()
    def near(v, bound, dim):
        return v >= v.max(dim, keepdim=True).values - tau + bound
    must = near(s, 1e-3, 1) | near(t, 1e-3, 0)
    may = near(s, -1e-3, 1) | near(t, -1e-3, 0)
    for fn in (select_triton, select_torch):
        by_row, by_col = fn(x, y, hx, hy, eps, pairs, pairs_t, block, tau)
        kept = []
        for lists, shape, flip in ((by_row, s.shape, False), (by_col, s.shape[::-1], True)):
            rows, cols = (v.cpu() for v in lists.rows())
            k = torch.zeros(shape, dtype=torch.bool)
            k[rows, cols] = True
            assert len(rows) == lists.entries == int(k.sum())               # no entry twice
            kept.append(k.t() if flip else k)
        assert torch.equal(kept[0], kept[1]), fn.__name__                  # one set, two groupings
        assert bool((kept[0] | ~must).all()) and bool((may | ~kept[0]).all()), fn.__name__
        assert int(by_row.count[:157].min()) >= 1 and int(by_col.count[:219].min()) >= 1


@pytest.mark.parametrize("eps, work", [(1e-2, 256), (1e-3, 256), (1e-3, 32)])
def test_softmin_over_point_lists_matches_float64(eps, work, monkeypatch):
    """The soft-min over each row's list (and the fused weights and relaxation) against float64
    over the same entries; with lists holding whole block pairs it is the block-pair soft-min.
    work=32: rows of up to 224 entries are shared by up to 7 programs, merged by the combine."""
    monkeypatch.setattr(lists_module, "LIST_WORK", work)
    lam, omega = 0.9, 1.6
    block, x, y, logw_x, logw_y, f, g, pairs, pairs_t = point_lists_case(24, eps)
    hx, hy = logw_x + f / eps, logw_y + g / eps
    for tau in (6.0, 1e6):
        lists = select_triton(x, y, hx, hy, eps, pairs, pairs_t, block, tau)[0]
        rows, cols = (t.cpu() for t in lists.rows())
        _, logits = reference(x, y, hy, eps, pairs, block)
        kept = torch.full_like(logits, -torch.inf)
        kept[rows, cols] = logits[rows, cols]
        want = -eps * torch.logsumexp(kept, 1)
        soft, relaxed = softmin_lists_triton(x, y, logw_y, eps, lists, pot=g, relax=(f, lam, omega))
        for got in (soft, softmin_lists_torch(x, y, hy, eps, lists)):
            assert float((got.double().cpu() - want).abs().max()) / eps < 1e-4
        want_relaxed = f.double().cpu() + omega * (lam * want - f.double().cpu())
        assert float((relaxed.double().cpu() - want_relaxed).abs().max()) / eps < 2e-4
    whole = softmin_triton(x, y, hy, eps, pairs, block)
    torch.testing.assert_close(soft, whole, rtol=0, atol=1e-4 * eps)


def test_plane_fit_matches_the_float64_eigenproblem_and_the_torch_fit():
    """Normals and planarity of voxel centroids (planes, a pole, a blob, stray points, metres from
    the origin) against float64 eigh of each query's 3x3x3-cell covariance, gathered by brute force;
    Triton and torch agree on the sign too (one rule picks the eigenvector)."""
    import numpy as np

    from ros_ot_fusion.fusion.align import normals

    seed = int(np.random.default_rng().integers(1 << 30))
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(2, 1500, generator=g) * 4
    floor = torch.stack([a, b, 0.02 * torch.randn(1500, generator=g)], 1)
    wall = torch.stack([a, 0.01 * torch.randn(1500, generator=g), b], 1) + torch.tensor([0.0, 3.0, 0.0])
    pole = torch.stack([0.01 * torch.randn(200, generator=g), 0.01 * torch.randn(200, generator=g),
                        torch.rand(200, generator=g) * 3], 1) + torch.tensor([1.0, 1.0, 0.2])
    blob = torch.randn(300, 3, generator=g) * 0.3 + torch.tensor([3.0, 1.5, 1.0])
    stray = torch.rand(20, 3, generator=g) * 12 - 4
    p = torch.cat([floor, wall, pole, blob, stray]) + torch.tensor([30.0, -20.0, 1.5])
    at = torch.randperm(len(p), generator=g)[:400]
    radius = 0.4
    got = normals(p.to(DEVICE), radius, at.to(DEVICE), "triton")
    ref = normals(p.to(DEVICE), radius, at.to(DEVICE), "torch")
    n_got, pl_got = (t.cpu().double() for t in got)
    n_ref, pl_ref = (t.cpu().double() for t in ref)
    # float64 eigh of the covariance of the points in the 27 cells around each query point; cells
    # as the fit defines them, in float32 (p / radius rounds to the other side of an integer in
    # float64 for a point such as y = -19.6: seed 406061723)
    cell = torch.floor(p / radius).double()
    near = ((cell[None, :] - cell[at][:, None]).abs() <= 1).all(-1).double()          # (q, n)
    count = near.sum(1)
    pd = p.double() - p.double().mean(0)
    mean = near @ pd / count[:, None]
    cov = torch.einsum("qn,ni,nj->qij", near, pd, pd) / count[:, None, None] - mean[:, :, None] * mean[:, None, :]
    evals, evecs = torch.linalg.eigh(cov)
    gap = (evals[:, 1] - evals[:, 0]) / evals[:, 2]
    want = torch.where(count >= 5, gap.clamp(0, 1), torch.zeros_like(gap))
    for normal, planarity in ((n_got, pl_got), (n_ref, pl_ref)):
        assert float((planarity - want).abs().max()) < 1e-4, seed
        assert torch.allclose(normal.norm(dim=1), torch.ones(len(at), dtype=torch.float64), atol=1e-6)
        residual = (cov @ normal[:, :, None])[..., 0] - evals[:, :1] * normal          # C n = l_min n
        assert float((residual.norm(dim=1) / evals[:, 2].clamp_min(1e-12)).max()) < 1e-4, seed
    plane = gap > 1e-3
    assert int(plane.sum()) > 200
    assert bool(((n_got * n_ref).sum(1)[plane] > 1 - 1e-6).all()), seed
