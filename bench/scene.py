"""A street scene ray-cast analytically in torch, for solver benchmarks (any device, no open3d).

A street canyon (ground, two facades, end walls), parked cars (boxes) and poles (cylinders).
A spinning LiDAR (beams x azimuth steps) at 1.9 m and a forward-looking 640x480 depth camera
beside it each see the scene from the vehicle pose at `x_vehicle`. `frame` returns both clouds
in the LiDAR frame (the OT problem after the prior extrinsic is applied); `sensor_frame` returns
what the sensors publish (camera points in the camera's optical frame, through `TRUTH`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ros_ot_fusion.transforms import axis_angle_to_matrix, make_transform

# the camera looks along +x from (0.4, 0.1, 1.5), tilted 8 degrees down; its optical frame is
# z forward, x right (-y), y down (-z): TRUTH = lidar_T_camera
OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
TRUTH = make_transform(axis_angle_to_matrix([0, 1, 0], math.radians(8)) @ OPTICAL, [0.4, 0.1, 1.5])

BOXES = [  # (xmin, ymin, zmin, xmax, ymax, zmax): facades, end walls, cars
    (-80, 9, 0, 80, 10, 14), (-80, -10, 0, 80, -9, 11), (60, -10, 0, 61, 10, 14), (-61, -10, 0, -60, 10, 14),
] + [(x, side * 6.5 - 1, 0, x + 4.4, side * 6.5 + 1, 1.5) for x in range(-50, 55, 9) for side in (-1, 1)]
POLES = [(x, side * 8.0, 0.15) for x in range(-45, 50, 12) for side in (-1, 1)]   # (x, y, radius)


def raycast(origin: torch.Tensor, dirs: torch.Tensor, max_range: float) -> torch.Tensor:
    """Distance along each unit ray (n, 3) to the first surface; inf where nothing is hit."""
    dev = dirs.device
    t = torch.full((len(dirs),), math.inf, device=dev)
    hit_ground = dirs[:, 2] < -1e-6
    t = torch.where(hit_ground, -origin[2] / dirs[:, 2].clamp(max=-1e-6), t)
    boxes = torch.tensor(BOXES, dtype=torch.float32, device=dev)
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    for lo, hi in ((boxes[:, :3], boxes[:, 3:]),):
        t0 = (lo[None] - origin) * inv[:, None]
        t1 = (hi[None] - origin) * inv[:, None]
        near = torch.minimum(t0, t1).amax(-1)
        far = torch.maximum(t0, t1).amin(-1)
        tb = torch.where((far >= near) & (near > 0), near, torch.full_like(near, math.inf))
        t = torch.minimum(t, tb.amin(1))
    poles = torch.tensor(POLES, dtype=torch.float32, device=dev)
    ox, oy = origin[0] - poles[:, 0], origin[1] - poles[:, 1]          # (p,)
    a = (dirs[:, :2] ** 2).sum(1, keepdim=True).clamp_min(1e-12)      # (n, 1)
    b = 2 * (dirs[:, :1] * ox + dirs[:, 1:2] * oy)                    # (n, p)
    c = ox**2 + oy**2 - poles[:, 2] ** 2
    disc = b * b - 4 * a * c
    tp = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    tp = torch.where((disc > 0) & (tp > 0), tp, torch.full_like(tp, math.inf))
    t = torch.minimum(t, tp.amin(1))
    return torch.where(t < max_range, t, torch.full_like(t, math.inf))


def lidar(x_vehicle: float, beams: int = 128, steps: int = 1024, noise: float = 0.01,
          generator=None, device="cpu") -> torch.Tensor:
    elev = torch.deg2rad(torch.linspace(-25, 15, beams, device=device))
    azim = torch.linspace(0, 2 * math.pi, steps + 1, device=device)[:-1]
    e, a = torch.meshgrid(elev, azim, indexing="ij")
    dirs = torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], -1).reshape(-1, 3)
    origin = torch.tensor([x_vehicle, 0.0, 1.9], device=device)
    r = raycast(origin, dirs, 100.0)
    r = r + noise * torch.randn(r.shape, device=device, generator=generator)
    keep = torch.isfinite(r)
    return dirs[keep] * r[keep, None] + origin - torch.tensor([x_vehicle, 0.0, 0.0], device=device)


def camera(x_vehicle: float, width: int = 640, height: int = 480, focal: float = 500.0,
           noise: float = 0.003, generator=None, device="cpu") -> torch.Tensor:
    """Depth-camera points (depth noise grows with range), in the LiDAR frame."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                          torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    # optical axis along +x (vehicle forward), image u -> -y, v -> -z, tilted 8 degrees down
    d = torch.stack([torch.full_like(u, focal), -(u - width / 2), -(v - height / 2)], -1).reshape(-1, 3)
    tilt = math.radians(8)
    rot = torch.tensor([[math.cos(tilt), 0, math.sin(tilt)], [0, 1, 0],
                        [-math.sin(tilt), 0, math.cos(tilt)]], device=device)
    dirs = torch.nn.functional.normalize(d @ rot.T, dim=1)
    origin = torch.tensor([x_vehicle + 0.4, 0.1, 1.5], device=device)
    r = raycast(origin, dirs, 60.0)
    r = r * (1 + noise * torch.randn(r.shape, device=device, generator=generator))
    keep = torch.isfinite(r)
    return dirs[keep] * r[keep, None] + origin - torch.tensor([x_vehicle, 0.0, 0.0], device=device)


def frame(k: int, speed: float = 1.0, device="cpu", beams: int = 128, seed: int = 0, steps: int = 1024,
          width: int = 640, height: int = 480):
    """Frame k of a drive along the street at `speed` metres per frame: (lidar, camera)."""
    g = torch.Generator(device=device).manual_seed(seed + k)
    x = -30.0 + speed * k
    return (lidar(x, beams=beams, steps=steps, generator=g, device=device),
            camera(x, width=width, height=height, focal=500.0 * width / 640, generator=g, device=device))


def sensor_frame(k: int, speed: float = 1.0, device="cpu", **size):
    """Frame k as the sensors give it: LiDAR xyz (LiDAR frame), camera xyz (optical frame, through
    TRUTH) and its rgb (a colour pattern along the street)."""
    lidar_xyz, cam_l = frame(k, speed, device=device, **size)
    inv = torch.as_tensor(np.linalg.inv(TRUTH), dtype=torch.float32, device=device)
    camera_xyz = cam_l @ inv[:3, :3].t() + inv[:3, 3]
    rgb = ((camera_xyz[:, :1].abs() * 40) % 256).to(torch.uint8).expand(-1, 3).contiguous()
    return lidar_xyz, camera_xyz, rgb
