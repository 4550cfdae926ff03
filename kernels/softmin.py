"""Soft-min (c-transform) of squared Euclidean cost, dense or block-sparse: the one kernel of the solver.

    softmin_i = -eps * log sum_j exp(h_j - |x_i - y_j|^2 / eps)

Every Sinkhorn update is one of these (h_j = log b_j + g_j / eps), and so is every
initialisation of fine potentials from coarse ones. `barycenter` is the same pass with an
extra accumulator: the plan-weighted means of values v_j and of the cost (transport of
colours, barycentric targets, transport cost) without materialising the plan.

Layout. Points are stored transposed, (3, n) float32, and padded to a multiple of `block`
points; padding carries h = -inf and finite coordinates. Block-sparse calls take a CSR list
of block pairs, (row_ptr, cols): row block I meets column blocks cols[row_ptr[I]:row_ptr[I+1]].

Numerics. The soft-min kernel takes the columns centred per block (`column_blocks`: each block
moved by its first point d, and |y - d|^2, computed once per point set). For a row x and a
column block it forms e = x - d once, then -C/eps = -(|e|^2 + |y - d|^2 - 2 e.(y - d))/eps:
the expanded form costs 3 FMAs a pair, and centring keeps it exact to float32 rounding of
|e|^2, which for the pairs that matter is about C itself (metre-scale coordinates broke the
un-centred form; see the design notes). With everything per column precomputed and everything
per row done once per block, the inner loop is 3 FMA + max + sub + one ex2 + add a pair.
Exponentials are base 2 with an online maximum (the attention trick).

Parallelism. A row tile's column blocks are split over SPLIT programs, each writing a partial
(max, sum); `_combine_kernel` merges them. One program per row tile filled an H100 only ~0.6
waves at 65536 points and left it waiting on loads.

Iterations in one launch (`iterations_triton`; dense up to PERSISTENT_MAX points, or sparse). One
program per multiprocessor runs all k iterations between two checks, the programs waiting for
each other at a barrier in global memory after every half-iteration (~1.3 us on an H200),
instead of four launches an iteration. Each program walks its rows' column blocks as SEG runs
side by side and scales the sums by a guess of the result (the row's last log-sum; in a
launch's first iteration, its own potential) instead of a running maximum: the loop then has
no reductions and its steps are independent (4096^2: 26 us an iteration, against 70-87 us with
the running maximum). A tile whose sums left [2^-100, 2^100] (a guess ~70 eps off) is redone
with the running maximum. Its rows are centred per row tile and its columns raw, so the
per-row terms are computed once per tile: the loop is 3 FMA + sub + ex2 + add a pair (6.6
instructions in SASS, against 9.3 when the rows were re-centred on every column block; 11.4
in the split kernel, whose threads hold few rows and load ~3 values a pair). Each row tile
takes the exact form or the 3-FMA one by its own radius, so a few far-flung tiles no longer make
a whole problem exact. Block-sparse iterations (the multi-scale solver's) run here too, over the
CSR lists, their row tiles dealt out to the programs by work (`balanced_order`); the split
kernels remain for single soft-mins (annealing, initialisation), point lists and large dense
problems.
"""
from __future__ import annotations

import weakref

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
def _tile_cost(Y, H, COLS, m_pad, first, t, c0, c1, c2, x0, x1, x2, l2e, BLOCK: tl.constexpr,
               BLOCK_N: tl.constexpr, SPARSE: tl.constexpr):
    """The t-th column tile of a row tile (rows x - c, see _rows): (columns, h log2 e, squared
    distances from exact differences), [1, BLOCK_N] and [BLOCK_M, BLOCK_N]."""
    j0 = _tile_origin(COLS, first, t, BLOCK, BLOCK_N, SPARSE)
    cols, y0, y1, y2, hq = _load_tile(Y, H, m_pad, j0, c0, c1, c2, l2e, BLOCK_N)
    d0 = x0 - y0
    d1 = x1 - y1
    d2 = x2 - y2
    return cols, hq, d0 * d0 + d1 * d1 + d2 * d2


@triton.jit
def _rows(X, n_pad, pid, BLOCK_M: tl.constexpr, VOLATILE: tl.constexpr = False):
    """A row tile as [BLOCK_M, 1] tensors, centred on its first point c. VOLATILE: loaded again,
    not taken from registers (see _update_rows)."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    c0 = tl.load(X + pid * BLOCK_M, volatile=VOLATILE)
    c1 = tl.load(X + n_pad + pid * BLOCK_M, volatile=VOLATILE)
    c2 = tl.load(X + 2 * n_pad + pid * BLOCK_M, volatile=VOLATILE)
    x0 = tl.load(X + rows, volatile=VOLATILE) - c0
    x1 = tl.load(X + n_pad + rows, volatile=VOLATILE) - c1
    x2 = tl.load(X + 2 * n_pad + rows, volatile=VOLATILE) - c2
    return rows, c0, c1, c2, x0, x1, x2


@triton.jit
def _tile_origin(COLS, start, t, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr):
    """First column of the t-th column tile of this row block."""
    if SPARSE:
        return tl.load(COLS + start + t // (BLOCK // BLOCK_N)) * BLOCK + (t % (BLOCK // BLOCK_N)) * BLOCK_N
    else:
        return t * BLOCK_N


@triton.jit
def _block_range(ROW_PTR, row, m_pad, BLOCK: tl.constexpr, SPARSE: tl.constexpr):
    """(first pair, number of column blocks) of the row block holding `row`: its CSR range, or
    every column block when dense."""
    if SPARSE:
        start = tl.load(ROW_PTR + row // BLOCK)
        return start, tl.load(ROW_PTR + row // BLOCK + 1) - start
    else:
        return 0, m_pad // BLOCK


@triton.jit
def _tile_count(ROW_PTR, pid, m_pad, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, SPARSE: tl.constexpr):
    """(first pair, number of column tiles) for this program's row tile."""
    start, blocks = _block_range(ROW_PTR, pid * BLOCK_M, m_pad, BLOCK, SPARSE)
    return start, blocks * (BLOCK // BLOCK_N)


@triton.jit
def _lse_rows(x0, x1, x2, YC, YY, D, H, G, COLS, first, lo, hi, m_pad, scale, l2e, inv_eps, fixed,
              SPARSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              SEG: tl.constexpr, FTZ: tl.constexpr, EXACT: tl.constexpr, HAS_G: tl.constexpr,
              FIXED: tl.constexpr, CENTRED: tl.constexpr = False, c0=0.0, c1=0.0, c2=0.0):
    """(max, sum) of 2^(h_j - C_ij scale), [BLOCK_M, 1] each, for the rows (x0, x1, x2), [1, BLOCK_M, 1]
    each, over their column blocks lo..hi (of the CSR list COLS from `first` when SPARSE). The
    blocks are cut into SEG runs walked side by side: independent work for a program's warps.
    Column log-weights are H, or H + G / eps with HAS_G (log weights and a potential).

    FIXED: no running maximum; the terms are scaled by 2^-fixed, `fixed` ([1, BLOCK_M, 1]) being
    a guess of the result (see _update_rows), and returned as the "max". No reductions in
    the loop, so its steps are independent; a caller checks that the sum stayed in range.

    CENTRED: the rows come centred on their tile's origin c = (c0, c1, c2) and YC holds the raw
    columns (YY, D unused): the columns are moved by -c as they are loaded, so the per-row terms
    are computed once, not once per column block (with a thread holding a tile's rows and a
    few columns of each block, they had cost ~2.7 instructions a pair)."""
    n_col_blocks = m_pad // BLOCK
    steps = tl.cdiv(hi - lo, SEG)
    start = lo + tl.arange(0, SEG)[:, None, None] * steps
    m_i = tl.full([SEG, BLOCK_M, 1], _NEG, tl.float32)
    l_i = tl.zeros([SEG, BLOCK_M, 1], tl.float32)
    acc = tl.zeros([SEG, BLOCK_M, BLOCK_N], tl.float32)
    for t in range(0, steps):
        pos = start + t
        if SEG > 1:                                   # the last run can be short
            valid = pos < hi
            pos = tl.where(valid, pos, lo)
        b = tl.load(COLS + first + pos) if SPARSE else pos
        if CENTRED:
            e0, e1, e2 = x0, x1, x2
        else:
            e0 = x0 - tl.load(D + b)                  # rows relative to the column block's first point
            e1 = x1 - tl.load(D + n_col_blocks + b)
            e2 = x2 - tl.load(D + 2 * n_col_blocks + b)
        a0 = 2.0 * scale * e0                         # (loop-invariant when CENTRED: hoisted)
        a1 = 2.0 * scale * e1
        a2 = 2.0 * scale * e2
        r = scale * (e0 * e0 + e1 * e1 + e2 * e2)
        for k in tl.static_range(BLOCK // BLOCK_N):
            cols = b * BLOCK + k * BLOCK_N + tl.arange(0, BLOCK_N)[None, None, :]
            y0 = tl.load(YC + cols) - c0
            y1 = tl.load(YC + m_pad + cols) - c1
            y2 = tl.load(YC + 2 * m_pad + cols) - c2
            if HAS_G:   # .cg: potentials written by other programs of a persistent kernel (not L1)
                hq = (tl.load(H + cols) + tl.load(G + cols, cache_modifier=".cg") * inv_eps) * l2e
            else:
                hq = tl.load(H + cols) * l2e
            if SEG > 1:
                hq = tl.where(valid, hq, -float("inf"))
            if EXACT:   # u = h - C/eps from exact differences (6 ops a pair)
                d0 = e0 - y0
                d1 = e1 - y1
                d2 = e2 - y2
                u = hq - scale * (d0 * d0 + d1 * d1 + d2 * d2)
                shift = tl.zeros_like(r)
            else:       # u - r = h - C/eps with r = |e|^2 scale per row: 3 FMAs a pair
                yy = y0 * y0 + y1 * y1 + y2 * y2 if CENTRED else tl.load(YY + cols)
                # explicit FMAs: written as a sum, the compiler multiplied and then added (4 ops)
                u = tl.fma(a2, y2, tl.fma(a1, y1, tl.fma(a0, y0, hq - scale * yy)))
                shift = r
            if FIXED:
                acc += _exp2(u - (shift + fixed), FTZ)
            else:
                m_new = tl.maximum(m_i, tl.max(u, axis=2, keep_dims=True) - shift)
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(_exp2(u - (m_new + shift), FTZ), axis=2, keep_dims=True)
                m_i = m_new
    if FIXED:
        return tl.reshape(fixed, [BLOCK_M, 1]), tl.sum(tl.sum(acc, axis=2), axis=0)[:, None]
    if SEG == 1:
        return tl.reshape(m_i, [BLOCK_M, 1]), tl.reshape(l_i, [BLOCK_M, 1])
    peak = tl.max(m_i, axis=0)
    return peak, tl.sum(l_i * tl.exp2(m_i - peak[None, :, :]), axis=0)


@triton.jit
def _softmin_kernel(X, YC, YY, D, H, G, M, L, ROW_PTR, COLS, n_pad, m_pad, scale, l2e, inv_eps,
                    SPARSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FTZ: tl.constexpr, EXACT: tl.constexpr,
                    HAS_G: tl.constexpr):
    """Partial log2-sum-exp2 of one row tile over its share of the column blocks: M (max), L (sum)."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[None, :, None]
    x0 = tl.load(X + rows)
    x1 = tl.load(X + n_pad + rows)
    x2 = tl.load(X + 2 * n_pad + rows)
    first, count = _block_range(ROW_PTR, pid * BLOCK_M, m_pad, BLOCK, SPARSE)
    share = tl.cdiv(count, SPLIT)
    lo = part * share
    hi = tl.minimum(lo + share, count)
    m_i, l_i = _lse_rows(x0, x1, x2, YC, YY, D, H, G, COLS, first, lo, hi, m_pad, scale, l2e, inv_eps, 0.0,
                         SPARSE, BLOCK, BLOCK_M, BLOCK_N, 1, FTZ, EXACT, HAS_G, False)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    tl.store(M + part * n_pad + rows, m_i)
    tl.store(L + part * n_pad + rows, l_i)


@triton.jit
def _update_rows(R, r_pad, C, CH, POT, OUT, SOFT, LSE, ROW_PTR, COLS, ORDER, c_pad, pid, nprog, scale, l2e, inv_eps,
                 inv_scale, lam, omega, update, write_soft, guess, first, exact_above, SPARSE: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEG: tl.constexpr,
                 FTZ: tl.constexpr):
    """One half-iteration, this program's row tiles: soft = softmin over the columns C (all, or
    with SPARSE the row block's column blocks in the CSR list ROW_PTR, COLS, the tiles taken in
    the order ORDER; weights CH + POT / eps);
    SOFT <- soft if write_soft; OUT <- OUT + omega (lam soft - OUT) if update.
    Each row tile is centred on its first point (_lse_rows' CENTRED). LSE keeps each row's
    log2-sum. With `guess`, the sums are scaled by a guess of it instead of a running maximum
    (see _lse_rows): the last one, or in the `first` iteration of a launch the row's own
    potential (a Sinkhorn potential is lam times its soft-min once settled). A tile whose sums
    left [2^-100, 2^100] (a guess ~70 eps off) is redone, in the exact form.
    Each tile chooses its cost form: the 3-FMA form's rounding grows with the tile's radius r
    (squared distance from its origin to its farthest row), so tiles with r2 / eps over
    `exact_above` take exact differences (needs_exact). On a street scene's 32-row tiles at
    eps 1e-3 that is 13-32% of them; one far-flung tile had made a whole problem exact."""
    for i in range(pid, r_pad // BLOCK_M, nprog):
        tile = i
        if SPARSE:                                   # tiles dealt out by their work (balanced_order)
            tile = tl.load(ORDER + i)
        rows, c0, c1, c2, x0, x1, x2 = _rows(R, r_pad, tile, BLOCK_M)
        exact = tl.max(tl.max(x0 * x0 + x1 * x1 + x2 * x2, axis=1), axis=0) * inv_eps > exact_above
        rows, x0, x1, x2 = rows[None, :, :], x0[None, :, :], x1[None, :, :], x2[None, :, :]   # [1, BLOCK_M, 1]
        start, count = _block_range(ROW_PTR, tile * BLOCK_M, c_pad, BLOCK, SPARSE)
        m_i = tl.zeros([BLOCK_M, 1], tl.float32)
        l_i = tl.zeros([BLOCK_M, 1], tl.float32)
        redo = 1
        if guess:
            if first:
                last = tl.load(OUT + rows, cache_modifier=".cg") * (-scale / lam)
            else:
                last = tl.load(LSE + rows, cache_modifier=".cg")
            if exact:
                m_i, l_i = _lse_rows(x0, x1, x2, C, C, C, CH, POT, COLS, start, 0, count, c_pad, scale, l2e,
                                     inv_eps, last, SPARSE, BLOCK, BLOCK_M, BLOCK_N, SEG, FTZ, True, True, True,
                                     True, c0, c1, c2)
            else:
                m_i, l_i = _lse_rows(x0, x1, x2, C, C, C, CH, POT, COLS, start, 0, count, c_pad, scale, l2e,
                                     inv_eps, last, SPARSE, BLOCK, BLOCK_M, BLOCK_N, SEG, FTZ, False, True, True,
                                     True, c0, c1, c2)
            inside = (l_i > 7.9e-31) & (l_i < 1.27e30)           # 2^-100, 2^100 (NaN is outside)
            redo = 1 - tl.min(inside.to(tl.int32))
        if redo != 0:
            # the rows loaded again: kept in registers through the guess's loop for this rare path,
            # they had left that loop fewer registers and made it ~20% slower (H200)
            _, c0, c1, c2, x0, x1, x2 = _rows(R, r_pad, tile, BLOCK_M, True)
            x0, x1, x2 = x0[None, :, :], x1[None, :, :], x2[None, :, :]
            m_i, l_i = _lse_rows(x0, x1, x2, C, C, C, CH, POT, COLS, start, 0, count, c_pad, scale, l2e,
                                 inv_eps, 0.0, SPARSE, BLOCK, BLOCK_M, BLOCK_N, SEG, FTZ, True, True, False,
                                 True, c0, c1, c2)
        lse = m_i + tl.log2(l_i)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
        tl.store(LSE + rows, lse)
        soft = -lse * inv_scale
        if write_soft:
            tl.store(SOFT + rows, soft)
        if update:
            prev = tl.load(OUT + rows, cache_modifier=".cg")
            tl.store(OUT + rows, prev + omega * (lam * soft - prev))


@triton.jit
def _grid_barrier(SYNC, target):
    """Wait until SYNC reaches target: every program adds 1 per barrier (all must be resident)."""
    tl.debug_barrier()                                 # this program's stores are issued
    tl.atomic_add(SYNC, 1, sem="release", scope="gpu")
    while tl.load(SYNC, volatile=True) < target:       # spin on loads: atomics would queue
        pass
    tl.atomic_add(SYNC, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _iterations_kernel(X, HX, F, Y, HY, G, FSOFT, LSE_X, LSE_Y, SYNC, PTR_XY, COLS_XY, ORDER_X, PTR_YX, COLS_YX,
                       ORDER_Y, n_pad, m_pad, k, scale, l2e, inv_eps, inv_scale, lam, omega, exact_above,
                       SPARSE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       SEG: tl.constexpr, FTZ: tl.constexpr, GUESS: tl.constexpr):
    """k relaxed alternating iterations in one launch (`sinkhorn.iterations`), dense or over block
    pairs (SPARSE: CSR lists x -> y blocks and y -> x blocks):
    g <- relax(g, lam softmin_y(f)), then f <- relax(f, lam softmin_x(g)), the last f update left
    undone and its soft-min written to FSOFT. A grid barrier separates the half-iterations.
    GUESS: scale the sums by a guess of the result (see _update_rows)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for it in range(k):
        _update_rows(Y, m_pad, X, HX, F, G, G, LSE_Y, PTR_YX, COLS_YX, ORDER_Y, n_pad, pid, nprog, scale, l2e, inv_eps,
                     inv_scale, lam, omega, True, False, GUESS, it == 0, exact_above, SPARSE, BLOCK, BLOCK_M,
                     BLOCK_N, SEG, FTZ)
        _grid_barrier(SYNC, (2 * it + 1) * nprog)
        _update_rows(X, n_pad, Y, HY, G, F, FSOFT, LSE_X, PTR_XY, COLS_XY, ORDER_X, m_pad, pid, nprog, scale, l2e, inv_eps,
                     inv_scale, lam, omega, it != k - 1, it == k - 1, GUESS, it == 0, exact_above, SPARSE,
                     BLOCK, BLOCK_M, BLOCK_N, SEG, FTZ)
        _grid_barrier(SYNC, (2 * it + 2) * nprog)


@triton.jit
def _combine_kernel(M, L, OUT, PREV, RELAXED, n_pad, inv_scale, lam, omega, SPLIT: tl.constexpr,
                    BLOCK: tl.constexpr, RELAX: tl.constexpr):
    """-eps * ln of the summed partials: OUT = -(max + log2 sum L 2^(M - max)) / scale; with RELAX
    also the relaxed Sinkhorn update RELAXED = PREV + omega (lam OUT - PREV)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    parts = tl.arange(0, SPLIT)[:, None] * n_pad + rows[None, :]
    m = tl.load(M + parts)
    peak = tl.max(m, axis=0)
    total = tl.sum(tl.load(L + parts) * tl.exp2(m - peak[None, :]), axis=0)
    _store_update(OUT, PREV, RELAXED, rows, peak, total, inv_scale, lam, omega, RELAX)


@triton.jit
def _store_update(OUT, PREV, RELAXED, rows, peak, total, inv_scale, lam, omega, RELAX: tl.constexpr):
    """OUT = -(peak + log2 total) / scale (= -eps ln sum); with RELAX also the relaxed Sinkhorn
    update RELAXED = PREV + omega (lam OUT - PREV)."""
    out = -(peak + tl.log2(total)) * inv_scale
    tl.store(OUT + rows, out)
    if RELAX:
        prev = tl.load(PREV + rows)
        tl.store(RELAXED + rows, prev + omega * (lam * out - prev))


@triton.jit
def _barycenter_kernel(X, Y, H, V, M, L, ACC_V, ACC_C, ROW_PTR, COLS, n_pad, m_pad, scale, l2e,
                       K: tl.constexpr, KP: tl.constexpr, SPARSE: tl.constexpr, BLOCK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row tile over its share of the column tiles (program_id(1) of num_programs(1)): the
    running max M and sum L of 2^s and the plan-weighted sums of v and of the cost, scaled by
    2^-M (barycenter() combines the shares)."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    rows, c0, c1, c2, x0, x1, x2 = _rows(X, n_pad, pid, BLOCK_M)
    ks = tl.arange(0, KP)[None, :]
    m_i = tl.full([BLOCK_M, 1], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M, 1], tl.float32)
    acc_c = tl.zeros([BLOCK_M, 1], tl.float32)
    acc_v = tl.zeros([BLOCK_M, KP], tl.float32)
    start, n_tiles = _tile_count(ROW_PTR, pid, m_pad, BLOCK, BLOCK_M, BLOCK_N, SPARSE)
    share = tl.cdiv(n_tiles, tl.num_programs(1))
    for t in range(part * share, tl.minimum(part * share + share, n_tiles)):
        cols, hq, cost = _tile_cost(Y, H, COLS, m_pad, start, t, c0, c1, c2, x0, x1, x2, l2e,
                                    BLOCK, BLOCK_N, SPARSE)   # exact differences: this pass is not hot
        s = hq - scale * cost
        m_new = tl.maximum(m_i, tl.max(s, axis=1, keep_dims=True))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(V + tl.reshape(cols, [BLOCK_N, 1]) * K + ks, mask=ks < K, other=0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1, keep_dims=True)
        acc_c = acc_c * alpha + tl.sum(p * cost, axis=1, keep_dims=True)
        acc_v = acc_v * alpha + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = part * n_pad + rows
    tl.store(M + out, m_i)
    tl.store(L + out, l_i)
    tl.store(ACC_C + out, acc_c)
    tl.store(ACC_V + out * K + ks, acc_v, mask=ks < K)


MAX_SPLIT = 32      # most programs a row tile's column blocks are split over (small problems)


def _config(n_pad: int, block: int) -> tuple[int, int, int, int]:
    """Pinned kernel configuration (BLOCK_M, BLOCK_N, num_warps, SPLIT); never autotuned on the hot path.

    Measured on an H100 (bench/bench_softmin.py --sweep, bench/RESULTS.md): 128 x 32 tiles with
    2 warps, the column blocks split 8 ways up to 131072 rows (4096 programs and more): one soft-min
    at 65536^2 takes 2.47 ms split 8 ways, 2.63 split 2 ways, 4.65 unsplit; with 4 warps, 4.25.
    Smaller problems split further, up to MAX_SPLIT, for ~1000 programs: 4096 points split 8 ways
    are 256 programs of 2 warps on 132 multiprocessors, each running 16 dependent column tiles.
    """
    bm = min(128, block)
    split = max(1, min(MAX_SPLIT, max(min(8, 8192 * bm // n_pad), 131072 // n_pad)))
    return bm, min(32, block), 2, 1 << (split.bit_length() - 1)       # a power of two


EXACT_ABOVE = 1e3   # extent2 / eps above which the 3-FMA form's rounding exceeds ~1e-4 (needs_exact)


def needs_exact(extent2: float, eps: float) -> bool:
    """Whether the 3-FMA expanded cost loses more than ~1e-4 in the exponent.

    Its error is about 1e-7 * extent2 / eps, extent2 being the squared size of a column block
    (of a row tile in the one-launch kernel, which decides tile by tile).
    """
    return extent2 / eps > EXACT_ABOVE


_CACHE: dict = {}    # (id(t), tag) -> (weak reference to t, t._version, captured, value)


def _cached(t: torch.Tensor, tag, compute):
    """compute(), cached per tensor t (and tag): a solve's points and block pairs stay the same
    over its iterations (a tensor changed in place, or freed and replaced, misses). While a CUDA
    graph is captured only what was computed in the capture is reused: its replays read static
    buffers refilled in between."""
    captured = t.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (id(t), tag)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == captured:
        return hit[3]
    out = compute()
    for k in [k for k, v in _CACHE.items() if v[0]() is None]:
        del _CACHE[k]
    _CACHE[key] = (weakref.ref(t), t._version, captured, out)
    return out


def column_blocks(y: torch.Tensor, block: int):
    """(y - d (3, m), |y - d|^2 (m,), d (3, blocks)): each block of points centred on its first
    (cached per point tensor)."""
    def compute():
        yb = y.reshape(3, -1, block)
        d = yb[:, :, :1]
        yc = (yb - d).reshape(3, -1).contiguous()
        return yc, (yc * yc).sum(0), d[:, :, 0].contiguous()
    return _cached(y, ("columns", block), compute)


def balanced_order(row_ptr: torch.Tensor, tiles_per_block: int, programs: int) -> torch.Tensor:
    """The row tiles of a CSR block-pair list in an order whose round-robin share-out over
    `programs` evens their work (a program waits for the slowest at every barrier): by column
    blocks, descending, every other round reversed. A street scene's rows dealt out in storage
    order gave the busiest program 1.245x the mean work (cached per row_ptr)."""
    def compute():
        work = (row_ptr[1:] - row_ptr[:-1]).repeat_interleave(tiles_per_block)
        order = torch.argsort(work, descending=True, stable=True).int()
        rounds = order[: len(order) // programs * programs].view(-1, programs)
        rounds[1::2] = rounds[1::2].flip(1)
        return order
    return _cached(row_ptr, ("order", tiles_per_block, programs), compute)


def _check(x, y, h, block):
    assert x.dim() == 2 and x.shape[0] == 3 and y.shape[0] == 3, "points are (3, n)"
    assert x.shape[1] % block == 0 and y.shape[1] % block == 0, "pad points to the block size"
    assert h.shape == (y.shape[1],)


def softmin_triton(x, y, h, eps: float, pairs=None, block: int = 128, exact: bool = True, config=None,
                   pot=None, relax=None):
    """exact: cost from differences (else the 3-FMA expanded form, see needs_exact).
    config: (BLOCK_M, BLOCK_N, num_warps, SPLIT, exact) overrides the pinned choice (benchmarks).
    pot: column potentials, the column log-weights then being h + pot / eps (one kernel fewer).
    relax=(prev, lam, omega): return (out, prev + omega (lam out - prev)), the relaxed update."""
    _check(x, y, h, block)
    n_pad, m_pad = x.shape[1], y.shape[1]
    bm, bn, warps, split, exact = config or (*_config(n_pad, block), exact)
    partial = torch.empty(2, split, n_pad, device=x.device, dtype=torch.float32)
    row_ptr, cols = pairs if pairs is not None else (partial, partial)   # unused when dense
    _softmin_kernel[(n_pad // bm, split)](x, *column_blocks(y, block), h, h if pot is None else pot,
                                          partial[0], partial[1], row_ptr, cols, n_pad, m_pad, LOG2E / eps,
                                          LOG2E, 1.0 / eps, SPARSE=pairs is not None, BLOCK=block,
                                          BLOCK_M=bm, BLOCK_N=bn, SPLIT=split, FTZ=x.device.type == "cuda",
                                          EXACT=exact, HAS_G=pot is not None, num_warps=warps)
    out = torch.empty(n_pad, device=x.device, dtype=torch.float32)
    prev, lam, omega = relax if relax is not None else (out, 1.0, 1.0)
    relaxed = torch.empty_like(out) if relax is not None else out
    _combine_kernel[(n_pad // block,)](partial[0], partial[1], out, prev, relaxed, n_pad, eps / LOG2E,
                                       lam, omega, SPLIT=split, BLOCK=block, RELAX=relax is not None)
    return out if relax is None else (out, relaxed)


# dense problems up to this many (padded) points a side iterate in one launch (block-sparse ones
# always do): measured up to here, 1.40x the exp floor at 262144 against 2.62x split
PERSISTENT_MAX = 262144
_PROGRAMS: dict = {}    # device -> programs of a persistent launch (one per multiprocessor)


def persistent_fits(n_pad: int, m_pad: int) -> bool:
    return max(n_pad, m_pad) <= PERSISTENT_MAX


def iterations_triton(x, y, hx, hy, f, g, eps: float, lam: float, omega: float, k: int,
                      block: int, pairs=None, config=None, exact_above: float = EXACT_ABOVE):
    """k relaxed alternating iterations in one launch; (f, g, f_soft) as `sinkhorn.iterations`
    returns them (f and g are not changed in place). Each row tile takes the exact cost form
    when its squared radius over eps exceeds exact_above (0: every tile; inf: none), the 3-FMA
    form otherwise (_update_rows). pairs: None (dense) or the block pairs both ways, (CSR x -> y,
    CSR y -> x). config: (BLOCK_M, BLOCK_N, num_warps, SEG, GUESS) overrides the pinned choice
    (bench/bench_softmin.py --one-launch-sweep; bench/RESULTS.md).

    The programs wait for each other between half-iterations, so all must be resident at once:
    one per multiprocessor on the GPU, and a single program under Triton's interpreter, which
    runs them in turn. A program takes a whole multiprocessor's registers (ptxas: 254 a thread
    in the default configuration), so two of these launches running at once on two streams
    could each hold SMs the other waits for: solve from one thread, or one stream, at a time
    (as the node does)."""
    _check(x, y, hy, block)
    n_pad, m_pad = x.shape[1], y.shape[1]
    bm, bn, warps, seg, guess = config or (min(32, block), min(32, block), 8, 8, True)
    if x.is_cuda:
        if x.device not in _PROGRAMS:
            _PROGRAMS[x.device] = torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = min(_PROGRAMS[x.device], max(n_pad, m_pad) // bm)
    else:
        programs = 1
    f, g = f.clone(), g.clone()
    f_soft, lse_x, lse_y = torch.empty_like(f), torch.empty_like(f), torch.empty_like(g)
    sync = torch.zeros(1, device=x.device, dtype=torch.int32)
    if pairs is not None:
        (ptr_xy, cols_xy), (ptr_yx, cols_yx) = pairs
        order_x, order_y = (balanced_order(p, block // bm, programs) for p in (ptr_xy, ptr_yx))
    else:
        ptr_xy = cols_xy = order_x = ptr_yx = cols_yx = order_y = sync
    _iterations_kernel[(programs,)](x, hx, f, y, hy, g, f_soft, lse_x, lse_y, sync, ptr_xy, cols_xy, order_x,
                                    ptr_yx, cols_yx, order_y, n_pad, m_pad, k, LOG2E / eps, LOG2E, 1.0 / eps,
                                    eps / LOG2E, lam, omega, min(exact_above, 1e30), SPARSE=pairs is not None,
                                    BLOCK=block, BLOCK_M=bm, BLOCK_N=bn, SEG=seg, FTZ=x.is_cuda, GUESS=guess,
                                    num_warps=warps)
    return f, g, f_soft


def barycenter_triton(x, y, h, eps: float, v, pairs=None, block: int = 128):
    _check(x, y, h, block)
    n_pad, m_pad = x.shape[1], y.shape[1]
    k = v.shape[1]
    bm, bn = 32, min(32, block)
    # each row tile's columns split over up to 32 programs, for ~2000 in all: 250 row tiles of
    # an 8k problem ran one wave of 250 serial loops (a frame's calls averaged 0.44 ms on an H200
    # before, 0.30 after: the loop itself is slow too, see bench/RESULTS.md)
    split = 1 << (max(1, min(32, 2048 * bm // n_pad)).bit_length() - 1)
    m, l, acc_c = torch.empty(3, split, n_pad, device=x.device, dtype=torch.float32)
    acc_v = torch.empty(split, n_pad, k, device=x.device, dtype=torch.float32)
    row_ptr, cols = pairs if pairs is not None else (m, m)
    _barycenter_kernel[(n_pad // bm, split)](x, y, h, v.contiguous(), m, l, acc_v, acc_c, row_ptr, cols,
                                             n_pad, m_pad, LOG2E / eps, LOG2E, K=k,
                                             KP=max(16, triton.next_power_of_2(k)),
                                             SPARSE=pairs is not None, BLOCK=block, BLOCK_M=bm, BLOCK_N=bn)
    peak = m.max(0).values
    w = torch.exp2(m - peak)                          # each share's scale relative to the row's max
    total = (w * l).sum(0)
    lse = (peak + torch.log2(total)) / LOG2E
    return lse, (w[..., None] * acc_v).sum(0) / total[:, None], (w * acc_c).sum(0) / total


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


def _scaled_exp(logits):
    """(exp(logits - peak), peak) with peak the maximum over the last axis, in place. Terms under
    e^-80 of the peak are raised to it: a denormal result makes a CPU exp ~10x slower, and
    B * e^-80 is far below float32 rounding."""
    peak = logits.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return logits.sub_(peak).clamp_min_(-80.0).exp_(), peak[..., 0]


def _row_logsumexp(logits):
    """logsumexp over the last axis, in place."""
    p, peak = _scaled_exp(logits)
    return p.sum(-1).log_().add_(peak)


GUESS_RANGE = (-40.0, 80.0)   # log-sums of terms scaled by a guess that are kept (softmin_torch)


def softmin_torch(x, y, h, eps: float, pairs=None, block: int = 128, exact: bool = True, costs=None,
                  guess=None):
    """costs: pair_costs(x, y, pairs, block), if already computed. guess: (n_pad,) a guess of each
    row's log-sum (from its potential: a settled one is -lam eps times it). The terms are then
    scaled by e^-guess instead of by each row's largest (the GPU kernel's trick): no maximum over
    16-wide rows and no merge of per-pair log-sums, which took ~40% of a CPU soft-min. Row blocks
    with a row whose scaled sum left [e^-40, e^80] (a guess ~40 eps off) are redone."""
    _check(x, y, h, block)
    costs = pair_costs(x, y, pairs, block) if costs is None else costs
    nb = x.shape[1] // block
    if guess is None:
        return -eps * _exact_lse(h, eps, block, costs, nb).reshape(-1)
    shift = guess.reshape(nb, block)
    total = torch.zeros(nb, block, dtype=x.dtype, device=x.device)
    for r, c, cost in costs:   # terms under e^-80 of the guess raised to it: denormals are slow
        total.index_add_(0, r, _logits(h, c, cost, eps, block).sub_(shift[r][:, :, None])
                         .clamp_min_(-80.0).exp_().sum(-1))
    lse = total.log_()
    redo = ~((lse > GUESS_RANGE[0]) & (lse < GUESS_RANGE[1])).all(1)   # NaN is outside
    lse += shift
    if bool(redo.any()):
        some = [(r[m], c[m], cost[m]) for r, c, cost in costs if bool((m := redo[r]).any())]
        lse = torch.where(redo[:, None], _exact_lse(h, eps, block, some, nb), lse)
    return -eps * lse.reshape(-1)


def _exact_lse(h, eps, block, costs, nb):
    """Each row's log-sum over the pairs in costs, (nb, block): per pair with its own maximum,
    then merged per row block (rows without pairs: -inf)."""
    if not costs:
        return torch.full((nb, block), -torch.inf, dtype=h.dtype, device=h.device)
    rows = torch.cat([r for r, _, _ in costs])
    lse = torch.cat([_row_logsumexp(_logits(h, c, cost, eps, block)) for _, c, cost in costs])
    return _segment_logsumexp(rows, lse, nb)


def barycenter_torch(x, y, h, eps: float, v, pairs=None, block: int = 128):
    """One pass over the pairs, chunk by chunk: each pair's terms scaled by their row's largest
    in the pair, its sums (of the terms, of v and of the cost) merged into per-row sums on a
    running scale (computing the log-sums first took a second pass of exponentials)."""
    _check(x, y, h, block)
    nb, k = x.shape[1] // block, v.shape[1]
    vb = v.reshape(-1, block, k)
    top = torch.full((nb, block), -torch.inf, dtype=x.dtype, device=x.device)
    total, mean_c = torch.zeros_like(top), torch.zeros_like(top)
    mean_v = torch.zeros(nb, block, k, dtype=x.dtype, device=x.device)
    for r, c, cost in pair_costs(x, y, pairs, block):
        p, peak = _scaled_exp(_logits(h, c, cost, eps, block))
        new_top = top.scatter_reduce(0, r[:, None].expand_as(peak), peak, "amax")
        old = torch.where(torch.isfinite(top), torch.exp(top - new_top), torch.zeros_like(top))
        w = torch.exp(peak - new_top[r])                              # each pair's scale in its row's
        total.mul_(old).index_add_(0, r, w * p.sum(-1))
        mean_c.mul_(old).index_add_(0, r, w * (p * cost).sum(-1))
        mean_v.mul_(old[..., None]).index_add_(0, r, w[..., None] * torch.bmm(p, vb[c]))
        top = new_top
    return ((top + torch.log(total)).reshape(-1), (mean_v / total[..., None]).reshape(-1, k),
            (mean_c / total).reshape(-1))


def softmin(x, y, h, eps, pairs=None, block=128, backend="torch", exact=True, costs=None, guess=None):
    """Dispatch: 'triton' runs the GPU kernel (or Triton's interpreter on CPU tensors);
    'torch' reuses `costs` (pair_costs) and scales by `guess` (softmin_torch) when given."""
    if backend == "triton":
        return softmin_triton(x, y, h, eps, pairs, block, exact)
    return softmin_torch(x, y, h, eps, pairs, block, exact, costs, guess)


def barycenter(x, y, h, eps, v, pairs=None, block=128, backend="torch"):
    return (barycenter_triton if backend == "triton" else barycenter_torch)(x, y, h, eps, v, pairs, block)

