"""Point sets as the kernels want them: transposed, padded to whole blocks, optionally Morton-sorted.

Sorting along a Morton (Z-order) curve makes each block of `block` consecutive points a small
spatial cluster, so a block's bounding box is tight and whole block pairs can be skipped when
their coupling is negligible (see `prune`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_BITS = 10                      # Morton code: 10 bits per axis, a 1024^3 grid over the bounding box


def _spread_table() -> torch.Tensor:
    """Each 10-bit value with two zero bits inserted between its bits (one lookup per axis)."""
    v = torch.arange(1 << _BITS, dtype=torch.int64)
    out = torch.zeros_like(v)
    for bit in range(_BITS):
        out |= ((v >> bit) & 1) << (3 * bit)
    return out


_SPREAD = {}                    # device -> _spread_table() there


def morton_order(points: torch.Tensor) -> torch.Tensor:
    """Permutation sorting (n, 3) points along a Z-order curve over their bounding box.

    A 1024^3 grid is fine enough for blocks of 32-128 points (cells of 4 cm on a 40 m scene), and
    three table lookups cost a dozen launches where spreading bits by shifts cost ~50."""
    table = _SPREAD.get(points.device)
    if table is None:
        table = _SPREAD[points.device] = _spread_table().to(points.device)
    lo = points.min(0).values
    extent = (points.max(0).values - lo).max().clamp_min(1e-12)
    q = ((points - lo) * ((2**_BITS - 1) / extent)).long().clamp_(0, 2**_BITS - 1)
    code = table[q]                                                    # (n, 3)
    return torch.argsort(code[:, 0] | (code[:, 1] << 1) | (code[:, 2] << 2))


@dataclass
class Layout:
    """A weighted point set laid out for the kernels."""

    pts: torch.Tensor           # (3, n_pad) float32, padded with copies of the last point
    logw: torch.Tensor          # (n_pad,) log weights, -inf on padding
    order: torch.Tensor | None  # (n,) original index of each stored point; None: stored as given
    n: int
    block: int

    @staticmethod
    def build(points: torch.Tensor, weights: torch.Tensor | None = None, block: int = 128,
              sort: bool = True) -> "Layout":
        """points (n, 3); weights (n,) positive (uniform 1/n if None)."""
        if points.dim() != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be (n, 3), got {tuple(points.shape)}")
        n = points.shape[0]
        if n == 0:
            raise ValueError("empty point set")
        points = points.float()
        logw = (torch.full((n,), -math.log(n), device=points.device)
                if weights is None else torch.log(weights.float()))
        order = morton_order(points) if sort and n > block else None
        if order is not None:
            points, logw = points[order], logw[order]
        pad = -n % block
        pts = torch.cat([points, points[-1:].expand(pad, 3)]).t().contiguous()
        logw = torch.cat([logw, logw.new_full((pad,), -torch.inf)]).contiguous()
        return Layout(pts, logw, order, n, block)

    def moved(self, points: torch.Tensor) -> "Layout":
        """The same points (n, 3), in the same order, at new coordinates (a rigid motion keeps
        each block a tight cluster, so the order need not change; nor, to a few percent for the
        aligner's corrections, the blocks' extents, which only choose the cost form)."""
        out = Layout(self.pad(points.float()).t().contiguous(), self.logw, self.order, self.n, self.block)
        if hasattr(self, "_extent2"):
            out._extent2 = self._extent2
        return out

    @property
    def n_pad(self) -> int:
        return self.pts.shape[1]

    @property
    def device(self) -> torch.device:
        return self.pts.device

    def points(self) -> torch.Tensor:
        """(n, 3) stored points, in original order."""
        return self.unpad(self.pts.t())

    def unpad(self, values: torch.Tensor) -> torch.Tensor:
        """Per-point values in storage order (n_pad, ...) -> original order (n, ...)."""
        values = values[: self.n]
        if self.order is None:
            return values
        out = torch.empty_like(values)
        out[self.order] = values
        return out

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """Per-point values in original order (n, ...) -> storage order (n_pad, ...)."""
        if self.order is not None:
            values = values[self.order]
        return torch.cat([values, values[-1:].expand(self.n_pad - self.n, *values.shape[1:])])

    def boxes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block bounding boxes (lo, hi), each (n_blocks, 3) (computed once: pts never change)."""
        if not hasattr(self, "_boxes"):
            b = self.pts.reshape(3, -1, self.block)
            self._boxes = b.amin(2).t(), b.amax(2).t()
        return self._boxes

    @property
    def extent2(self) -> float:
        """Largest squared diagonal of a block: bounds the expanded-cost rounding (needs_exact)."""
        if not hasattr(self, "_extent2"):
            lo, hi = self.boxes()
            self._extent2 = float(((hi - lo) ** 2).sum(1).max())
        return self._extent2

    def rank(self) -> torch.Tensor:
        """(n,) storage position of each original point (inverse of `order`)."""
        if self.order is None:
            return torch.arange(self.n, device=self.device)
        r = torch.empty_like(self.order)
        r[self.order] = torch.arange(self.n, device=self.device)
        return r

    def block_max(self, values: torch.Tensor) -> torch.Tensor:
        """Per-block maximum of per-point values (n_pad,), padding excluded."""
        v = torch.where(torch.isfinite(self.logw), values, torch.full_like(values, -torch.inf))
        return v.reshape(-1, self.block).amax(1)
