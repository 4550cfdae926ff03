"""Child process for test_dds.py: publish one deterministic cloud again and again until killed."""
import sys
import time

import numpy as np
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header
from sensor_msgs.msg import PointCloud2

from ros_ot_fusion.io import pointcloud2 as pc2


def deterministic_cloud(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3)).astype(np.float32),
            rng.integers(0, 256, (n, 3), dtype=np.uint8))


if __name__ == "__main__":
    topic, n, seed, reliability = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rclpy.init()
    node = rclpy.create_node("test_cloud_publisher")
    pub = node.create_publisher(PointCloud2, topic, QoSProfile(depth=2, reliability=ReliabilityPolicy[reliability.upper()]))
    xyz, rgb = deterministic_cloud(n, seed)
    msg = pc2.encode(Header(frame_id="lidar"), xyz, rgb=rgb)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msg.header.stamp = node.get_clock().now().to_msg()
        pub.publish(msg)
        time.sleep(0.2)
