"""Rigid transforms in numpy float64: quaternions (x, y, z, w), rotation matrices, 4x4 poses.

One convention everywhere: a pose `[x, y, z, qx, qy, qz, qw]` (the order of
geometry_msgs/Transform and of the `prior_extrinsic` parameter) is the 4x4 matrix
`T = [[R, t], [0, 1]]` that maps a point from the child frame into the parent frame:
`p_parent = R @ p_child + t`. For the camera->LiDAR extrinsic, parent = lidar, child = camera.

Functions accept a single item or a batch (leading dimensions) unless they say otherwise.
"""
from __future__ import annotations

import numpy as np


def quat_to_matrix(q) -> np.ndarray:
    """(..., 4) quaternions (x, y, z, w), any norm > 0 -> (..., 3, 3) rotation matrices."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def matrix_to_quat(R) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions (x, y, z, w) with w >= 0.

    Shepperd's method: build the quaternion from the largest of w², x², y², z² so that no
    division is by a small number, whatever the angle.
    """
    R = np.asarray(R, dtype=np.float64)
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    trace = m00 + m11 + m22
    # 4·(w², x², y², z²), one per candidate pivot
    cands = np.stack([1 + trace, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    pivot = np.argmax(cands, axis=-1)
    s = 2.0 * np.sqrt(np.maximum(np.take_along_axis(cands, pivot[..., None], -1)[..., 0], 1e-300))
    d21, d02, d10 = R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]
    s01, s02, s12 = R[..., 0, 1] + R[..., 1, 0], R[..., 0, 2] + R[..., 2, 0], R[..., 1, 2] + R[..., 2, 1]
    by_pivot = np.stack([  # rows: (x, y, z, w) for pivot w, x, y, z
        np.stack([d21 / s, d02 / s, d10 / s, s / 4], -1),
        np.stack([s / 4, s01 / s, s02 / s, d21 / s], -1),
        np.stack([s01 / s, s / 4, s12 / s, d02 / s], -1),
        np.stack([s02 / s, s12 / s, s / 4, d10 / s], -1),
    ], -2)
    q = np.take_along_axis(by_pivot, pivot[..., None, None], -2)[..., 0, :]
    q = np.where(q[..., 3:] < 0, -q, q)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def axis_angle_to_matrix(axis, angle_rad) -> np.ndarray:
    """Rotation by `angle_rad` about `axis` (any non-zero length; Rodrigues' formula). Single item."""
    axis = np.asarray(axis, dtype=np.float64)
    k = axis / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1 - np.cos(angle_rad)) * (K @ K)


def euler_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """R = Rz(yaw) @ Ry(pitch) @ Rx(roll), radians (the ROS fixed-axis RPY convention)."""
    return (axis_angle_to_matrix([0, 0, 1], yaw) @ axis_angle_to_matrix([0, 1, 0], pitch)
            @ axis_angle_to_matrix([1, 0, 0], roll))


def make_transform(R=None, t=None) -> np.ndarray:
    """4x4 from a rotation (default identity) and a translation (default zero)."""
    T = np.eye(4)
    if R is not None:
        T[:3, :3] = R
    if t is not None:
        T[:3, 3] = t
    return T


def pose_to_matrix(pose) -> np.ndarray:
    """(..., 7) poses [x, y, z, qx, qy, qz, qw] -> (..., 4, 4) transforms."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape[-1] != 7:
        raise ValueError(f"a pose has 7 numbers [x, y, z, qx, qy, qz, qw], got shape {pose.shape}")
    T = np.zeros(pose.shape[:-1] + (4, 4))
    T[..., :3, :3] = quat_to_matrix(pose[..., 3:])
    T[..., :3, 3] = pose[..., :3]
    T[..., 3, 3] = 1.0
    return T


def matrix_to_pose(T) -> np.ndarray:
    """(..., 4, 4) transforms -> (..., 7) poses [x, y, z, qx, qy, qz, qw] (qw >= 0)."""
    T = np.asarray(T, dtype=np.float64)
    return np.concatenate([T[..., :3, 3], matrix_to_quat(T[..., :3, :3])], -1)


def invert(T) -> np.ndarray:
    """Inverse of rigid (..., 4, 4) transforms, without a general matrix inverse."""
    T = np.asarray(T, dtype=np.float64)
    Rt = np.swapaxes(T[..., :3, :3], -1, -2)
    out = np.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -(Rt @ T[..., :3, 3:])[..., 0]
    out[..., 3, 3] = 1.0
    return out


def transform_points(T, points) -> np.ndarray:
    """Apply one 4x4 transform to (N, 3) points; float64 out."""
    T = np.asarray(T, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ T[:3, :3].T + T[:3, 3]


def rotation_angle_deg(R) -> np.ndarray | float:
    """Angle of rotation(s) (..., 3, 3) in degrees, in [0, 180].

    Computed from the quaternion (atan2 of its vector part and w), which stays accurate for
    tiny angles where acos((trace - 1) / 2) loses half its digits.
    """
    q = matrix_to_quat(R)
    angle = np.degrees(2.0 * np.arctan2(np.linalg.norm(q[..., :3], axis=-1), np.abs(q[..., 3])))
    return float(angle) if np.ndim(angle) == 0 else angle


def pose_error(T_estimate, T_truth) -> tuple[float, float]:
    """(rotation error in degrees, translation error in metres) between two 4x4 transforms.

    Rotation: angle of R_est @ R_truthᵀ; translation: |t_est - t_truth|. Single items.
    """
    T_estimate, T_truth = np.asarray(T_estimate, float), np.asarray(T_truth, float)
    return (rotation_angle_deg(T_estimate[:3, :3] @ T_truth[:3, :3].T),
            float(np.linalg.norm(T_estimate[:3, 3] - T_truth[:3, 3])))
