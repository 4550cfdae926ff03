"""sensor_msgs/PointCloud2 <-> numpy, one buffer view per message.

A PointCloud2 is a table of `height x width` points, `point_step` bytes each, rows
`row_step` bytes apart; every field is (name, offset, datatype, count). We describe one
point as a numpy structured dtype and look at the message buffer through it, so decoding
costs a few vectorised copies and no per-point Python. Encoding fills one structured
array and hands its bytes to the message in one write.

Works on rclpy messages (`data` is an `array.array`) and on rosbags messages (`data` is
a numpy array) alike: only the attributes of the message are used.
"""
from __future__ import annotations

import array
from dataclasses import dataclass, field

import numpy as np

INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)
_NUMPY = {INT8: "i1", UINT8: "u1", INT16: "i2", UINT16: "u2",
          INT32: "i4", UINT32: "u4", FLOAT32: "f4", FLOAT64: "f8"}
_DATATYPE = {np.dtype(code): datatype for datatype, code in _NUMPY.items()}
_PACKED_COLOUR = ("rgb", "rgba")  # float32 or uint32 holding 0x00RRGGBB (0xAARRGGBB)


class PointCloudError(ValueError):
    """A PointCloud2 message that cannot be decoded; the text says why."""


@dataclass
class Cloud:
    """The valid points of a PointCloud2, as arrays in native byte order."""

    xyz: np.ndarray                    # (N, 3) float32
    rgb: np.ndarray | None             # (N, 3) uint8, or None without a colour field
    intensity: np.ndarray | None       # (N,) float32, or None without an intensity field
    fields: dict[str, np.ndarray]      # every field: (N,) or (N, count); packed colours as uint32
    index: np.ndarray                  # (N,) int64: row-major position of each point in the message
    height: int = 1
    width: int = 0
    frame_id: str = ""
    stamp_ns: int = 0
    dropped: int = field(default=0)   # points removed for a NaN/Inf coordinate

    def __len__(self) -> int:
        return len(self.xyz)


def point_dtype(fields, point_step: int, bigendian: bool) -> np.dtype:
    """The numpy dtype of one point; raises PointCloudError for an impossible layout."""
    order = ">" if bigendian else "<"
    names, formats, offsets = [], [], []
    for f in fields:
        if f.name in names:
            raise PointCloudError(f"field {f.name!r} appears twice")
        if f.datatype not in _NUMPY:
            raise PointCloudError(f"field {f.name!r} has unknown datatype {f.datatype}")
        if f.count < 1:
            raise PointCloudError(f"field {f.name!r} has count {f.count}")
        code = _NUMPY[f.datatype]
        if f.name in _PACKED_COLOUR and code in ("f4", "i4"):
            code = "u4"                 # a float32 that is really four bytes of colour
        fmt = np.dtype(order + code) if f.count == 1 else np.dtype((order + code, (f.count,)))
        if f.offset < 0 or f.offset + fmt.itemsize > point_step:
            raise PointCloudError(
                f"field {f.name!r} (offset {f.offset}, {fmt.itemsize} bytes) does not fit in "
                f"point_step {point_step}")
        names.append(f.name)
        formats.append(fmt)
        offsets.append(f.offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": point_step})


def _table(msg) -> np.ndarray:
    """The message's points as a (height * width,) structured array (a view where possible)."""
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    for f in ("x", "y", "z"):
        if not any(pf.name == f for pf in msg.fields):
            raise PointCloudError(f"no {f!r} field (fields: {[pf.name for pf in msg.fields]})")
    if point_step <= 0:
        raise PointCloudError(f"point_step is {point_step}")
    dtype = point_dtype(msg.fields, point_step, bool(msg.is_bigendian))
    if row_step < width * point_step:
        raise PointCloudError(f"row_step {row_step} < width {width} x point_step {point_step}")
    data = memoryview(msg.data).cast("B")
    if len(data) != row_step * height:
        raise PointCloudError(
            f"data has {len(data)} bytes, expected row_step {row_step} x height {height} = "
            f"{row_step * height}")
    if height * width == 0:
        return np.zeros(0, dtype)
    table = np.ndarray((height, width), dtype, buffer=data, strides=(row_step, point_step))
    return table.reshape(-1)            # a view unless rows carry padding


def _native(a: np.ndarray) -> np.ndarray:
    """A contiguous copy in native byte order."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))


def _xyz(table: np.ndarray) -> np.ndarray:
    for k in "xyz":
        if table.dtype[k].shape:
            raise PointCloudError(f"field {k!r} has count {table.dtype[k].shape[0]}; a coordinate needs count 1")
    xyz = np.empty((len(table), 3), np.float32)
    for i, k in enumerate("xyz"):       # column by column: 4x faster than a strided (3,) view
        xyz[:, i] = table[k]
    return xyz


def _finite_rows(xyz: np.ndarray) -> np.ndarray | None:
    """Mask of rows with finite x, y, z; None when all are (the common, cheap case)."""
    if np.isfinite(xyz).all():
        return None
    return np.isfinite(xyz[:, 0]) & np.isfinite(xyz[:, 1]) & np.isfinite(xyz[:, 2])


def _rgb(fields: dict[str, np.ndarray]) -> np.ndarray | None:
    for name in _PACKED_COLOUR:
        if name in fields and fields[name].ndim == 1 and fields[name].dtype.itemsize == 4:
            bgra = fields[name].astype("<u4", copy=False).view(np.uint8).reshape(-1, 4)
            rgb = np.empty((len(bgra), 3), np.uint8)
            rgb[:, 0], rgb[:, 1], rgb[:, 2] = bgra[:, 2], bgra[:, 1], bgra[:, 0]
            return rgb
    if all(k in fields and fields[k].ndim == 1 for k in "rgb"):
        return np.stack([np.clip(fields[k], 0, 255).astype(np.uint8) for k in "rgb"], axis=1)
    return None


def decode(msg, keep_invalid: bool = False) -> Cloud:
    """Decode a PointCloud2. Points with a NaN/Inf coordinate are dropped unless `keep_invalid`.

    Raises PointCloudError for a message whose layout does not add up.
    """
    table = _table(msg)
    xyz = _xyz(table)
    index, dropped = np.arange(len(xyz), dtype=np.int64), 0
    fields = {name: _native(table[name]) for name in table.dtype.names}
    valid = None if keep_invalid else _finite_rows(xyz)
    if valid is not None:
        index = np.flatnonzero(valid)   # take() by index: 5x faster than boolean indexing of 2-D rows
        xyz = xyz.take(index, axis=0)
        fields = {name: values.take(index, axis=0) for name, values in fields.items()}
        dropped = int(len(valid) - len(xyz))
    intensity = fields.get("intensity")
    if intensity is not None:
        intensity = intensity.astype(np.float32, copy=False) if intensity.ndim == 1 else None
    header = getattr(msg, "header", None)
    stamp = getattr(header, "stamp", None)
    return Cloud(xyz=xyz, rgb=_rgb(fields), intensity=intensity, fields=fields,
                 index=index, height=int(msg.height), width=int(msg.width),
                 frame_id=getattr(header, "frame_id", ""),
                 stamp_ns=int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec) if stamp else 0,
                 dropped=dropped)


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 colours -> (N,) float32 whose bits are 0x00RRGGBB (the RViz convention)."""
    rgb = np.asarray(rgb, dtype=np.uint32)
    return ((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]).view(np.float32)


def encode(header, xyz, rgb=None, intensity=None, extra=None):
    """Build a sensor_msgs/PointCloud2 (height 1, little-endian, no padding).

    Fields, in order: x y z (float32), intensity (float32), rgb (float32-packed 0x00RRGGBB),
    then each `extra` name -> (N,) or (N, count) array in its own numeric type.
    """
    from sensor_msgs.msg import PointCloud2, PointField

    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be (N, 3), got {xyz.shape}")
    n = len(xyz)
    columns = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}
    if intensity is not None:
        columns["intensity"] = np.asarray(intensity, dtype=np.float32)
    if rgb is not None:
        columns["rgb"] = pack_rgb(rgb)
    for name, values in (extra or {}).items():
        values = np.asarray(values)
        if values.dtype == np.bool_:
            values = values.astype(np.uint8)
        columns[name] = values
    fields, formats, offset = [], [], 0
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"field {name!r} has {len(values)} values for {n} points")
        base = np.dtype("f4") if name in "xyz" else values.dtype.newbyteorder("<")
        if base.newbyteorder("=") not in _DATATYPE:
            raise ValueError(f"field {name!r}: no PointField datatype for {values.dtype}")
        count = 1 if values.ndim == 1 else int(np.prod(values.shape[1:]))
        fields.append(PointField(name=name, offset=offset, count=count,
                                 datatype=_DATATYPE[base.newbyteorder("=")]))
        formats.append(base if count == 1 else np.dtype((base, (count,))))
        offset += formats[-1].itemsize
    # Write every column straight into the message's own buffer: one pass, no extra copy.
    data = array.array("B", [0]) * (n * offset)
    table = np.frombuffer(data, np.dtype({"names": list(columns), "formats": formats}), count=n)
    for name, values in columns.items():
        table[name] = values.reshape(table[name].shape)
    del table                           # release the buffer export before handing `data` over
    # check_fields=True makes the `data` setter keep our array.array('B') instead of copying it
    msg = PointCloud2(check_fields=True, header=header, height=1, width=n, fields=fields,
                      is_bigendian=False, point_step=offset, row_step=offset * n,
                      is_dense=bool(np.isfinite(xyz).all()))
    msg.data = data
    return msg
