"""Bad input and faults against the live node over DDS: what it did, and whether a good frame was lost.

    python bench/fault_table.py [--json out.json] [--device auto|cpu|cuda]

The node runs in its own process (`ros-ot-fusion node`). For each case this script publishes the
bad input, waits until the node has processed it and notes the diagnostic (level and message)
and whether anything was published for it; then it publishes a good frame and checks that the
frame is fused and that the extrinsic published with it is still near the truth (nothing garbage
leaked from the bad frame). Silence, run-time parameter changes and a start without a GPU are
cases too. Clouds: the analytic street of `scene.py` at a reduced size (fast on a CPU).

Exit status 0 when every good frame was fused within its timeout with a sane extrinsic, every
bad input was flagged as expected and the node stayed up; 1 otherwise. The table is printed in
Markdown.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import scene  # noqa: E402

from ros_ot_fusion import transforms as tf  # noqa: E402
from ros_ot_fusion.io import pointcloud2 as pc2  # noqa: E402
from ros_ot_fusion.sync import header, stamp_ns  # noqa: E402

OK, WARN, ERROR = 0, 1, 2
LEVELS = {OK: "OK", WARN: "WARN", ERROR: "ERROR"}
STATUS = "ros_ot_fusion: fusion"
SIZE = dict(beams=32, steps=512, width=320, height=240)
PARAMS = dict(qos_reliability="reliable", lidar_frame="lidar", camera_frame="camera", camera_timeout_s=1.0,
              max_points=3000, lidar_voxel_m=0.4, camera_voxel_m=0.4, rigid_steps=2)
SANE_DEG, SANE_M = 1.5, 0.10          # a published extrinsic this close to the truth is not garbage


# ---------------------------------------------------------------------------------------------
# the cases: each makes (lidar message, camera message or None) from a good frame at a stamp

@dataclass
class Frame:
    lidar: np.ndarray
    camera: np.ndarray
    rgb: np.ndarray

    def messages(self, stamp: int, lidar_xyz=None, camera_xyz=None, lidar_frame="lidar", camera_frame="camera"):
        lidar = self.lidar if lidar_xyz is None else lidar_xyz
        camera = self.camera if camera_xyz is None else camera_xyz
        rgb = self.rgb if len(camera) == len(self.rgb) else np.full((len(camera), 3), 128, np.uint8)
        return (pc2.encode(header(lidar_frame, stamp), lidar, intensity=np.ones(len(lidar), np.float32)),
                pc2.encode(header(camera_frame, stamp), camera, rgb=rgb))


def _field(msg, name):
    return next(f for f in msg.fields if f.name == name)


def truncated(f, s):
    lidar, camera = f.messages(s)
    lidar.data = bytes(lidar.data)[:-7]
    return lidar, camera


def short_point_step(f, s):
    lidar, camera = f.messages(s)
    lidar.point_step = 8
    return lidar, camera


def missing_z(f, s):
    lidar, camera = f.messages(s)
    lidar.fields = [fd for fd in lidar.fields if fd.name != "z"]
    return lidar, camera


def unknown_datatype(f, s):
    lidar, camera = f.messages(s)
    _field(lidar, "x").datatype = 99
    return lidar, camera


def count_zero(f, s):
    lidar, camera = f.messages(s)
    _field(lidar, "y").count = 0
    return lidar, camera


def camera_malformed(f, s):
    lidar, camera = f.messages(s)
    camera.data = bytes(camera.data)[: len(camera.data) // 2]
    return lidar, camera


def with_points(lidar_fn=None, camera_fn=None):
    def make(f, s):
        return f.messages(s, lidar_xyz=None if lidar_fn is None else lidar_fn(f.lidar).astype(np.float32),
                          camera_xyz=None if camera_fn is None else camera_fn(f.camera).astype(np.float32))
    return make


def seen_by_camera(flatten):
    """`flatten` done in the LiDAR frame to camera points (there and back through the truth)."""
    return lambda xyz: tf.transform_points(tf.invert(scene.TRUTH), flatten(tf.transform_points(scene.TRUTH, xyz)))


def plane(xyz):      # everything flattened onto the road (z = -1.9): yaw and x/y are unobservable
    return np.column_stack([xyz[:, 0], xyz[:, 1], np.full(len(xyz), -1.9)])


def line(xyz):       # everything on one line along the street, 5 m to the left
    return np.column_stack([xyz[:, 0], np.full(len(xyz), 5.0), np.zeros(len(xyz))])


def huge(xyz, n=2_000_000, rng=np.random.default_rng(0)):
    idx = rng.integers(0, len(xyz), n)
    return xyz[idx] + rng.normal(scale=0.01, size=(n, 3))


def stamped(offset_s: float):
    def make(f, s):
        return f.messages(s + int(offset_s * 1e9))
    return make


def wrong_frame(which: str):
    def make(f, s):
        return f.messages(s, **{f"{which}_frame": "base_link"})
    return make


@dataclass
class Case:
    name: str
    make: Callable | None          # None: a special case run by its own code below
    expect: int                    # the least diagnostic level the node must raise
    published: bool | None = None  # whether a fused cloud must come for the bad frame (None: either)


CASES = [
    Case("data length != row_step * height", truncated, ERROR, False),
    Case("point_step too small for the fields", short_point_step, ERROR, False),
    Case("no z field", missing_z, ERROR, False),
    Case("unknown field datatype (99)", unknown_datatype, ERROR, False),
    Case("field count 0", count_zero, ERROR, False),
    Case("camera message malformed", camera_malformed, WARN, True),
    Case("empty LiDAR cloud", with_points(lambda x: x[:0]), ERROR, False),
    Case("all-NaN LiDAR cloud", with_points(lambda x: np.full_like(x, np.nan)), ERROR, False),
    Case("all-Inf camera cloud", with_points(camera_fn=lambda x: np.full_like(x, np.inf)), WARN, True),
    Case("LiDAR of 2,000,000 points (budget 3000)", with_points(huge), OK, True),
    Case("every point duplicated 4x", with_points(lambda x: np.repeat(x, 4, 0), lambda x: np.repeat(x, 4, 0)),
         OK, True),
    Case("a single LiDAR point", with_points(lambda x: x[:1]), WARN, None),
    Case("a single camera point", with_points(camera_fn=lambda x: x[:1]), WARN, True),
    Case("LiDAR frame_id 'base_link'", wrong_frame("lidar"), ERROR, False),
    Case("camera frame_id 'base_link'", wrong_frame("camera"), WARN, True),
    Case("stamp 1 h in the future", stamped(3600.0), WARN, True),
    Case("stamp 10 s in the past (bag loop)", stamped(-10.0), WARN, True),
    Case("degenerate: both clouds one plane", with_points(plane, seen_by_camera(plane)), WARN, True),
    Case("degenerate: both clouds one line", with_points(line, seen_by_camera(line)), WARN, True),
    Case("coordinates of 1e30 m", with_points(lambda x: x * 1e30), WARN, None),
    Case("camera silent for 2 s (timeout 1 s)", None, WARN, True),
    Case("invalid parameter set at run time", None, OK, None),
    Case("device:=cuda with no usable GPU (second node)", None, WARN, None),
]


# ---------------------------------------------------------------------------------------------
# DDS side

def start_node(domain_id: int, log: Path, env_extra: dict | None = None, **params) -> subprocess.Popen:
    args = [sys.executable, "-m", "ros_ot_fusion.cli", "node", "--ros-args"]
    for name, value in params.items():
        text = ("[" + ", ".join(repr(float(v)) for v in value) + "]" if isinstance(value, (list, tuple))
                else str(value))
        args += ["-p", f"{name}:={text}"]
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               FASTDDS_BUILTIN_TRANSPORTS="LARGE_DATA", PYTHONUNBUFFERED="1", **(env_extra or {}))
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


class Peer:
    def __init__(self, domain_id: int):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TransformStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("fault_table_peer", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.lidar_pub = self.node.create_publisher(PointCloud2, "/lidar/points", qos)
        self.camera_pub = self.node.create_publisher(PointCloud2, "/camera/points", qos)
        self.fused, self.extrinsic, self.status = {}, {}, []
        self.node.create_subscription(PointCloud2, "/ros_ot_fusion/fused", self._on_fused, QoSProfile(depth=10))
        self.node.create_subscription(TransformStamped, "/ros_ot_fusion/extrinsic",
                                      lambda m: self.extrinsic.__setitem__(stamp_ns(m), m), QoSProfile(depth=10))
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, QoSProfile(depth=50))

    def _on_fused(self, msg):
        self.fused[stamp_ns(msg)] = {f.name for f in msg.fields}, msg.width

    def _on_diagnostics(self, msg):
        self.status.extend(s for s in msg.status if s.name == STATUS)

    def now(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def values(self) -> dict:
        return {kv.key: kv.value for kv in self.status[-1].values} if self.status else {}

    def processed(self) -> int:
        return int(self.values().get("frames_processed", 0))

    def spin_until(self, predicate, timeout: float, proc: subprocess.Popen) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not predicate():
            self.executor.spin_once(timeout_sec=0.05)
        return bool(predicate())

    def publish(self, lidar, camera) -> None:
        if camera is not None:
            self.camera_pub.publish(camera)
        self.lidar_pub.publish(lidar)

    def process(self, lidar, camera, proc, timeout: float):
        """Publish a pair; wait until the node has processed it: (the status it published for it
        or None, seconds from publishing to that status)."""
        before, seen, t0 = self.processed(), len(self.status), time.monotonic()
        self.publish(lidar, camera)
        if not self.spin_until(lambda: self.processed() > before, timeout, proc):
            return None, math.nan
        elapsed = time.monotonic() - t0
        self.spin_until(lambda: False, 0.3, proc)          # the fused cloud comes after the status
        count = lambda s: int({kv.key: kv.value for kv in s.values}.get("frames_processed", 0))  # noqa: E731
        return next(s for s in self.status[seen:] if count(s) > before), elapsed

    def close(self) -> None:
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)


def level_of(status) -> int:
    return status.level[0] if isinstance(status.level, bytes) else int(status.level)


def run(args) -> list[dict]:
    import torch
    from rcl_interfaces.msg import Parameter as ParameterMsg, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    from ros_ot_fusion.io.transform_msg import msg_to_matrix

    dev = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    frames = []
    for k in range(3):
        lidar, camera, rgb = scene.sensor_frame(k, speed=0.5, **SIZE)
        frames.append(Frame(lidar.numpy(), camera.numpy(), rgb.numpy()))
    prior = tf.make_transform(tf.axis_angle_to_matrix([1, 2, 3], math.radians(0.5)) @ scene.TRUTH[:3, :3],
                              scene.TRUTH[:3, 3] + [0.03, -0.02, 0.0])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    domain_id = args.domain
    proc = start_node(domain_id, out_dir / "node.log", device=dev,
                      prior_extrinsic=[float(v) for v in tf.matrix_to_pose(prior)], **PARAMS)
    peer = Peer(domain_id)
    rows, k = [], 0

    def good(timeout: float = args.timeout) -> dict:
        nonlocal k
        stamp = peer.now()
        f = frames[k % len(frames)]
        k += 1
        status, _ = peer.process(*f.messages(stamp), proc, timeout)
        fused = peer.spin_until(lambda: stamp in peer.fused and stamp in peer.extrinsic, 5.0, proc)
        result = {"fused": fused, "level": level_of(status) if status else None,
                  "message": status.message if status else "no status"}
        if fused:
            rot, trans = tf.pose_error(msg_to_matrix(peer.extrinsic[stamp]), scene.TRUTH)
            result.update(rot_deg=rot, trans_m=trans, sane=rot < SANE_DEG and trans < SANE_M)
        return result

    def record(case: Case, status, published, note: str = "") -> None:
        after = good()
        lvl = level_of(status) if status is not None else None
        row = {"case": case.name, "level": LEVELS.get(lvl, "none"),
               "message": (status.message if status is not None else "no status") + note,
               "bad_frame_published": published, "good_frame_fused": after["fused"],
               "extrinsic_after": (f"{after['rot_deg']:.2f} deg / {100 * after['trans_m']:.1f} cm"
                                   if after["fused"] else "-"),
               "node_alive": proc.poll() is None}
        flagged = lvl is not None and lvl >= case.expect
        as_expected = case.published is None or published == case.published
        row["pass"] = bool(flagged and as_expected and after["fused"] and after.get("sane") and row["node_alive"])
        rows.append(row)
        print(f"  {'ok  ' if row['pass'] else 'FAIL'} {case.name}: {row['level']} {row['message'][:90]}",
              file=sys.stderr)

    try:
        if not peer.spin_until(lambda: peer.status, args.start_timeout, proc):
            raise SystemExit(f"the node did not come up; see {out_dir / 'node.log'}")
        for _ in range(3):                       # warm up: the first solves compile and allocate
            first = good(args.start_timeout)
        print(f"node up on {dev}; warm-up frame: {first['message']}", file=sys.stderr)
        for case in CASES:
            if proc.poll() is not None:
                break
            if case.make is not None:
                stamp = peer.now()
                status, seconds = peer.process(*case.make(frames[k % len(frames)], stamp), proc, args.timeout)
                offset = {"stamp 1 h in the future": 3600e9, "stamp 10 s in the past (bag loop)": -10e9}
                published = stamp + int(offset.get(case.name, 0)) in peer.fused
                record(case, status, published, f" ({seconds:.1f} s to its result)" if seconds > 2 else "")
            elif case.name.startswith("camera silent"):
                stamps, deadline = [], time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    stamps.append(peer.now())
                    peer.publish(frames[0].messages(stamps[-1])[0], None)
                    peer.spin_until(lambda: False, 0.25, proc)
                peer.spin_until(lambda: stamps[-1] in peer.fused, args.timeout, proc)
                silent = [s for s in reversed(peer.status) if "silent" in s.message]
                lidar_only = [s for s in stamps if s in peer.fused and "rgb" not in peer.fused[s][0]]
                fields = peer.fused[stamps[-1]][0] if stamps[-1] in peer.fused else set()
                record(case, silent[0] if silent else None, bool(lidar_only) or "confidence" in fields,
                       f" ({len([s for s in stamps if s in peer.fused])} of {len(stamps)} sweeps published)")
            elif case.name.startswith("invalid parameter"):
                request = SetParameters.Request(parameters=[ParameterMsg(
                    name="eps_schedule", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE_ARRAY,
                                                              double_array_value=[-1.0, 0.01]))])
                client = peer.node.create_client(SetParameters, "/ros_ot_fusion/set_parameters")
                client.wait_for_service(timeout_sec=10.0)
                future = client.call_async(request)
                peer.executor.spin_until_future_complete(future, timeout_sec=10.0)
                result = future.result().results[0] if future.done() else None
                rejected = result is not None and not result.successful
                status = type("Status", (), {"level": OK if rejected else ERROR,
                                             "message": f"rejected: {result.reason}" if rejected
                                             else "accepted an invalid value"})()
                record(case, status, None)
            else:
                log = out_dir / "node_nogpu.log"
                second = start_node(domain_id + 1, log, env_extra={"CUDA_VISIBLE_DEVICES": ""}, device="cuda")
                deadline = time.monotonic() + args.start_timeout
                while time.monotonic() < deadline and "fusing" not in log.read_text():
                    time.sleep(0.5)
                second.send_signal(signal.SIGINT)
                second.wait(timeout=30)
                lines = [line for line in log.read_text().splitlines() if "WARN" in line and "CPU" in line]
                status = type("Status", (), {"level": WARN if lines else OK,
                                             "message": lines[0].split("]: ")[-1] if lines else "no warning"})()
                record(case, status, None, f" (exit {second.returncode})")
    finally:
        peer.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    for row in rows:
        row["node_exit"] = proc.returncode
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", default="build/faults", help="folder for the node logs")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--domain", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "42")))
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for one frame to be processed")
    ap.add_argument("--start-timeout", type=float, default=120.0)
    args = ap.parse_args()
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    rows = run(args)
    print("\n| bad input or fault | node's diagnostic | published for it | next good frame fused | "
          "extrinsic after (vs truth) | as expected |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        pub = {True: "yes", False: "no", None: "-"}[r["bad_frame_published"]]
        print(f"| {r['case']} | {r['level']}: {r['message']} | {pub} | {'yes' if r['good_frame_fused'] else 'NO'} | "
              f"{r['extrinsic_after']} | {'yes' if r['pass'] else 'NO'} |")
    exit_code = rows[-1]["node_exit"] if rows else None
    print(f"\nnode exit status after SIGINT: {exit_code}; good frames lost: "
          f"{sum(not r['good_frame_fused'] for r in rows)} of {len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if rows and len(rows) == len(CASES) and all(r["pass"] for r in rows) and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
