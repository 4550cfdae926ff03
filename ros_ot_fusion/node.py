"""The `ros_ot_fusion` node: parameters, QoS, sync, a worker thread, publishing. Thin glue.

    LiDAR  ─┐                       bounded queue               ┌─> ~/fused        (PointCloud2)
            ├─ Collector (stamps) ──[oldest dropped]── worker ──┼─> ~/extrinsic    (TransformStamped)
    camera ─┘   never waits long                  Pipeline     └─> /diagnostics   (DiagnosticArray)

The per-frame work is `Pipeline.process` (the same code `process-bag` runs). Subscription
callbacks only pair messages and hand them over: the solver runs on a worker thread, so the
executor keeps receiving while a frame is solved, and a full queue drops its oldest frame.

Parameters come from `params.PARAMS` (descriptors with ranges, choices and read-only flags);
every value is checked with `params.validate`, at start (the node exits with every reason) and
on each change (refused with the reason).
"""
from __future__ import annotations

import array
import gc
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TransformStamped
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2

from ros_ot_fusion import params as P
from ros_ot_fusion.sync import CameraBuffer, stamp_ns

OK, WARN, ERROR = 0, 1, 2            # diagnostic_msgs/DiagnosticStatus levels
STATUS_NAME = f"{P.NODE_NAME}: fusion"
POLL_PERIOD_S = 0.01          # how often a waiting sweep checks whether its wait is over
CAMERA_HISTORY = 8            # camera clouds kept for pairing
MAX_WAITING = 8               # sweeps waiting for their camera cloud at most
STARVED_S = 3 * POLL_PERIOD_S # a poll this late: the executor itself was held up (a busy CPU)
LIDAR_STALE_S = 2.0           # no sweep for this long: a WARN
LOG_THROTTLE_S = 5.0
SET_PARAMS_WAIT_S = 5.0       # a parameter change waits at most this long for the frame in flight


# ---------------------------------------------------------------------------------------------
# Parameters: descriptors and the few type conversions ROS needs (1 for 1.0, [0, 1] for [0.0, 1.0])

def ros_type(p: P.Param) -> Parameter.Type:
    if isinstance(p.default, bool):
        return Parameter.Type.BOOL
    if isinstance(p.default, int):
        return Parameter.Type.INTEGER
    if isinstance(p.default, float):
        return Parameter.Type.DOUBLE
    if isinstance(p.default, str):
        return Parameter.Type.STRING
    return Parameter.Type.DOUBLE_ARRAY


def descriptor(p: P.Param) -> ParameterDescriptor:
    """The ROS parameter descriptor of a table entry: description, range, choices, read-only."""
    d = ParameterDescriptor(name=p.name, type=ros_type(p).value, description=p.description,
                            read_only=p.read_only)
    constraints = []
    if p.low is not None and p.high is not None:
        if d.type == Parameter.Type.INTEGER.value:      # step 1: every integer of the range
            d.integer_range = [IntegerRange(from_value=math.ceil(p.low), to_value=math.floor(p.high),
                                            step=1)]
        elif d.type == Parameter.Type.DOUBLE.value:     # step 0: a continuous range
            d.floating_point_range = [FloatingPointRange(from_value=float(p.low),
                                                         to_value=float(p.high), step=0.0)]
        else:
            constraints.append(f"each value in [{p.low:g}, {p.high:g}]")
    if p.choices:
        constraints.append("one of: " + ", ".join(p.choices))
    if p.read_only:
        constraints.append("read-only: set at start (command line or params file)")
    d.additional_constraints = "; ".join(constraints)
    return d


def plain(value):
    """A parameter value as params.check wants it (arrays become lists)."""
    if isinstance(value, (array.array, tuple)) or type(value).__name__ == "ndarray":
        return [v.item() if hasattr(v, "item") else v for v in value]
    return value


def coerce(p: P.Param, value):
    """`value` in the Python type of the parameter, where that loses nothing (1 -> 1.0)."""
    value = plain(value)
    kind = ros_type(p)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == Parameter.Type.DOUBLE and is_int:
        return float(value)
    if kind == Parameter.Type.INTEGER and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == Parameter.Type.DOUBLE_ARRAY and isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return value


def as_parameter(p: P.Param, value) -> Parameter | None:
    """A Parameter of the declared type holding `value`, or None when the types do not fit."""
    try:
        return Parameter(p.name, ros_type(p), coerce(p, value))
    except (TypeError, ValueError):
        return None


def ignored_parameter(name: str) -> bool:
    """Parameters that are rclpy's own, not the table's."""
    return name in ("use_sim_time", "start_type_description_service") or name.startswith("qos_overrides.")


# ---------------------------------------------------------------------------------------------
# Pairing LiDAR sweeps with camera clouds by stamp

@dataclass
class Frame:
    """One unit of work for the solver."""

    lidar: object
    received: float                    # time.monotonic() when the sweep arrived
    stamp: int = 0                     # the sweep's stamp, ns
    camera: object | None = None
    note: str = ""                     # why there is no camera cloud (when there is none)
    silent: bool = False               # ... because the camera is silent
    paired_late: bool = False          # the camera cloud came while the sweep was queued
    queued: float = math.nan           # time.monotonic() when it went into the queue (paired or given up)


class Collector:
    """Pairs each LiDAR sweep with the camera cloud nearest in stamp, within `slop_s`.

    Never stalls for long: a sweep waits for a camera cloud only while a later one could still be
    nearer, and only while the camera stream is alive: until `wait_s` after the sweep's arrival
    or the last camera cloud's, whichever is later (a camera stream behind the LiDAR, e.g. an
    executor catching up after a long solve, keeps delivering older clouds: the sweep's own is
    on its way), and never longer than `timeout_s`. Then it goes on alone, marked `silent` when
    the camera has sent nothing for `timeout_s`. (A silent camera still gets the short wait: its
    first cloud after a pause, or at start, then pairs.) Several sweeps can wait at once. Times
    are `time.monotonic()` seconds, passed in (tests drive it without a clock). The pairing rule
    itself is `sync.CameraBuffer`'s, the one `process-bag` uses.
    """

    def __init__(self, slop_s: float, timeout_s: float, now: float, wait_s: float = 0.1):
        self.timeout_s, self.wait_s = timeout_s, wait_s
        self.cameras = CameraBuffer(int(slop_s * 1e9), CAMERA_HISTORY)
        self.started = now
        self.last_camera: float | None = None
        self.last_event = now                                   # the last call of any kind
        self.pending: deque[Frame] = deque()                    # waiting sweeps, in arrival order

    @property
    def slop_s(self) -> float:
        return self.cameras.slop_ns / 1e9

    @slop_s.setter
    def slop_s(self, value: float) -> None:
        self.cameras.slop_ns = int(value * 1e9)

    def staleness(self, now: float) -> float:
        """Seconds since the last camera cloud (since the start, before the first one)."""
        return now - (self.last_camera if self.last_camera is not None else self.started)

    def silent(self, now: float) -> bool:
        return self.staleness(now) > self.timeout_s

    def add_camera(self, msg, now: float) -> list[Frame]:
        stamp = stamp_ns(msg)
        self.cameras.add(stamp, msg)
        self.last_camera = self.last_event = now
        # the waiting sweeps up to this stamp are decided: nothing later can be nearer
        return self._resolve(now, lambda frame: frame.stamp <= stamp)

    def add_lidar(self, msg, now: float) -> list[Frame]:
        self.last_event = now
        stamp = stamp_ns(msg)
        # (after a bag loop the old camera clouds are far from the new stamps: they never pair,
        # and the buffer forgets them at the camera's own jump back)
        frame = Frame(lidar=msg, received=now, stamp=stamp)
        camera = self.cameras.nearest(stamp)
        newest = self.cameras.newest_stamp_ns
        if camera is not None and newest is not None and newest >= stamp and not self.pending:
            frame.camera = camera                            # a later cloud would be farther
            return [frame]
        self.pending.append(frame)                           # a later camera cloud may be nearer
        # a flood of sweeps (many times the camera's rate) is not held for long
        return self._resolve(now, lambda frame: len(self.pending) > MAX_WAITING)

    def poll(self, now: float) -> list[Frame]:
        """The waiting sweeps whose wait is over. A late poll means the executor was held up: the
        messages that came meanwhile are taken first (only the `timeout_s` bound holds now)."""
        starved, self.last_event = now - self.last_event > STARVED_S, now
        if starved:
            return self._resolve(now, lambda frame: now >= frame.received + self.timeout_s)
        alive = self.last_camera if self.last_camera is not None else -math.inf
        return self._resolve(now, lambda frame: now >= min(frame.received + self.timeout_s,
                                                           max(frame.received, alive) + self.wait_s))

    def _resolve(self, now: float, done) -> list[Frame]:
        """Pair the waiting sweeps from the oldest on while `done(frame)` holds."""
        out = []
        while self.pending and done(self.pending[0]):
            frame = self.pending.popleft()
            frame.camera = self.cameras.nearest(frame.stamp)
            out.append(frame if frame.camera is not None else self._without_camera(frame, now))
        return out

    def _without_camera(self, frame: Frame, now: float) -> Frame:
        if self.silent(now):
            frame.silent = True
            frame.note = f"camera silent for {self.staleness(now):.1f} s"
        else:
            frame.note = f"no camera cloud within sync_slop_s={self.slop_s:g} s of the sweep"
        return frame


class GcClock:
    """Time spent in Python's garbage collector, summed over all threads (gc.callbacks)."""

    def __init__(self):
        self.total_s, self._start = 0.0, None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.total_s += time.perf_counter() - self._start
            self._start = None

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


class FrameQueue:
    """A bounded FIFO between the executor and the worker: a full queue drops its oldest frame.

    A sweep that went in without a camera cloud still takes one that arrives while it waits
    (`pair_late`): under load the camera cloud, published after the sweep, can come later than
    the collector's short wait, and the solver was busy anyway.
    """

    def __init__(self, size: int):
        self.size = size
        self.dropped = 0
        self._items: deque[Frame] = deque()
        self._cv = threading.Condition()
        self._closed = False

    def put(self, frame: Frame) -> bool:
        """Queue a frame; False when it pushed the oldest one out."""
        frame.queued = time.monotonic()
        with self._cv:
            dropped = len(self._items) >= self.size
            if dropped:
                self._items.popleft()
                self.dropped += 1
            self._items.append(frame)
            self._cv.notify()
            return not dropped

    def pair_late(self, camera, stamp: int, slop_ns: int) -> int:
        """Give the camera cloud stamped `stamp` to each waiting sweep that went in without one
        and for which it is the nearest so far (within `slop_ns`); how many it went to."""
        paired = 0
        with self._cv:
            for frame in self._items:
                gap = abs(stamp - frame.stamp)
                if gap > slop_ns or not (frame.camera is None or frame.paired_late):
                    continue
                if frame.camera is None or gap < abs(stamp_ns(frame.camera) - frame.stamp):
                    frame.camera, frame.note, frame.silent, frame.paired_late = camera, "", False, True
                    paired += 1
        return paired

    def get(self) -> Frame | None:
        """The oldest frame, waiting for one; None once closed."""
        with self._cv:
            while not self._items and not self._closed:
                self._cv.wait()
            return None if self._closed else self._items.popleft()

    def resize(self, size: int) -> None:
        with self._cv:
            self.size = size
            while len(self._items) > size:
                self._items.popleft()
                self.dropped += 1

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)


# ---------------------------------------------------------------------------------------------

@dataclass
class Status:
    """What /diagnostics reports: the last frame and the counters (guarded by a lock)."""

    level: int = OK
    message: str = "waiting for the first LiDAR sweep"
    stats: dict = field(default_factory=dict)
    lidar_received: int = 0
    camera_received: int = 0
    processed: int = 0
    without_camera: int = 0
    paired_late: int = 0               # sweeps whose camera cloud came while they were queued
    skipped: int = 0                   # sweeps not processed (camera silent, camera_silent_output=none)
    errors: int = 0
    last_error: str = ""
    last_lidar: float | None = None    # time.monotonic() of the last sweep
    latency_ms: float = math.nan
    processing_ms: float = math.nan
    sync_wait_ms: float = math.nan     # sweep receipt -> paired (waiting for its camera cloud)
    queue_wait_ms: float = math.nan    # paired -> the worker takes it


class FusionNode(Node):
    """Subscribes the two clouds, runs the pipeline on a worker thread, publishes the results."""

    def __init__(self, **kwargs):
        super().__init__(P.NODE_NAME, automatically_declare_parameters_from_overrides=True, **kwargs)
        self.values = self._declare_parameters()           # ValueError with every reason
        from ros_ot_fusion.pipeline import FrameOutput, Pipeline   # torch: import after the checks

        self._FrameOutput = FrameOutput
        self.pipeline = Pipeline(self.values)
        if self.pipeline.device.type == "cuda":     # kernels and graphs load now, not on the first sweeps
            started = time.monotonic()
            try:
                done = self.pipeline.warm_up().message
            except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs the first sweeps time
                done = f"failed: {type(exc).__name__}: {exc}"
            self.get_logger().info(f"GPU warm-up: {time.monotonic() - started:.1f} s ({done})")
        # Everything alive now (modules, kernels, graphs: ~200k objects) lives as long as the
        # node: out of the collector's sight, a full collection scans only what frames leave
        # behind (with them in, one took 141 ms on the H200, stalling the worker mid-drive)
        gc.freeze()
        self.gc_clock = GcClock()
        self._pipe_lock = threading.Lock()
        self._status_lock = threading.Lock()
        self.status = Status()
        v = self.values
        self.collector = Collector(v["sync_slop_s"], v["camera_timeout_s"], time.monotonic(), v["sync_wait_s"])
        self.queue = FrameQueue(v["queue_size"])
        self._camera_was_silent = False

        self.add_pre_set_parameters_callback(self._coerce_parameters)
        self.add_on_set_parameters_callback(self._check_parameters)

        reliability = (ReliabilityPolicy.BEST_EFFORT if v["qos_reliability"] == "best_effort"
                       else ReliabilityPolicy.RELIABLE)
        sensor_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=v["qos_depth"],
                                reliability=reliability, durability=DurabilityPolicy.VOLATILE)
        # camera first: when both are waiting, the executor takes the camera cloud first and the
        # sweep pairs with it at once
        camera_sub = self.create_subscription(PointCloud2, v["camera_topic"], self._on_camera, sensor_qos)
        lidar_sub = self.create_subscription(PointCloud2, v["lidar_topic"], self._on_lidar, sensor_qos)
        self.lidar_topic, self.camera_topic = lidar_sub.topic_name, camera_sub.topic_name   # remapped
        self._lidar_sub = lidar_sub
        # Reliable publishers match both best-effort and reliable subscribers; the extrinsic is
        # latched (transient local) so a late subscriber gets the current estimate at once.
        self.fused_pub = self.create_publisher(PointCloud2, "~/fused", QoSProfile(depth=2))
        self.extrinsic_pub = self.create_publisher(
            TransformStamped, "~/extrinsic",
            QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        # Steady-clock timers: they run with use_sim_time too, with or without /clock.
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        # the pairing timer runs only while a sweep waits for its camera cloud (idle CPU stays low)
        self._poll_timer = self.create_timer(POLL_PERIOD_S, self._poll_collector, clock=steady,
                                             autostart=False)
        self.create_timer(1.0, self._publish_diagnostics, clock=steady)

        self._worker = threading.Thread(target=self._work, name="fusion-worker", daemon=True)
        self._worker.start()
        warning = getattr(self.pipeline, "device_warning", "")
        if warning:
            self.get_logger().warning(warning)
        self.get_logger().info(
            f"fusing {self.lidar_topic} + {self.camera_topic} ({v['qos_reliability']}, depth "
            f"{v['qos_depth']}) on {self._device()}; publishing {self.fused_pub.topic_name}, "
            f"{self.extrinsic_pub.topic_name}, /diagnostics")

    # -- parameters -----------------------------------------------------------------------------

    def _declare_parameters(self) -> dict:
        """Declare the table's parameters with descriptors; the validated values.

        rclpy has declared every override (params file, `-p`) as it came; we read them, check
        them all at once, and declare each parameter again with its descriptor and typed value.
        """
        given = {}
        for name, parameter in self.get_parameters_by_prefix("").items():
            if ignored_parameter(name):
                continue
            given[name] = coerce(P.BY_NAME[name], parameter.value) if name in P.BY_NAME else parameter.value
        values = P.validate(given)                           # raises ValueError: every reason
        for name in given:
            self.undeclare_parameter(name)
        for p in P.PARAMS:
            value = values[p.name]
            if isinstance(value, list) and not value:        # [] cannot name its type: declare, then set
                self.declare_parameter(p.name, ros_type(p), descriptor(p), ignore_override=True)
                self.set_parameters([Parameter(p.name, ros_type(p), [])])
            else:
                self.declare_parameter(p.name, coerce(p, value), descriptor(p), ignore_override=True)
        return values

    def _coerce_parameters(self, parameters: list[Parameter]) -> list[Parameter]:
        """Pre-set: 1 for a float parameter becomes 1.0 (and so on) instead of a type error."""
        out = []
        for parameter in parameters:
            p = P.BY_NAME.get(parameter.name)
            typed = as_parameter(p, parameter.value) if p is not None else None
            out.append(typed if typed is not None and parameter.type_ != Parameter.Type.NOT_SET
                       else parameter)
        return out

    def _check_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        changes = {p.name: plain(p.value) for p in parameters if not ignored_parameter(p.name)}
        if not changes:
            return SetParametersResult(successful=True)
        try:
            values = P.validate({**self.values, **changes})
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        changes = {name: values[name] for name in changes}
        if not self._pipe_lock.acquire(timeout=SET_PARAMS_WAIT_S):
            return SetParametersResult(successful=False,
                                       reason="the solver is busy with a frame; try again")
        try:
            self.pipeline.set_params(changes)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        finally:
            self._pipe_lock.release()
        self.values = values
        self.collector.slop_s = values["sync_slop_s"]
        self.collector.timeout_s = values["camera_timeout_s"]
        self.collector.wait_s = values["sync_wait_s"]
        self.queue.resize(values["queue_size"])
        self.get_logger().info("parameters set: " + ", ".join(f"{k}={v!r}" for k, v in changes.items()))
        return SetParametersResult(successful=True)

    # -- executor side: callbacks never block ---------------------------------------------------

    def _on_lidar(self, msg: PointCloud2) -> None:
        now = time.monotonic()
        with self._status_lock:
            self.status.lidar_received += 1
            self.status.last_lidar = now
        self._dispatch(self.collector.add_lidar(msg, now))

    def _on_camera(self, msg: PointCloud2) -> None:
        now = time.monotonic()
        with self._status_lock:
            self.status.camera_received += 1
        if self._camera_was_silent:
            self._camera_was_silent = False
            self.get_logger().info("camera clouds are back: fusing again")
        self._dispatch(self.collector.add_camera(msg, now))
        self.queue.pair_late(msg, stamp_ns(msg), self.collector.cameras.slop_ns)

    def _poll_collector(self) -> None:
        self._dispatch(self.collector.poll(time.monotonic()))

    def _dispatch(self, frames: list[Frame]) -> None:
        waiting = bool(self.collector.pending)
        if waiting and self._poll_timer.is_canceled():
            self._poll_timer.reset()
        elif not waiting and not self._poll_timer.is_canceled():
            self._poll_timer.cancel()
        for frame in frames:
            if frame.camera is None:
                if frame.silent and not self._camera_was_silent:
                    self._camera_was_silent = True
                    self.get_logger().warning(
                        f"{frame.note} on {self.camera_topic}: "
                        + ("LiDAR-only output" if self.values["camera_silent_output"] == "lidar_only"
                           else "publishing nothing but diagnostics"))
                if self.values["camera_silent_output"] == "none":
                    with self._status_lock:
                        self.status.skipped += 1
                        self.status.level = WARN
                        self.status.message = f"{frame.note}: publishing nothing (camera_silent_output=none)"
                    self._publish_diagnostics()
                    continue
            if not self.queue.put(frame):
                self.get_logger().warning(
                    f"solver behind: dropped the oldest queued frame ({self.queue.dropped} so far)",
                    throttle_duration_sec=LOG_THROTTLE_S)

    # -- worker side ---------------------------------------------------------------------------

    def _work(self) -> None:
        while rclpy.ok(context=self.context):
            frame = self.queue.get()
            if frame is None:
                return
            started, gc_before = time.monotonic(), self.gc_clock.total_s
            with self._pipe_lock:
                try:
                    out = self.pipeline.process(frame.lidar, frame.camera,
                                                now_ns=self.get_clock().now().nanoseconds)
                except Exception as exc:  # noqa: BLE001 - the node outlives any one frame
                    out = self._FrameOutput(level=ERROR, message=f"pipeline error: {type(exc).__name__}: {exc}")
            finished = time.monotonic()
            out.stats["gc_ms"] = (self.gc_clock.total_s - gc_before) * 1e3
            try:
                if out.fused is not None:
                    self.fused_pub.publish(out.fused)
                if out.extrinsic is not None:
                    self.extrinsic_pub.publish(out.extrinsic)
                self._record(frame, out, started, finished, time.monotonic())
                self._publish_diagnostics()
            except Exception as exc:  # noqa: BLE001 - the worker must outlive a failed publish
                if not rclpy.ok(context=self.context):
                    return                                   # shutting down: publishers are gone
                self.get_logger().error(f"publishing failed: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=LOG_THROTTLE_S)

    def _record(self, frame: Frame, out, started: float, finished: float, published: float) -> None:
        level, message = int(out.level), out.message
        if frame.camera is None and frame.note and level < ERROR:
            level, message = max(level, WARN), f"{frame.note}: LiDAR only"
        elif frame.note:
            message = f"{message}; {frame.note}"
        with self._status_lock:
            s = self.status
            s.level, s.message, s.stats = level, message, dict(out.stats)
            s.processed += 1
            s.without_camera += frame.camera is None
            s.paired_late += frame.paired_late
            s.latency_ms = (published - frame.received) * 1e3
            s.processing_ms = (finished - started) * 1e3
            s.sync_wait_ms = (frame.queued - frame.received) * 1e3
            s.queue_wait_ms = (started - frame.queued) * 1e3
            if level >= ERROR:
                s.errors += 1
                s.last_error = message
        if level >= ERROR:
            self.get_logger().error(message, throttle_duration_sec=LOG_THROTTLE_S)
        elif level == WARN and not frame.silent:
            self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)

    # -- diagnostics ---------------------------------------------------------------------------

    def _device(self) -> str:
        device = getattr(self.pipeline, "device", None)
        return getattr(device, "type", None) or str(self.values["device"])

    def diagnostic_status(self, now: float | None = None) -> DiagnosticStatus:
        now = time.monotonic() if now is None else now
        camera_staleness = self.collector.staleness(now)
        with self._status_lock:
            s = self.status
            level, message = s.level, s.message
            lidar_staleness = now - s.last_lidar if s.last_lidar is not None else math.inf
            if s.last_lidar is not None and s.processed == 0 and level == OK:
                message = "solving the first frame"
            if lidar_staleness > LIDAR_STALE_S:
                level = WARN
                message = (f"no LiDAR sweep on {self.lidar_topic} yet" if s.last_lidar is None
                           else f"no LiDAR sweep for {lidar_staleness:.1f} s")
                publishers = self._lidar_sub.get_publisher_count()
                if publishers:
                    # a writer whose shared-memory segment is too small loses every large
                    # best-effort cloud (bench/RESULTS.md): say where to look
                    message += (f", though {publishers} publisher(s) are matched: clouds of several MB may "
                                f"not get through (best effort, small DDS shared-memory segments; README)")
            elif camera_staleness > self.collector.timeout_s and level < WARN:
                level, message = WARN, f"camera silent for {camera_staleness:.1f} s: LiDAR only"
            values = {k: v for k, v in s.stats.items()}
            values.update(
                pipeline_latency_ms=s.latency_ms, processing_time_ms=s.processing_ms,
                sync_wait_ms=s.sync_wait_ms, queue_wait_ms=s.queue_wait_ms, frames_processed=s.processed,
                frames_dropped=self.queue.dropped, frames_skipped=s.skipped,
                frames_without_camera=s.without_camera, frames_paired_late=s.paired_late,
                frames_with_error=s.errors,
                lidar_received=s.lidar_received, camera_received=s.camera_received,
                camera_staleness_s=camera_staleness, lidar_staleness_s=lidar_staleness,
                queue_length=len(self.queue), last_error=s.last_error, **_memory_mb())
        return DiagnosticStatus(level=bytes([level]), name=STATUS_NAME, message=message,
                                hardware_id=self._device(),
                                values=[KeyValue(key=k, value=_text(v)) for k, v in values.items()])

    def _publish_diagnostics(self) -> None:
        msg = DiagnosticArray(status=[self.diagnostic_status()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_pub.publish(msg)

    # -- shutdown -------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (it finishes the frame in flight) before the node is destroyed."""
        self.queue.close()
        if self._worker.is_alive():
            self._worker.join(timeout)
        self.gc_clock.close()


def _memory_mb() -> dict:
    """Resident memory of this process and the GPU memory torch holds, in MiB (for soak checks)."""
    out = {}
    try:
        with open("/proc/self/statm") as f:
            out["rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    import torch
    if torch.cuda.is_initialized():
        out["gpu_memory_mb"] = torch.cuda.memory_reserved() / 2**20
    return out


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM; `args` is an argv with `--ros-args ...` for rclpy."""
    rclpy.init(args=args)               # installs SIGINT/SIGTERM handlers: spin ends cleanly
    node = None
    try:
        try:
            node = FusionNode()
        except ValueError as exc:
            print(f"{P.NODE_NAME}: invalid parameters: {exc}", file=sys.stderr)
            return 2
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:  # noqa: BLE001 - a signal can invalidate the context mid-wait (RCLError)
        if rclpy.ok():
            raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):   # a second Ctrl-C must not cut the cleanup short
            signal.signal(signum, signal.SIG_IGN)
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
