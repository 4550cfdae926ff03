"""PointCloud2 codec: round trips, arbitrary layouts against a per-point struct reference, bad input."""
import array
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from ros_ot_fusion.io import pointcloud2 as pc2

STRUCT = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 8: "d"}
SIZE = {k: struct.calcsize(v) for k, v in STRUCT.items()}


def make_msg(fields, points, height, width, point_step, row_pad, bigendian):
    """Pack `points` (list of dicts name -> tuple of values) by hand with struct: the reference."""
    order = ">" if bigendian else "<"
    row_step = width * point_step + row_pad
    buf = bytearray(row_step * height)
    for k, p in enumerate(points):
        r, c = divmod(k, width)
        base = r * row_step + c * point_step
        for f in fields:
            struct.pack_into(order + STRUCT[f.datatype] * f.count, buf,
                             base + f.offset, *p[f.name])
    return PointCloud2(header=Header(frame_id="f"), height=height, width=width, fields=fields,
                       is_bigendian=bigendian, point_step=point_step, row_step=row_step,
                       data=array.array("B", bytes(buf)), is_dense=False)


def value(rng, datatype):
    if datatype in (7, 8):
        return float(np.float32(rng.normal() * 100))
    bits = SIZE[datatype] * 8
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if datatype in (1, 3, 5) else (0, 2 ** bits - 1)
    return int(rng.integers(lo, hi, endpoint=True))


@st.composite
def layouts(draw):
    extra = draw(st.lists(st.sampled_from(["intensity", "ring", "t", "normal", "label"]),
                          unique=True, max_size=4))
    names = ["x", "y", "z"] + extra + draw(st.sampled_from([[], ["rgb"], ["rgba"]]))
    order = draw(st.permutations(names))
    fields, offset = [], 0
    for name in order:
        if name in "xyz":
            datatype, count = draw(st.sampled_from([7, 8])), 1
        elif name in ("rgb", "rgba"):
            datatype, count = draw(st.sampled_from([7, 6])), 1
        else:
            datatype, count = draw(st.integers(1, 8)), draw(st.integers(1, 3))
        offset += draw(st.integers(0, 3))                      # gaps between fields
        fields.append(PointField(name=name, offset=offset, datatype=datatype, count=count))
        offset += SIZE[datatype] * count
    point_step = offset + draw(st.integers(0, 8))             # padding at the end of a point
    height, width = draw(st.integers(1, 4)), draw(st.integers(0, 12))
    return fields, point_step, height, width, draw(st.integers(0, 9)), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(layouts(), st.integers(0, 2**32 - 1), st.floats(0, 0.5))
def test_decode_matches_struct_reference(layout, seed, nan_rate):
    fields, point_step, height, width, row_pad, bigendian = layout
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(height * width):
        p = {f.name: tuple(value(rng, f.datatype) for _ in range(f.count)) for f in fields}
        if rng.random() < nan_rate:
            p[rng.choice(["x", "y", "z"])] = (float(rng.choice([np.nan, np.inf, -np.inf])),)
        if "rgb" in p or "rgba" in p:
            key = "rgb" if "rgb" in p else "rgba"
            packed = int(rng.integers(0, 2**24))
            fmt = next(f for f in fields if f.name == key).datatype
            p[key] = (struct.unpack("f", struct.pack("I", packed))[0] if fmt == 7 else packed,)
        points.append(p)
    msg = make_msg(fields, points, height, width, point_step, row_pad, bigendian)
    cloud = pc2.decode(msg)
    keep = [k for k, p in enumerate(points) if all(np.isfinite(p[a][0]) for a in "xyz")]
    assert len(cloud) == len(keep) and cloud.dropped == len(points) - len(keep)
    np.testing.assert_array_equal(cloud.index, keep)
    want_xyz = np.array([[points[k][a][0] for a in "xyz"] for k in keep], np.float32).reshape(-1, 3)
    np.testing.assert_array_equal(cloud.xyz, want_xyz)
    assert cloud.xyz.dtype == np.float32 and cloud.xyz.flags.c_contiguous
    for f in fields:
        got = cloud.fields[f.name].reshape(len(keep), f.count)
        if f.name in ("rgb", "rgba"):
            bits = [struct.unpack("I", struct.pack("f", points[k][f.name][0]))[0] if f.datatype == 7
                    else points[k][f.name][0] for k in keep]
            np.testing.assert_array_equal(got[:, 0], bits)
            want_rgb = np.array([[(b >> 16) & 255, (b >> 8) & 255, b & 255] for b in bits], np.uint8)
            np.testing.assert_array_equal(cloud.rgb, want_rgb.reshape(-1, 3))
        else:
            want = np.array([points[k][f.name] for k in keep]).reshape(len(keep), f.count)
            np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))
    if "intensity" in cloud.fields and cloud.fields["intensity"].ndim == 1:
        assert cloud.intensity.dtype == np.float32
    all_points = pc2.decode(msg, keep_invalid=True)
    assert len(all_points) == height * width
    assert_device_decode_matches(msg, cloud, "cpu")


def test_device_decode_reads_rows_padded_off_four_byte_boundaries():
    """One point a row, rows 13 bytes apart: the float words of a row are not 4-byte aligned in
    the buffer, so the one-view shortcut does not apply (found by the property test above)."""
    fields = [PointField(name=c, offset=4 * i, datatype=7, count=1) for i, c in enumerate("xyz")]
    points = [{"x": (1.5,), "y": (-2.0,), "z": (3.25,)}, {"x": (4.0,), "y": (5.5,), "z": (-6.0,)}]
    msg = make_msg(fields, points, 2, 1, 12, 1, False)
    assert msg.row_step == 13
    cloud = pc2.decode(msg)
    np.testing.assert_array_equal(cloud.xyz, [[1.5, -2.0, 3.25], [4.0, 5.5, -6.0]])
    assert_device_decode_matches(msg, cloud, "cpu")


def assert_device_decode_matches(msg, cloud, device):
    """The pipeline's torch decoder reads the same xyz, colour and intensity as `decode`."""
    mine = pc2.decode_bytes(msg, device)
    assert mine.dropped == cloud.dropped and mine.frame_id == cloud.frame_id and mine.stamp_ns == cloud.stamp_ns
    for got, want in ((mine.xyz, cloud.xyz), (mine.rgb, cloud.rgb), (mine.intensity, cloud.intensity)):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.device.type == torch.device(device).type
            np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_packing_on_the_device_writes_the_bytes_numpy_writes():
    """encode's GPU path (`_rows`, run here on CPU tensors) against its numpy path: the fused
    cloud's six 4-byte columns (one stacked launch) and a mix of widths (one column at a time)."""
    rng = np.random.default_rng()
    n = 777
    xyz = torch.from_numpy(rng.normal(size=(n, 3)).astype(np.float32))
    rgb = torch.from_numpy(rng.integers(0, 256, (n, 3), dtype=np.uint8))
    inten, conf = (torch.from_numpy(rng.random(n, dtype=np.float32)) for _ in range(2))
    for extra in ({"confidence": conf}, {"confidence": conf.double(), "normal": xyz * 2, "valid": conf > 0.5}):
        msg = pc2.encode(Header(frame_id="lidar"), xyz, rgb=rgb, intensity=inten, extra=extra)
        columns = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "intensity": inten,
                   "rgb": (rgb[:, 0].int() << 16) | (rgb[:, 1].int() << 8) | rgb[:, 2].int(),
                   **{k: v.to(torch.uint8) if v.dtype == torch.bool else v for k, v in extra.items()}}
        rows = pc2._rows(columns)
        assert rows.shape == (n, msg.point_step) and bytes(rows.numpy()) == bytes(msg.data)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(1)
    n = 1000
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    intensity = rng.random(n, dtype=np.float32)
    conf = rng.random(n).astype(np.float64)
    normals = rng.normal(size=(n, 3)).astype(np.float32)
    msg = pc2.encode(Header(frame_id="lidar"), xyz, rgb=rgb, intensity=intensity,
                     extra={"confidence": conf, "normal": normals, "valid": conf > 0.5})
    assert [f.name for f in msg.fields] == ["x", "y", "z", "intensity", "rgb", "confidence",
                                          "normal", "valid"]
    assert next(f for f in msg.fields if f.name == "rgb").datatype == PointField.FLOAT32
    assert msg.height == 1 and msg.width == n and msg.is_dense
    assert len(msg.data) == msg.row_step == msg.point_step * n
    cloud = pc2.decode(msg)
    np.testing.assert_array_equal(cloud.xyz, xyz)
    np.testing.assert_array_equal(cloud.rgb, rgb)
    np.testing.assert_array_equal(cloud.intensity, intensity)
    # the same columns as torch tensors: the same bytes
    again = pc2.encode(Header(frame_id="lidar"), torch.from_numpy(xyz), rgb=torch.from_numpy(rgb),
                       intensity=torch.from_numpy(intensity),
                       extra={"confidence": torch.from_numpy(conf), "normal": torch.from_numpy(normals),
                              "valid": torch.from_numpy(conf > 0.5)})
    assert again.fields == msg.fields and bytes(again.data) == bytes(msg.data)
    np.testing.assert_array_equal(cloud.fields["confidence"], conf)
    np.testing.assert_array_equal(cloud.fields["normal"], normals)
    np.testing.assert_array_equal(cloud.fields["valid"], conf > 0.5)
    assert cloud.frame_id == "lidar"


def test_encode_empty_and_nan():
    msg = pc2.encode(Header(), np.zeros((0, 3), np.float32))
    assert msg.width == 0 and len(pc2.decode(msg)) == 0
    xyz = np.array([[1, 2, 3], [np.nan, 0, 0]], np.float32)
    msg = pc2.encode(Header(), xyz)
    assert not msg.is_dense
    cloud = pc2.decode(msg)
    assert len(cloud) == 1 and cloud.dropped == 1


def test_separate_rgb_channels_and_organized_cloud():
    fields = [PointField(name=n, offset=o, datatype=d, count=1) for n, o, d in
              [("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("r", 12, 2), ("g", 13, 2), ("b", 14, 2)]]
    points = [{"x": (float(i),), "y": (0.0,), "z": (1.0,), "r": (i,), "g": (2 * i,), "b": (3,)}
              for i in range(6)]
    msg = make_msg(fields, points, 2, 3, 16, 4, False)
    cloud = pc2.decode(msg)
    assert cloud.height == 2 and cloud.width == 3
    np.testing.assert_array_equal(cloud.rgb[:, 1], [0, 2, 4, 6, 8, 10])
    assert_device_decode_matches(msg, cloud, "cpu")


def _good():
    fields = [PointField(name=n, offset=4 * i, datatype=7, count=1) for i, n in enumerate("xyz")]
    return make_msg(fields, [{"x": (1.0,), "y": (2.0,), "z": (3.0,)}] * 4, 1, 4, 12, 0, False)


@pytest.mark.parametrize("breakage, reason", [
    (lambda m: setattr(m, "data", m.data[:-1]), "expected row_step"),
    (lambda m: setattr(m, "point_step", 8), "does not fit in point_step"),
    (lambda m: setattr(m, "point_step", 0), "point_step is 0"),
    (lambda m: setattr(m, "row_step", 4), "row_step 4 <"),
    (lambda m: m.fields.pop(), "no 'z' field"),
    (lambda m: setattr(m.fields[0], "datatype", 42), "unknown datatype 42"),
    (lambda m: setattr(m.fields[1], "count", 0), "count 0"),
    (lambda m: m.fields.append(PointField(name="x", offset=0, datatype=7, count=1)), "twice"),
    (lambda m: setattr(m.fields[0], "count", 2), "'x' has count 2"),     # found by the pipeline fuzz test
])
def test_malformed_messages_raise_one_clear_error(breakage, reason):
    msg = _good()
    assert len(pc2.decode(msg)) == 4
    breakage(msg)
    for decode in (pc2.decode, lambda m: pc2.decode_bytes(m, "cpu"), lambda m: pc2.decode_to(m, "cpu")):
        with pytest.raises(pc2.PointCloudError, match=reason):
            decode(msg)


def test_decodes_rosbags_message_objects():
    """rosbags' own message objects (numpy `data`) decode the same as rclpy's."""
    from rclpy.serialization import serialize_message
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    xyz = np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    msg = pc2.encode(Header(frame_id="cam"), xyz, rgb=np.full((50, 3), 7, np.uint8))
    other = store.deserialize_cdr(bytes(serialize_message(msg)), "sensor_msgs/msg/PointCloud2")
    cloud = pc2.decode(other)
    np.testing.assert_array_equal(cloud.xyz, xyz)
    assert (cloud.rgb == 7).all() and cloud.frame_id == "cam"
    assert_device_decode_matches(other, cloud, "cpu")


def test_cross_check_with_sensor_msgs_py_when_installed():
    point_cloud2 = pytest.importorskip("sensor_msgs_py.point_cloud2")
    xyz = np.random.default_rng(3).normal(size=(100, 3)).astype(np.float32)
    ours = pc2.encode(Header(frame_id="a"), xyz)
    theirs = point_cloud2.create_cloud_xyz32(Header(frame_id="a"), xyz.tolist())
    np.testing.assert_array_equal(pc2.decode(theirs).xyz, xyz)
    back = np.array(list(point_cloud2.read_points(ours, field_names=("x", "y", "z"))).tolist())
    np.testing.assert_allclose(back, xyz)
