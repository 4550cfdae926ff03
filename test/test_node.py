"""The node over real DDS: the node runs in its own process, the test publishes and listens.

The clouds are a small synthetic room (a few thousand points) and the solver settings are cut
down, so a frame takes ~0.1-0.5 s on a 2-core CPU; the timeouts are generous because torch's
import and the first frame are slow on a busy machine. Pure-Python parts (pairing, the queue,
the parameter descriptors) are tested without DDS first; last, a simulated drive goes through
`replay --clock` into the node with its default solver, and the extrinsic must converge.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ros_ot_fusion import params as P
from ros_ot_fusion import transforms as tf
from ros_ot_fusion.sync import stamp_ns

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["x", "y", "z", "intensity", "rgb", "confidence"]
STATUS = "ros_ot_fusion: fusion"
# camera optical frame (z forward, x right, y down) -> LiDAR frame (x forward, y left, z up)
TRUTH = tf.make_transform(np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], float), [0.1, 0.0, 0.2])
# a small solve: the node's plumbing is under test here, not the alignment
FAST = dict(max_points=300, lidar_voxel_m=0.6, camera_voxel_m=0.6, max_iter=30, rigid_steps=1,
            pyramid_voxel_sizes=[2.0], eps_schedule=[0.25, 0.05], device="cpu",
            prior_extrinsic=[float(v) for v in tf.matrix_to_pose(TRUTH)])
START_TIMEOUT_S = 90.0        # process start to first /diagnostics (torch import on a busy machine)
FRAME_TIMEOUT_S = 60.0        # a published frame to its result (the first solve is the slowest)
_BASE_DOMAIN = 100 + (os.getpid() % 20) * 6      # 100..219, six per test session


def domain(offset: int) -> int:
    return _BASE_DOMAIN + offset


# ---------------------------------------------------------------------------------------------
# a synthetic scene: a room with a box, seen by both sensors

def room(n: int, rng) -> np.ndarray:
    def plane(k, origin, u, v):
        a, b = rng.uniform(0, 1, (2, k))
        return np.asarray(origin) + a[:, None] * np.asarray(u) + b[:, None] * np.asarray(v)
    return np.concatenate([
        plane(n // 4, [1, -4, -1.5], [9, 0, 0], [0, 8, 0]),      # floor
        plane(n // 4, [10, -4, -1.5], [0, 8, 0], [0, 0, 4]),     # front wall
        plane(n // 8, [1, 4, -1.5], [9, 0, 0], [0, 0, 4]),       # side walls
        plane(n // 8, [1, -4, -1.5], [9, 0, 0], [0, 0, 4]),
        plane(n // 8, [5, -1, -1.5], [0, 2, 0], [0, 0, 1.5]),    # a box
        plane(n // 8, [5, -1, 0], [1.5, 0, 0], [0, 2, 0])])


def scene(n_lidar=2000, n_camera=2000, seed=0):
    """LiDAR points (LiDAR frame); camera points (camera frame: the room seen through TRUTH^-1), rgb."""
    rng = np.random.default_rng(seed)
    lidar = room(n_lidar, rng).astype(np.float32)
    world = room(4 * n_camera, rng)
    cam = tf.transform_points(tf.invert(TRUTH), world)
    seen = (cam[:, 2] > 0.3) & (np.abs(cam[:, 0]) < cam[:, 2]) & (np.abs(cam[:, 1]) < 0.75 * cam[:, 2])
    rgb = (np.abs(np.sin(world[seen] * 1.7)) * 255).astype(np.uint8)
    return lidar, cam[seen][:n_camera].astype(np.float32), rgb[:n_camera]


LIDAR, CAMERA, RGB = scene()


def clouds(k: int):
    """LiDAR and camera PointCloud2 of frame k (stamps 0.1 s apart)."""
    from std_msgs.msg import Header

    from ros_ot_fusion.io import pointcloud2 as pc2

    def header(frame):
        h = Header(frame_id=frame)
        h.stamp.sec, h.stamp.nanosec = 1000 + k // 10, (k % 10) * 100_000_000
        return h
    lidar = pc2.encode(header("lidar"), LIDAR, intensity=np.full(len(LIDAR), 7.0, np.float32))
    camera = pc2.encode(header("camera"), CAMERA, rgb=RGB)
    return lidar, camera


# ---------------------------------------------------------------------------------------------
# without DDS: pairing, the queue, the descriptors

def stamped(sec: float):
    ns = int(round(sec * 1e9))
    return SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=ns // 10**9, nanosec=ns % 10**9)),
                           name=f"{sec:g}")


def polled(c, since: float, until: float) -> list:
    """What the node's 10 ms polling timer gets from the collector over (since, until]."""
    out, k = [], 1
    while since + 0.01 * k <= until + 1e-9:
        out += c.poll(since + 0.01 * k)
        k += 1
    return out


def test_collector_pairs_nearest_and_never_stalls():
    from ros_ot_fusion.node import Collector

    c = Collector(slop_s=0.05, timeout_s=1.0, now=0.0, wait_s=0.07)
    for t in (10.00, 10.03, 10.07):
        assert c.add_camera(stamped(t), now=0.1) == []
    [frame] = c.add_lidar(stamped(10.06), now=0.1)       # a later cloud exists: pair at once
    assert frame.camera.name == "10.07" and not frame.note
    assert c.add_lidar(stamped(10.10), now=0.2) == []    # nearest is 10.07; 10.10 may still come
    [frame] = c.add_camera(stamped(10.10), now=0.21)     # ... and it does
    assert frame.camera.name == "10.1"
    assert c.add_lidar(stamped(10.14), now=0.3) == []    # waits, but not for long
    assert polled(c, 0.3, 0.36) == []
    [frame] = polled(c, 0.36, 0.37)
    assert frame.camera.name == "10.1"
    assert c.add_lidar(stamped(10.30), now=0.4) == []
    [frame] = polled(c, 0.4, 0.5)                        # nothing within the slop: LiDAR alone
    assert frame.camera is None and "sync_slop_s" in frame.note and not frame.silent


def test_collector_goes_lidar_only_when_the_camera_is_silent_and_recovers():
    from ros_ot_fusion.node import Collector

    c = Collector(slop_s=0.05, timeout_s=1.0, now=0.0)
    c.add_camera(stamped(5.0), now=0.0)
    assert c.add_lidar(stamped(7.0), now=2.0) == []      # silent: a short wait all the same
    [frame] = polled(c, 2.0, 2.1)
    assert frame.camera is None and frame.silent and "camera silent" in frame.note
    assert c.add_lidar(stamped(7.2), now=2.2) == []      # the camera's first cloud in a while ...
    [frame] = c.add_camera(stamped(7.2), now=2.21)       # ... pairs with the waiting sweep
    assert frame.camera is not None and not frame.silent
    assert c.add_lidar(stamped(0.5), now=2.3) == []      # a bag loop: stamps go back
    [frame] = c.add_camera(stamped(0.5), now=2.31)       # the new loop's cloud, not the old ones
    assert frame.camera.name == "0.5"


def test_frame_queue_drops_the_oldest():
    from ros_ot_fusion.node import Frame, FrameQueue

    a, b, c, d = (Frame(lidar=name, received=time.monotonic()) for name in "abcd")
    q = FrameQueue(2)
    assert q.put(a) and q.put(b) and not q.put(c)
    assert q.dropped == 1 and q.get() is b
    assert a.received <= a.queued <= b.queued <= time.monotonic()     # when each went in
    q.put(d)
    q.resize(1)
    assert q.dropped == 2 and q.get() is d
    q.close()
    assert q.get() is None


def test_collector_pairs_a_camera_stream_that_lags_by_more_than_a_sweep_period():
    from ros_ot_fusion.node import Collector

    c = Collector(slop_s=0.02, timeout_s=1.0, now=0.0, wait_s=0.1)
    # 20 Hz; each camera cloud comes 80 ms after its sweep (the polling timer runs every 10 ms)
    events = sorted([(0.05 * k, "lidar", k) for k in range(6)] + [(0.05 * k + 0.08, "camera", k) for k in range(6)]
                    + [(0.01 * i + 0.005, "poll", None) for i in range(50)])
    got = []
    for now, kind, k in events:
        got += (c.add_lidar(stamped(10 + 0.05 * k), now) if kind == "lidar" else
                c.add_camera(stamped(10 + 0.05 * k), now) if kind == "camera" else c.poll(now))
    assert [f.camera.name if f.camera else None for f in got] == [f"{10 + 0.05 * k:g}" for k in range(6)]
    assert c.add_lidar(stamped(11.0), now=1.0) + c.poll(now=1.05) == [] and len(c.pending) == 1
    for k in range(1, 20):                               # a flood: at most MAX_WAITING sweeps wait
        c.add_lidar(stamped(11.0 + 0.001 * k), now=1.05)
    assert len(c.pending) == 8


def test_a_sweep_waits_while_a_backlogged_camera_stream_catches_up():
    from ros_ot_fusion.node import Collector

    c = Collector(slop_s=0.02, timeout_s=1.0, now=0.0, wait_s=0.1)
    c.add_camera(stamped(9.5), now=0.0)
    assert c.add_lidar(stamped(10.0), now=0.0) == []
    for k in range(6):                                   # older clouds keep coming, 60 ms apart
        now = 0.06 * (k + 1)
        assert c.add_camera(stamped(9.6 + 0.06 * k), now) == [] and c.poll(now + 0.05) == []
    [frame] = c.add_camera(stamped(10.0), now=0.4)       # ... then its own, 0.4 s after the sweep
    assert frame.camera.name == "10" and not frame.note
    assert c.add_lidar(stamped(10.1), now=0.5) == [] and c.poll(now=0.59) == []
    [frame] = c.poll(now=0.6)                            # the stream stopped: 0.1 s after its last cloud
    assert frame.camera is None
    c.add_lidar(stamped(10.2), now=0.6)
    for k in range(30):                                  # never longer than timeout_s, stream or not
        c.add_camera(stamped(9.0), now=0.6 + 0.05 * k)
        if c.poll(now=0.6 + 0.05 * k):
            break
    assert 0.6 + 0.05 * k >= 1.6 - 1e-9 and not c.pending


def test_a_late_poll_lets_the_messages_taken_meanwhile_go_first():
    from ros_ot_fusion.node import Collector

    c = Collector(slop_s=0.02, timeout_s=1.0, now=0.0, wait_s=0.1)
    c.add_camera(stamped(9.9), now=0.0)
    assert c.add_lidar(stamped(10.0), now=0.0) == [] and polled(c, 0.0, 0.05) == []
    assert c.poll(now=0.3) == []                         # the executor stood still for 250 ms ...
    [frame] = c.add_camera(stamped(10.0), now=0.3)       # ... with the sweep's cloud waiting in DDS
    assert frame.camera.name == "10"
    c.add_lidar(stamped(10.1), now=0.3)
    assert c.poll(now=1.0) == [] and c.poll(now=1.4)[0].camera is None    # timeout_s still holds


def test_queued_sweeps_take_a_camera_cloud_that_comes_late():
    from ros_ot_fusion.node import Collector, FrameQueue

    c, q = Collector(slop_s=0.05, timeout_s=1.0, now=0.0, wait_s=0.1), FrameQueue(2)
    c.add_camera(stamped(9.0), now=0.0)
    for t, now in ((10.0, 0.1), (10.1, 0.2)):            # the solver is busy: both sweeps queue
        c.add_lidar(stamped(t), now=now)
        [frame] = polled(c, now, now + 0.1)              # no camera cloud in time: LiDAR alone
        assert frame.camera is None and frame.note
        q.put(frame)
    assert q.pair_late(stamped(10.13), int(10.13e9), c.cameras.slop_ns) == 1     # 10.1's only
    assert q.pair_late(stamped(10.03), int(10.03e9), c.cameras.slop_ns) == 1     # 10.0's
    assert q.pair_late(stamped(10.09), int(10.09e9), c.cameras.slop_ns) == 1     # nearer for 10.1
    assert q.pair_late(stamped(10.12), int(10.12e9), c.cameras.slop_ns) == 0     # farther: kept
    first, second = q.get(), q.get()
    assert first.camera.name == "10.03" and not first.note and first.paired_late
    assert second.camera.name == "10.09" and not second.note


def test_gc_clock_sums_the_collectors_pauses():
    import gc

    from ros_ot_fusion.node import GcClock

    clock = GcClock()
    junk = [[i] for i in range(200_000)]          # something for a full collection to walk
    gc.collect()
    assert clock.total_s > 0
    del junk
    clock.close()
    before = clock.total_s
    gc.collect()
    assert clock.total_s == before                 # closed: no longer called


def test_descriptors_carry_ranges_choices_and_read_only():
    from ros_ot_fusion.node import coerce, descriptor

    d = {p.name: descriptor(p) for p in P.PARAMS}
    assert d["sync_slop_s"].floating_point_range[0].to_value == 1.0
    assert d["sync_slop_s"].floating_point_range[0].step == 0.0
    assert d["queue_size"].integer_range[0].from_value == 1 and d["queue_size"].integer_range[0].step == 1
    assert "best_effort" in d["qos_reliability"].additional_constraints and d["qos_reliability"].read_only
    assert "[0.01, 100]" in d["pyramid_voxel_sizes"].additional_constraints
    assert all(x.description for x in d.values())
    assert coerce(P.BY_NAME["rho"], 1) == 1.0 and isinstance(coerce(P.BY_NAME["rho"], 1), float)
    assert coerce(P.BY_NAME["max_points"], 500.0) == 500
    assert coerce(P.BY_NAME["eps_schedule"], [1, 0]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# over DDS

def _ros_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(repr(float(v)) for v in value) + "]"
    return str(value)


def start_replay(domain_id: int, log: Path, bag: Path, *args: str, **env: str) -> subprocess.Popen:
    """`ros-ot-fusion replay BAG ARGS...` in its own process on `domain_id`, its output in `log`."""
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", **env)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "ros_ot_fusion.cli", "replay", str(bag), *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def start_node(domain_id: int, log: Path, params_file: Path | None = None, **params):
    args = [sys.executable, "-m", "ros_ot_fusion.cli", "node", "--ros-args"]
    if params_file is not None:
        args += ["--params-file", str(params_file)]
    for name, value in params.items():
        args += ["-p", f"{name}:={_ros_value(value)}"]
    # OMP_NUM_THREADS=1: on a busy 2-core machine torch's spinning intra-op threads made the
    # first frame take 16-32 s instead of 0.3 s (the test process competes for the same cores)
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               FASTDDS_BUILTIN_TRANSPORTS="LARGE_DATA", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


class Peer:
    """The test's side of DDS: publishes the clouds, listens to everything the node publishes."""

    def __init__(self, domain_id: int):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import TransformStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile
        from sensor_msgs.msg import PointCloud2

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("test_peer", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lidar_pub = self.node.create_publisher(PointCloud2, "/lidar/points", QoSProfile(depth=5))
        self.camera_pub = self.node.create_publisher(PointCloud2, "/camera/points", QoSProfile(depth=5))
        self.fused, self.extrinsic, self.status = [], [], []
        self.node.create_subscription(PointCloud2, "/ros_ot_fusion/fused", self.fused.append, QoSProfile(depth=10))
        self.node.create_subscription(TransformStamped, "/ros_ot_fusion/extrinsic", self.extrinsic.append,
                                      QoSProfile(depth=10))
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, QoSProfile(depth=50))
        self.frame = 0

    def _on_diagnostics(self, msg):
        for status in msg.status:
            if status.name == STATUS:
                self.status.append((msg.header.stamp, status))

    def spin_until(self, predicate, timeout: float, proc: subprocess.Popen | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if proc is not None and proc.poll() is not None:
                return predicate()
            self.executor.spin_once(timeout_sec=0.05)
        return predicate()

    def publish(self, camera: bool = True, lidar_msg=None, camera_msg=None) -> None:
        """One frame: the camera cloud first (so the pair goes at once), then the LiDAR sweep."""
        lidar, cam = clouds(self.frame)
        self.frame += 1
        if camera:
            self.camera_pub.publish(camera_msg or cam)
        self.lidar_pub.publish(lidar_msg or lidar)

    def feed_until(self, predicate, proc, timeout: float = FRAME_TIMEOUT_S, camera: bool = True,
                   period: float = 0.3, **msgs) -> bool:
        """Publish a frame every `period` s until `predicate()` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the node died"
            self.publish(camera=camera, **msgs)
            if self.spin_until(predicate, period, proc):
                return True
        return False

    def call(self, srv_type, name: str, request, timeout: float = 20.0):
        client = self.node.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=timeout), f"no service {name}"
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        assert future.done(), f"{name}: no answer"
        self.node.destroy_client(client)
        return future.result()

    def close(self) -> None:
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)


def latest(peer: Peer):
    return peer.status[-1][1] if peer.status else None


def values(status) -> dict:
    return {kv.key: kv.value for kv in status.values}


def level(status) -> int:
    return status.level[0] if isinstance(status.level, bytes) else int(status.level)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One node for the module's DDS tests (camera_timeout_s short, so silence shows fast)."""
    log = tmp_path_factory.mktemp("node") / "node.log"
    proc = start_node(domain(0), log, camera_timeout_s=0.6, **FAST)
    peer = Peer(domain(0))
    try:
        up = peer.spin_until(lambda: peer.status, START_TIMEOUT_S, proc)
        assert up, f"node did not come up:\n{log.read_text()}"
        yield SimpleNamespace(proc=proc, peer=peer, log=log)
    finally:
        peer.close()
        stop(proc)


def test_fused_cloud_and_extrinsic_arrive(running):
    peer, proc = running.peer, running.proc
    assert peer.feed_until(lambda: peer.fused and peer.extrinsic, proc), running.log.read_text()
    fused = peer.fused[-1]
    assert [f.name for f in fused.fields] == FIELDS
    assert fused.header.frame_id == "lidar" and fused.width >= len(LIDAR)
    ext = peer.extrinsic[-1]
    assert ext.header.frame_id == "lidar" and ext.child_frame_id == "camera"
    q = ext.transform.rotation
    assert abs(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w - 1) < 1e-6
    assert peer.spin_until(lambda: "frames_processed" in values(latest(peer))
                           and int(values(latest(peer))["frames_processed"]) >= 1, 10)
    status = latest(peer)
    v = values(status)
    assert status.hardware_id == "cpu"
    for key in ("pipeline_latency_ms", "total_ms", "frames_dropped", "camera_staleness_s", "last_error", "gc_ms"):
        assert key in v, key
    assert float(v["pipeline_latency_ms"]) > 0
    # the latency splits into waiting for the pair, for the worker, processing and publishing
    waits = float(v["sync_wait_ms"]) + float(v["queue_wait_ms"])
    assert min(float(v["sync_wait_ms"]), float(v["queue_wait_ms"])) >= 0
    assert waits + float(v["processing_time_ms"]) <= float(v["pipeline_latency_ms"])


def test_the_node_maps_a_shared_memory_segment_that_holds_a_large_cloud(running):
    """Its process takes the large-cloud DDS profile (cli.use_dds_profile): beside Fast DDS's
    default 512 kB segments it maps one of 64 MB, so a 10 MB fused cloud goes out in one piece."""
    if "FASTDDS_DEFAULT_PROFILES_FILE" in os.environ:
        pytest.skip("the environment names its own DDS profile")
    maps = Path(f"/proc/{running.proc.pid}/maps").read_text().splitlines()
    segments = {line.split()[-1] for line in maps if "/dev/shm/fastdds_" in line and "_port" not in line}
    sizes = sorted(os.path.getsize(s) for s in segments if os.path.exists(s))
    assert sizes and sizes[-1] >= 64 * 2**20 and sizes[0] < 2**20, sizes


def test_runtime_parameters_are_checked(running):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import GetParameters, SetParameters

    def param(name, **value):
        return Parameter(name=name, value=ParameterValue(**value))

    D, I, S = ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_INTEGER, ParameterType.PARAMETER_STRING
    request = SetParameters.Request(parameters=[
        param("sync_slop_s", type=D, double_value=5.0),                           # out of range
        param("camera_silent_output", type=S, string_value="maybe"),             # not a choice
        param("lidar_topic", type=S, string_value="/elsewhere"),                 # read-only
        param("rho", type=D, double_value=0.1),                                  # fine
        param("max_correction_m", type=I, integer_value=2),                      # 2 for 2.0: fine
    ])
    results = running.peer.call(SetParameters, "/ros_ot_fusion/set_parameters", request).results
    assert [r.successful for r in results] == [False, False, False, True, True], results
    assert "sync_slop_s" in results[0].reason and "range" in results[0].reason
    assert "lidar_only" in results[1].reason
    assert "read-only" in results[2].reason
    got = running.peer.call(GetParameters, "/ros_ot_fusion/get_parameters",
                            GetParameters.Request(names=["rho", "max_correction_m", "sync_slop_s"])).values
    assert [v.double_value for v in got] == [0.1, 2.0, 0.05]


def test_malformed_messages_do_not_stop_the_node(running):
    peer, proc = running.peer, running.proc
    lidar, camera = clouds(0)
    short = clouds(0)[0]
    short.data = short.data[:-5]                          # data length does not match the layout
    no_x = clouds(0)[0]
    no_x.fields = [f for f in no_x.fields if f.name != "x"]

    def error_reported():
        s = latest(peer)
        return s is not None and level(s) == 2 and "malformed" in s.message.lower()
    assert peer.feed_until(error_reported, proc, lidar_msg=short), [s.message for _, s in peer.status[-5:]]
    peer.status.clear()
    assert peer.feed_until(error_reported, proc, lidar_msg=no_x)
    assert "last_error" in values(latest(peer)) and values(latest(peer))["last_error"]
    bad_camera = clouds(0)[1]
    bad_camera.point_step = 1                             # fields no longer fit
    count = len(peer.fused)
    assert peer.feed_until(lambda: len(peer.fused) > count, proc, camera_msg=bad_camera)
    count = len(peer.fused)
    assert peer.feed_until(lambda: len(peer.fused) > count, proc)    # and a good frame after all that
    assert [f.name for f in peer.fused[-1].fields] == FIELDS and proc.poll() is None


def test_silent_camera_gives_lidar_only_output_and_a_warning(running):
    peer, proc = running.peer, running.proc
    time.sleep(1.0)                                       # > camera_timeout_s without a camera cloud
    peer.fused.clear()
    peer.status.clear()

    def lidar_only_and_warned():
        warned = any(level(s) == 1 and "camera" in s.message.lower() for _, s in peer.status)
        return warned and any(f.width == len(LIDAR) for f in peer.fused)
    assert peer.feed_until(lidar_only_and_warned, proc, camera=False), \
        [s.message for _, s in peer.status[-5:]]
    fused = peer.fused[-1]
    assert [f.name for f in fused.fields] == FIELDS and fused.header.frame_id == "lidar"
    assert any("silent" in s.message for _, s in peer.status)
    # the camera comes back: fusion resumes by itself (camera points again in the fused cloud)
    peer.fused.clear()
    assert peer.feed_until(lambda: any(f.width > len(LIDAR) for f in peer.fused), proc)


def test_a_matched_lidar_publisher_that_sends_nothing_is_named_in_the_warning(running):
    """What a user sees when a driver's large best-effort clouds never get through."""
    peer, proc = running.peer, running.proc       # the peer's LiDAR publisher is matched, and silent now

    def warned():
        return any(level(s) == 1 and "no LiDAR sweep" in s.message and "1 publisher(s) are matched" in s.message
                   for _, s in peer.status)
    assert peer.spin_until(warned, 10, proc), [s.message for _, s in peer.status[-3:]]


def test_silent_camera_with_output_none_publishes_only_diagnostics(running):
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    peer, proc = running.peer, running.proc

    def set_output(value):
        request = SetParameters.Request(parameters=[Parameter(name="camera_silent_output", value=ParameterValue(
            type=ParameterType.PARAMETER_STRING, string_value=value))])
        assert peer.call(SetParameters, "/ros_ot_fusion/set_parameters", request).results[0].successful
    set_output("none")
    try:
        time.sleep(1.0)
        peer.spin_until(lambda: False, 1.0)              # let frames in flight come out
        peer.fused.clear()
        peer.status.clear()
        assert peer.feed_until(lambda: any("publishing nothing" in s.message for _, s in peer.status), proc,
                               camera=False), [s.message for _, s in peer.status[-5:]]
        assert not peer.fused
    finally:
        set_output("lidar_only")


def test_invalid_parameters_at_start_exit_nonzero_with_reasons(tmp_path):
    params_file = tmp_path / "bad.yaml"
    params_file.write_text("ros_ot_fusion:\n  ros__parameters:\n    qos_depth: 0\n    sync_slop: 0.1\n")
    log = tmp_path / "node.log"
    proc = start_node(domain(5), log, params_file=params_file, device="tpu", max_range_m=0.2)
    try:
        rc = proc.wait(timeout=START_TIMEOUT_S)
    finally:
        stop(proc)
    out = log.read_text()
    assert rc != 0, out
    for reason in ("qos_depth must lie in [1, 100]", "unknown parameter 'sync_slop'",
                   "device must be one of auto, cuda, cpu", "max_range_m must lie in"):
        assert reason in out, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_clean_exit_on_signal(tmp_path, sig):
    """Exit code 0 after frames went through; with use_sim_time the diagnostics carry /clock's time."""
    from rosgraph_msgs.msg import Clock

    offset = 1 if sig == signal.SIGINT else 2
    log = tmp_path / "node.log"
    proc = start_node(domain(offset), log, use_sim_time=True, **FAST)
    peer = Peer(domain(offset))
    try:
        clock_pub = peer.node.create_publisher(Clock, "/clock", 10)

        def tick():
            msg = Clock()
            msg.clock.sec = 4242
            clock_pub.publish(msg)
            return any(stamp.sec == 4242 for stamp, _ in peer.status)
        assert peer.spin_until(lambda: peer.status, START_TIMEOUT_S, proc), log.read_text()
        assert peer.feed_until(lambda: tick() and peer.fused, proc), log.read_text()
    finally:
        peer.close()
        rc = stop(proc, sig)
    assert rc == 0, log.read_text()


def test_replay_restamp_patches_the_header_stamp_in_the_cdr_bytes():
    from geometry_msgs.msg import TransformStamped
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import PointCloud2

    from ros_ot_fusion.replay import cdr_stamp_ns, shift_stamp

    for cls in (PointCloud2, TransformStamped):
        msg = cls()
        msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = 10, 900_000_000, "lidar"
        assert cdr_stamp_ns(serialize_message(msg)) == 10_900_000_000
        for offset, (sec, nanosec) in ((2_300_000_000, (13, 200_000_000)), (-950_000_000, (9, 950_000_000))):
            out = deserialize_message(shift_stamp(serialize_message(msg), offset), cls)
            assert (out.header.stamp.sec, out.header.stamp.nanosec, out.header.frame_id) == (sec, nanosec, "lidar")


def test_replay_plays_a_bag_with_clock_and_stops_on_ctrl_c(tmp_path):
    """`ros-ot-fusion replay --clock --loop`: the recorded messages, in order, with /clock in bag time."""
    from rclpy.qos import QoSProfile
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import PointCloud2

    from ros_ot_fusion.io import pointcloud2 as pc2
    from ros_ot_fusion.io.bag import BagWriter

    bag, t0 = tmp_path / "bag", 1_000_000_000_000
    sent = []
    with BagWriter(bag) as writer:
        for k in range(5):
            lidar, camera = clouds(k)
            stamp = t0 + k * 100_000_000
            writer.write("/camera/points", camera, stamp)
            writer.write("/lidar/points", lidar, stamp + 1_000_000)
            sent += [("/camera/points", stamp), ("/lidar/points", stamp + 1_000_000)]
    peer = Peer(domain(3))
    got, ticks = [], []
    for topic in ("/lidar/points", "/camera/points"):
        peer.node.create_subscription(PointCloud2, topic, lambda m, t=topic: got.append((t, m)),
                                      QoSProfile(depth=50))
    peer.node.create_subscription(Clock, "/clock", ticks.append, QoSProfile(depth=200))
    log = tmp_path / "replay.log"
    proc = start_replay(domain(3), log, bag, "--clock", "--loop", "--rate", "2", "--start-delay", "20")
    try:
        assert peer.spin_until(lambda: len(got) >= len(sent) + 2, 60, proc), log.read_text()
    finally:
        rc = stop(proc, signal.SIGINT)
        peer.close()
    assert rc == 0, log.read_text()
    for topic in ("/lidar/points", "/camera/points"):                # each topic in recorded order
        stamps = [stamp_ns(m) for t, m in got if t == topic]
        assert stamps[:5] == [t0 + k * 100_000_000 for k in range(5)], topic
    np.testing.assert_array_equal(pc2.decode(next(m for t, m in got if t == "/lidar/points")).xyz, LIDAR)
    clock = [c.clock.sec * 10**9 + c.clock.nanosec for c in ticks]
    assert clock and min(clock) >= t0 and max(clock) <= sent[-1][1]
    assert any(t0 < c < sent[-1][1] for c in clock)          # ticks between the messages too
    assert "interrupted" in log.read_text()


def test_replay_waits_for_the_subscribers_asked_for(tmp_path):
    """`--subscribers 2`: with one reader matched the replay holds the first message back; a
    second reader lets it start (the demo's recorder must not count for the node)."""
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import PointCloud2

    from ros_ot_fusion.io.bag import BagWriter
    from ros_ot_fusion.replay import replay

    bag = tmp_path / "bag"
    with BagWriter(bag) as writer:
        for k in range(3):
            writer.write("/lidar/points", clouds(k)[0], 1_000_000_000_000 + k * 100_000_000)
    assert replay(bag, topics=["/lidar/points"], subscribers=[1, 2]) == 2      # one count per topic
    peer = Peer(domain(5))
    first, second = [], []
    peer.node.create_subscription(PointCloud2, "/lidar/points", first.append, QoSProfile(depth=10))
    log = tmp_path / "replay.log"
    proc = start_replay(domain(5), log, bag, "--topics", "/lidar/points", "--subscribers", "2", "--start-delay", "30")
    try:
        peer.spin_until(lambda: False, 4, proc)                    # matched with one reader by now
        assert not first and proc.poll() is None, log.read_text()
        peer.node.create_subscription(PointCloud2, "/lidar/points", second.append, QoSProfile(depth=10))
        assert peer.spin_until(lambda: len(first) == len(second) == 3, 30, proc), log.read_text()
    finally:
        stop(proc, signal.SIGINT)
        peer.close()


def test_replay_delivers_the_last_messages_before_it_exits(tmp_path):
    """A reliable reader gets every message of a one-pass replay, the last multi-MB clouds included
    (a publisher destroyed right after its last publish drops what is still in flight)."""
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import PointCloud2

    from ros_ot_fusion.io import pointcloud2 as pc2
    from ros_ot_fusion.io.bag import BagWriter
    from ros_ot_fusion.sync import header

    rng = np.random.default_rng(7)
    bag, t0, n = tmp_path / "bag", 1_000_000_000_000, 6
    with BagWriter(bag) as writer:
        for k in range(n):                      # 300k points a cloud: ~4.8 MB
            stamp = t0 + k * 100_000_000
            cloud = pc2.encode(header("camera", stamp), rng.normal(size=(300_000, 3)).astype(np.float32),
                               rgb=rng.integers(0, 255, (300_000, 3), dtype=np.uint8))
            writer.write("/camera/points", cloud, stamp)
    peer = Peer(domain(2))
    got = []
    peer.node.create_subscription(PointCloud2, "/camera/points", got.append, QoSProfile(depth=50))
    log = tmp_path / "replay.log"
    proc = start_replay(domain(2), log, bag, "--rate", "4", "--start-delay", "20")
    try:
        peer.spin_until(lambda: proc.poll() is not None, 60)
        peer.spin_until(lambda: len(got) >= n, 5)       # what was acknowledged has arrived
    finally:
        rc = stop(proc, signal.SIGINT)
        peer.close()
    assert rc == 0, log.read_text()
    assert [stamp_ns(m) for m in got] == [t0 + k * 100_000_000 for k in range(n)], (len(got), log.read_text())


@pytest.mark.slow
def test_extrinsic_converges_on_a_simulated_bag_replayed_over_dds(tmp_path):
    """simulate -> replay --clock -> node (use_sim_time, the miscalibrated prior) -> ~/extrinsic."""
    pytest.importorskip("ros_ot_fusion.sim")
    from ros_ot_fusion.io.bag import read_bag
    from ros_ot_fusion.io.transform_msg import msg_to_matrix as transform_to_matrix

    env = dict(os.environ, ROS_DOMAIN_ID=str(domain(4)), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               OMP_NUM_THREADS="1")
    bag = tmp_path / "drive"
    subprocess.run([sys.executable, "-m", "ros_ot_fusion.cli", "simulate", str(bag), "--frames", "4",
                    "--lidar-beams", "16", "--camera-width", "160", "--camera-height", "120"],
                   env=env, check=True, capture_output=True, cwd=ROOT, timeout=120)
    truth = transform_to_matrix(next(m for _, _, m in read_bag(bag, ["/calibration/ground_truth"])))
    prior_file = Path(f"{bag}.params.yaml")
    prior = tf.pose_to_matrix(P.load_params_file(prior_file)["prior_extrinsic"])
    assert tf.pose_error(prior, truth)[0] > 2.0                # the prior is off by 3 deg / 15 cm

    log = tmp_path / "node.log"
    node = start_node(domain(4), log, params_file=prior_file, use_sim_time=True, device="cpu")
    peer = Peer(domain(4))
    try:
        assert peer.spin_until(lambda: peer.status, START_TIMEOUT_S, node), log.read_text()
        replay = start_replay(domain(4), tmp_path / "replay.log", bag, "--clock", "--rate", "0.5", "--topics",
                              "/lidar/points", "/camera/points", "--start-delay", "10", OMP_NUM_THREADS="1")

        def error():
            return tf.pose_error(transform_to_matrix(peer.extrinsic[-1]), truth) if peer.extrinsic else (90, 9)
        converged = peer.spin_until(lambda: error()[0] < 0.5 and error()[1] < 0.05, 2 * FRAME_TIMEOUT_S, node)
        assert replay.wait(timeout=60) == 0, (tmp_path / "replay.log").read_text()
        assert converged, f"extrinsic error {error()} (deg, m)\n{log.read_text()}"
        assert peer.extrinsic[-1].header.frame_id == "lidar"
    finally:
        peer.close()
        rc = stop(node)
    assert rc == 0, log.read_text()
