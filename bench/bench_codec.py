"""PointCloud2 codec throughput: decode and encode of LiDAR-like and camera-like clouds.

    python bench/bench_codec.py [--points 300000] [--repeat 30]
Prints a table of medians after warm-up (ms and Mpoints/s).
"""
import argparse
import platform
import statistics
import time

import numpy as np
from std_msgs.msg import Header

from ros_ot_fusion.io import pointcloud2 as pc2


def median_ms(fn, repeat):
    fn()                                               # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    n = args.points
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    intensity = rng.random(n, dtype=np.float32)
    confidence = rng.random(n, dtype=np.float32)
    header = Header(frame_id="lidar")
    with_nan = xyz.copy()
    with_nan[rng.random(n) < 0.1, 1] = np.nan
    cases = {
        "xyz + rgb (camera)": pc2.encode(header, xyz, rgb=rgb),
        "xyz + intensity (lidar)": pc2.encode(header, xyz, intensity=intensity),
        "xyz + intensity + rgb + confidence": pc2.encode(header, xyz, rgb=rgb, intensity=intensity,
                                                         extra={"confidence": confidence}),
        "xyz + rgb, 10% NaN": pc2.encode(header, with_nan, rgb=rgb),
    }
    print(f"# {n} points, {platform.processor() or platform.machine()}, median of {args.repeat}")
    print(f"| {'case':38s} | decode ms | Mpts/s | encode ms | Mpts/s |")
    print(f"|{'-' * 40}|-----------|--------|-----------|--------|")
    for name, msg in cases.items():
        cloud = pc2.decode(msg)
        dec = median_ms(lambda: pc2.decode(msg), args.repeat)
        enc = median_ms(lambda: pc2.encode(header, cloud.xyz, rgb=cloud.rgb, intensity=cloud.intensity,
                                           extra={k: v for k, v in cloud.fields.items()
                                                  if k == "confidence"}), args.repeat)
        print(f"| {name:38s} | {dec:9.2f} | {n / dec / 1e3:6.0f} | {enc:9.2f} | {n / enc / 1e3:6.0f} |")


if __name__ == "__main__":
    main()
