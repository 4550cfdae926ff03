"""Point-level truncation: the entries of the kept block pairs that matter, and soft-mins over them.

Block pairs are a coarse filter: a block of 128 Morton-sorted points spans a box much larger than
the plan's reach at small eps (on a 131k x 276k street scene at eps = 1e-3 the kept pairs held
~5.5e9 entries, each an exponential per half-iteration). Within them, entry (i, j) is kept when

    s_ij = hy_j - C_ij / eps >= max_j' s_ij' - tau   or   t_ij = hx_i - C_ij / eps >= max_i' t_i'j - tau

(hy = log b + g / eps, hx = log a + f / eps): what a row's soft-min drops weighs under exp(-tau)
of its largest term, whatever f is, and likewise for a column. One entry set serves both updates,
grouped by row and by column: with the rows' and the columns' choices apart, the updates are no
longer Sinkhorn's on one kernel, and over-relaxed they diverged on a street scene (potentials
drifting by ~30 m^2 an iteration). Each grouping is CSR, row i's columns at
cols[start_i : start_i + count_i] (storage indices); three passes over the candidates make them:
each row's and column's largest term, the counts, the entries.

A soft-min over the lists gathers its columns (points and weights stay in L2): it costs the
entries kept, not the candidates. Lists depend on h, so the solver chooses them again when the
potentials have moved by more than the margin they were chosen with (multiscale.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ros_ot_fusion.kernels.softmin import (LOG2E, _NEG, _check, _exp2, _rows, _store_update, _tile_cost,
                                           _tile_count, pair_costs)


@dataclass
class PointLists:
    """Per-row column lists (storage indices into the columns' layout), int32 on the points' device."""

    start: torch.Tensor          # (n_pad,) first entry of each row in cols (rows in turn, no gaps)
    count: torch.Tensor          # (n_pad,) entries of each row
    cols: torch.Tensor           # (entries,) column indices; -1: a slot the writing pass left free
    entries: int                 # sum of count (on the host)
    cache: dict = field(default_factory=dict, repr=False)   # rows and costs (torch), work items (triton)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every entry, int64 (the torch backend's form; rows are stored in turn)."""
        if "rows" not in self.cache:
            rows = torch.repeat_interleave(torch.arange(len(self.count), device=self.cols.device),
                                           self.count.long(), output_size=self.entries)
            cols = self.cols[: self.entries].long()
            used = cols >= 0
            self.cache["rows"] = rows[used], cols[used]
        return self.cache["rows"]


@triton.jit
def _select_kernel(X, Y, H, HR, ROW_PTR, COLS, PEAK, PEAK_C, START, COUNT, OUT, n_pad, m_pad, l2e, scale,
                   tau2, MODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row tile over its share (program_id(1) of num_programs(1)) of its block pairs;
    s = (H_j - C_ij/eps) log2 e, r = (HR_i - C_ij/eps) log2 e. Per (share, row): MODE 0: PEAK, the
    max of s. MODE 1: COUNT, the entries with s >= PEAK_i - tau2 or r >= PEAK_C_j - tau2 (near
    the row's largest, or near the column's; PEAK and PEAK_C over all shares). MODE 2: their
    columns, written from START, at most COUNT of them (slots left over keep -1)."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    rows, c0, c1, c2, x0, x1, x2 = _rows(X, n_pad, pid, BLOCK_M)
    first, n_tiles = _tile_count(ROW_PTR, pid, m_pad, BLOCK, BLOCK_M, BLOCK_N, True)
    share = tl.cdiv(n_tiles, tl.num_programs(1))
    mine = part * n_pad + rows
    if MODE == 0:
        peak = tl.full([BLOCK_M, 1], _NEG, tl.float32)
    else:
        bar = tl.load(PEAK + rows) - tau2
        hr = tl.load(HR + rows) * l2e
    if MODE == 2:
        at = tl.load(START + mine)
        room = tl.load(COUNT + mine)
    count = tl.zeros([BLOCK_M, 1], tl.int32)
    for t in range(part * share, tl.minimum(part * share + share, n_tiles)):
        cols, hq, c = _tile_cost(Y, H, COLS, m_pad, first, t, c0, c1, c2, x0, x1, x2, l2e, BLOCK, BLOCK_N, True)
        c = scale * c
        if MODE == 0:
            peak = tl.maximum(peak, tl.max(hq - c, axis=1, keep_dims=True))
        else:
            keep = ((hq - c >= bar) | (hr - c >= tl.load(PEAK_C + cols) - tau2)).to(tl.int32)
            if MODE == 2:   # within the share's count from MODE 1: the two compiled predicates
                rank = count + tl.cumsum(keep, axis=1)      # may round apart at the threshold
                tl.store(OUT + at + rank - 1, cols + 0 * rank, mask=(keep != 0) & (rank <= room))
            count += tl.sum(keep, axis=1, keep_dims=True)
    if MODE == 0:
        tl.store(PEAK + mine, peak)
    elif MODE == 1:
        tl.store(COUNT + mine, count)


@triton.jit
def _softmin_lists_kernel(X, Y, H, G, START, COUNT, COLS, TILE, PART, M, L, n_pad, m_pad, scale, l2e, inv_eps,
                          HAS_G: tl.constexpr, FTZ: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, WORK: tl.constexpr):
    """One work item: entries WORK * part .. WORK * (part + 1) of each row of a row tile, as a
    partial (max M, sum L) of 2^s. Column weights H, or H + G / eps with HAS_G."""
    pid = tl.program_id(0)
    tile = tl.load(TILE + pid)
    lo = tl.load(PART + pid) * WORK
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    x0 = tl.load(X + rows)
    x1 = tl.load(X + n_pad + rows)
    x2 = tl.load(X + 2 * n_pad + rows)
    start = tl.load(START + rows)
    hi = tl.minimum(tl.load(COUNT + rows), lo + WORK)
    m_i = tl.full([BLOCK_M, 1], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M, 1], tl.float32)
    for k0 in range(lo, tl.max(hi), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)[None, :]
        valid = k < hi
        j = tl.load(COLS + start + k, mask=valid, other=-1)
        valid &= j >= 0                                  # a slot the choice left free
        j = tl.maximum(j, 0)
        d0 = x0 - tl.load(Y + j)
        d1 = x1 - tl.load(Y + m_pad + j)
        d2 = x2 - tl.load(Y + 2 * m_pad + j)
        h = tl.load(H + j)
        if HAS_G:
            h += tl.load(G + j) * inv_eps
        s = tl.where(valid, h * l2e - scale * (d0 * d0 + d1 * d1 + d2 * d2), -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1, keep_dims=True))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(_exp2(s - m_new, FTZ), axis=1, keep_dims=True)
        m_i = m_new
    out = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    tl.store(M + out, m_i)
    tl.store(L + out, l_i)


@triton.jit
def _combine_parts_kernel(M, L, FIRST, OUT, PREV, RELAXED, inv_scale, lam, omega, RELAX: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    """A row tile's partials (work items FIRST[t] .. FIRST[t + 1]) merged: OUT = -eps ln sum, and
    with RELAX the relaxed update RELAXED = PREV + omega (lam OUT - PREV)."""
    t = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_M)
    peak = tl.full([BLOCK_M], _NEG, tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for p in range(tl.load(FIRST + t), tl.load(FIRST + t + 1)):
        m = tl.load(M + p * BLOCK_M + lanes)
        new = tl.maximum(peak, m)
        total = total * tl.exp2(peak - new) + tl.load(L + p * BLOCK_M + lanes) * tl.exp2(m - new)
        peak = new
    _store_update(OUT, PREV, RELAXED, t * BLOCK_M + lanes, peak, total, inv_scale, lam, omega, RELAX)


SELECT_SPLIT = 4        # programs a row tile's block pairs are split over while choosing entries
LIST_TILE, LIST_WORK = 16, 256   # soft-min work item: 16 rows x up to 256 entries each


MAX_ENTRIES = (1 << 31) - 1      # int32 indices


def select_triton(x, y, hx, hy, eps: float, pairs_xy, pairs_yx, block: int, tau: float):
    """(lists of x, lists of y) of one entry set: the block pairs' entries within tau of their
    row's largest or of their column's (weights hx on x, hy on y; pairs: CSR both ways); None
    where they would be more than MAX_ENTRIES."""
    _check(x, y, hy, block)
    _check(y, x, hx, block)
    bm, bn, split = min(128, block), min(32, block), SELECT_SPLIT
    meta = dict(BLOCK=block, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    sides = ((x, y, hy, hx, pairs_xy), (y, x, hx, hy, pairs_yx))
    peaks = []
    for r, c, h, hr, pairs in sides:
        part = torch.empty(split, r.shape[1], device=x.device, dtype=torch.float32)
        _select_kernel[(r.shape[1] // bm, split)](r, c, h, hr, *pairs, part, part, part, part, part, r.shape[1],
                                                  c.shape[1], LOG2E, LOG2E / eps, tau * LOG2E, MODE=0, **meta)
        peaks.append(part.amax(0))
    out = []
    for (r, c, h, hr, pairs), peak, peak_c in zip(sides, peaks, peaks[::-1]):
        n = r.shape[1]
        parts = torch.empty(split, n, device=x.device, dtype=torch.int32)
        args = (n, c.shape[1], LOG2E, LOG2E / eps, tau * LOG2E)
        _select_kernel[(n // bm, split)](r, c, h, hr, *pairs, peak, peak_c, parts, parts, parts, *args,
                                         MODE=1, **meta)
        count = parts.sum(0, dtype=torch.int32)
        ends = torch.cumsum(count, 0, dtype=torch.int64)
        entries = int(ends[-1])                                    # one host sync
        if entries > MAX_ENTRIES:
            return None
        start = (ends - count).int()
        at = (start + torch.cumsum(parts, 0, dtype=torch.int32) - parts).contiguous()   # each share's first
        cols = torch.full((max(entries, 1),), -1, device=x.device, dtype=torch.int32)
        _select_kernel[(n // bm, split)](r, c, h, hr, *pairs, peak, peak_c, at, parts, cols, *args,
                                         MODE=2, **meta)
        out.append(PointLists(start, count, cols, entries))
    return tuple(out)


def _work_items(lists: PointLists, tile: int, work: int):
    """(tile of each work item, its part, first item of each tile): the soft-min's grid, so that a
    tile of rows with thousands of entries each (near the camera) is shared by many programs."""
    if "work" not in lists.cache:
        dev = lists.count.device
        parts = ((lists.count.view(-1, tile).amax(1) + work - 1) // work).clamp_min(1)
        first = torch.zeros(len(parts) + 1, device=dev, dtype=torch.int32)
        first[1:] = torch.cumsum(parts, 0)
        n = int(first[-1])                                          # one host sync
        tiles = torch.repeat_interleave(torch.arange(len(parts), device=dev, dtype=torch.int32), parts, output_size=n)
        part = torch.arange(n, device=dev, dtype=torch.int32) - first[tiles.long()]
        lists.cache["work"] = tiles, part, first
    return lists.cache["work"]


def softmin_lists_triton(x, y, h, eps: float, lists: PointLists, pot=None, relax=None):
    """softmin_triton's contract (pot, relax) over point lists instead of block pairs."""
    n_pad, m_pad = x.shape[1], y.shape[1]
    bm = LIST_TILE
    while n_pad % bm:
        bm //= 2
    tiles, parts, first = _work_items(lists, bm, LIST_WORK)
    m, l = torch.empty(2, len(tiles), bm, device=x.device, dtype=torch.float32)
    _softmin_lists_kernel[(len(tiles),)](x, y, h, h if pot is None else pot, lists.start, lists.count, lists.cols,
                                         tiles, parts, m, l, n_pad, m_pad, LOG2E / eps, LOG2E, 1.0 / eps,
                                         HAS_G=pot is not None, FTZ=x.device.type == "cuda", BLOCK_M=bm,
                                         BLOCK_K=32, WORK=LIST_WORK, num_warps=4)
    out = torch.empty(n_pad, device=x.device, dtype=torch.float32)
    prev, lam, omega = relax if relax is not None else (out, 1.0, 1.0)
    relaxed = torch.empty_like(out) if relax is not None else out
    _combine_parts_kernel[(n_pad // bm,)](m, l, first, out, prev, relaxed, eps / LOG2E, lam, omega,
                                          RELAX=relax is not None, BLOCK_M=bm)
    return out if relax is None else (out, relaxed)


# ----------------------------------------------------------------------------------------------
# torch reference (CPU fallback and tests)
# ----------------------------------------------------------------------------------------------

def select_torch(x, y, hx, hy, eps: float, pairs_xy, pairs_yx, block: int, tau: float):
    _check(x, y, hy, block)
    n_pad, m_pad = x.shape[1], y.shape[1]
    blk = torch.arange(block, device=x.device)
    chunks = []
    peak_x = torch.full((n_pad,), -torch.inf, device=x.device)
    peak_y = torch.full((m_pad,), -torch.inf, device=x.device)
    for r, c, cost in pair_costs(x, y, pairs_xy, block):            # (P, B, B): rows x, columns y
        rows, cols = (r[:, None] * block + blk).reshape(-1), (c[:, None] * block + blk).reshape(-1)
        s = hy.reshape(-1, block)[c][:, None, :] - cost / eps
        t = hx.reshape(-1, block)[r][:, :, None] - cost / eps
        peak_x.scatter_reduce_(0, rows, s.amax(2).reshape(-1), "amax")
        peak_y.scatter_reduce_(0, cols, t.amax(1).reshape(-1), "amax")
        chunks.append((r, c, s, t))
    found = []
    for r, c, s, t in chunks:
        keep = ((s >= peak_x.reshape(-1, block)[r][:, :, None] - tau)
                | (t >= peak_y.reshape(-1, block)[c][:, None, :] - tau))
        p, i, j = keep.nonzero(as_tuple=True)
        found.append((r[p] * block + i, c[p] * block + j))
    rows, cols = (torch.cat(v) for v in zip(*found))
    if len(rows) > MAX_ENTRIES:
        return None
    return _grouped(rows, cols, n_pad), _grouped(cols, rows, m_pad)


def _grouped(rows, cols, n):
    order = torch.argsort(rows, stable=True)
    count = torch.bincount(rows, minlength=n)
    return PointLists((torch.cumsum(count, 0) - count).int(), count.int(), cols[order].int(), len(rows))


def softmin_lists_torch(x, y, h, eps: float, lists: PointLists) -> torch.Tensor:
    rows, cols = lists.rows()
    if "cost" not in lists.cache:                          # the points do not change in a solve
        lists.cache["cost"] = ((x.t()[rows] - y.t()[cols]) ** 2).sum(1)
    s = h[cols] - lists.cache["cost"] / eps
    n_pad = x.shape[1]
    peak = torch.full((n_pad,), -torch.inf, device=x.device).scatter_reduce_(0, rows, s, "amax")
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros(n_pad, device=x.device).index_add_(0, rows, torch.exp(s - safe[rows]))
    return -eps * (safe + torch.log(total))


def select(x, y, hx, hy, eps, pairs_xy, pairs_yx, block, tau, backend="torch"):
    """(lists of x, lists of y): the entries that matter, grouped by row and by column; None where
    they are too many for int32 indices (far from the solution, e.g. a large eps: iterate over
    whole block pairs instead)."""
    fn = select_triton if backend == "triton" else select_torch
    return fn(x, y, hx, hy, eps, pairs_xy, pairs_yx, block, tau)


def softmin_lists(x, y, h, eps, lists, backend="torch", pot=None, relax=None):
    """backend 'triton' takes pot and relax as softmin_triton does; 'torch' takes neither."""
    if backend == "triton":
        return softmin_lists_triton(x, y, h, eps, lists, pot, relax)
    return softmin_lists_torch(x, y, h, eps, lists)
