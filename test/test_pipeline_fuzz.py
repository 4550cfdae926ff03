"""Whatever arrives on the topics, `Pipeline.process` answers with a status and never raises; a
good frame after bad ones is still fused (the callback path of the node, without DDS)."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from std_msgs.msg import Header

from ros_ot_fusion.io import pointcloud2 as pc2
from ros_ot_fusion.pipeline import ERROR, OK, WARN, Pipeline

PIPE = Pipeline({"device": "cpu", "lidar_frame": "lidar"})


def cloud(n, seed, frame="lidar", rgb=False):
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-20, 20, (n, 3)).astype(np.float32)
    colours = rng.integers(0, 256, (n, 3), dtype=np.uint8) if rgb else None
    return pc2.encode(Header(frame_id=frame), xyz, rgb=colours)


@st.composite
def broken(draw):
    """A small valid cloud with one thing about it made wrong (or left alone)."""
    msg = cloud(draw(st.integers(0, 60)), draw(st.integers(0, 9)), rgb=draw(st.booleans()))
    what = draw(st.sampled_from(["none", "truncate", "point_step", "row_step", "width", "height",
                                 "datatype", "offset", "count", "drop_field", "nan", "frame", "bigendian"]))
    if what == "truncate":
        msg.data = msg.data[: draw(st.integers(0, max(0, len(msg.data) - 1)))]
    elif what in ("point_step", "row_step", "width", "height"):
        setattr(msg, what, draw(st.integers(0, 5000)))
    elif what in ("datatype", "offset", "count") and msg.fields:
        field = msg.fields[draw(st.integers(0, len(msg.fields) - 1))]
        setattr(field, what, draw(st.integers(0, 300)))
    elif what == "drop_field" and msg.fields:
        msg.fields = [f for i, f in enumerate(msg.fields) if i != draw(st.integers(0, len(msg.fields) - 1))]
    elif what == "nan" and msg.width:
        data = np.frombuffer(msg.data, np.float32).copy()
        data[draw(st.integers(0, len(data) - 1))::draw(st.integers(1, 7))] = np.nan
        msg.data = data.tobytes()
    elif what == "frame":
        msg.header.frame_id = draw(st.text(max_size=8))
    elif what == "bigendian":
        msg.is_bigendian = True
    return msg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lidar=broken(), camera=st.one_of(st.none(), broken()))
def test_process_never_raises(lidar, camera):
    out = PIPE.process(lidar, camera)
    assert out.level in (OK, WARN, ERROR) and out.message
    if out.fused is not None:
        assert pc2.decode(out.fused).frame_id == "lidar"


def test_a_good_frame_after_bad_ones_is_fused():
    bad = cloud(30, 1)
    bad.data = bad.data[:-5]
    assert PIPE.process(bad, None).level == ERROR
    out = PIPE.process(cloud(500, 2), cloud(500, 3, frame="camera", rgb=True))
    assert out.fused is not None and out.extrinsic is not None
    assert [f.name for f in out.fused.fields] == ["x", "y", "z", "intensity", "rgb", "confidence"]
