"""Pictures of an alignment: a top view of the LiDAR cloud with the camera cloud on it,
before and after calibration, side by side (matplotlib's Agg canvas: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_POINTS = 60_000


def _subsample(points, n, rng):
    points = np.asarray(points, float)
    return points if len(points) <= n else points[rng.choice(len(points), n, replace=False)]


def _ground_model(lidar, cell=4.0):
    """Ground height per `cell` x `cell` column: the lowest LiDAR point in it; columns the
    LiDAR does not reach (e.g. its blind circle) get the ground level around the sensor."""
    near = np.hypot(lidar[:, 0], lidar[:, 1]) < 20.0
    default = float(np.percentile(lidar[near if near.any() else slice(None), 2], 2))

    def code(points):                    # one int64 per column, for sorting and lookup
        k = np.floor(points[:, :2] / cell).astype(np.int64) + (1 << 20)
        return k[:, 0] << 21 | k[:, 1]

    codes, inverse = np.unique(code(lidar), return_inverse=True)
    lowest = np.full(len(codes), np.inf)
    np.minimum.at(lowest, inverse.reshape(-1), lidar[:, 2])

    def height(points):
        c = code(points)
        i = np.minimum(np.searchsorted(codes, c), len(codes) - 1)
        return np.where(codes[i] == c, lowest[i], default)
    return height


def _above_ground(points, ground, clearance=0.3):
    return points if ground is None else points[points[:, 2] > ground(points) + clearance]


def plot_alignment(path, lidar_xyz, camera_before, camera_after, title: str = "",
                   zoom: tuple[float, float, float] | None = None, drop_ground: bool = True,
                   labels: tuple[str, str] = ("before (prior)", "after (estimate)"),
                   max_points: int = MAX_POINTS, dpi: int = 110) -> Path:
    """Write a PNG: top view (x-y of the LiDAR frame) of the LiDAR points (dark grey) with the
    camera points (orange) as placed by the prior (left) and by the estimate (right).

    All clouds are (N, 3) in the LiDAR frame. The view is cropped to where the camera points
    lie, with a margin. Ground points are left out by default (`drop_ground`): seen from
    above, the ground covers everything and hides the vertical structure — facades, poles,
    cars — whose offset shows a miscalibration. `zoom=(x, y, half_width)` adds a second row
    with a close-up around (x, y). `labels` name the two panels. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(0)
    lidar = np.asarray(lidar_xyz, float)
    ground = _ground_model(lidar) if drop_ground and len(lidar) else None
    clouds = [_above_ground(np.asarray(c, float), ground) for c in (camera_before, camera_after)]
    lidar = _above_ground(lidar, ground)

    both = np.concatenate(clouds) if sum(map(len, clouds)) else lidar
    lo, hi = np.percentile(both[:, :2], 1, axis=0) - 3.0, np.percentile(both[:, :2], 99, axis=0) + 3.0
    views = [(lo, hi)]
    if zoom is not None:
        x, y, half = zoom
        views.append((np.array([x - half, y - half]), np.array([x + half, y + half])))

    def crop(points, lo, hi):
        keep = np.all((points[:, :2] >= lo) & (points[:, :2] <= hi), axis=1)
        return _subsample(points[keep], max_points, rng)

    fig = Figure(figsize=(14, 6.5 * len(views)), layout="constrained")   # no pyplot: no global state
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(views), 2, squeeze=False)
    for row, (lo, hi) in enumerate(views):
        ground = crop(lidar, lo, hi)
        for col, (name, cloud) in enumerate(zip(labels, clouds)):
            ax = axes[row, col]
            cam = crop(cloud, lo, hi)
            size = 0.3 if row == 0 else 2.0
            ax.scatter(ground[:, 0], ground[:, 1], s=size, c="0.25", linewidths=0, label="LiDAR")
            ax.scatter(cam[:, 0], cam[:, 1], s=size, c="tab:orange", alpha=0.6, linewidths=0,
                       label="camera")
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_aspect("equal")
            ax.set_xlabel("x (m, LiDAR frame)")
            ax.set_ylabel("y (m)")
            ax.set_title(name if row == 0 else f"{name}, close-up")
            ax.legend(loc="upper right", markerscale=12 if row == 0 else 4)
            ax.grid(True, linewidth=0.3, alpha=0.5)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
