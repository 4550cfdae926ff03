"""Camera -> LiDAR extrinsic by optimal transport and point-to-plane Gauss-Newton.

One frame, as `Aligner.align` reads:
  preprocess  crop both clouds by range, voxel-downsample them, estimate camera surface normals,
              and keep the LiDAR points that the camera can see under the current estimate;
  register    for eps annealed from eps_start down to eps: solve unbalanced OT between the LiDAR
              points x (rows) and the moved camera points y = T c; give each x its plan-weighted
              target y^, normal n^ and transported mass; one weighted Gauss-Newton step on the
              point-to-plane residual n^ . (x - y^) moves T. Potentials carry over between solves.

Why point-to-plane on plan targets: sparse LiDAR rings against a dense camera surface bias point
targets (the barycentre of a surface patch is not the point the LiDAR hit), but it lies on the
surface, and its normal measures the distance that matters. Weights: transported mass (points
the camera does not see carry none), normal coherence and planarity (edges and clutter count
less) and a Geman-McClure factor on the residual (outliers count little).

Depth noise grows with range (sigma ~ z^2 on stereo cameras). It biased the fixed point along the
street by 2-5 cm on a 128-beam drive (0.3 cm with a noise-free camera), mostly through the voxel
weights: one unit of mass per voxel gave the sparse fringe of a noisy surface as much mass as its
core, so camera voxels weigh by their point counts, and camera voxels are 0.2 m (0.25 m left the
64-beam seed-1 drive 1.1 cm off along the street; 0.15 m was better there but worse on a seed whose
first frames see little, with the same 8000-point budget). A smaller part came from the range cut:
near it a surface is one-sided (points pushed past the cut are gone), so the LiDAR stops
`camera_range_margin_m` short of it (on the four test drives this helps one and hurts another; see
bench/RESULTS.md).

Across frames the state keeps T, the final eps and the finest potentials; a warm frame runs at
most `rigid_steps` solves at the final eps, started from the kept potentials, and stops after a
step under `converged_m` (on a drive the second step of a warm frame moved T by 0.00-0.06 mm after
a first of 0.1-1.6 mm); within a frame each solve goes on from the last one's potentials (the same
points, moved by the step: `refine`). A cold frame (the first, or after a reset) goes on at the
final eps until its step is under `converged_m` (at most `cold_extra_steps` more): from a
5 deg / 0.3 m prior the schedule alone can stop 1 deg / 40 cm short along a street's weakly
constrained directions, and the fused information of later frames then holds the estimate there
(seen on a 128-beam drive).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import record_function

from ros_ot_fusion.kernels.normals import plane_fit
from ros_ot_fusion.ot.multiscale import MultiscaleResult, MultiscaleSinkhorn, WarmStart, voxel_keys
from ros_ot_fusion.ot.sinkhorn import eps_schedule, resolve_backend
from ros_ot_fusion.transforms import axis_angle_to_matrix


@dataclass
class AlignConfig:
    min_range_m: float = 0.5
    max_range_m: float = 80.0
    camera_max_range_m: float = 20.0
    lidar_voxel_m: float = 0.25
    camera_voxel_m: float = 0.2
    normal_radius_m: float = 0.4
    max_points: int = 8000
    crop_margin_m: float = 1.0
    camera_range_margin_m: float = 2.0
    pyramid_voxel_sizes: tuple = (2.0, 0.5)
    eps_start: float = 0.25
    eps: float = 0.0025
    eps_scaling: float = 0.25
    rho: float = 0.05
    tol: float = 1e-3
    max_iter: int = 300
    rigid_steps: int = 3            # a warm frame's most solves; it stops once converged
    warm_start: bool = True
    memory: float = 0.8             # per-frame decay of earlier frames' information (0: none)
    cold_extra_steps: int = 12      # a cold frame's further steps at the final eps, until converged
    converged_m: float = 0.002      # converged: a step under this (rotation in metres at the cloud's radius)

    @property
    def camera_range_m(self) -> float:
        """The camera's range cut: camera points beyond it are not used."""
        return min(self.max_range_m, self.camera_max_range_m)

    @classmethod
    def from_params(cls, p: dict) -> "AlignConfig":
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in p.items() if k in names}
        kw["eps_start"], kw["eps"] = p["eps_schedule"]
        kw["pyramid_voxel_sizes"] = tuple(p["pyramid_voxel_sizes"])
        kw["memory"] = 1.0 - p["smoothing_alpha"] if p["smoothing"] else 0.0
        return cls(**kw)


@dataclass
class AlignState:
    """What one frame leaves for the next (per sensor pair)."""

    T: np.ndarray                          # 4x4 camera -> LiDAR, the last estimate
    warm: WarmStart | None = None          # the last plan's potentials (None: cold start)
    information: np.ndarray | None = None  # 6x6: what the frames so far constrain (twists about the origin)


@dataclass
class Alignment:
    T: np.ndarray                          # 4x4 camera -> LiDAR estimated on this frame
    ok: bool
    reason: str = ""
    steps: list = field(default_factory=list)   # per solve: eps, iterations, marginal error, residual
    result: MultiscaleResult | None = None      # the last plan (rows: `lidar`, columns: `camera`)
    lidar: torch.Tensor | None = None           # the plan's LiDAR points (LiDAR frame)
    camera: torch.Tensor | None = None          # the plan's camera points (voxel centroids, camera frame)
    camera_rgb: torch.Tensor | None = None      # their mean colours (k, 3) float, or None
    bounds: tuple | None = None                 # the camera's view (see view_bounds)
    state: AlignState | None = None             # for the next frame

    def __post_init__(self):
        # the steps' `matched` fractions stay on the device until the frame ends: one host sync
        pending = [s for s in self.steps if isinstance(s.get("matched"), torch.Tensor)]
        if pending:
            for s, v in zip(pending, torch.stack([s["matched"] for s in pending]).tolist()):
                s["matched"] = v

    @property
    def iterations(self) -> int:
        return sum(s["iterations"] for s in self.steps)


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------

def to_device(a, device, dtype=torch.float32) -> torch.Tensor:
    """A small host array on `device`. Through pinned memory: a copy from pageable memory to the
    GPU first waits for everything queued on the stream, and a frame made ~10 of them."""
    t = torch.as_tensor(a, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


def transform(T: np.ndarray, p: torch.Tensor) -> torch.Tensor:
    Tt = to_device(T, p.device)
    return p @ Tt[:3, :3].t() + Tt[:3, 3]


def in_range(p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    r2 = (p * p).sum(1)
    return (r2 >= lo * lo) & (r2 <= hi * hi)


def voxel_downsample(p: torch.Tensor, size: float, values: torch.Tensor | None = None):
    """Voxel centroids (k, 3), the mean of per-point values (k, ...) in each voxel (None without
    values) and the number of points in each voxel (k,) float."""
    _, parent, count = torch.unique(voxel_keys(p, size), return_inverse=True, return_counts=True)
    count = count.float()
    centroid = torch.zeros(len(count), 3, device=p.device).index_add_(0, parent, p) / count[:, None]
    if values is None:
        return centroid, None, count
    total = torch.zeros(len(centroid), *values.shape[1:], device=p.device).index_add_(0, parent, values.float())
    return centroid, total / count.reshape(-1, *[1] * (values.dim() - 1)), count


def normals(p: torch.Tensor, radius: float, at: torch.Tensor | None = None,
            backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Unit normals (k, 3) and planarity in [0, 1] (k,) from the covariance of the points p in the
    3x3x3 voxels (edge `radius`) around each point p[at] (all points without `at`); planarity 0
    where too few points define a plane."""
    keys = voxel_keys(p, radius)
    cells, inv = torch.unique(keys, return_inverse=True)
    pd = p.double() - p.double().mean(0)
    x, y, z = pd.unbind(1)
    moments = torch.stack([torch.ones_like(x), x, y, z, x * x, x * y, x * z, y * y, y * z, z * z], 1)
    sums = torch.zeros(len(cells), 10, device=p.device, dtype=torch.float64).index_add_(0, inv, moments)
    return plane_fit(keys if at is None else keys[at], cells, sums, backend)


def view_bounds(camera: torch.Tensor, quantile: float = 0.001) -> tuple[float, float, float, float, float]:
    """The camera's field of view as seen in its own cloud: (u_lo, u_hi, v_lo, v_hi, z_max) with
    u = x/z, v = y/z (optical frame: z forward; every point in front of the camera)."""
    uv = camera[:100000, :2].t() / camera[:100000, 2]
    q = to_device([quantile, 1 - quantile], camera.device)
    u_lo, u_hi, v_lo, v_hi, z_max = torch.cat([torch.quantile(uv, q, dim=1).t().reshape(-1),
                                               camera[:, 2].max()[None]]).tolist()     # one host sync
    return u_lo, u_hi, v_lo, v_hi, z_max


def in_view(lidar_in_camera: torch.Tensor, bounds, margin: float) -> torch.Tensor:
    """LiDAR points (in the camera frame) inside the camera's view, widened by `margin` metres."""
    u_lo, u_hi, v_lo, v_hi, z_max = bounds
    x, y, z = lidar_in_camera.unbind(1)
    return ((z > 0.1) & (z < z_max + margin) & (x >= u_lo * z - margin) & (x <= u_hi * z + margin)
            & (y >= v_lo * z - margin) & (y <= v_hi * z + margin))


def subsample(n: int, budget: int, device) -> torch.Tensor | None:
    """A fixed random subset of `budget` of n indices (None: keep all)."""
    if n <= budget:
        return None
    gen = torch.Generator().manual_seed(n)
    return to_device(torch.randperm(n, generator=gen)[:budget], device, torch.int64)


# ---------------------------------------------------------------------------------------------
# the rigid update
# ---------------------------------------------------------------------------------------------

def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rotation matrix of a rotation vector (axis * angle)."""
    theta = float(np.linalg.norm(w))
    return np.eye(3) if theta < 1e-15 else axis_angle_to_matrix(w, theta)


def so3_log(R: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle) of a rotation matrix (angles under pi)."""
    angle = math.acos(max(-1.0, min(1.0, (np.trace(R) - 1) / 2)))
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / 2
    return w if angle < 1e-9 else w * angle / math.sin(angle)


def _skew(c: np.ndarray) -> np.ndarray:
    return np.array([[0, -c[2], c[1]], [c[2], 0, -c[0]], [-c[1], c[0], 0]])


def point_to_plane_step(x, y, n, w, prior=None):
    """Weighted Gauss-Newton step (a `Step`) moving targets y (k, 3) so that n . (x - y) -> 0;
    None when no weight is left (w sums to 0).

    Linearised about the targets' centroid c: y' = c + R (y - c) + v with R = exp([omega]x), the
    residual changes by -(omega . ((y - c) x n) + n . v). Also returns the weighted RMS residual
    before the step and the conditioning: the smallest over the largest eigenvalue of the normal
    matrix with rotations scaled to metres by the cloud's radius (this frame's observability).

    prior=(P, e): information P (6x6) that earlier frames hold about the correction, centred on
    the twist e (the step that would return to their estimate), both about the origin; the step
    minimises this frame's residuals plus (delta - e)' P (delta - e). The step's `information`
    is this frame's normal matrix about the origin, for the frames to come.
    """
    w = w.double()
    x, y, n = x.double(), y.double(), n.double()
    wsum = w.sum()
    c = (w[:, None] * y).sum(0) / wsum.clamp_min(1e-30)
    J = torch.cat([torch.cross(y - c, n, dim=1), n], 1)                    # (k, 6)
    r = (n * (x - y)).sum(1)
    Jw = J * w[:, None]
    # one host copy for everything the 6x6 solve needs (each .cpu() waits for the GPU)
    spread = (w * ((y - c) ** 2).sum(1)).sum()
    host = torch.cat([(Jw.t() @ J).reshape(-1), Jw.t() @ r, c, torch.stack([wsum, spread, (w * r * r).sum()])])
    host = host.cpu().numpy()
    H, b, c = host[:36].reshape(6, 6), host[36:42], host[42:45]
    wsum, spread, square = host[45:]
    if not wsum > 0:
        return None
    radius = max(math.sqrt(spread / wsum), 1e-6)
    scale = np.diag([1 / radius] * 3 + [1.0] * 3)
    ev = np.linalg.eigvalsh(scale @ H @ scale)
    conditioning = float(ev[0] / ev[-1]) if ev[-1] > 0 else 0.0
    # twists about c (omega, v) and about the origin (omega, u): u = v + c x omega, i.e. z_o = M z_c
    M = np.eye(6)
    M[3:, :3] = _skew(c)
    Minv = np.linalg.inv(M)
    A, rhs = H, b
    if prior is not None:
        P, e = prior
        Pc = M.T @ P @ M
        A, rhs = H + Pc, b + Pc @ (Minv @ e)
    delta = np.linalg.solve(A + 1e-9 * np.trace(A) * np.eye(6), rhs)
    rms = math.sqrt(square / wsum)
    return Step(delta, c, radius, rms, conditioning, Minv.T @ H @ Minv)


@dataclass
class Step:
    """A Gauss-Newton step: the twist (omega, v) about the centre c."""

    delta: np.ndarray
    centre: np.ndarray
    radius: float                  # metres per radian: the targets' spread, to compare the parts
    rms: float
    conditioning: float
    information: np.ndarray | None = None   # this frame's normal matrix, twists about the origin

    def scaled(self) -> np.ndarray:
        return np.concatenate([self.delta[:3] * self.radius, self.delta[3:]])

    def matrix(self, factor: float = 1.0) -> np.ndarray:
        D = np.eye(4)
        D[:3, :3] = so3_exp(factor * self.delta[:3])
        D[:3, 3] = self.centre - D[:3, :3] @ self.centre + factor * self.delta[3:]
        return D


def extrapolation(step: Step, previous: Step | None, max_factor: float = 8.0) -> float:
    """How far to take a step that repeats the last one in direction: ICP creeps along weakly
    constrained directions (each step a fixed fraction q of the remaining error), so the rest
    of a geometric series, 1 / (1 - q), is taken at once. The next solve corrects an overshoot."""
    if previous is None:
        return 1.0
    a, b = step.scaled(), previous.scaled()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0 or a @ b / (na * nb) < 0.9 or na >= 0.95 * nb:
        return 1.0
    return min(1.0 / (1.0 - na / nb), max_factor)


# ---------------------------------------------------------------------------------------------
# the aligner
# ---------------------------------------------------------------------------------------------

class Aligner:
    """OT-based camera -> LiDAR registration (see the module docstring)."""

    def __init__(self, config: AlignConfig, device: torch.device | str = "cpu", backend: str = "auto",
                 min_conditioning: float = 1e-4, min_points: int = 50):
        self.config, self.device, self.backend = config, torch.device(device), backend
        self.min_conditioning, self.min_points = min_conditioning, min_points

    def preprocess_camera(self, camera_xyz, camera_rgb=None):
        """Camera points (camera frame) -> voxel centroids, their normals, planarity, colours, view."""
        cfg = self.config
        c = torch.as_tensor(camera_xyz, dtype=torch.float32).to(self.device)
        # a depth camera sees only what is in front of it (z > 0): anything else is corrupt
        keep = in_range(c, cfg.min_range_m, cfg.camera_range_m) & (c[:, 2] > 1e-3)
        rgb = None if camera_rgb is None else torch.as_tensor(camera_rgb).to(self.device)[keep]
        c = c[keep]
        if len(c) < self.min_points:
            return None
        bounds = view_bounds(c)
        c, rgb, count = voxel_downsample(c, cfg.camera_voxel_m, rgb)
        idx = subsample(len(c), cfg.max_points, self.device)
        nrm, planarity = normals(c, cfg.normal_radius_m, idx,      # of the kept voxels, from all of them
                                 resolve_backend(self.backend, self.device))
        if idx is not None:
            c, count = c[idx], count[idx]
            rgb = None if rgb is None else rgb[idx]
        return c, nrm, planarity, rgb, count / count.sum(), bounds

    def crop_lidar(self, lidar: torch.Tensor, T: np.ndarray, bounds, range_margin: float = 0.0) -> torch.Tensor:
        """Boolean mask of the LiDAR points (LiDAR frame) that the camera can see under T; with
        range_margin > 0 only those at least that much nearer than the camera's range cut (0: no range cut)."""
        cfg = self.config
        keep = in_range(lidar, cfg.min_range_m, cfg.max_range_m)
        seen = transform(np.linalg.inv(T), lidar)
        if range_margin > 0:
            cut = cfg.camera_range_m - range_margin
            keep &= (seen * seen).sum(1) <= cut * cut
        return keep & in_view(seen, bounds, cfg.crop_margin_m)

    def align(self, lidar_xyz, camera_xyz, camera_rgb=None, state: AlignState | None = None,
              prior: np.ndarray | None = None) -> Alignment:
        """Estimate the camera -> LiDAR transform on one frame, starting from `state` (warm) or
        from `prior` (cold)."""
        cfg = self.config
        T = (state.T if state is not None else prior).copy()
        warm = state.warm if (state is not None and cfg.warm_start) else None
        cold = warm is None
        lidar = torch.as_tensor(lidar_xyz, dtype=torch.float32).to(self.device)
        with record_function("align.preprocess_camera"):
            cam = self.preprocess_camera(camera_xyz, camera_rgb)
        if cam is None:
            return Alignment(T, False, "too few camera points in front of the camera and in range")
        c, nrm, planarity, rgb, b, bounds = cam
        x = lidar[self.crop_lidar(lidar, T, bounds, cfg.camera_range_margin_m)]
        x = voxel_downsample(x, cfg.lidar_voxel_m)[0] if len(x) else x
        idx = subsample(len(x), cfg.max_points, self.device)
        x = x if idx is None else x[idx]
        if len(x) < self.min_points:
            return Alignment(T, False, f"too few LiDAR points in the camera's view ({len(x)})")
        steps = ([cfg.eps] * cfg.rigid_steps if warm is not None else
                 eps_schedule(cfg.eps_start, cfg.eps, cfg.eps_scaling) + [cfg.eps] * (cfg.rigid_steps - 1))
        # earlier frames' information, decayed, holds what this frame alone cannot pin down
        memory = None
        if state is not None and state.information is not None and cfg.memory > 0:
            memory = cfg.memory * state.information
        T_before = T.copy()
        log, result, previous, information = [], None, None, None
        extra = 0
        for i, eps in enumerate(steps):                  # (a cold frame may append steps)
            y = transform(T, c)
            n = nrm @ to_device(T[:3, :3], self.device).t()
            solver = MultiscaleSinkhorn(eps, rho=max(cfg.rho, 4 * eps), tol=cfg.tol,
                                        sizes=[s for s in cfg.pyramid_voxel_sizes if s * s > eps],
                                        max_iter=cfg.max_iter, backend=self.backend)
            with record_function("align.solve"):    # later steps go on from the last one's potentials
                result = solver(x, y, b=b, warm=warm) if i == 0 else solver.refine(result, y)
            warm = result.warm
            if not (math.isfinite(result.marginal_error) and torch.isfinite(result.f_pad).all()):
                return Alignment(T_before, False, f"solver diverged at eps={eps:g}", log)
            with record_function("align.transport"):
                both, mass = result.transport(torch.cat([y, n, planarity[:, None]], 1))
            target, normal, plan_planarity = both[:, :3], both[:, 3:6], both[:, 6]
            coherence = normal.norm(dim=1)
            normal = normal / coherence.clamp_min(1e-9)[:, None]
            mass = (mass * len(x)).clamp(0, 1)
            r = (normal * (x - target)).sum(1)
            s2 = 4 * max(eps, 0.05**2)                   # Geman-McClure scale: 2 blurs, at least 10 cm
            w = mass * coherence**2 * plan_planarity / (1 + r * r / s2) ** 2
            final = eps == cfg.eps
            fused = None
            if final and memory is not None:         # the step back to the last estimate, about the origin
                back = T_before @ np.linalg.inv(T)
                fused = (memory, np.concatenate([so3_log(back[:3, :3]), back[:3, 3]]))
            step = point_to_plane_step(x, target, normal, w, fused)
            if step is None:
                return Alignment(T_before, False, "no transported mass: the clouds do not overlap", log)
            factor = extrapolation(step, previous) if final else 1.0
            previous = step if final else None
            log.append({"eps": eps, "iterations": result.iterations,
                        "marginal_error": result.marginal_error, "residual_m": step.rms,
                        "matched": (mass > 0.5).float().mean(), "conditioning": step.conditioning,
                        "extrapolation": factor})
            if step.conditioning < self.min_conditioning:
                return Alignment(T_before, False, f"degenerate geometry: the transform is not observable "
                                                  f"(conditioning {step.conditioning:.1e})", log)
            T = step.matrix(factor) @ T
            information = step.information
            size = factor * np.linalg.norm(step.scaled())
            if not cold and final and size < cfg.converged_m:
                break                                # settled: later steps would move T by ~1% of this
            if cold and i == len(steps) - 1 and extra < cfg.cold_extra_steps and size > cfg.converged_m:
                steps.append(cfg.eps)                # not converged yet: one more step
                extra += 1
        if memory is not None:
            information = information + memory
        return Alignment(T, True, "aligned", log, result, x, c, rgb, bounds, AlignState(T, warm, information))
