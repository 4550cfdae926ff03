"""Soft-min (c-transform) of squared Euclidean cost, dense or block-sparse: the one kernel of the solver.

    softmin_i = -eps * log sum_j exp(h_j - |x_i - y_j|^2 / eps)

Every Sinkhorn update is one of these (h_j = log b_j + g_j / eps), and so is every
initialisation of fine potentials from coarse ones. `barycenter` is the same pass with an
extra accumulator: the plan-weighted means of values v_j and of the cost (transport of
colours, barycentric targets, transport cost) without materialising the plan.

Layout. Points are stored transposed, (3, n) float32, and padded to a multiple of `block`
points; padding carries h = -inf and finite coordinates. Block-sparse calls take a CSR list
of block pairs, (row_ptr, cols): row block I meets column blocks cols[row_ptr[I]:row_ptr[I+1]].

Numerics. Each program centres its rows and the column tiles on its first row point c, and
evaluates -C_ij/eps = -(|x'|^2 + |y'|^2 - 2 x'.y')/eps with x' = x - c, y' = y - c: the
expanded form costs 3 FMAs per pair, and centring keeps it exact to float32 rounding of
|y'|^2, which for pairs that matter is about C_ij itself (metre-scale coordinates broke the
un-centred form; see the design notes). Exponentials are base 2 with an online maximum
(the attention trick), so a pair costs 3 FMA + max + sub + add + one ex2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: keeps exp2(a - b) free of NaN


@triton.jit
def _exp2(x, FTZ: tl.constexpr):
    if FTZ:     # the bare special-function instruction, denormals flushed (GPU only)
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _load_tile(Y, H, m_pad, j0, c0, c1, c2, l2e, BLOCK_N: tl.constexpr):
    """A column tile as [1, BLOCK_N] tensors (2-D from the start: no layout conversions)."""
    cols = j0 + tl.arange(0, BLOCK_N)[None, :]
    y0 = tl.load(Y + cols) - c0
    y1 = tl.load(Y + m_pad + cols) - c1
    y2 = tl.load(Y + 2 * m_pad + cols) - c2
    return cols, y0, y1, y2, tl.load(H + cols) * l2e


@triton.jit
def _rows(X, n_pad, pid, BLOCK_M: tl.constexpr):
    """A row tile as [BLOCK_M, 1] tensors, centred on its first point c."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    c0 = tl.load(X + pid * BLOCK_M)
    c1 = tl.load(X + n_pad + pid * BLOCK_M)
    c2 = tl.load(X + 2 * n_pad + pid * BLOCK_M)
    x0 = tl.load(X + rows) - c0
    x1 = tl.load(X + n_pad + rows) - c1
    x2 = tl.load(X + 2 * n_pad + rows) - c2
    return rows, c0, c1, c2, x0, x1, x2


@triton.jit
def _tile_origin(COLS, start, t, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr):
    """First column of the t-th column tile of this row block."""
    if SPARSE:
        return tl.load(COLS + start + t // (BLOCK // BLOCK_N)) * BLOCK + (t % (BLOCK // BLOCK_N)) * BLOCK_N
    else:
        return t * BLOCK_N


@triton.jit
def _tile_count(ROW_PTR, pid, m_pad, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, SPARSE: tl.constexpr):
    """(first pair, number of column tiles) for this program's row block."""
    if SPARSE:
        blk = (pid * BLOCK_M) // BLOCK
        start = tl.load(ROW_PTR + blk)
        return start, (tl.load(ROW_PTR + blk + 1) - start) * (BLOCK // BLOCK_N)
    else:
        return 0, m_pad // BLOCK_N


@triton.jit
def _softmin_kernel(X, Y, H, OUT, ROW_PTR, COLS, n_pad, m_pad, scale, l2e,
                    SPARSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, FTZ: tl.constexpr, EXACT: tl.constexpr):
    pid = tl.program_id(0)
    rows, c0, c1, c2, x0, x1, x2 = _rows(X, n_pad, pid, BLOCK_M)
    a0 = 2.0 * scale * x0
    a1 = 2.0 * scale * x1
    a2 = 2.0 * scale * x2
    xx = scale * (x0 * x0 + x1 * x1 + x2 * x2)
    m_i = tl.full([BLOCK_M, 1], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M, 1], tl.float32)
    start, n_tiles = _tile_count(ROW_PTR, pid, m_pad, BLOCK, BLOCK_M, BLOCK_N, SPARSE)
    for t in range(n_tiles):
        j0 = _tile_origin(COLS, start, t, BLOCK, BLOCK_N, SPARSE)
        cols, y0, y1, y2, hq = _load_tile(Y, H, m_pad, j0, c0, c1, c2, l2e, BLOCK_N)
        if EXACT:       # s = h - C/eps from exact differences (6 ops a pair)
            d0 = x0 - y0
            d1 = x1 - y1
            d2 = x2 - y2
            s = hq - scale * (d0 * d0 + d1 * d1 + d2 * d2)
        else:           # expanded, centred: s + |x'|^2 scale = q_j + a_i . y'_j (3 FMAs a pair)
            q = hq - scale * (y0 * y0 + y1 * y1 + y2 * y2)
            s = q + a0 * y0 + a1 * y1 + a2 * y2
        m_new = tl.maximum(m_i, tl.max(s, axis=1, keep_dims=True))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(_exp2(s - m_new, FTZ), axis=1, keep_dims=True)
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)
    if not EXACT:
        lse2 = lse2 - xx
    tl.store(OUT + rows, -lse2 / scale)


@triton.jit
def _barycenter_kernel(X, Y, H, V, LSE, MEAN_V, MEAN_C, ROW_PTR, COLS, n_pad, m_pad, scale, l2e,
                       K: tl.constexpr, KP: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows, c0, c1, c2, x0, x1, x2 = _rows(X, n_pad, pid, BLOCK_M)
    ks = tl.arange(0, KP)[None, :]
    m_i = tl.full([BLOCK_M, 1], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M, 1], tl.float32)
    acc_c = tl.zeros([BLOCK_M, 1], tl.float32)
    acc_v = tl.zeros([BLOCK_M, KP], tl.float32)
    start, n_tiles = _tile_count(ROW_PTR, pid, m_pad, BLOCK, BLOCK_M, BLOCK_N, SPARSE)
    for t in range(n_tiles):
        j0 = _tile_origin(COLS, start, t, BLOCK, BLOCK_N, SPARSE)
        cols, y0, y1, y2, hq = _load_tile(Y, H, m_pad, j0, c0, c1, c2, l2e, BLOCK_N)
        d0 = x0 - y0
        d1 = x1 - y1
        d2 = x2 - y2
        cost = d0 * d0 + d1 * d1 + d2 * d2            # exact differences: this pass is not hot
        s = hq - scale * cost
        m_new = tl.maximum(m_i, tl.max(s, axis=1, keep_dims=True))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(V + tl.reshape(cols, [BLOCK_N, 1]) * K + ks, mask=ks < K, other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1, keep_dims=True)
        acc_c = acc_c * alpha + tl.sum(p * cost, axis=1, keep_dims=True)
        acc_v = acc_v * alpha + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    tl.store(LSE + rows, (m_i + tl.log2(l_i)) / l2e)
    tl.store(MEAN_C + rows, acc_c / l_i)
    tl.store(MEAN_V + rows * K + ks, acc_v / l_i, mask=ks < K)


def _config(n_pad: int, block: int, device) -> tuple[int, int, int, bool]:
    """Pinned kernel configuration (BLOCK_M, BLOCK_N, num_warps, ftz); never autotuned on the hot path.

    Measured on an H100 at 65536^2 (bench/bench_softmin.py --sweep): 128 x 32 tiles with 4 warps
    are fastest by 30% or more; shorter row tiles fill the GPU for small problems.
    """
    bm = 128 if n_pad >= 32768 else 64 if n_pad >= 8192 else 32
    return min(bm, block), min(32, block), 4, device.type == "cuda"


def needs_exact(extent2: float, eps: float) -> bool:
    """Whether the 3-FMA expanded cost loses more than ~1e-4 in the exponent.

    Its error is about 1e-7 * extent2 / eps, extent2 being the squared size of a row tile.
    """
    return extent2 / eps > 1e3


def _check(x, y, h, block):
    assert x.dim() == 2 and x.shape[0] == 3 and y.shape[0] == 3, "points are (3, n)"
    assert x.shape[1] % block == 0 and y.shape[1] % block == 0, "pad points to the block size"
    assert h.shape == (y.shape[1],)


def softmin_triton(x, y, h, eps: float, pairs=None, block: int = 128, exact: bool = True, config=None):
    """exact: cost from differences (else the 3-FMA expanded form, see needs_exact).
    config: (BLOCK_M, BLOCK_N, num_warps, ftz, exact) overrides the pinned choice (benchmarks)."""
    _check(x, y, h, block)
    n_pad, m_pad = x.shape[1], y.shape[1]
    bm, bn, warps, ftz, exact = config or (*_config(n_pad, block, x.device), exact)
    out = torch.empty(n_pad, device=x.device, dtype=torch.float32)
    row_ptr, cols = pairs if pairs is not None else (out, out)   # unused when dense
    _softmin_kernel[(n_pad // bm,)](x, y, h, out, row_ptr, cols, n_pad, m_pad, LOG2E / eps, LOG2E,
                                    SPARSE=pairs is not None, BLOCK=block, BLOCK_M=bm, BLOCK_N=bn,
                                    FTZ=ftz, EXACT=exact, num_warps=warps)
    return out


def barycenter_triton(x, y, h, eps: float, v, pairs=None, block: int = 128):
    _check(x, y, h, block)
    n_pad, m_pad = x.shape[1], y.shape[1]
    k = v.shape[1]
    bm, bn = 32, min(32, block)
    lse = torch.empty(n_pad, device=x.device, dtype=torch.float32)
    mean_c = torch.empty_like(lse)
    mean_v = torch.empty(n_pad, k, device=x.device, dtype=torch.float32)
    row_ptr, cols = pairs if pairs is not None else (lse, lse)
    _barycenter_kernel[(n_pad // bm,)](x, y, h, v.contiguous(), lse, mean_v, mean_c, row_ptr, cols,
                                       n_pad, m_pad, LOG2E / eps, LOG2E, K=k,
                                       KP=max(16, triton.next_power_of_2(k)),
                                       SPARSE=pairs is not None, BLOCK=block, BLOCK_M=bm, BLOCK_N=bn)
    return lse, mean_v, mean_c


# ----------------------------------------------------------------------------------------------
# torch reference: the same functions, same layout, plain tensor code (CPU fallback and tests)
# ----------------------------------------------------------------------------------------------

def _pair_costs(xb, yb):
    """(P, B, 3) x (P, B, 3) -> (P, B, B) squared distances, centred on each x block's first point."""
    c = xb[:, :1, :]
    xc, yc = xb - c, yb - c
    return ((xc * xc).sum(-1)[:, :, None] + (yc * yc).sum(-1)[:, None, :]
            - 2 * torch.bmm(xc, yc.transpose(1, 2))).clamp_min_(0)


def _pair_index(nb_x, nb_y, pairs, device):
    """(row block, column block) of every pair, dense when pairs is None."""
    if pairs is None:
        rows = torch.arange(nb_x, device=device).repeat_interleave(nb_y)
        return rows, torch.arange(nb_y, device=device).repeat(nb_x)
    row_ptr, cols = pairs
    rows = torch.repeat_interleave(torch.arange(len(row_ptr) - 1, device=device),
                                   (row_ptr[1:] - row_ptr[:-1]).long())
    return rows, cols.long()


def pair_costs(x, y, pairs=None, block: int = 128, chunk_elems: int = 1 << 22):
    """Squared distances of every block pair: a list of (row blocks (P,), col blocks (P,), C (P,B,B)).

    They depend only on the points and the pairs, not on the potentials: the solver computes
    them once per set of pairs and reuses them across iterations (torch backend).
    """
    xb = x.t().reshape(-1, block, 3)
    yb = y.t().reshape(-1, block, 3)
    rows, cols = _pair_index(len(xb), len(yb), pairs, x.device)
    step = max(1, chunk_elems // (block * block))
    return [(rows[s:s + step], cols[s:s + step], _pair_costs(xb[rows[s:s + step]], yb[cols[s:s + step]]))
            for s in range(0, len(rows), step)]


def _logits(h, cols, cost, eps, block):
    """h_j - C_ij / eps for a chunk of pairs: (P, B, B)."""
    return torch.sub(h.reshape(-1, block)[cols][:, None, :], cost, alpha=1.0 / eps)


def _segment_logsumexp(rows, values, n_blocks):
    """Combine per-pair log-sums (P, B, ...) into per-row-block log-sums (n_blocks, B, ...)."""
    shape = (n_blocks,) + values.shape[1:]
    idx = rows.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    peak = torch.full(shape, -torch.inf, dtype=values.dtype, device=values.device)
    peak.scatter_reduce_(0, idx, values, "amax")
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros(shape, dtype=values.dtype, device=values.device)
    total.index_add_(0, rows, torch.exp(values - safe[rows]))
    return safe + torch.log(total)


def _row_logsumexp(logits):
    """logsumexp over the last axis, in place. Terms under e^-80 of the peak are raised to it:
    a denormal result makes a CPU exp ~10x slower, and B * e^-80 is far below float32 rounding."""
    peak = logits.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return logits.sub_(peak).clamp_min_(-80.0).exp_().sum(-1).log_().add_(peak[..., 0])


def softmin_torch(x, y, h, eps: float, pairs=None, block: int = 128, exact: bool = True, costs=None):
    """costs: pair_costs(x, y, pairs, block), if already computed."""
    _check(x, y, h, block)
    costs = pair_costs(x, y, pairs, block) if costs is None else costs
    rows = torch.cat([r for r, _, _ in costs])
    lse = torch.cat([_row_logsumexp(_logits(h, c, cost, eps, block)) for _, c, cost in costs])
    return -eps * _segment_logsumexp(rows, lse, x.shape[1] // block).reshape(-1)


def barycenter_torch(x, y, h, eps: float, v, pairs=None, block: int = 128):
    _check(x, y, h, block)
    nb, k = x.shape[1] // block, v.shape[1]
    costs = pair_costs(x, y, pairs, block)
    lse = (softmin_torch(x, y, h, eps, pairs, block, costs=costs) / -eps).reshape(nb, block)
    vb = v.reshape(-1, block, k)
    mean_v = torch.zeros(nb, block, k, dtype=x.dtype, device=x.device)
    mean_c = torch.zeros(nb, block, dtype=x.dtype, device=x.device)
    for r, c, cost in costs:
        p = torch.exp(_logits(h, c, cost, eps, block) - lse[r][:, :, None])   # plan rows, normalised
        mean_v.index_add_(0, r, torch.bmm(p, vb[c]))
        mean_c.index_add_(0, r, (p * cost).sum(-1))
    return lse.reshape(-1), mean_v.reshape(-1, k), mean_c.reshape(-1)


def softmin(x, y, h, eps, pairs=None, block=128, backend="torch", exact=True, costs=None):
    """Dispatch: 'triton' runs the GPU kernel (or Triton's interpreter on CPU tensors);
    'torch' reuses `costs` (pair_costs) when given."""
    if backend == "triton":
        return softmin_triton(x, y, h, eps, pairs, block, exact)
    return softmin_torch(x, y, h, eps, pairs, block, exact, costs)


def barycenter(x, y, h, eps, v, pairs=None, block=128, backend="torch"):
    return (barycenter_triton if backend == "triton" else barycenter_torch)(x, y, h, eps, v, pairs, block)

