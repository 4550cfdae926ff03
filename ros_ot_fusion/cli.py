"""`ros-ot-fusion` command: one entry point, a sub-command per job."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Large clouds over shared memory in one piece (see the file); a profile the user names wins.
DDS_PROFILE = Path(__file__).with_name("fastdds_large_clouds.xml")
SHM_NEEDED = 256 * 2**20      # free /dev/shm the profile wants: this process's segment and its peers'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ros-ot-fusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("bag-info", help="list a bag's topics, types and message counts")
    info.add_argument("bag")
    info.set_defaults(run=_bag_info)
    sim = sub.add_parser("simulate", help="simulate a LiDAR + depth-camera drive with a known extrinsic "
                         "into a new bag, and a miscalibrated prior into <OUT_BAG>.params.yaml")
    sim.add_argument("out_bag", metavar="OUT_BAG")
    sim.add_argument("--frames", type=int, default=20)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--miscalib-deg", type=float, default=3.0, help="prior rotation error (degrees)")
    sim.add_argument("--miscalib-m", type=float, default=0.15, help="prior translation error (metres)")
    sim.add_argument("--lidar-beams", type=int, default=64, help="16, 32, 64 or 128")
    sim.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    sim.add_argument("--camera-width", type=int, default=640)
    sim.add_argument("--camera-height", type=int, default=480)
    sim.set_defaults(run=_simulate)
    node = sub.add_parser("node", help="run the fusion node (ROS arguments after --ros-args)")
    node.add_argument("--ros-args", dest="ros_args", nargs=argparse.REMAINDER, default=[],
                      help="arguments for ROS (-p name:=value, --params-file F, -r from:=to), to the end")
    node.set_defaults(run=_node)
    from ros_ot_fusion import replay

    replay.add_arguments(sub.add_parser("replay", help="play a bag into DDS at recorded timing "
                                        "(like ros2 bag play), with /clock")).set_defaults(run=replay.run)
    proc = sub.add_parser("process-bag", help="run the node's pipeline over a bag, offline, into a new bag")
    proc.add_argument("in_bag", metavar="IN_BAG")
    proc.add_argument("out_bag", metavar="OUT_BAG")
    proc.add_argument("--params-file", help="ROS 2 params YAML (ros_ot_fusion: ros__parameters: ...)")
    proc.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE",
                      help="override one parameter (YAML value), after the params file")
    proc.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    proc.add_argument("--png", help="write a top view of the last frame before/after alignment here")
    proc.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    proc.set_defaults(run=_process_bag)
    demo = sub.add_parser("demo", help="simulate a drive, replay it through the node over DDS, report")
    demo.add_argument("--out", default="build/demo", help="output folder (replaced)")
    demo.add_argument("--frames", type=int, default=20)
    demo.add_argument("--rate", type=float, help="replay speed (default: 1 on a GPU, 0.05 on the CPU)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def _node(args) -> int:
    from ros_ot_fusion.node import main as node_main

    return node_main(["ros_ot_fusion", "--ros-args", *args.ros_args] if args.ros_args else ["ros_ot_fusion"])


def _process_bag(args) -> int:
    import json

    from ros_ot_fusion.params import load_params_file, overrides
    from ros_ot_fusion.process_bag import process_bag, report

    try:
        params = load_params_file(args.params_file) if args.params_file else {}
        params.update(overrides(args.param))
        summary = process_bag(args.in_bag, args.out_bag, params, storage=args.storage, png=args.png)
    except (OSError, ValueError) as error:
        print(f"ros-ot-fusion process-bag: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else report(summary))
    return 0


def _demo(args) -> int:
    from ros_ot_fusion.demo import run_demo

    return run_demo(args.out, args.frames, args.rate, args.seed)


def _bag_info(args) -> int:
    from ros_ot_fusion.io.bag import bag_topics

    for topic, (msgtype, count) in sorted(bag_topics(args.bag).items()):
        print(f"{topic:40s} {msgtype:40s} {count}")
    return 0


def _simulate(args) -> int:
    from ros_ot_fusion.sim import CameraConfig, DriveConfig, LidarConfig, write_bag

    config = DriveConfig(frames=args.frames, seed=args.seed, miscalib_deg=args.miscalib_deg,
                         miscalib_m=args.miscalib_m, lidar=LidarConfig(beams=args.lidar_beams),
                         camera=CameraConfig(width=args.camera_width, height=args.camera_height))
    try:
        summary = write_bag(args.out_bag, config, storage=args.storage,
                            progress=lambda k, n: print(f"frame {k}/{n}", file=sys.stderr, flush=True))
    except (FileExistsError, ValueError) as error:
        print(f"ros-ot-fusion simulate: {error}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0


def main(argv: list[str] | None = None) -> int:
    args, _ros_args = build_parser().parse_known_args(argv)
    if args.command in ("node", "replay", "demo"):           # the commands that speak DDS
        use_dds_profile()
    return args.run(args)


def use_dds_profile(shm: str = "/dev/shm") -> None:
    """Fast DDS reads the profile when this process makes its first participant: call before.
    Not where shared memory is short (a container's default /dev/shm is 64 MB): a segment that
    outgrows it would fail mid-publish, so Fast DDS's defaults stay."""
    if "FASTDDS_DEFAULT_PROFILES_FILE" in os.environ:
        return
    try:
        st = os.statvfs(shm)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 0
    if free < SHM_NEEDED:
        print(f"ros-ot-fusion: {free / 2**20:.0f} MB free in {shm}, under the {SHM_NEEDED / 2**20:.0f} MB the "
              f"large-cloud DDS profile wants: Fast DDS's default transports", file=sys.stderr)
        return
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(DDS_PROFILE)


def node_main() -> int:
    return main(["node", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
