"""The node's own per-frame path without DDS: PointCloud2 messages in, messages out.

    python bench/bench_messages.py [--frames 60] [--beams 128] [-p NAME:=VALUE ...]

`Pipeline.process` (what the node's worker calls) on rclpy messages of the analytic street
(`scene.py`, 128 x 1024 LiDAR ~130k points, 640 x 480 camera ~276k points), then
`serialize_message` of the fused cloud (the copy `publish` makes). The prior is off by 1 deg / 4.7 cm
and the frames run warm, as in the node; the first two are left out. Prints p50 / p99 per stage.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import scene  # noqa: E402

from ros_ot_fusion import params as P  # noqa: E402
from ros_ot_fusion import transforms as tf  # noqa: E402
from ros_ot_fusion.io import pointcloud2 as pc2  # noqa: E402
from ros_ot_fusion.pipeline import Pipeline  # noqa: E402
from ros_ot_fusion.sync import header  # noqa: E402

STAGES = ("decode_ms", "align_ms", "fuse_ms", "encode_ms", "total_ms", "serialize_ms")


def main() -> None:
    from rclpy.serialization import serialize_message

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--beams", type=int, default=128)
    ap.add_argument("-p", action="append", default=[], metavar="NAME:=VALUE", help="a parameter (YAML value)")
    args = ap.parse_args()
    prior = tf.make_transform(tf.axis_angle_to_matrix([1, 2, 3], math.radians(1.0)) @ scene.TRUTH[:3, :3],
                              scene.TRUTH[:3, 3] + [0.03, -0.03, 0.02])
    pipe = Pipeline({"prior_extrinsic": [float(v) for v in tf.matrix_to_pose(prior)], **P.overrides(args.p)})
    rows = []
    for k in range(args.frames):
        lidar, camera, rgb = scene.sensor_frame(k, speed=0.4, beams=args.beams)
        stamp = (1_700_000_000 + k) * 1_000_000_000
        msgs = (pc2.encode(header("lidar", stamp), lidar.numpy(), intensity=np.ones(len(lidar), np.float32)),
                pc2.encode(header("camera", stamp), camera.numpy(), rgb=rgb.numpy()))
        out = pipe.process(*msgs)
        t = time.perf_counter()
        serialize_message(out.fused)
        rows.append([out.stats.get(s, math.nan) for s in STAGES[:-1]] + [(time.perf_counter() - t) * 1e3])
        print(f"frame {k:3d}: {out.message}; " + ", ".join(f"{s[:-3]} {v:.1f}" for s, v in zip(STAGES, rows[-1])),
              file=sys.stderr)
    r = np.array(rows[2:])
    print(f"device {pipe.device}, {len(r)} warm frames, {out.stats['lidar_points']} + {out.stats['camera_points']} "
          f"points, fused {out.fused.width} points")
    print("| stage | p50 ms | p99 ms |\n|---|---:|---:|")
    for i, s in enumerate(STAGES):
        print(f"| {s[:-3]} | {np.percentile(r[:, i], 50):.1f} | {np.percentile(r[:, i], 99):.1f} |")


if __name__ == "__main__":
    main()
