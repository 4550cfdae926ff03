"""The fused cloud: LiDAR points coloured through the plan, camera points moved into the LiDAR frame.

LiDAR part. Each LiDAR point the camera sees is a new row of the last plan: its colour is the
plan-weighted mean of the camera colours, (pi rgb) / (pi 1), and its confidence the mass it
sends, (pi 1) / a, clipped to [0, 1] (1: matched like the solved rows, 0: no camera surface
near it). Points outside the camera's view keep rgb 0 and confidence 0.

Camera part. Every camera point moved by the estimated transform, with its own colour; its
confidence is the mass its voxel received in the plan, (pi^T 1) / b = exp(-g / rho) at the
optimum, clipped to [0, 1], and 0 for voxels not in the plan.
"""
from __future__ import annotations

import numpy as np
import torch

from ros_ot_fusion.fusion.align import Aligner, Alignment, transform
from ros_ot_fusion.ot.multiscale import voxel_keys

CONTENTS = ("both", "lidar", "camera")


def lidar_part(aligner: Aligner, lidar: torch.Tensor, alignment: Alignment | None):
    """(rgb (n, 3) uint8, confidence (n,) float32) for every LiDAR point (LiDAR frame)."""
    rgb = torch.zeros(len(lidar), 3, dtype=torch.uint8, device=lidar.device)
    conf = torch.zeros(len(lidar), device=lidar.device)
    if alignment is None or alignment.result is None or alignment.camera_rgb is None:
        return rgb, conf
    seen = aligner.crop_lidar(lidar, alignment.T, alignment.bounds).nonzero()[:, 0]
    if len(seen):
        colour, ratio = alignment.result.transfer(lidar[seen], alignment.camera_rgb)
        rgb[seen] = colour.round().clamp(0, 255).to(torch.uint8)
        conf[seen] = ratio.clamp(0, 1)
    return rgb, conf


def camera_confidence(camera: torch.Tensor, alignment: Alignment | None, voxel: float) -> torch.Tensor:
    """Per camera point (camera frame): the plan's column mass ratio of its voxel."""
    conf = torch.zeros(len(camera), device=camera.device)
    if alignment is None or alignment.result is None:
        return conf
    res = alignment.result
    ratio = torch.exp(-res.g / res.rho).clamp(0, 1) if res.rho is not None else torch.ones_like(res.g)
    keys, order = torch.sort(voxel_keys(alignment.camera, voxel))   # a centroid lies in its own voxel
    k = voxel_keys(camera, voxel)
    pos = torch.searchsorted(keys, k).clamp_max(len(keys) - 1)
    return torch.where(keys[pos] == k, ratio[order[pos]], conf)


def fuse(aligner: Aligner, lidar_xyz, lidar_intensity, camera_xyz, camera_rgb, T: np.ndarray,
         alignment: Alignment | None, content: str = "both") -> dict[str, torch.Tensor]:
    """Columns of the fused cloud (LiDAR frame): xyz, intensity, rgb, confidence, as tensors on
    the aligner's device (`pointcloud2.encode` packs them there).

    T is the transform to publish (the last accepted estimate); `alignment` the frame's plan,
    or None (no camera: LiDAR points only, uncoloured)."""
    if content not in CONTENTS:
        raise ValueError(f"content must be one of {CONTENTS}, got {content!r}")
    dev = aligner.device
    parts = []
    if content in ("both", "lidar") or camera_xyz is None:
        lidar = torch.as_tensor(lidar_xyz, dtype=torch.float32).to(dev)
        rgb, conf = lidar_part(aligner, lidar, alignment)
        inten = (torch.as_tensor(lidar_intensity, dtype=torch.float32).to(dev) if lidar_intensity is not None
                 else torch.zeros(len(lidar), device=dev))
        parts.append((lidar, inten, rgb, conf))
    if content in ("both", "camera") and camera_xyz is not None:
        cam = torch.as_tensor(camera_xyz, dtype=torch.float32).to(dev)
        rgb = (torch.as_tensor(camera_rgb).to(dev) if camera_rgb is not None
               else torch.zeros(len(cam), 3, dtype=torch.uint8, device=dev))
        conf = camera_confidence(cam, alignment, aligner.config.camera_voxel_m)
        parts.append((transform(T, cam), torch.zeros(len(cam), device=dev), rgb, conf))
    xyz, inten, rgb, conf = (torch.cat(col) for col in zip(*parts))
    return {"xyz": xyz, "intensity": inten, "rgb": rgb, "confidence": conf}
