"""Where the single-frame estimator settles when it starts at the truth: its bias, frame by frame.

    python bench/fixed_point.py --seed 3 --beams 128 --frames 10 22 [--depth-noise 0] [-p NAME:=VALUE ...]

Each frame of a simulated drive (the simulator's, 640x480 camera; `--depth-noise` sets
the camera's k in sigma = k z^2, 0 for a noise-free camera) is aligned from the true extrinsic by
`--steps` single alignment steps at the final eps (solve + rigid update, no annealing, no earlier
frames). An unbiased estimator stays at the truth; the walk shows where this one goes and how fast.
"""
from __future__ import annotations

import argparse

import numpy as np

from ros_ot_fusion.fusion.align import Aligner, AlignConfig, so3_log
from ros_ot_fusion.params import overrides, validate
from ros_ot_fusion.sim import CameraConfig, Drive, DriveConfig, LidarConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--beams", type=int, default=128)
    ap.add_argument("--frames", type=int, nargs="+", default=[10, 22])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--depth-noise", type=float, default=CameraConfig.depth_noise)
    ap.add_argument("-p", action="append", default=[], metavar="NAME:=VALUE")
    args = ap.parse_args()
    drive = Drive(DriveConfig(frames=max(args.frames) + 1, seed=args.seed, lidar=LidarConfig(beams=args.beams),
                              camera=CameraConfig(depth_noise=args.depth_noise)))
    truth = drive.truth
    config = AlignConfig.from_params(validate(overrides(args.p)))
    config.eps_start, config.rigid_steps, config.cold_extra_steps, config.memory = config.eps, 1, 0, 0.0
    aligner = Aligner(config, "cpu")
    print(f"seed {args.seed}, {args.beams} beams, camera depth noise k = {args.depth_noise:g}, "
          f"params {overrides(args.p)}")
    for k in args.frames:
        frame = drive.frame(k)
        T = truth.copy()
        for _ in range(args.steps):
            a = aligner.align(frame.lidar.xyz, frame.camera.xyz, state=None, prior=T)
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
