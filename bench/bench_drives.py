"""Extrinsic accuracy over simulated drives, warm start against cold, and a picture per drive.

    python bench/bench_drives.py                      # the six drives of bench/RESULTS.md
    python bench/bench_drives.py --drives 0:64:5:0.3 3:128:5:0.3 --frames 40 [-p NAME:=VALUE ...]
                                 [--cold 3:128:5:0.3 ...] [--out build/drives] [--figures bench/figures]

Each drive SEED:BEAMS:DEG:M is simulated (`ros-ot-fusion simulate`: 640x480 depth camera, prior
off by exactly DEG degrees and M metres) and run through `process_bag`, the node's pipeline,
warm (the defaults: each frame starts from the last one's transform, eps and potentials), and the
`--cold` drives (default: the last one) a second time cold on the same bag (`warm_start:=false`:
the last transform only, the full eps annealing and fresh potentials every frame). Errors count
the frames after the first second of driving.
Written: `<out>/drives.json` and a top view of the last frame before/after alignment per drive,
`<figures>/drive_seed<S>_<B>beams.png`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ros_ot_fusion.params import load_params_file, overrides
from ros_ot_fusion.process_bag import process_bag
from ros_ot_fusion.sim import CameraConfig, DriveConfig, LidarConfig, params_path, write_bag

DRIVES = ("0:64:5:0.3", "1:64:5:0.3", "2:128:5:0.3", "3:128:5:0.3", "4:64:5:0.3", "5:128:5:0.3")


def run_drive(spec: str, args) -> dict:
    seed, beams, deg, m = spec.split(":")
    seed, beams, deg, m = int(seed), int(beams), float(deg), float(m)
    bag = Path(args.out) / f"seed{seed}_{beams}beams_{deg:g}deg_{m:g}m"
    if not bag.exists():
        print(f"simulating {bag.name} ...", file=sys.stderr)
        write_bag(bag, DriveConfig(frames=args.frames, seed=seed, miscalib_deg=deg, miscalib_m=m,
                                   lidar=LidarConfig(beams=beams), camera=CameraConfig()))
    params = {**load_params_file(params_path(bag)), **overrides(args.p)}
    row = {"drive": spec, "seed": seed, "beams": beams, "deg": deg, "m": m}
    png = Path(args.figures) / f"drive_seed{seed}_{beams}beams.png"
    modes = [("warm", {}), ("cold", {"warm_start": False})][: 2 if spec in args.cold else 1]
    for mode, extra in modes:
        print(f"{bag.name}: {mode}", file=sys.stderr)
        s = process_bag(bag, None, {**params, **extra}, progress=True, png=png if mode == "warm" else None)
        frames = s["per_frame"][1:]                      # the first frame is cold in both modes
        err = s["error_after_first_second"]
        row[mode] = {
            "rot_deg_p50": err["rot_deg"]["p50"], "rot_deg_p95": err["rot_deg"]["p95"],
            "trans_m_p50": err["trans_m"]["p50"], "trans_m_p95": err["trans_m"]["p95"],
            "within": err["within_0.5deg_5cm"], "frames": err["frames"],
            "iterations_p50": float(np.median([f["iterations"] for f in frames if "iterations" in f])),
            "align_ms_p50": float(np.median([f["align_ms"] for f in frames if "align_ms" in f])),
            "first_frame_iterations": s["per_frame"][0].get("iterations"),
        }
    return row


def table(rows: list[dict]) -> str:
    lines = ["| drive (seed, beams, prior off) | mode | rot p50 ° | rot p95 ° | trans p50 cm | trans p95 cm | "
             "within 0.5°/5 cm | iterations/frame p50 | align ms/frame p50 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for mode in ("warm", "cold"):
            if mode not in r:
                continue
            e = r[mode]
            lines.append(f"| seed {r['seed']}, {r['beams']}, {r['deg']:g}° / {r['m']:g} m | {mode} | "
                         f"{e['rot_deg_p50']:.3f} | {e['rot_deg_p95']:.3f} | {100 * e['trans_m_p50']:.2f} | "
                         f"{100 * e['trans_m_p95']:.2f} | {100 * e['within']:.0f}% ({e['frames']}) | "
                         f"{e['iterations_p50']:.0f} | {e['align_ms_p50']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drives", nargs="+", default=list(DRIVES), metavar="SEED:BEAMS:DEG:M")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("-p", action="append", default=[], metavar="NAME:=VALUE", help="a pipeline parameter")
    ap.add_argument("--cold", nargs="*", metavar="SEED:BEAMS:DEG:M", help="drives also run cold "
                    "(default: the last of --drives)")
    ap.add_argument("--out", default="build/drives")
    ap.add_argument("--figures", default="bench/figures")
    args = ap.parse_args()
    args.cold = args.drives[-1:] if args.cold is None else args.cold
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    rows = [run_drive(spec, args) for spec in args.drives]
    (Path(args.out) / "drives.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
