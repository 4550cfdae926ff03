"""Real DDS: a publisher process and a subscriber here exchange a 300k-point cloud on localhost."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ros_ot_fusion.cli import DDS_PROFILE

HERE = Path(__file__).parent


# Best effort, as the node subscribes by default: a 4.8 MB cloud needs a writer whose shared-memory
# segment holds it (without the large-cloud profile none arrived here: bench/RESULTS.md).
@pytest.mark.parametrize("reliability, profile", [("reliable", None), ("best_effort", DDS_PROFILE)])
def test_300k_point_cloud_crosses_dds_between_processes(reliability, profile):
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = str(10 + os.getpid() % 80)   # keep concurrent runs apart
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from ros_ot_fusion.io import pointcloud2 as pc2
    sys.path.insert(0, str(HERE))
    from dds_publisher import deterministic_cloud

    n, seed, topic = 300_000, 7, "/test/points"
    env = dict(os.environ, **({"FASTDDS_DEFAULT_PROFILES_FILE": str(profile)} if profile else {}))
    child = subprocess.Popen([sys.executable, str(HERE / "dds_publisher.py"), topic, str(n), str(seed), reliability],
                             env=env)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("test_cloud_subscriber", context=context)
        got = []
        node.create_subscription(PointCloud2, topic, got.append,
                                 QoSProfile(depth=2, reliability=ReliabilityPolicy[reliability.upper()]))
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 45
        while not got and time.monotonic() < deadline and child.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        assert got, "no cloud arrived over DDS"
        cloud = pc2.decode(got[0])
        xyz, rgb = deterministic_cloud(n, seed)
        assert cloud.frame_id == "lidar" and len(cloud) == n
        np.testing.assert_array_equal(cloud.xyz, xyz)
        np.testing.assert_array_equal(cloud.rgb, rgb)
        node.destroy_node()
    finally:
        child.terminate()
        child.wait(timeout=10)
        rclpy.shutdown(context=context)
