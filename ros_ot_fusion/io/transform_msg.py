"""geometry_msgs/TransformStamped <-> 4x4 transforms (parent_T_child: p_parent = R p_child + t)."""
from __future__ import annotations

import numpy as np

from ros_ot_fusion.transforms import matrix_to_pose, pose_to_matrix


def msg_to_matrix(msg) -> np.ndarray:
    t, q = msg.transform.translation, msg.transform.rotation
    return pose_to_matrix([t.x, t.y, t.z, q.x, q.y, q.z, q.w])


def matrix_to_msg(T: np.ndarray, header, child_frame: str):
    from geometry_msgs.msg import TransformStamped

    msg = TransformStamped(header=header, child_frame_id=child_frame)
    t, r = msg.transform.translation, msg.transform.rotation
    t.x, t.y, t.z, r.x, r.y, r.z, r.w = (float(v) for v in matrix_to_pose(T))
    return msg
