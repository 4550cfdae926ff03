"""Pairing LiDAR sweeps with camera clouds by stamp, without ever stalling.

Each LiDAR sweep takes the buffered camera cloud nearest to it in stamp when that is within
`slop`; otherwise it goes on alone (the caller decides what LiDAR-only means). The buffer holds
the last few camera clouds only, so a silent or flooding camera costs nothing. The node feeds it
from its callbacks; `process-bag` feeds it from a bag; the pairing is the same.
"""
from __future__ import annotations

from collections import deque


class CameraBuffer:
    def __init__(self, slop_ns: int, history: int = 8):
        self.slop_ns = int(slop_ns)
        self._clouds: deque = deque(maxlen=history)      # (stamp_ns, message)

    def add(self, stamp_ns: int, msg) -> None:
        if self._clouds and stamp_ns < self._clouds[-1][0]:
            self._clouds.clear()                         # time went backwards (a bag loop)
        self._clouds.append((int(stamp_ns), msg))

    def nearest(self, stamp_ns: int):
        """The camera message nearest to `stamp_ns` within the slop, or None."""
        best = min(self._clouds, key=lambda c: abs(c[0] - stamp_ns), default=None)
        if best is None or abs(best[0] - stamp_ns) > self.slop_ns:
            return None
        return best[1]

    @property
    def newest_stamp_ns(self) -> int | None:
        return self._clouds[-1][0] if self._clouds else None


def stamp_ns(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def header(frame_id: str, stamp: int):
    """A std_msgs/Header with `frame_id` and the stamp `stamp` nanoseconds (`stamp_ns`'s inverse)."""
    from std_msgs.msg import Header

    h = Header(frame_id=frame_id)
    h.stamp.sec, h.stamp.nanosec = divmod(int(stamp), 1_000_000_000)
    return h
