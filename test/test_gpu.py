"""GPU-only faults, on a real GPU (skipped without one): out of memory mid-run.

After a cold and a warm frame, the process's CUDA memory is capped (torch's per-process fraction)
at a quarter of what the warm frame needed: the next frame must be skipped with a WARN (the point budget
halved), nothing may raise, and once memory is available again the frame after is fused.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _messages(k):
    import scene

    from ros_ot_fusion.io import pointcloud2 as pc2
    from ros_ot_fusion.sync import header

    lidar, camera, rgb = scene.sensor_frame(k, speed=0.5, device="cuda")
    stamp = (100 + k) * 1_000_000_000
    return (pc2.encode(header("lidar", stamp), lidar.cpu().numpy(), intensity=np.ones(len(lidar), np.float32)),
            pc2.encode(header("camera", stamp), camera.cpu().numpy(), rgb=rgb.cpu().numpy()), scene.TRUTH)


def test_device_codec_matches_the_cpu_codec():
    """decode_to on the GPU reads what decode reads (NaN rows dropped); encode from GPU tensors
    writes the same bytes as from numpy."""
    from ros_ot_fusion.io import pointcloud2 as pc2
    from ros_ot_fusion.sync import header

    rng = np.random.default_rng(4)
    xyz = rng.normal(size=(50_000, 3)).astype(np.float32)
    xyz[rng.random(len(xyz)) < 0.05, 2] = np.nan
    rgb = rng.integers(0, 256, (len(xyz), 3), dtype=np.uint8)
    inten = rng.random(len(xyz), dtype=np.float32)
    conf = rng.random(len(xyz), dtype=np.float32)
    msg = pc2.encode(header("cam", 5), xyz, rgb=rgb, intensity=inten, extra={"confidence": conf})
    want, got = pc2.decode(msg), pc2.decode_to(msg, "cuda")
    assert got.xyz.is_cuda and got.dropped == want.dropped > 0
    for mine, ref in ((got.xyz, want.xyz), (got.rgb, want.rgb), (got.intensity, want.intensity)):
        np.testing.assert_array_equal(mine.cpu().numpy(), ref)
    on_gpu = pc2.encode(header("cam", 5), torch.from_numpy(xyz).cuda(), rgb=torch.from_numpy(rgb).cuda(),
                        intensity=torch.from_numpy(inten).cuda(), extra={"confidence": torch.from_numpy(conf).cuda()})
    assert on_gpu.fields == msg.fields and not on_gpu.is_dense and bytes(on_gpu.data) == bytes(msg.data)


def test_out_of_memory_skips_the_frame_and_fusing_goes_on():
    from ros_ot_fusion import transforms as tf
    from ros_ot_fusion.pipeline import OK, WARN, Pipeline

    frames = [_messages(k) for k in range(4)]
    pipe = Pipeline({"device": "cuda", "prior_extrinsic": [float(v) for v in tf.matrix_to_pose(frames[0][2])]})
    assert pipe.process(*frames[0][:2]).level == OK            # cold: pyramid, graphs captured
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    warm = pipe.process(*frames[1][:2])                        # what a warm frame needs
    assert warm.level == OK, warm.message
    need = torch.cuda.max_memory_allocated() - base
    budget = pipe.params["max_points"]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + need / 4) / total)
    try:
        starved = pipe.process(*frames[2][:2])          # must not raise
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert starved.level == WARN and "GPU out of memory" in starved.message, (starved.message, need)
    assert starved.fused is None and pipe.params["max_points"] == budget // 2
    after = pipe.process(*frames[3][:2])
    assert after.level == OK and after.fused is not None, after.message
