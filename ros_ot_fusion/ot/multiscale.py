"""Multi-scale, coarse-to-fine, block-sparse Sinkhorn, warm-started across frames.

Pyramid. Each level clusters both clouds on a voxel grid (weighted centroids, weights summed);
sizes shrink by `ratio` from a few clusters across the scene down to about sqrt(eps), and the
finest level is the input points. The coarsest level is solved densely while eps anneals from
the squared diameter; a level hands over once eps falls under its voxel size squared (the blur
at which clusters stop being a faithful summary of their points).

Hand-over. Fine potentials start as soft c-transforms against the coarse level:
    f_fine(x) = lam * softmin_eps over coarse y of (|x - y|^2 - g_c(y) - eps log b_c(y))
so each fine point inherits what its neighbourhood learnt, not just its parent's value.

Sparsity. Points are Morton-sorted into blocks; a block pair (I, J) is skipped when no entry in
it can matter to a row or column soft-min:
    max_I f/(lam eps) + max_J (log b + g/eps) - dmin(I, J)^2 / eps < -tau   (rows; columns alike)
where dmin is the gap between the blocks' bounding boxes. At the fixed point f/(lam eps) is
minus the row's log-sum, so a skipped entry weighs under exp(-tau) of its row. Pairs are
re-selected at every eps step and every convergence check, as the potentials move.

Point lists (the Triton backend's default). At the target eps the finest level's soft-mins run
over the entries of the kept pairs that matter (kernels/lists.py: within exp(-tau) of their row's
or column's largest), not over whole pairs. Lists chosen with tau + margin hold while no potential
has moved by more than margin / 2 eps since (what they dropped is then still under exp(-tau)). Potentials move fast
after an eps step and then slower, by ~0.65x a check on a street scene (the largest move over 5
iterations going from thousands of eps to ~1), so the margin follows the last check's move: whole
pairs while it is large, then lists with a wide margin that are kept for several checks.

Warm start. After a solve, `WarmStart` keeps eps and the finest level with its potentials; the
next frame skips the pyramid, starts at the final eps, initialises its potentials by soft
c-transforms against the kept ones (the same hand-over as between levels), and makes them
consistent with one plain iteration before the over-relaxed ones. `refine` solves again
after the columns moved rigidly: same points, same order, so the potentials carry over as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ros_ot_fusion.kernels.lists import select
from ros_ot_fusion.kernels.softmin import barycenter
from ros_ot_fusion.ot.layout import Layout
from ros_ot_fusion.ot.sinkhorn import (Iterations, Problem, SinkhornResult, anneal, damping,
                                       eps_schedule, iterate, resolve_backend, squared_diameter)

_GRID_BIAS = 1 << 20          # voxel keys: three 21-bit coordinates around a fixed origin
DENSE_TRANSFER_PAIRS = 1 << 30   # `transfer` runs dense on the GPU up to this many point pairs
LIST_MARGINS = (4.0, 800.0)      # point lists: chosen with tau + a margin in this range (module docstring)


def voxel_keys(points: torch.Tensor, size: float) -> torch.Tensor:
    """int64 key of the voxel (edge `size`, fixed origin) of each (n, 3) point. Points beyond
    2^20 voxels from the origin (210 km for 0.2 m) fall in the grid's edge voxels: clamped, not
    checked, since a check on the host would wait for the GPU at each of a frame's ~10 calls."""
    q = (torch.floor(points / size).long() + _GRID_BIAS).clamp_(0, 2 * _GRID_BIAS - 1)
    return (q[:, 0] << 42) | (q[:, 1] << 21) | q[:, 2]


def cluster(points: torch.Tensor, logw: torch.Tensor, size: float):
    """Voxel-grid clustering: (centroids (k, 3), log weights (k,), cluster of each point (n,))."""
    keys, parent = torch.unique(voxel_keys(points, size), return_inverse=True)
    w = torch.exp(logw - logw.max())
    mass = torch.zeros(len(keys), device=points.device).index_add_(0, parent, w)
    centroid = torch.zeros(len(keys), 3, device=points.device).index_add_(0, parent, points * w[:, None])
    return centroid / mass[:, None], torch.log(mass) + logw.max(), parent


@dataclass
class Level:
    """One side of one pyramid level: its layout and, per stored point, its parent's storage index."""

    layout: Layout
    parent: torch.Tensor | None = None    # (n_pad,) index into the coarser level's storage


def pyramid(points: torch.Tensor, logw: torch.Tensor, sizes: list[float], block: int) -> list[Level]:
    """Levels coarse -> fine for one cloud; the last is the points themselves."""
    levels = [Level(Layout.build(points, torch.exp(logw), block))]
    for size in sorted(sizes):                                       # fine -> coarse
        child = levels[0].layout
        pts, lw, parent = cluster(child.pts.t()[: child.n], child.logw[: child.n], size)
        coarse = Layout.build(pts, torch.exp(lw), block)
        stored = coarse.rank()[parent]                               # child storage -> coarse storage
        levels[0].parent = torch.cat([stored, stored[-1:].expand(child.n_pad - child.n)])
        levels.insert(0, Level(coarse))
    return levels


def useful_sizes(x: torch.Tensor, y: torch.Tensor, sizes: list[float], shrink: float = 0.5) -> list[float]:
    """Drop levels that would keep more than `shrink` of the next finer level's clusters."""
    kept, finer = [], (len(x), len(y))
    for size in sorted(sizes):
        counts = tuple(len(torch.unique(voxel_keys(p, size))) for p in (x, y))
        if max(c / f for c, f in zip(counts, finer)) <= shrink:
            kept.append(size)
            finer = counts
    return sorted(kept, reverse=True)


def box_gap2(lo_x, hi_x, lo_y, hi_y) -> torch.Tensor:
    """Squared gap between every pair of bounding boxes (nbx, nby): 0 where they overlap."""
    gap = (lo_y[None] - hi_x[:, None]).clamp_min(0) + (lo_x[:, None] - hi_y[None]).clamp_min(0)
    return (gap * gap).sum(-1)


def block_pairs(x: Layout, y: Layout, f: torch.Tensor, g: torch.Tensor, eps: float, lam: float,
                tau: float):
    """The block pairs that can matter, as CSR (x blocks -> y blocks) and its transpose."""
    d2 = box_gap2(*x.boxes(), *y.boxes()) / eps                      # (nbx, nby), in units of eps
    rows = x.block_max(f / (lam * eps))[:, None] + y.block_max(y.logw + g / eps)[None, :]
    cols = x.block_max(x.logw + f / eps)[:, None] + y.block_max(g / (lam * eps))[None, :]
    keep = (torch.maximum(rows, cols) - d2) >= -tau
    nbx, nby = keep.shape           # never leave a block without partners: keep its nearest
    keep[torch.arange(nbx, device=keep.device), d2.argmin(1)] = True
    keep[d2.argmin(0), torch.arange(nby, device=keep.device)] = True
    xy = _csr(keep)
    return xy, _csr(keep.t()), len(xy[1]) / keep.numel()     # (the count is on the host already)


def _csr(keep: torch.Tensor):
    rows, cols = keep.nonzero(as_tuple=True)
    row_ptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=keep.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=keep.shape[0]), 0)
    return row_ptr, cols.int()


def softmin_bound(rows: Layout, cols: Layout, h: torch.Tensor, eps: float, blocks: int = 4) -> torch.Tensor:
    """An upper bound, per stored row point, on softmin_eps over the columns of (C - eps h), h the
    columns' log weight plus potential / eps: any one column j bounds it by C_ij - eps h_j. The
    smallest of those over the `blocks` column blocks nearest the row's block (by box gap, then by
    the distance between box centres: overlapping boxes have no gap) is within ~2 eps for most
    points of a surface. Block pairs chosen with it keep every pair the exact potentials keep."""
    lo_x, hi_x = rows.boxes()
    lo_y, hi_y = cols.boxes()
    centres = (((lo_y + hi_y)[None] - (lo_x + hi_x)[:, None]) ** 2).sum(-1) / 4
    rank = box_gap2(lo_x, hi_x, lo_y, hi_y) + 1e-3 * centres
    near = rank.topk(min(blocks, rank.shape[1]), 1, largest=False).indices       # (row blocks, k)
    nb = len(near)
    y = cols.pts.reshape(3, -1, cols.block)[:, near].reshape(3, nb, 1, -1)    # (3, row blocks, 1, k By)
    x = rows.pts.reshape(3, nb, rows.block, 1)                               # (3, row blocks, Bx, 1)
    c = ((x - y) ** 2).sum(0)                                                # (row blocks, Bx, k By)
    return (c - eps * h.reshape(-1, cols.block)[near].reshape(nb, 1, -1)).amin(2).reshape(-1)


@dataclass
class WarmStart:
    """What one frame leaves for the next: eps, the finest level and its potentials.

    The next frame starts from soft c-transforms of the kept potentials onto its own points,
    f(x) = lam softmin_eps over kept y of (C - g_kept - eps log b_kept), and likewise g; the
    block pairs of those c-transforms are chosen with upper bounds of them (`softmin_bound`).
    """

    eps: float
    x: Layout
    f: torch.Tensor
    y: Layout
    g: torch.Tensor

    def bounds(self, x: Layout, y: Layout, eps: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Upper bounds of the c-transforms onto new rows x (from the kept g) and columns y (from the kept f)."""
        return (lam * softmin_bound(x, self.y, self.y.logw + self.g / eps, eps),
                lam * softmin_bound(y, self.x, self.x.logw + self.f / eps, eps))


@dataclass
class MultiscaleResult(SinkhornResult):
    """A SinkhornResult on the finest level, plus how each level went and the next frame's start."""

    levels: list = field(default_factory=list)   # per level: dict(points, iterations, eps, pairs)
    warm: WarmStart | None = None
    tau: float = 16.0

    def transfer(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What new points x (n, 3) would receive as rows of this plan: the plan-weighted mean of
        values v (m, k) on y, and the mass ratio (pi 1)_i / a_i in [0, inf).

        A new row's potential is its soft c-transform, f = -lam eps lse with
        lse = log sum_j b_j exp((g_j - C_ij) / eps), so (pi 1)/a = exp(f/eps + lse) = exp((1-lam) lse):
        1 where a point is matched as the solution's own rows are, 0 far from every y.
        """
        w, lam = self.warm, damping(self.eps, self.rho)
        # one pass, so dense is cheaper than choosing pairs up to ~1e9 pairs on the GPU (~0.3 ms of
        # exponentials); dense needs no Morton order either
        dense = (self.problem.backend == "triton" and x.is_cuda
                 and -(-len(x) // w.x.block) * w.x.block * w.y.n_pad <= DENSE_TRANSFER_PAIRS)
        X = Layout.build(x.float(), None, w.x.block, sort=not dense)
        h = w.y.logw + w.g / self.eps
        pairs = None if dense else block_pairs(X, w.y, lam * softmin_bound(X, w.y, h, self.eps), w.g,
                                               self.eps, lam, self.tau)[0]
        lse, mean_v, _ = barycenter(X.pts, w.y.pts, h, self.eps,
                                    w.y.pad(v.reshape(len(v), -1).float()).contiguous(), pairs,
                                    X.block, self.problem.backend)
        ratio = torch.exp(((1 - lam) * lse).clamp_max(50.0))
        return X.unpad(mean_v), X.unpad(ratio)


class MultiscaleSinkhorn:
    """Coarse-to-fine block-sparse Sinkhorn between two 3-D clouds (see the module docstring).

    eps: target blur (m^2); rho: KL marginal penalty (None: balanced); tol: marginal error (L1)
    at which the finest level stops; sizes: voxel sizes coarse -> fine (None: from the data);
    ratio: size ratio between levels; tau: truncation in units of the log-sum (exp(-tau));
    block: points per block; dense_blocks: levels with at most this many block pairs run dense
    (None: 4096 on the GPU, where a dense 8k x 8k soft-min took ~45 us and choosing its pairs
    ~1 ms of launches and host syncs; 256 on the CPU, where every entry costs);
    omega: over-relaxation at the final eps (None: the solver's default); cuda_graphs: replay
    dense GPU iterations as CUDA graphs (graphed.py); point_lists: at the target eps, sparse
    levels iterate over the entries that matter, not over whole block pairs (module docstring;
    None: on the Triton backend only: on the CPU choosing them in torch made the aligner's cold
    frame 3.8 -> 6.2 s, bench/RESULTS.md).
    """

    def __init__(self, eps: float, rho: float | None = None, tol: float = 1e-3, *,
                 sizes: list[float] | None = None, ratio: float = 4.0, scaling: float = 0.5,
                 tau: float = 16.0, block: int | None = None, max_iter: int = 500, check_every: int = 5,
                 dense_blocks: int | None = None, omega: float | None = None, backend: str = "auto",
                 cuda_graphs: bool = True, point_lists: bool | None = None):
        # block=None: 128 on the GPU (kernel efficiency), 16 on the CPU (less work wasted in
        # partly relevant block pairs, since the torch backend does every entry of a kept pair:
        # against 32, a warm aligner frame 14% faster, a 20k-point cold solve 16-28%; 8 was slower)
        if eps <= 0 or (rho is not None and rho <= 0) or tol <= 0:
            raise ValueError("eps, rho and tol must be positive")
        self.eps, self.rho, self.tol, self.sizes, self.ratio = eps, rho, tol, sizes, ratio
        self.scaling, self.tau, self.block, self.max_iter = scaling, tau, block, max_iter
        self.check_every, self.dense_blocks, self.backend = check_every, dense_blocks, backend
        self.omega, self.cuda_graphs, self.point_lists = omega, cuda_graphs, point_lists

    def level_sizes(self, diameter: float) -> list[float]:
        """Voxel sizes coarse -> fine: from diameter/8 while above 2 sqrt(eps)."""
        if self.sizes is not None:
            return sorted(self.sizes, reverse=True)
        sizes, s = [], diameter / 8
        while s > 2 * math.sqrt(self.eps):
            sizes.append(s)
            s /= self.ratio
        return sizes

    def _dense(self, x: Layout, y: Layout) -> bool:
        dense = self.dense_blocks if self.dense_blocks is not None else (4096 if x.pts.is_cuda else 256)
        return (x.n_pad // x.block) * (y.n_pad // y.block) <= dense

    def _problem(self, x: Layout, y: Layout, f, g, eps, backend, stats=None, margin=None) -> Problem:
        """Dense, block pairs, or (margin: not None) block pairs and point lists chosen with tau + margin."""
        if self._dense(x, y):
            return Problem(x, y, backend)
        lists = margin is not None
        tau = self.tau + (margin if lists else 0.0)
        pxy, pyx, frac = block_pairs(x, y, f, g, eps, damping(eps, self.rho), tau)
        if stats is not None:
            stats["pairs"] = frac
        if not lists:
            return Problem(x, y, backend, pxy, pyx)
        if x.block != y.block:
            raise ValueError("point lists need one block size on both sides")
        lists = select(x.pts, y.pts, x.logw + f / eps, y.logw + g / eps, eps, pxy, pyx, x.block, tau, backend)
        if lists is None:                       # more entries than int32 indices hold: whole pairs
            return Problem(x, y, backend, pxy, pyx)
        lxy, lyx = lists
        if stats is not None:
            stats["entries"] = (lxy.entries + lyx.entries) / (2 * x.n_pad * y.n_pad)
            stats["selections"] = stats.get("selections", 0) + 1
        return Problem(x, y, backend, pxy, pyx, lxy, lyx)

    def _refresh(self, X: Layout, Y: Layout, backend, stats):
        """refresh(f, g, eps) for `iterate`, called at every eps step and check: block pairs, and
        at the target eps point lists once the potentials move slowly enough (see the module
        docstring). Lists are chosen with tau + a margin of 4x the last check's move (within
        LIST_MARGINS) and kept while no potential has moved by more than half the margin since."""
        held = {}

        def moved(f, g, since) -> torch.Tensor:
            """The largest move of a potential since `since`, in units of the truncation's exponent,
            over the points that can carry mass: unbalanced, a point whose potential is over
            rho (tau + the largest margin) sends or receives under exp(-tau - margin) of its
            weight (points far from the other cloud; their potentials creep for hundreds of
            iterations)."""
            lam = damping(since["eps"], self.rho)
            out = []
            for p, old, lay, scale in ((f, since["f"], X, lam * since["eps"]), (g, since["g"], Y, since["eps"])):
                live = torch.isfinite(lay.logw)
                if self.rho is not None:
                    live &= p < self.rho * (self.tau + LIST_MARGINS[1])
                out.append(torch.where(live, (p - old).abs(), torch.zeros_like(p)).max() / scale)
            return torch.maximum(*out)

        def refresh(f, g, eps):
            last, chosen = held.get("last"), held.get("chosen")
            held["last"] = {"eps": eps, "f": f, "g": g}
            lists = self.point_lists if self.point_lists is not None else backend == "triton"
            if not (lists and eps == self.eps and last is not None and last["eps"] == eps):
                return self._problem(X, Y, f, g, eps, backend, stats)
            since = torch.stack([moved(f, g, s) for s in (last, chosen) if s is not None]).tolist()  # one sync
            if len(since) > 1 and since[1] <= chosen["margin"] / 2:
                return chosen["problem"]
            margin = max(LIST_MARGINS[0], 4 * since[0])
            if not margin <= LIST_MARGINS[1]:                     # still moving fast: whole pairs
                return self._problem(X, Y, f, g, eps, backend, stats)
            problem = self._problem(X, Y, f, g, eps, backend, stats, margin)
            held["chosen"] = {"eps": eps, "f": f, "g": g, "problem": problem, "margin": margin}
            if stats is not None:
                stats["margin"] = margin
            return problem
        return refresh

    def __call__(self, x: torch.Tensor, y: torch.Tensor, a=None, b=None,
                 warm: WarmStart | None = None) -> MultiscaleResult:
        x, y = x.float(), y.float()
        backend = resolve_backend(self.backend, x.device)
        block = self.block or (128 if x.device.type == "cuda" else 16)
        loga = torch.log(a.float()) if a is not None else torch.full((len(x),), -math.log(len(x)), device=x.device)
        logb = torch.log(b.float()) if b is not None else torch.full((len(y),), -math.log(len(y)), device=x.device)
        rho, eps = self.rho, self.eps
        log = Iterations()
        levels_info = []
        if warm is not None:
            X = Layout.build(x, loga.exp(), block)
            Y = Layout.build(y, logb.exp(), block)
            start = max(warm.eps, eps)
            f, g = self._hand_over((warm.x, warm.y), Level(X), Level(Y), warm.f, warm.g, start, backend,
                                   lambda: warm.bounds(X, Y, start, damping(start, self.rho)))
            # one plain iteration first: the handed-over f and g were each made from the other
            # frame's potentials, not from each other, and over-relaxation would carry their gaps
            # over (0.6x an iteration): an aligner frame's first check then read 1e3-1e11 instead of 0.2
            schedule = [start] + eps_schedule(start, eps, self.scaling)
        else:
            diameter2 = squared_diameter(x, y)
            sizes = useful_sizes(x, y, self.level_sizes(math.sqrt(diameter2)))
            xs, ys = pyramid(x, loga, sizes, block), pyramid(y, logb, sizes, block)
            schedule = eps_schedule(diameter2, eps, self.scaling)
            f = g = coarse = None
            for level, size in enumerate(sizes + [None]):      # None: the points themselves
                X, Y = xs[level].layout, ys[level].layout
                steps = [e for e in schedule if size is not None and e >= size**2] or schedule[:1]
                if coarse is None:
                    f, g = torch.zeros(X.n_pad, device=x.device), torch.zeros(Y.n_pad, device=x.device)
                else:
                    f, g = self._hand_over(coarse, xs[level], ys[level], f, g, steps[0], backend)
                if size is None:
                    break                                       # the finest level iterates to tol
                schedule = schedule[len(steps):] or [eps]
                info = {"points": (X.n, Y.n), "eps": (steps[0], steps[-1]), "iterations": len(steps)}
                select = lambda f_, g_, e, X=X, Y=Y, info=info: self._problem(X, Y, f_, g_, e, backend, info)
                _, f, g = anneal(Problem(X, Y, backend), f, g, steps, rho, select)
                log.iterations += len(steps)
                levels_info.append(info)
                coarse = (X, Y)
        return self._finest(X, Y, f, g, schedule, backend, log, levels_info)

    def refine(self, previous: MultiscaleResult, y: torch.Tensor) -> MultiscaleResult:
        """Solve again after the columns moved, from `previous`'s potentials as they are: the
        same rows, and y the same points as `previous`'s columns in the same order, moved (a
        rigid step of the aligner). Skips the layouts and the hand-over that a new frame needs."""
        w = previous.warm
        X, Y = w.x, w.y.moved(y.float())
        backend = resolve_backend(self.backend, y.device)
        return self._finest(X, Y, w.f, w.g, eps_schedule(max(w.eps, self.eps), self.eps, self.scaling),
                            backend, Iterations(), [])

    def _finest(self, X: Layout, Y: Layout, f, g, schedule, backend, log: Iterations,
                levels_info: list) -> MultiscaleResult:
        """Iterate on the finest level to tol; the result carries the next start."""
        info = {"points": (X.n, Y.n), "eps": (schedule[0], schedule[-1])}
        before = log.iterations
        problem, f, g, log = iterate(
            Problem(X, Y, backend), f, g, schedule, rho=self.rho, tol=self.tol, max_iter=self.max_iter,
            check_every=self.check_every, log=log, omega=self.omega, cuda_graphs=self.cuda_graphs,
            refresh=self._refresh(X, Y, backend, info))
        info["iterations"] = log.iterations - before
        levels_info.append(info)
        result = MultiscaleResult(problem, f, g, self.eps, self.rho, log.iterations, log.marginal_error,
                                  log.errors, levels=levels_info, tau=self.tau)
        result.warm = WarmStart(self.eps, X, f, Y, g)
        return result

    def _hand_over(self, coarse, fine_x: Level, fine_y: Level, f_c, g_c, eps, backend, estimates=None):
        """Fine potentials from coarse ones by soft c-transforms. Block pairs are chosen with
        estimates of the fine potentials: estimates() -> (f, g) if given, else the parents'
        values (not computed when both transforms run dense: a warm frame's grid lookups were
        ~1.7 ms of launches and host syncs on the GPU, for nothing)."""
        CX, CY = coarse
        X, Y = fine_x.layout, fine_y.layout
        if self._dense(X, CY) and self._dense(CX, Y):
            f_est = g_est = None
        elif estimates is not None:
            f_est, g_est = estimates()
        else:
            f_est, g_est = f_c[fine_x.parent], g_c[fine_y.parent]
        lam = damping(eps, self.rho)
        to_y = self._problem(X, CY, f_est, g_c, eps, backend)    # fine x <- coarse y
        to_x = self._problem(CX, Y, f_c, g_est, eps, backend)    # fine y <- coarse x
        return lam * to_y.softmin_x(g_c, eps), lam * to_x.softmin_y(f_c, eps)
