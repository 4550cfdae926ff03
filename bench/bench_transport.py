"""DDS transport of point-cloud-sized messages between two processes on one machine.

    python bench/bench_transport.py [--mb 9.7] [--hz 20] [--count 400] [--qos reliable]

A publisher process sends PointCloud2 messages of `--mb` megabytes of data at `--hz`, each
stamped just before `publish` (wall clock); this process subscribes (rclpy deserializes, as the
node's callbacks do) and takes each message's age when its callback runs. Prints p50 / p90 / p99 /
max of the age and how many arrived. The transport is what the environment configures
(FASTDDS_BUILTIN_TRANSPORTS, FASTDDS_DEFAULT_PROFILES_FILE), so run it once per configuration:

    python bench/bench_transport.py
    FASTDDS_DEFAULT_PROFILES_FILE=ros_ot_fusion/fastdds_large_clouds.xml python bench/bench_transport.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def publish(args) -> None:
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    rclpy.init()
    node = rclpy.create_node("transport_bench_publisher")
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy[args.qos.upper()])
    pub = node.create_publisher(PointCloud2, "/transport_bench", qos)
    msg = PointCloud2(height=1, width=int(args.mb * 1e6) // 16, point_step=16, is_dense=True)
    msg.row_step = msg.width * 16
    msg.data = np.random.default_rng(0).integers(0, 255, msg.row_step, dtype=np.uint8).tobytes()
    deadline = time.monotonic() + 20
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)                                  # the match settles on both sides
    t0 = time.monotonic()
    for k in range(args.count):
        time.sleep(max(0.0, t0 + k / args.hz - time.monotonic()))
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(time.time_ns(), 1_000_000_000)
        pub.publish(msg)
    pub.wait_for_all_acked(rclpy.duration.Duration(seconds=5))
    node.destroy_node()
    rclpy.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=9.7, help="message data size (MB)")
    ap.add_argument("--hz", type=float, default=20.0)
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--qos", default="reliable", choices=("reliable", "best_effort"))
    ap.add_argument("--role", default="subscribe", choices=("subscribe", "publish"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "publish":
        return publish(args)

    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")    # both processes
    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
    rclpy.init()
    node = rclpy.create_node("transport_bench_subscriber")
    ages = []

    def on_cloud(msg) -> None:
        ages.append((time.time_ns() - (msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)) / 1e6)

    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy[args.qos.upper()])
    node.create_subscription(PointCloud2, "/transport_bench", on_cloud, qos)
    child = subprocess.Popen([sys.executable, __file__, "--role", "publish", "--mb", str(args.mb), "--hz",
                              str(args.hz), "--count", str(args.count), "--qos", args.qos])
    while child.poll() is None:
        rclpy.spin_once(node, timeout_sec=0.05)
    end = time.monotonic() + 2
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    node.destroy_node()
    rclpy.shutdown()
    a = np.array(ages[10:]) if len(ages) > 20 else np.array(ages)    # leave the first few out
    profile = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE")
    transports = (f"transports {os.environ.get('FASTDDS_BUILTIN_TRANSPORTS') or '(default)'}, profile "
                  f"{os.path.basename(profile) if profile else '(none)'}")
    if len(a):
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        print(f"{transports}: {args.mb:g} MB at {args.hz:g} Hz ({args.qos}): {len(ages)} of {args.count} received; "
              f"age p50 {p50:.1f} / p90 {p90:.1f} / p99 {p99:.1f} / max {a.max():.1f} ms")
    else:
        print(f"{transports}: nothing received")


if __name__ == "__main__":
    main()
