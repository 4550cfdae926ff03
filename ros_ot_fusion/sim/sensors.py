"""A spinning LiDAR and a depth camera that ray-cast the scene from a pose.

Both sensors are hardware-triggered: one frame of each is captured at the same instant from
the same vehicle pose, and a whole LiDAR sweep is taken at that instant (no motion
distortion). So the only thing that separates the two clouds is the camera->LiDAR extrinsic,
which is what the aligner has to recover.

Frames: the LiDAR frame is x forward, y left, z up; the camera frame is the ROS optical
frame, z forward (optical axis), x right, y down. Each sensor's `capture(scene, world_T_sensor,
rng)` takes the 4x4 pose of its own frame in the world and returns points in its own frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ros_ot_fusion.sim.scene import Scene


@dataclass
class SimCloud:
    """One sensor frame: float32 points in the sensor frame and the ground truth behind them."""

    xyz: np.ndarray                  # (N, 3) float32, sensor frame
    intensity: np.ndarray | None     # (N,) float32 (LiDAR), or None
    rgb: np.ndarray | None           # (N, 3) uint8 (camera), or None
    geometry_id: np.ndarray          # (N,) uint32: scene object hit by each point's ray
    primitive_id: np.ndarray         # (N,) uint32: triangle hit
    ray: np.ndarray                  # (N,) int64: index into the sensor's `directions` (beam/azimuth, pixel)

    def __len__(self) -> int:
        return len(self.xyz)


def _rotate(directions: np.ndarray, R: np.ndarray) -> np.ndarray:
    """(N, 3) float32 directions @ R.T, one column at a time (5-30x faster than `@` for N x 3)."""
    R = np.asarray(R, np.float32)
    out = np.empty_like(directions)
    for i in range(3):
        out[:, i] = directions[:, 0] * R[i, 0] + directions[:, 1] * R[i, 1] + directions[:, 2] * R[i, 2]
    return out


@dataclass
class LidarConfig:
    beams: int = 64
    fov_down_deg: float = -25.0
    fov_up_deg: float = 15.0
    azimuth_steps: int | None = None   # None: 2048 for more than 64 beams, else 1024
    min_range: float = 0.5
    max_range: float = 100.0
    range_noise: float = 0.02          # m, Gaussian, along the beam
    dropout: float = 0.02              # fraction of returns lost at random


@dataclass
class CameraConfig:
    width: int = 640
    height: int = 480
    hfov_deg: float = 87.0             # square pixels: the vertical FOV follows from the aspect ratio
    min_depth: float = 0.2
    max_depth: float = 40.0
    depth_noise: float = 0.0015        # k in sigma_z = k * z^2 (1/m), like stereo/structured light


class SpinningLidar:
    """`beams` lasers at evenly spaced elevations, fired at `azimuth_steps` angles per sweep.

    Points come out column by column (azimuth outer, beam inner), the order a spinning
    sensor streams them. Intensity (0-255) = 255 · albedo · (0.3 + 0.7 |cos incidence|).
    """

    def __init__(self, config: LidarConfig | None = None):
        self.config = c = config or LidarConfig()
        if c.beams < 1:
            raise ValueError(f"beams must be >= 1, got {c.beams}")
        steps = c.azimuth_steps or (2048 if c.beams > 64 else 1024)
        self.azimuth_steps = steps
        elevation = np.radians(np.linspace(c.fov_down_deg, c.fov_up_deg, c.beams))
        azimuth = np.arange(steps) * (2 * np.pi / steps)
        az, el = np.meshgrid(azimuth, elevation, indexing="ij")         # (steps, beams)
        self.directions = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)],
                                   -1).reshape(-1, 3).astype(np.float32)  # unit, LiDAR frame

    def capture(self, scene: Scene, world_T_lidar: np.ndarray, rng: np.random.Generator) -> SimCloud:
        c = self.config
        R, t = world_T_lidar[:3, :3], world_T_lidar[:3, 3]
        world = _rotate(self.directions, R)
        hits = scene.cast(t, world)
        r = hits.t + rng.standard_normal(len(hits.t), dtype=np.float32) * np.float32(c.range_noise)
        keep = hits.hit & (r >= c.min_range) & (r <= c.max_range) & (rng.random(len(r)) >= c.dropout)
        ray = np.flatnonzero(keep)
        gid, pid = hits.geometry_id[ray], hits.primitive_id[ray]
        d = self.directions[ray]
        cos = np.abs(np.einsum("ij,ij->i", hits.normal[ray], world[ray]))
        intensity = 255.0 * scene.albedo(gid, pid) * (0.3 + 0.7 * cos)
        return SimCloud(xyz=d * r[ray, None], intensity=intensity.astype(np.float32), rgb=None,
                        geometry_id=gid, primitive_id=pid, ray=ray)


class DepthCamera:
    """A pinhole depth camera with colour; pixels that see nothing (or too far) give no point.

    Depth noise grows with the square of depth (sigma = k z²) and moves each point along its
    pixel ray, as a stereo or structured-light camera does. So a camera frame has at most
    width × height points, in the optical frame.
    """

    def __init__(self, config: CameraConfig | None = None):
        self.config = c = config or CameraConfig()
        if c.width < 1 or c.height < 1 or not 0 < c.hfov_deg < 180:
            raise ValueError(f"camera needs width, height >= 1 and 0 < hfov < 180, got {c}")
        self.fx = self.fy = (c.width / 2) / np.tan(np.radians(c.hfov_deg) / 2)
        self.cx, self.cy = (c.width - 1) / 2, (c.height - 1) / 2
        v, u = np.meshgrid(np.arange(c.height), np.arange(c.width), indexing="ij")
        # z = 1: a ray's hit distance t is then the depth z itself
        self.directions = np.stack([(u - self.cx) / self.fx, (v - self.cy) / self.fy,
                                    np.ones_like(u, float)], -1).reshape(-1, 3).astype(np.float32)

    @property
    def intrinsics(self) -> np.ndarray:
        """The 3x3 K matrix."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])

    def capture(self, scene: Scene, world_T_camera: np.ndarray, rng: np.random.Generator) -> SimCloud:
        c = self.config
        R, t = world_T_camera[:3, :3], world_T_camera[:3, 3]
        hits = scene.cast(t, _rotate(self.directions, R))
        keep = hits.hit & (hits.t >= c.min_depth) & (hits.t <= c.max_depth)
        ray = np.flatnonzero(keep)
        z = hits.t[ray]
        z = z + np.float32(c.depth_noise) * z * z * rng.standard_normal(len(z), dtype=np.float32)
        gid, pid = hits.geometry_id[ray], hits.primitive_id[ray]
        return SimCloud(xyz=self.directions[ray] * z[:, None], intensity=None,
                        rgb=scene.colour(gid, pid), geometry_id=gid, primitive_id=pid, ray=ray)
