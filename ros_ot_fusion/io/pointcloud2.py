"""sensor_msgs/PointCloud2 <-> numpy / torch, one buffer view per message.

A PointCloud2 is a table of `height x width` points, `point_step` bytes each, rows
`row_step` bytes apart; every field is (name, offset, datatype, count). `decode` describes one
point as a numpy structured dtype and looks at the message buffer through it: every field, a
few vectorised copies, no per-point Python. `decode_to` is what the pipeline reads: xyz, colour
and intensity as torch tensors; on a GPU, after the same checks, the buffer is copied there once
and the columns are cut out of its bytes on the device. `encode` packs the columns where they
lie and copies them into the message's buffer once (from the GPU: one device-to-host copy).

Works on rclpy messages (`data` is an `array.array`) and on rosbags messages (`data` is
a numpy array) alike: only the attributes of the message are used.
"""
from __future__ import annotations

import array
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

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


def _layout(msg):
    """(point dtype, height, width, point_step, row_step, data bytes) of a message whose layout
    adds up; raises PointCloudError otherwise."""
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    for f in ("x", "y", "z"):
        if not any(pf.name == f for pf in msg.fields):
            raise PointCloudError(f"no {f!r} field (fields: {[pf.name for pf in msg.fields]})")
    if point_step <= 0:
        raise PointCloudError(f"point_step is {point_step}")
    dtype = point_dtype(msg.fields, point_step, bool(msg.is_bigendian))
    for k in "xyz":
        if dtype[k].shape:
            raise PointCloudError(f"field {k!r} has count {dtype[k].shape[0]}; a coordinate needs count 1")
    if row_step < width * point_step:
        raise PointCloudError(f"row_step {row_step} < width {width} x point_step {point_step}")
    data = memoryview(msg.data).cast("B")
    if len(data) != row_step * height:
        raise PointCloudError(
            f"data has {len(data)} bytes, expected row_step {row_step} x height {height} = "
            f"{row_step * height}")
    return dtype, height, width, point_step, row_step, data


def _table(msg) -> np.ndarray:
    """The message's points as a (height * width,) structured array (a view where possible)."""
    dtype, height, width, point_step, row_step, data = _layout(msg)
    if height * width == 0:
        return np.zeros(0, dtype)
    table = np.ndarray((height, width), dtype, buffer=data, strides=(row_step, point_step))
    return table.reshape(-1)            # a view unless rows carry padding


def _native(a: np.ndarray) -> np.ndarray:
    """A contiguous copy in native byte order."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))


def _xyz(table: np.ndarray) -> np.ndarray:
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


def _origin(msg) -> dict:
    """frame_id and stamp_ns of a message's header ("" and 0 without one)."""
    header = getattr(msg, "header", None)
    stamp = getattr(header, "stamp", None)
    return {"frame_id": getattr(header, "frame_id", ""),
            "stamp_ns": int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec) if stamp else 0}


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
    return Cloud(xyz=xyz, rgb=_rgb(fields), intensity=intensity, fields=fields,
                 index=index, height=int(msg.height), width=int(msg.width), **_origin(msg),
                 dropped=dropped)


# ---------------------------------------------------------------------------------------------
# torch: the pipeline's decoder and the encoder, on whichever device holds the points
# ---------------------------------------------------------------------------------------------

@dataclass
class DevicePoints:
    """What the pipeline reads of a PointCloud2: its valid points as torch tensors on one device."""

    xyz: torch.Tensor                  # (N, 3) float32
    rgb: torch.Tensor | None           # (N, 3) uint8, or None without a colour field
    intensity: torch.Tensor | None     # (N,) float32, or None without an intensity field
    frame_id: str = ""
    stamp_ns: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.xyz)


def _bytes(rows: torch.Tensor, dtype: np.dtype, name: str, swap: bool) -> torch.Tensor:
    """(N, count, itemsize) uint8: the field's bytes per value, little-endian."""
    fmt, offset = dtype.fields[name][:2]
    size, count = fmt.base.itemsize, int(np.prod(fmt.shape, dtype=np.int64))
    b = rows[:, offset: offset + size * count].reshape(len(rows), count, size)
    return b.flip(-1) if swap and size > 1 else b


def _values(rows: torch.Tensor, dtype: np.dtype, name: str, swap: bool) -> torch.Tensor:
    """(N, count) float32 values of a numeric field (a little-endian host: torch views bytes natively)."""
    b = _bytes(rows, dtype, name, swap)
    base = dtype.fields[name][0].base
    if base.kind == "u" and base.itemsize > 1:       # widen unsigned to signed: no uint16/32 kernels needed
        b = torch.cat([b, torch.zeros_like(b)], -1)
    signed = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    torch_dtype = ({4: torch.float32, 8: torch.float64} if base.kind == "f" else
                   {**signed, 1: torch.uint8} if base.kind == "u" else signed)[b.shape[-1]]
    b = b.clone() if b.is_contiguous() else b.contiguous()     # a fresh buffer: aligned for the view
    return b.view(torch_dtype)[..., 0].float()


def _float_words(rows: torch.Tensor, dtype: np.dtype, names, swap: bool) -> torch.Tensor | None:
    """Scalar float32 fields as one strided view of the rows read as 4-byte words, (N, len(names)):
    the layout of nearly every sensor (aligned, little-endian), a few launches where `_values`
    takes several per field. None for any other layout, rows that do not start on 4-byte
    boundaries (row padding of 1-3 bytes between rows of one point) among them."""
    if swap or rows.shape[1] % 4 or rows.stride(0) % 4 or rows.storage_offset() % 4:
        return None
    words = []
    for name in names:
        fmt, offset = dtype.fields[name][:2]
        if fmt.kind != "f" or fmt.itemsize != 4 or fmt.shape or offset % 4:
            return None
        words.append(offset // 4)
    table = rows.view(torch.float32)
    if words == list(range(words[0], words[0] + len(words))):
        return table[:, words[0]: words[0] + len(words)]
    return torch.stack([table[:, w] for w in words], 1)


def decode_to(msg, device) -> DevicePoints:
    """`decode` for the pipeline: xyz, rgb and intensity of the valid points as tensors on
    `device`. On a GPU they are cut out of the message's bytes there, after one host-to-device
    copy of the buffer (no per-field work on the host); on the CPU numpy's views are faster
    than torch's byte slicing (3 against 11 ms for a 276k-point cloud), so `decode` reads them.
    Raises PointCloudError as `decode` does."""
    if torch.device(device).type == "cpu":
        c = decode(msg)
        return DevicePoints(torch.from_numpy(c.xyz), None if c.rgb is None else torch.from_numpy(c.rgb),
                            None if c.intensity is None else torch.from_numpy(c.intensity),
                            frame_id=c.frame_id, stamp_ns=c.stamp_ns, dropped=c.dropped)
    return decode_bytes(msg, device)


def decode_bytes(msg, device) -> DevicePoints:
    """`decode_to`'s GPU path, on any device (tests run it on the CPU against `decode`)."""
    dtype, height, width, point_step, row_step, data = _layout(msg)
    n = height * width
    with warnings.catch_warnings():                  # a read-only buffer (rosbags): we only read it
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.zeros(0, dtype=torch.uint8)
    rows = raw.to(device).reshape(height, row_step)[:, : width * point_step].reshape(n, point_step)
    swap = bool(msg.is_bigendian)
    xyz = _float_words(rows, dtype, "xyz", swap)
    xyz = torch.cat([_values(rows, dtype, k, swap) for k in "xyz"], 1) if xyz is None else xyz.contiguous()
    rgb = intensity = None
    packed = next((k for k in _PACKED_COLOUR if k in dtype.names and dtype[k].itemsize == 4), None)
    if packed:                                       # 0x00RRGGBB: little-endian bytes B, G, R, A
        rgb = _bytes(rows, dtype, packed, swap)[:, 0, :3].flip(-1)
    elif all(k in dtype.names and not dtype[k].shape for k in "rgb"):
        rgb = torch.cat([_values(rows, dtype, k, swap).clamp(0, 255) for k in "rgb"], 1).to(torch.uint8)
    if "intensity" in dtype.names and not dtype["intensity"].shape:
        intensity = _float_words(rows, dtype, ["intensity"], swap)
        intensity = _values(rows, dtype, "intensity", swap)[:, 0] if intensity is None else intensity[:, 0].contiguous()
    valid = torch.isfinite(xyz).all(1)
    dropped = 0
    if not bool(valid.all()):
        keep = valid.nonzero()[:, 0]
        xyz, dropped = xyz[keep], n - len(keep)
        rgb = None if rgb is None else rgb[keep]
        intensity = None if intensity is None else intensity[keep]
    return DevicePoints(xyz, None if rgb is None else rgb.contiguous(), intensity, **_origin(msg),
                        dropped=dropped)


_TORCH_DATATYPE = {torch.int8: INT8, torch.uint8: UINT8, torch.int16: INT16, torch.uint16: UINT16,
                   torch.int32: INT32, torch.uint32: UINT32, torch.float32: FLOAT32, torch.float64: FLOAT64}


def _tensor(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    values = np.asarray(values)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("=")))


def _rows(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """The points' bytes, (N, point_step) uint8, packed where the columns lie (encode's GPU path).
    Columns of one 4-byte value each (the fused cloud's six) go in one launch."""
    values = list(columns.values())
    if all(v.dim() == 1 and v.element_size() == 4 for v in values):
        return torch.stack([v.view(torch.float32) for v in values], 1).view(torch.uint8)
    n = len(values[0])
    return torch.cat([v.reshape(n, -1).contiguous().view(torch.uint8) for v in values], 1)


def encode(header, xyz, rgb=None, intensity=None, extra=None):
    """Build a sensor_msgs/PointCloud2 (height 1, little-endian, no padding) from numpy arrays or
    torch tensors: the points are packed where xyz lies (CPU or GPU) and copied into the
    message's buffer once.

    Fields, in order: x y z (float32), intensity (float32), rgb (float32-packed 0x00RRGGBB),
    then each `extra` name -> (N,) or (N, count) values in their own numeric type.
    """
    from sensor_msgs.msg import PointCloud2, PointField

    xyz = _tensor(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be (N, 3), got {tuple(xyz.shape)}")
    n, dev = len(xyz), xyz.device
    xyz = xyz.float()
    columns = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}
    if intensity is not None:
        columns["intensity"] = _tensor(intensity).to(dev, torch.float32)
    if rgb is not None:
        rgb = _tensor(rgb).to(dev, torch.uint8).int()
        columns["rgb"] = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]       # 0x00RRGGBB
    for name, values in (extra or {}).items():
        values = _tensor(values).to(dev)
        columns[name] = values.to(torch.uint8) if values.dtype == torch.bool else values
    fields, offset = [], 0
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"field {name!r} has {len(values)} values for {n} points")
        if values.dtype not in _TORCH_DATATYPE:
            raise ValueError(f"field {name!r}: no PointField datatype for {values.dtype}")
        count = int(np.prod(values.shape[1:], dtype=np.int64))
        datatype = FLOAT32 if name == "rgb" else _TORCH_DATATYPE[values.dtype]    # RViz reads rgb as float32
        fields.append(PointField(name=name, offset=offset, count=count, datatype=datatype))
        offset += count * values.element_size()
    data = array.array("B", [0]) * (n * offset)
    if n and offset and dev.type == "cpu":
        # numpy's structured assignment: on the CPU, torch's strided byte copies are 3x slower
        table = np.frombuffer(data, np.dtype({"names": list(columns), "offsets": [f.offset for f in fields],
                                              "formats": [np.dtype((v.numpy().dtype, v.shape[1:]))
                                                          for v in columns.values()]}), count=n)
        for name, values in columns.items():
            table[name] = values.numpy()
        del table                        # release the buffer export before handing `data` over
        dense = bool(np.isfinite(xyz.numpy()).all())
    elif n and offset:
        torch.frombuffer(data, dtype=torch.uint8).copy_(_rows(columns).reshape(-1))   # one device-to-host copy
        dense = bool(torch.isfinite(xyz).all())
    else:
        dense = True
    # check_fields=True makes the `data` setter keep our array.array('B') instead of copying it
    msg = PointCloud2(check_fields=True, header=header, height=1, width=n, fields=fields,
                      is_bigendian=False, point_step=offset, row_step=offset * n, is_dense=dense)
    msg.data = data
    return msg
