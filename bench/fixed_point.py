"""Where the single-frame estimator settles when it starts at the truth: its bias, frame by frame.

    python bench/fixed_point.py --seed 3 --beams 128 --frames 10 22 [--depth-noise 0] [-p NAME:=VALUE ...]

Each frame of a simulated drive (`ros-ot-fusion simulate`, 640x480 camera; `--depth-noise` sets
the camera's k in sigma = k z^2, 0 for a noise-free camera) is aligned from the true extrinsic by
`--steps` single alignment steps at the final eps (solve + rigid update, no annealing, no earlier
frames). An unbiased estimator stays at the truth; the walk shows where this one goes and how fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ros_ot_fusion.fusion.align import Aligner, AlignConfig, so3_log
from ros_ot_fusion.io import pointcloud2 as pc2
from ros_ot_fusion.io.bag import read_bag
from ros_ot_fusion.io.transform_msg import msg_to_matrix
from ros_ot_fusion.params import overrides, validate
from ros_ot_fusion.sim import CameraConfig, DriveConfig, LidarConfig, write_bag
from ros_ot_fusion.sim.drive import TOPICS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--beams", type=int, default=128)
    ap.add_argument("--frames", type=int, nargs="+", default=[10, 22])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--depth-noise", type=float, default=CameraConfig.depth_noise)
    ap.add_argument("--out", default="build/fixed_point")
    ap.add_argument("-p", action="append", default=[], metavar="NAME:=VALUE")
    args = ap.parse_args()
    bag = Path(args.out) / f"seed{args.seed}_{args.beams}beams_noise{args.depth_noise:g}_{max(args.frames) + 1}f"
    if not bag.exists():
        write_bag(bag, DriveConfig(frames=max(args.frames) + 1, seed=args.seed, lidar=LidarConfig(beams=args.beams),
                                   camera=CameraConfig(depth_noise=args.depth_noise)))
    config = AlignConfig.from_params(validate(overrides(args.p)))
    config.eps_start, config.rigid_steps, config.cold_extra_steps, config.memory = config.eps, 1, 0, 0.0
    aligner = Aligner(config, "cpu")
    msgs = {TOPICS["lidar"]: [], TOPICS["camera"]: []}
    for topic, _, msg in read_bag(bag, list(msgs) + [TOPICS["truth"]]):
        if topic == TOPICS["truth"]:
            truth = msg_to_matrix(msg)                  # the same extrinsic in every frame
        else:
            msgs[topic].append(msg)
    print(f"{bag.name}, params {overrides(args.p)}")
    for k in args.frames:
        lidar, camera = (pc2.decode(msgs[t][k]).xyz for t in (TOPICS["lidar"], TOPICS["camera"]))
        T = truth.copy()
        for step in range(args.steps):
            a = aligner.align(lidar, camera, state=None, prior=T)
            T = a.T
        dt = 100 * (T[:3, 3] - truth[:3, 3])
        w = np.degrees(so3_log(T[:3, :3] @ truth[:3, :3].T))
        last = a.steps[-1]
        print(f"frame {k:3d}: after {args.steps} steps off by {np.linalg.norm(dt):5.2f} cm "
              f"(LiDAR x y z {dt[0]:+.2f} {dt[1]:+.2f} {dt[2]:+.2f}), {np.linalg.norm(w):.3f} deg "
              f"(x y z {w[0]:+.3f} {w[1]:+.3f} {w[2]:+.3f}); conditioning {last['conditioning']:.1e}, "
              f"matched {last['matched']:.2f}", flush=True)


if __name__ == "__main__":
    main()
