"""`ros-ot-fusion demo` (`make demo`): a simulated drive through the real node over DDS.

    simulate (bag + miscalibrated prior) -> node process <- replay process
                                              |
                      recorder here: ~/fused, ~/extrinsic, /diagnostics -> bag, table, PNG

Latency is what a subscriber sees: the recorder takes the arrival time of each LiDAR sweep and
of the fused cloud with the same stamp (message receipt -> publish, plus one DDS hop). The
replay rate is chosen so the solver keeps up on the device it runs on (`--rate`).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ros_ot_fusion.sync import stamp_ns


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ros_ot_fusion.cli", *args], env=dict(os.environ))


def run_demo(out_dir: str | Path = "build/demo", frames: int = 20, rate: float | None = None,
             seed: int = 0, beams: int = 64) -> int:
    import rclpy
    import torch
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import TransformStamped
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from ros_ot_fusion.io.bag import BagWriter, read_bag
    from ros_ot_fusion.params import load_params_file
    from ros_ot_fusion.io.transform_msg import msg_to_matrix
    from ros_ot_fusion.process_bag import EXTRINSIC, FUSED, GROUND_TRUTH, plot_last
    from ros_ot_fusion.sim import CameraConfig, DriveConfig, LidarConfig, write_bag
    from ros_ot_fusion.transforms import pose_error, pose_to_matrix

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
    gpu = torch.cuda.is_available()
    rate = rate or (1.0 if gpu else 0.05)
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    drive, fused_bag = out / "drive", out / "fused"
    print(f"[1/4] simulating {frames} frames ({beams}-beam LiDAR, 640x480 depth camera) -> {drive}")
    write_bag(drive, DriveConfig(frames=frames, seed=seed, lidar=LidarConfig(beams=beams), camera=CameraConfig()))
    params_file = Path(f"{drive}.params.yaml")
    prior = pose_to_matrix(load_params_file(params_file)["prior_extrinsic"])
    truth = next(msg_to_matrix(m) for _, _, m in read_bag(drive, [GROUND_TRUTH]))

    print(f"[2/4] starting the node ({'GPU' if gpu else 'CPU'}) and a recorder")
    # reliable: a replay in the lab should lose nothing; drops are then the solver falling behind
    # and the camera counts as silent only after 3 frame periods of the slowed replay
    node_proc = _start(["node", "--ros-args", "--params-file", str(params_file), "-p", "qos_reliability:=reliable",
                        "-p", f"camera_timeout_s:={min(60.0, max(1.0, 0.3 / rate)):.1f}"])
    rclpy.init()
    rec = rclpy.create_node("ros_ot_fusion_demo_recorder")
    lidar_arrival, fused, extrinsic, diagnostics = {}, {}, {}, []
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    rec.create_subscription(PointCloud2, "/lidar/points",
                            lambda m: lidar_arrival.setdefault(stamp_ns(m), time.monotonic()), qos)
    rec.create_subscription(PointCloud2, FUSED, lambda m: fused.setdefault(stamp_ns(m), (time.monotonic(), m)), qos)
    rec.create_subscription(TransformStamped, EXTRINSIC, lambda m: extrinsic.__setitem__(stamp_ns(m), m), qos)
    rec.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, qos)
    deadline = time.monotonic() + 60
    while rec.count_publishers(FUSED) == 0 and time.monotonic() < deadline and node_proc.poll() is None:
        rclpy.spin_once(rec, timeout_sec=0.1)
    if node_proc.poll() is not None:
        print("the node exited early", file=sys.stderr)
        return 1

    print(f"[3/4] replaying the drive at rate {rate:g}")
    # the sweeps have two subscribers (the node and this recorder): wait for both
    player = _start(["replay", str(drive), "--rate", str(rate), "--topics", "/lidar/points", "/camera/points",
                     "--subscribers", "2", "1", "--start-delay", "20"])
    while player.poll() is None:
        rclpy.spin_once(rec, timeout_sec=0.05)
    # frames still queued or solving: wait while results keep coming
    quiet_s, last_count, last_change = (5 if gpu else 30), -1, time.monotonic()
    while len(fused) < len(lidar_arrival) and time.monotonic() - last_change < quiet_s:
        rclpy.spin_once(rec, timeout_sec=0.05)
        if len(fused) != last_count:
            last_count, last_change = len(fused), time.monotonic()
    # each frame's extrinsic goes out on its own topic just after its cloud: let the last ones in
    deadline = time.monotonic() + 2.0
    while any(s not in extrinsic for s in fused) and time.monotonic() < deadline:
        rclpy.spin_once(rec, timeout_sec=0.05)
    node_proc.send_signal(signal.SIGINT)
    node_proc.wait(timeout=30)

    print(f"[4/4] results ({len(fused)} of {frames} frames fused) -> {fused_bag}")
    rows, lidar_msgs, camera_msgs = [], {}, {}
    for topic, _, msg in read_bag(drive, ["/lidar/points", "/camera/points"]):
        (lidar_msgs if topic == "/lidar/points" else camera_msgs)[stamp_ns(msg)] = msg
    t0 = min(lidar_msgs)
    with BagWriter(fused_bag) as writer:
        for stamp in sorted(fused):
            arrival, msg = fused[stamp]
            writer.write(FUSED, msg, stamp)
            row = {"t": (stamp - t0) / 1e9, "latency_ms": None, "rot": None, "trans": None}
            if stamp in lidar_arrival:
                row["latency_ms"] = (arrival - lidar_arrival[stamp]) * 1e3
            if stamp in extrinsic:
                writer.write(EXTRINSIC, extrinsic[stamp], stamp)
                row["rot"], row["trans"] = pose_error(msg_to_matrix(extrinsic[stamp]), truth)
            rows.append(row)
    rot0, trans0 = pose_error(prior, truth)
    print(f"\n{'t (s)':>6} {'latency ms':>11} {'rot err deg':>12} {'trans err cm':>13}")
    for r in rows:
        lat = f"{r['latency_ms']:.0f}" if r["latency_ms"] is not None else "-"
        err = (f"{r['rot']:12.3f} {100 * r['trans']:13.2f}" if r["rot"] is not None else f"{'-':>12} {'-':>13}")
        print(f"{r['t']:6.1f} {lat:>11} {err}")
    lat = np.array([r["latency_ms"] for r in rows if r["latency_ms"] is not None])
    dropped = [kv.value for d in diagnostics for s in d.status for kv in s.values if kv.key == "frames_dropped"]
    print(f"\nprior error: {rot0:.3f} deg, {100 * trans0:.2f} cm")
    if rows and rows[-1]["rot"] is not None:
        print(f"final error: {rows[-1]['rot']:.3f} deg, {100 * rows[-1]['trans']:.2f} cm")
    if lat.size:
        print(f"latency (LiDAR receipt -> fused receipt): p50 {np.percentile(lat, 50):.0f} ms, "
              f"p99 {np.percentile(lat, 99):.0f} ms")
    print(f"frames fused: {len(fused)} of {len(lidar_msgs)}; dropped by the node: {dropped[-1] if dropped else '?'}")
    if diagnostics and diagnostics[-1].status:
        last_status = diagnostics[-1].status[0]
        print(f"node's last diagnostic: {last_status.message} "
              f"({', '.join(f'{kv.key}={kv.value}' for kv in last_status.values[:12])})")
    if rows:
        last = max(s for s in fused if s in camera_msgs and s in extrinsic)
        png = plot_last(out / "alignment.png", lidar_msgs[last], camera_msgs[last], prior,
                        msg_to_matrix(extrinsic[last]), drive)
        print(f"picture: {png}")
    rec.destroy_node()
    rclpy.shutdown()
    return 0 if rows else 1
