"""ROS 2 bags (MCAP or sqlite3) of rclpy messages, through rosbags.

Messages are stored as the CDR bytes rclpy's own `serialize_message` produces, so a bag
written here plays in `ros2 bag play` and a recorded bag reads here, bit for bit.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterable, Iterator

from rclpy.serialization import deserialize_message, serialize_message
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

_TYPESTORE = get_typestore(Stores.ROS2_KILTED)
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


def msgtype_of(msg) -> str:
    """'sensor_msgs/msg/PointCloud2' for an rclpy PointCloud2, and so on."""
    package = type(msg).__module__.split(".")[0]
    return f"{package}/msg/{type(msg).__name__}"


def message_class(msgtype: str):
    """The rclpy message class for a type name such as 'sensor_msgs/msg/PointCloud2'."""
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


class BagWriter:
    """Write rclpy messages to a new bag directory: `with BagWriter(p) as w: w.write(t, m, ns)`."""

    def __init__(self, path: str | Path, storage: str = "mcap"):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")
        self._writer = Writer(Path(path), version=9, storage_plugin=STORAGES[storage])
        self._connections: dict[str, object] = {}

    def __enter__(self) -> "BagWriter":
        self._writer.open()
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()

    def write(self, topic: str, msg, stamp_ns: int) -> None:
        """Append `msg` (an rclpy message, or CDR bytes of a topic already written) at `stamp_ns`."""
        if isinstance(msg, (bytes, bytearray, memoryview)):
            if topic not in self._connections:
                raise ValueError(f"{topic}: write a message object before raw CDR bytes")
            self._writer.write(self._connections[topic], int(stamp_ns), bytes(msg))
            return
        connection = self._connections.get(topic)
        if connection is None:
            connection = self._writer.add_connection(topic, msgtype_of(msg), typestore=_TYPESTORE)
            self._connections[topic] = connection
        elif connection.msgtype != msgtype_of(msg):
            raise TypeError(f"{topic} holds {connection.msgtype}, not {msgtype_of(msg)}")
        self._writer.write(connection, int(stamp_ns), serialize_message(msg))


def read_bag(path: str | Path, topics: Iterable[str] | None = None,
             raw: bool = False) -> Iterator[tuple[str, int, object]]:
    """Yield (topic, receive time ns, message) in time order.

    Messages are rclpy messages, or their CDR bytes with `raw=True` (what a replayer publishes).
    """
    wanted = set(topics) if topics is not None else None
    with Reader(Path(path)) as reader:
        connections = [c for c in reader.connections if wanted is None or c.topic in wanted]
        classes = {c.id: message_class(c.msgtype) for c in connections}
        for connection, stamp_ns, data in reader.messages(connections=connections):
            msg = data if raw else deserialize_message(bytes(data), classes[connection.id])
            yield connection.topic, stamp_ns, msg


def bag_topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """topic -> (message type, message count)."""
    with Reader(Path(path)) as reader:
        return {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
