"""`ros-ot-fusion` command: one entry point, a sub-command per job."""
from __future__ import annotations

import argparse
import sys


def _not_yet(args) -> int:
    print(f"ros-ot-fusion {args.command}: not yet implemented", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ros-ot-fusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("bag-info", help="list a bag's topics, types and message counts")
    info.add_argument("bag")
    info.set_defaults(run=_bag_info)
    for name in ("node", "replay", "process-bag", "simulate", "demo"):
        sub.add_parser(name, help="(coming)").set_defaults(run=_not_yet)
    return parser


def _bag_info(args) -> int:
    from ros_ot_fusion.io.bag import bag_topics

    for topic, (msgtype, count) in sorted(bag_topics(args.bag).items()):
        print(f"{topic:40s} {msgtype:40s} {count}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, _ros_args = build_parser().parse_known_args(argv)
    return args.run(args)


def node_main() -> int:
    return main(["node", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
