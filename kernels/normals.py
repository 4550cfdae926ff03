"""Surface normals by local plane fits: one kernel from voxel moments to normals and planarity.

Each query point takes the points of the 3x3x3 cells around its own (cells of the sorted keys
`cells`, with per-cell moments `sums` = [count, sum p, sum p p^T (xx xy xz yy yz zz)] in float64,
p about the cloud's mean), their covariance A, and returns A's smallest eigenvector (the normal)
and the planarity (l1 - l0) / l2 (0 where fewer than 5 points define the plane).

The torch reference spends ~100 small launches a call (27 gathers per point, then the 3x3
eigenproblem element by element); the kernel finds the 27 cells side by side by binary search
and solves each point's eigenproblem in registers.

Eigenvalues. The reference solves the characteristic cubic by its trigonometric form; the kernel
has no arccos (the interpreter neither), so it runs Newton's method on the cubic from below
zero and from above the trace: on a cubic with three real roots, Newton started outside them
moves monotonically to the nearest one (quadratically for a simple root, linearly with ratio
1/2 or 2/3 for a double or triple one: NEWTON steps bring even those to ~1e-6 of the trace).
The eigenvector is the reference's: the largest cross product of two rows of A - l0 I, or, where
that matrix has rank 1 (a line), a unit vector normal to its largest row. Same rule, same sign.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

NEWTON = 40
NEIGHBOURS = [(dx << 42) + (dy << 21) + dz for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)]
_offsets = {}


@triton.jit
def _cross(a0, a1, a2, b0, b1, b2):
    return a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0


@triton.jit
def _newton_root(start, tr, c1, det, STEPS: tl.constexpr):
    """The root of l^3 - tr l^2 + c1 l - det nearest to `start` (outside the roots)."""
    lam = start
    for _ in tl.static_range(STEPS):
        f = ((lam - tr) * lam + c1) * lam - det
        df = (3.0 * lam - 2.0 * tr) * lam + c1
        lam = tl.where(df != 0.0, lam - f / tl.where(df != 0.0, df, 1.0), lam)
    return lam


@triton.jit(do_not_specialize=["n", "k", "steps"])      # sizes change every frame: one compile
def _plane_fit_kernel(Q, CELLS, SUMS, OFF, NORMAL, PLANARITY, n, k, steps, BLOCK: tl.constexpr,
                      STEPS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < n
    o = tl.arange(0, 32)[None, :]
    near = tl.load(Q + rows, mask=live, other=0)[:, None] + tl.load(OFF + o, mask=o < 27, other=0)
    lo = tl.zeros([BLOCK, 32], tl.int32)
    hi = lo + k
    for _ in range(steps):                               # lower bound of `near` in CELLS, all 27 at once
        act = lo < hi
        mid = (lo + hi) // 2
        less = tl.load(CELLS + mid, mask=act, other=0) < near
        lo = tl.where(act & less, mid + 1, lo)
        hi = tl.where(act & ~less, mid, hi)
    pos = tl.minimum(lo, k - 1)
    hit = (tl.load(CELLS + pos) == near) & (o < 27) & live[:, None]
    at = SUMS + pos.to(tl.int64) * 10
    cnt = tl.sum(tl.load(at, mask=hit, other=0.0), axis=1)
    w = 1.0 / tl.maximum(cnt, 1.0)
    m0 = tl.sum(tl.load(at + 1, mask=hit, other=0.0), axis=1) * w
    m1 = tl.sum(tl.load(at + 2, mask=hit, other=0.0), axis=1) * w
    m2 = tl.sum(tl.load(at + 3, mask=hit, other=0.0), axis=1) * w
    a00 = tl.sum(tl.load(at + 4, mask=hit, other=0.0), axis=1) * w - m0 * m0
    a01 = tl.sum(tl.load(at + 5, mask=hit, other=0.0), axis=1) * w - m0 * m1
    a02 = tl.sum(tl.load(at + 6, mask=hit, other=0.0), axis=1) * w - m0 * m2
    a11 = tl.sum(tl.load(at + 7, mask=hit, other=0.0), axis=1) * w - m1 * m1
    a12 = tl.sum(tl.load(at + 8, mask=hit, other=0.0), axis=1) * w - m1 * m2
    a22 = tl.sum(tl.load(at + 9, mask=hit, other=0.0), axis=1) * w - m2 * m2
    # the characteristic cubic l^3 - tr l^2 + c1 l - det
    tr = a00 + a11 + a22
    c1 = a00 * a11 + a00 * a22 + a11 * a22 - a01 * a01 - a02 * a02 - a12 * a12
    det = a00 * (a11 * a22 - a12 * a12) - a01 * (a01 * a22 - a12 * a02) + a02 * (a01 * a12 - a11 * a02)
    pad = 1e-9 * tl.abs(tr)
    l0 = _newton_root(-pad, tr, c1, det, STEPS)
    l2 = _newton_root(tl.abs(tr) + pad, tr, c1, det, STEPS)
    l1 = tr - l0 - l2
    # rows of M = A - l0 I and their cross products
    r00 = a00 - l0
    r11 = a11 - l0
    r22 = a22 - l0
    u0, u1, u2 = _cross(r00, a01, a02, a01, r11, a12)
    v0, v1, v2 = _cross(r00, a01, a02, a02, a12, r22)
    q0, q1, q2 = _cross(a01, r11, a12, a02, a12, r22)
    nu = u0 * u0 + u1 * u1 + u2 * u2
    nv = v0 * v0 + v1 * v1 + v2 * v2
    nq = q0 * q0 + q1 * q1 + q2 * q2
    pick_v = nv > nu                                     # the first largest, as torch's argmax
    b0 = tl.where(pick_v, v0, u0)
    b1 = tl.where(pick_v, v1, u1)
    b2 = tl.where(pick_v, v2, u2)
    nb = tl.where(pick_v, nv, nu)
    pick_q = nq > nb
    b0 = tl.where(pick_q, q0, b0)
    b1 = tl.where(pick_q, q1, b1)
    b2 = tl.where(pick_q, q2, b2)
    nb = tl.sqrt(tl.where(pick_q, nq, nb))
    # rank 1: a unit vector normal to M's largest row (the cross product with the axis it leans on least)
    s0 = r00 * r00 + a01 * a01 + a02 * a02
    s1 = a01 * a01 + r11 * r11 + a12 * a12
    s2 = a02 * a02 + a12 * a12 + r22 * r22
    big1 = s1 > s0
    e0 = tl.where(big1, a01, r00)
    e1 = tl.where(big1, r11, a01)
    e2 = tl.where(big1, a12, a02)
    big2 = s2 > tl.where(big1, s1, s0)
    e0 = tl.where(big2, a02, e0)
    e1 = tl.where(big2, a12, e1)
    e2 = tl.where(big2, r22, e2)
    z0 = tl.abs(e0)
    z1 = tl.abs(e1)
    z2 = tl.abs(e2)
    ax1 = z1 < z0
    ax2 = z2 < tl.where(ax1, z1, z0)
    ax0 = ~ax1 & ~ax2
    ax1 = ax1 & ~ax2
    p0, p1, p2 = _cross(e0, e1, e2, ax0.to(tl.float64), ax1.to(tl.float64), ax2.to(tl.float64))
    np_ = tl.sqrt(p0 * p0 + p1 * p1 + p2 * p2)
    ok = np_ > 0
    p0 = tl.where(ok, p0 / tl.where(ok, np_, 1.0), 0.0)
    p1 = tl.where(ok, p1 / tl.where(ok, np_, 1.0), 0.0)
    p2 = tl.where(ok, p2 / tl.where(ok, np_, 1.0), 1.0)
    rank2 = nb > 1e-6 * (s0 + s1 + s2)
    inv = 1.0 / tl.where(rank2, nb, 1.0)
    tl.store(NORMAL + 3 * rows, tl.where(rank2, b0 * inv, p0).to(tl.float32), mask=live)
    tl.store(NORMAL + 3 * rows + 1, tl.where(rank2, b1 * inv, p1).to(tl.float32), mask=live)
    tl.store(NORMAL + 3 * rows + 2, tl.where(rank2, b2 * inv, p2).to(tl.float32), mask=live)
    planar = (l1 - l0) / tl.maximum(l2, 1e-12)
    planar = tl.minimum(tl.maximum(planar, 0.0), 1.0)
    tl.store(PLANARITY + rows, tl.where(cnt >= 5, planar, 0.0).to(tl.float32), mask=live)


def _neighbour_offsets(device) -> torch.Tensor:
    """NEIGHBOURS as an int64 tensor on `device`, made once per device (no host copy per call)."""
    off = _offsets.get(device)
    if off is None:
        off = _offsets[device] = torch.tensor(NEIGHBOURS, dtype=torch.int64, device=device)
    return off


def plane_fit_triton(query: torch.Tensor, cells: torch.Tensor, sums: torch.Tensor, block: int = 64):
    """Normals (n, 3) float32 and planarity (n,) float32 of the query keys (n,) int64 against the
    sorted cell keys (k,) int64 with their moments (k, 10) float64."""
    n, k = len(query), len(cells)
    normal = torch.empty(n, 3, device=query.device)
    planarity = torch.empty(n, device=query.device)
    if n == 0:
        return normal, planarity
    _plane_fit_kernel[(triton.cdiv(n, block),)](query.contiguous(), cells.contiguous(), sums.contiguous(),
                                                _neighbour_offsets(query.device),
                                                normal, planarity, n, k, max(1, k.bit_length()),
                                                BLOCK=block, STEPS=NEWTON)
    return normal, planarity


def smallest_eigenvector(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, (n, 3)) and the unit eigenvector of the smallest, (n, 3), of
    symmetric 3x3 matrices (n, 3, 3), in closed form. (torch.linalg.eigh on CUDA goes through
    cuSOLVER's batched solver: gigabytes of workspace for a few thousand matrices, and an internal
    error at ~200k.) Eigenvalues by the trigonometric solution of the characteristic cubic; the
    eigenvector as the largest cross product of two rows of A - l_min I."""
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    q = A.diagonal(dim1=1, dim2=2).sum(1) / 3
    off = A[:, 0, 1] ** 2 + A[:, 0, 2] ** 2 + A[:, 1, 2] ** 2
    p = (((A.diagonal(dim1=1, dim2=2) - q[:, None]) ** 2).sum(1) + 2 * off) / 6
    p = p.clamp_min(0).sqrt()
    B = (A - q[:, None, None] * eye) / p.clamp_min(1e-30)[:, None, None]
    det = (B[:, 0, 0] * (B[:, 1, 1] * B[:, 2, 2] - B[:, 1, 2] * B[:, 2, 1])      # no batched LU either
           - B[:, 0, 1] * (B[:, 1, 0] * B[:, 2, 2] - B[:, 1, 2] * B[:, 2, 0])
           + B[:, 0, 2] * (B[:, 1, 0] * B[:, 2, 1] - B[:, 1, 1] * B[:, 2, 0]))
    phi = torch.acos((det / 2).clamp(-1, 1)) / 3
    hi = q + 2 * p * torch.cos(phi)
    lo = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    evals = torch.stack([lo, 3 * q - hi - lo, hi], 1)
    M = A - lo[:, None, None] * eye
    cands = torch.stack([torch.linalg.cross(M[:, 0], M[:, 1]), torch.linalg.cross(M[:, 0], M[:, 2]),
                         torch.linalg.cross(M[:, 1], M[:, 2])], 1)                 # (n, 3, 3)
    norm = cands.norm(dim=2)
    best = norm.argmax(1)
    idx = torch.arange(len(A), device=A.device)
    v, vnorm = cands[idx, best], norm[idx, best, None]
    # a repeated smallest eigenvalue (a line): M has rank 1 and the cross products are noise; any
    # unit vector normal to M's largest row is an eigenvector (a blob, M = 0: any unit vector)
    row = M[idx, M.norm(dim=2).argmax(1)]
    perp = torch.linalg.cross(row, eye[row.abs().argmin(1)])
    pnorm = perp.norm(dim=1, keepdim=True)
    perp = torch.where(pnorm > 0, perp / pnorm.clamp_min(1e-300), eye[2].expand_as(perp))
    rank2 = vnorm > 1e-6 * (M ** 2).sum((1, 2))[:, None]
    return evals, torch.where(rank2, v / vnorm.clamp_min(1e-300), perp)


def plane_fit_torch(query: torch.Tensor, cells: torch.Tensor, sums: torch.Tensor):
    """The reference of `plane_fit_triton` (same arguments and results)."""
    k = len(cells)
    near = query[:, None] + _neighbour_offsets(query.device)                                    # (n, 27)
    pos = torch.searchsorted(cells, near).clamp_max(k - 1)
    s = sums[pos] * (cells[pos] == near)[..., None]                                             # (n, 27, 10)
    s = s.sum(1)
    cnt = s[:, 0]
    mean = s[:, 1:4] / cnt[:, None]
    second = s[:, 4:] / cnt[:, None]
    upper = [0, 1, 2, 1, 3, 4, 2, 4, 5]                 # xx xy xz yy yz zz -> 3x3
    cov = second[:, upper].reshape(-1, 3, 3) - mean[:, :, None] * mean[:, None, :]
    evals, normal = smallest_eigenvector(cov)
    planarity = ((evals[:, 1] - evals[:, 0]) / evals[:, 2].clamp_min(1e-12)).clamp(0, 1)
    planarity = torch.where(cnt >= 5, planarity, torch.zeros_like(planarity))
    return normal.float(), planarity.float()


def plane_fit(query, cells, sums, backend: str = "torch"):
    return (plane_fit_triton if backend == "triton" else plane_fit_torch)(query, cells, sums)
