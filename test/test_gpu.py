"""GPU-only faults, on a real GPU (skipped without one): out of memory mid-run.

The process's CUDA memory is capped (torch's per-process fraction) at twice what a modest point
budget needs, then the budget is raised far beyond it: the pipeline must skip the
frame with a WARN, halve its budget until frames fit again, and go on fusing.
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
    from std_msgs.msg import Header

    from ros_ot_fusion.io import pointcloud2 as pc2

    lidar, camera, rgb = scene.sensor_frame(k, speed=0.5, device="cuda")
    h = Header(frame_id="lidar")
    h.stamp.sec = 100 + k
    hc = Header(frame_id="camera")
    hc.stamp.sec = 100 + k
    return (pc2.encode(h, lidar.cpu().numpy(), intensity=np.ones(len(lidar), np.float32)),
            pc2.encode(hc, camera.cpu().numpy(), rgb=rgb.cpu().numpy()), scene.TRUTH)


def test_out_of_memory_lowers_the_budget_and_fusing_goes_on():
    from ros_ot_fusion import transforms as tf
    from ros_ot_fusion.pipeline import OK, WARN, Pipeline

    lidar, camera, truth = _messages(0)
    # fine voxels: many points reach the solver, where the budget applies
    pipe = Pipeline({"device": "cuda", "max_points": 4000, "lidar_voxel_m": 0.05, "camera_voxel_m": 0.05,
                     "prior_extrinsic": [float(v) for v in tf.matrix_to_pose(truth)]})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    assert pipe.process(lidar, camera).level == OK
    need = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((base + 2 * need) / total)
    try:
        pipe.set_params({"max_points": 400000})
        levels, messages = [], []
        for k in range(1, 12):
            lidar, camera, _ = _messages(k)
            out = pipe.process(lidar, camera)
            levels.append(out.level)
            messages.append(out.message)
            if out.level == OK and out.fused is not None:
                break
        print(messages)
        assert any("GPU out of memory" in m for m in messages), messages
        assert levels[-1] == OK and pipe.params["max_points"] < 400000, messages
        assert all(lv in (OK, WARN) for lv in levels)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
