"""Play a ROS 2 bag into DDS at its recorded timing, like `ros2 bag play [--clock] [--loop]`.

    ros-ot-fusion replay BAG [--rate R] [--loop] [--restamp] [--clock] [--topics T ...]
                             [--qos best_effort|reliable] [--start-delay S] [--subscribers N ...]
                             [--ros-args ...]

Messages go out as the CDR bytes stored in the bag (no deserialization): one publisher per
topic with the recorded message type. With `--clock`, `/clock` (rosgraph_msgs/Clock) carries
the bag's time at about 100 Hz and at every message, so nodes run with `use_sim_time:=true`
see the recorded time; with `--loop` that clock jumps back at each restart (as the recording
does). `--restamp` stamps every message with the wall-clock time at which it is played (header
stamps patched in the CDR bytes, /clock with them), as a live sensor would: a short bag looped,
played faster, or played again by another process, is one drive whose time never goes back.
Before the first message it waits until every topic has a subscriber (`--subscribers`: that
many, per topic in the order of `--topics`, or one count for all), or `--start-delay` seconds
at most, so a node started alongside does not miss the start (a recorder on a topic is a
subscriber too: with one count the replay could start before the node had matched).
"""
from __future__ import annotations

import argparse
import signal
import struct
import sys
import time
from pathlib import Path

import numpy as np

CLOCK_PERIOD_S = 0.01               # /clock at 100 Hz
PROGRESS_PERIOD_S = 1.0
MATCH_GRACE_S = 0.3                 # after discovery matched, let the readers finish matching
ACK_TIMEOUT_S = 10.0                # at the end: how long reliable readers may take to acknowledge the last messages


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("bag", help="bag directory (MCAP or sqlite3)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1)")
    parser.add_argument("--loop", action="store_true", help="start again at the end, until Ctrl-C")
    parser.add_argument("--restamp", action="store_true",
                        help="stamp messages with the wall-clock time of playing (time never goes back)")
    parser.add_argument("--clock", action="store_true",
                        help="publish /clock with the bag's time (~100 Hz and at each message)")
    parser.add_argument("--topics", nargs="+", metavar="T", help="play only these topics")
    parser.add_argument("--qos", choices=("best_effort", "reliable"), default="reliable",
                        help="publisher reliability (reliable also serves best-effort subscribers)")
    parser.add_argument("--start-delay", type=float, default=1.0, metavar="S",
                        help="wait at most this long for subscribers before the first message (s)")
    parser.add_argument("--subscribers", type=int, nargs="+", metavar="N",
                        help="subscribers to wait for, per topic of --topics (or one count for all; default 1)")
    parser.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=[],
                        help="arguments for ROS (remappings, ...), to the end of the line")
    return parser


def run(args: argparse.Namespace) -> int:
    return replay(args.bag, rate=args.rate, loop=args.loop, clock=args.clock, topics=args.topics,
                  qos=args.qos, start_delay=args.start_delay, ros_args=args.ros_args, restamp=args.restamp,
                  subscribers=args.subscribers)


def _say(text: str, end: str = "\n") -> None:
    print(text, file=sys.stderr, end=end, flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def replay(bag: str | Path, rate: float = 1.0, loop: bool = False, clock: bool = False,
           topics: list[str] | None = None, qos: str = "reliable", start_delay: float = 1.0,
           ros_args: list[str] | None = None, restamp: bool = False, subscribers: list[int] | None = None) -> int:
    """Play `bag`; 0 when done or interrupted, 2 for a bad request."""
    from rosbags.rosbag2 import Reader

    from ros_ot_fusion.io.bag import bag_topics

    if not rate > 0:
        _say(f"replay: --rate must be positive, got {rate}")
        return 2
    try:
        recorded = bag_topics(bag)
        with Reader(Path(bag)) as reader:
            start_ns, duration_ns = reader.start_time, reader.duration
    except Exception as exc:  # noqa: BLE001 - any unreadable bag: say why
        _say(f"replay: cannot read {bag}: {exc}")
        return 2
    missing = sorted(set(topics or ()) - set(recorded))
    if missing:
        _say(f"replay: not in the bag: {', '.join(missing)} (it has {', '.join(sorted(recorded))})")
        return 2
    wanted = sorted(topics or recorded)
    counts = subscribers or [1]
    if len(counts) not in (1, len(topics or ())) or min(counts) < 0:
        _say(f"replay: --subscribers takes one count, or one per topic of --topics, none negative; got {counts}")
        return 2
    need = dict(zip(topics, counts)) if len(counts) > 1 else dict.fromkeys(wanted, counts[0])

    import rclpy
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.signals import SignalHandlerOptions

    # Python's own handlers: Ctrl-C (and SIGTERM) raise KeyboardInterrupt between publishes.
    rclpy.init(args=["replay", "--ros-args", *ros_args] if ros_args else ["replay"],
               signal_handler_options=SignalHandlerOptions.NO)
    # explicitly: a process started in the background by a script inherits SIGINT ignored
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    node = rclpy.create_node("ros_ot_fusion_replay")
    player = None
    try:
        profile = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                             durability=DurabilityPolicy.VOLATILE,
                             reliability=ReliabilityPolicy.RELIABLE if qos == "reliable"
                             else ReliabilityPolicy.BEST_EFFORT)
        player = Player(node, bag, wanted, {t: recorded[t][0] for t in wanted}, profile, rate, clock,
                        start_ns, duration_ns, restamp=restamp)
        if not player.publishers:
            _say("replay: no topic to play")
            return 2
        player.wait_for_subscribers(start_delay, need)
        while True:
            player.play_once()
            if not loop or player.sent == 0:
                break
        player.flush()
        _say(f"replay: done, {player.sent} messages in {player.loops} pass(es)")
    except KeyboardInterrupt:
        if player is not None:
            _say(f"\nreplay: interrupted after {player.sent} messages")
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


class Player:
    """Publishes one pass of a bag at recorded timing / rate, with /clock when asked."""

    def __init__(self, node, bag, topics, types, profile, rate, clock, start_ns, duration_ns, restamp=False):
        from rosgraph_msgs.msg import Clock

        from ros_ot_fusion.io.bag import message_class

        self.node, self.bag, self.topics, self.rate = node, bag, topics, rate
        self.start_ns, self.duration_ns = start_ns, duration_ns
        self.publishers, self.stamped = {}, set()
        self.restamp, self._period_ns = restamp, 0
        for topic in topics:
            try:
                cls = message_class(types[topic])
                self.publishers[topic] = node.create_publisher(cls, topic, profile)
                if next(iter(cls.get_fields_and_field_types()), None) == "header":
                    self.stamped.add(topic)
            except (ImportError, AttributeError, ValueError) as exc:
                _say(f"replay: skipping {topic}: no Python message type {types[topic]} ({exc})")
        self._clock_msg = Clock
        self.clock_pub = node.create_publisher(Clock, "/clock", 10) if clock else None
        self.sent = 0
        self.loops = 0
        self._last_clock = 0.0
        self._tty = sys.stderr.isatty()

    def publish_clock(self, ns: int) -> None:
        if self.clock_pub is None:
            return
        msg = self._clock_msg()
        msg.clock.sec, msg.clock.nanosec = divmod(int(ns), 1_000_000_000)
        self.clock_pub.publish(msg)
        self._last_clock = time.monotonic()

    def flush(self, timeout_s: float = ACK_TIMEOUT_S) -> None:
        """Wait until reliable subscribers have acknowledged everything sent: a publisher destroyed
        right after its last publish drops what is still in flight (the last 1-2 of 40 multi-MB
        clouds were lost that way)."""
        from rclpy.duration import Duration

        for topic, pub in self.publishers.items():
            if not pub.wait_for_all_acked(Duration(seconds=timeout_s)):
                _say(f"replay: {topic}: not every message acknowledged within {timeout_s:g} s")

    def wait_for_subscribers(self, start_delay: float, need: dict[str, int]) -> None:
        """Until every topic has its `need` of subscribers (plus a short grace), at most `start_delay` s."""
        deadline = time.monotonic() + max(0.0, start_delay)
        matched_at = None
        while time.monotonic() < deadline:
            self.publish_clock(self.start_ns)            # sim-time nodes start at the bag's start
            if matched_at is None and all(p.get_subscription_count() >= need[t]
                                          for t, p in self.publishers.items()):
                matched_at = time.monotonic()
            if matched_at is not None and time.monotonic() - matched_at >= MATCH_GRACE_S:
                return
            time.sleep(CLOCK_PERIOD_S)

    def play_once(self) -> None:
        from ros_ot_fusion.io.bag import read_bag

        if self.loops:                                 # the next pass goes on one frame period later
            time.sleep(self._period_ns / 1e9 / self.rate)
        self.loops += 1
        first = t0 = None
        stamps = []
        next_progress = time.monotonic() + PROGRESS_PERIOD_S
        sent_before = self.sent
        for topic, stamp, data in read_bag(self.bag, topics=list(self.publishers), raw=True):
            if first is None:
                first, t0, wall0 = stamp, time.monotonic(), time.time_ns()
            # --restamp: the wall-clock time at which this message is due
            shift = wall0 + int((stamp - first) / self.rate) - stamp if self.restamp else 0
            target = t0 + (stamp - first) / 1e9 / self.rate
            while True:                                  # wait for the message's time, ticking /clock
                now = time.monotonic()
                if now >= target:
                    break
                if self.clock_pub is not None and now - self._last_clock >= CLOCK_PERIOD_S:
                    self.publish_clock(min(stamp + shift, time.time_ns()) if self.restamp
                                       else min(stamp, first + int((now - t0) * self.rate * 1e9)))
                time.sleep(min(target - now, CLOCK_PERIOD_S if self.clock_pub is not None else 0.1))
            self.publish_clock(stamp + shift)
            data = data if isinstance(data, bytes) else bytes(data)
            if shift and topic in self.stamped:
                data = shift_stamp(data, shift)
            self.publishers[topic].publish(data)
            if not stamps or stamps[-1] != stamp:
                stamps.append(stamp)
            self.sent += 1
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_PERIOD_S
                self._progress(stamp, self.sent - sent_before)
        if len(stamps) > 1:
            self._period_ns = int(np.median(np.diff(stamps)))
        if first is not None:
            self._progress(first + int((time.monotonic() - t0) * self.rate * 1e9), self.sent - sent_before,
                           final=True)

    def _progress(self, stamp: int, count: int, final: bool = False) -> None:
        position = (stamp - self.start_ns) / 1e9
        text = (f"replay: pass {self.loops}  {position:7.2f} / {self.duration_ns / 1e9:.2f} s  "
                f"{count} messages  (rate {self.rate:g})")
        _say(text, end="\n" if final or not self._tty else "\r")


def _stamp_format(data: bytes) -> str:
    """In the CDR bytes of a message whose first field is a std_msgs/Header, the stamp's sec and
    nanosec follow the 4-byte encapsulation header, in its byte order (CDR_LE / CDR_BE)."""
    return "<iI" if data[1] == 1 else ">iI"


def cdr_stamp_ns(data: bytes) -> int:
    """The header stamp (ns) of such a message's CDR bytes."""
    sec, nanosec = struct.unpack_from(_stamp_format(data), data, 4)
    return sec * 1_000_000_000 + nanosec


def shift_stamp(data: bytes, offset_ns: int) -> bytes:
    """Such a message's CDR bytes with its stamp moved by `offset_ns`."""
    out = bytearray(data)
    struct.pack_into(_stamp_format(data), out, 4, *divmod(cdr_stamp_ns(data) + offset_ns, 1_000_000_000))
    return bytes(out)
