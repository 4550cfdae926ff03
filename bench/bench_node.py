"""The live node under sustained load over DDS: soak, burst and per-frame latency.

    python bench/bench_node.py --minutes 10 [--hz 20] [--burst 5 --burst-s 10 --recover-s 60]
                               [--beams 128 --width 640 --height 480] [--device auto]
                               [-p NAME:=VALUE ...] [--out build/soak]

A drive of the analytic street (`scene.py`, `--bag-frames` frames at `--hz`) is written to a bag
with a prior off by 1 deg / 5 cm; the node runs in its own process (`ros-ot-fusion node`) and
`ros-ot-fusion replay --loop --restamp` feeds it (stamps of the time of playing, so the loops
and phases are one continuous drive): `--minutes` at `--hz`, then `--burst-s` at `--burst` times
that rate, then `--recover-s` at `--hz` again.

Measured, from outside the node:
- per processed frame, from the node's /diagnostics (it publishes one after every frame): latency
  from the sweep's receipt to the fused cloud's publication, the processing time, the queue wait;
- once a second: the node process's resident memory (/proc/PID/status), the GPU memory torch
  holds (diagnostics `gpu_memory_mb`), sweeps received, frames processed and dropped, queue length;
- sweeps the replay sent against sweeps the node received (lost in transport);
- end to end, as a consumer of the node sees it: a subscriber here receives every fused cloud
  (unless --no-subscriber) and takes its age, now minus the stamp that the replay gave the sweep
  when it played it (one clock: the same machine). This includes both DDS hops, which the
  node's own latency does not: the time before its callback ran and the fused cloud's transport.

Printed: a table per window, a summary (memory growth, latency p50/p99 per phase, drops); written:
`soak.json` and `soak.png` in `--out`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import scene  # noqa: E402

from ros_ot_fusion import transforms as tf  # noqa: E402

STATUS = "ros_ot_fusion: fusion"


def write_drive(out: Path, frames: int, hz: float, size: dict) -> Path:
    """The analytic street as a bag (LiDAR + camera clouds) and its params file; the bag path."""
    from ros_ot_fusion.io import pointcloud2 as pc2
    from ros_ot_fusion.io.bag import BagWriter
    from ros_ot_fusion.sync import header

    bag = out / "drive"
    if bag.exists():
        import shutil

        shutil.rmtree(bag)
    t0 = 1_700_000_000 * 10**9
    with BagWriter(bag) as writer:
        for k in range(frames):
            lidar, camera, rgb = scene.sensor_frame(k, speed=10.0 / hz, **size)   # 10 m/s
            stamp = t0 + int(k * 1e9 / hz)
            writer.write("/lidar/points", pc2.encode(header("lidar", stamp), lidar.numpy(),
                                                      intensity=np.ones(len(lidar), np.float32)), stamp)
            writer.write("/camera/points", pc2.encode(header("camera", stamp), camera.numpy(), rgb=rgb.numpy()),
                         stamp)
    prior = tf.make_transform(tf.axis_angle_to_matrix([1, 2, 3], math.radians(1.0)) @ scene.TRUTH[:3, :3],
                              scene.TRUTH[:3, 3] + [0.03, -0.04, 0.0])
    pose = ", ".join(repr(float(v)) for v in tf.matrix_to_pose(prior))
    (out / "drive.params.yaml").write_text(f"ros_ot_fusion:\n  ros__parameters:\n    prior_extrinsic: [{pose}]\n")
    print(f"drive: {frames} frames, {len(lidar)} LiDAR + {len(camera)} camera points a frame -> {bag}",
          file=sys.stderr)
    return bag


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024
    except (OSError, AttributeError):
        return math.nan


def _cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "ros_ot_fusion.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def run(args) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from ros_ot_fusion.replay import cdr_stamp_ns

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = dict(beams=args.beams, steps=args.steps, width=args.width, height=args.height)
    bag = write_drive(out, args.bag_frames, args.hz, size)
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", FASTDDS_BUILTIN_TRANSPORTS="LARGE_DATA",
               PYTHONUNBUFFERED="1", ROS_DOMAIN_ID=str(args.domain))
    os.environ.update(ROS_DOMAIN_ID=str(args.domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                      FASTDDS_BUILTIN_TRANSPORTS="LARGE_DATA")
    node_args = ["node", "--ros-args", "--params-file", str(out / "drive.params.yaml"),
                 "-p", f"qos_reliability:={args.qos}", "-p", f"device:={args.device}"]
    for item in args.p:
        node_args += ["-p", item]
    (out / "node.log").write_text("")
    (out / "replay.log").write_text("")
    node = _cli(node_args, env, out / "node.log")

    rclpy.init()
    rec = rclpy.create_node("ros_ot_fusion_soak_recorder")
    frames, latest = [], {}

    def on_diagnostics(msg):
        for status in msg.status:
            if status.name != STATUS:
                continue
            values = {kv.key: kv.value for kv in status.values}
            latest.update(values)
            n = int(values.get("frames_processed", 0))
            if n and (not frames or n > frames[-1]["n"]):
                frames.append({"n": n, "t": time.monotonic(), "latency_ms": float(values["pipeline_latency_ms"]),
                               **{k: float(values.get(k, "nan")) for k in ("decode_ms", "align_ms", "fuse_ms",
                                                                          "encode_ms", "gc_ms", "iterations")},
                               "processing_ms": float(values["processing_time_ms"]),
                               "sync_wait_ms": float(values.get("sync_wait_ms", "nan")),
                               "queue_wait_ms": float(values["queue_wait_ms"]), "level": status.level[0],
                               "message": status.message})
    rec.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics,
                            QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
    delivered = []

    def on_fused(data: bytes) -> None:
        # the fused cloud carries the sweep's header, stamped by the replay when it was played
        delivered.append({"t": time.monotonic(), "e2e_ms": (time.time_ns() - cdr_stamp_ns(data)) / 1e6})
    if not args.no_subscriber:
        rec.create_subscription(PointCloud2, "/ros_ot_fusion/fused", on_fused,
                                QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE), raw=True)

    def spin(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rclpy.spin_once(rec, timeout_sec=min(0.05, max(0.0, end - time.monotonic())))

    deadline = time.monotonic() + 120
    while not latest and time.monotonic() < deadline and node.poll() is None:
        spin(0.2)
    if not latest:
        raise SystemExit(f"the node did not come up; see {out / 'node.log'}")

    phases = [("steady", args.hz, args.minutes * 60), ("burst", args.hz * args.burst, args.burst_s),
              ("recovery", args.hz, args.recover_s)]
    samples, phase_spans, sent = [], [], 0
    t_start = time.monotonic()
    for name, hz, seconds in phases:
        if seconds <= 0:
            continue
        player = _cli(["replay", str(bag), "--loop", "--restamp", "--rate", f"{hz / args.hz:g}",
                       "--topics", "/lidar/points", "/camera/points", "--start-delay", "5"], env, out / "replay.log")
        begin = time.monotonic()
        print(f"[{begin - t_start:7.1f} s] {name}: {hz:g} Hz for {seconds:g} s", file=sys.stderr)
        while time.monotonic() - begin < seconds and node.poll() is None:
            spin(1.0)
            s = {"t": time.monotonic() - t_start, "phase": name, "rss_mb": rss_mb(node.pid),
                 "gpu_mb": float(latest.get("gpu_memory_mb", "nan")),
                 **{k: int(latest.get(k, 0)) for k in ("lidar_received", "frames_processed", "frames_dropped",
                                                        "frames_without_camera", "frames_paired_late",
                                                        "frames_with_error", "queue_length")}}
            samples.append(s)
            if len(samples) % 30 == 0:
                print(f"[{s['t']:7.1f} s] rss {s['rss_mb']:.0f} MB  gpu {s['gpu_mb']:.0f} MB  received "
                      f"{s['lidar_received']}  processed {s['frames_processed']}  dropped {s['frames_dropped']}",
                      file=sys.stderr)
        player.send_signal(signal.SIGINT)
        player.wait(timeout=30)
        phase_spans.append((name, begin - t_start, time.monotonic() - t_start))
        log = (out / "replay.log").read_text()
        counts = re.findall(r"(?:interrupted after|done,) (\d+) messages", log)
        sent = sum(int(c) for c in counts) // 2         # two topics, one of each per frame
    spin(5.0)                                           # the frames still in flight
    node.send_signal(signal.SIGINT)
    try:
        exit_code = node.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.kill()
        exit_code = "killed"
    rec.destroy_node()
    rclpy.shutdown()
    for f in frames + delivered:
        f["t"] -= t_start
    return {"args": vars(args), "frames": frames, "delivered": delivered, "samples": samples, "phases": phase_spans,
            "sweeps_sent": sent, "final": latest, "node_exit": exit_code,
            "points": {"lidar": int(latest.get("lidar_points", 0)), "camera": int(latest.get("camera_points", 0))}}


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def report(result: dict, window_s: float) -> str:
    frames, samples = result["frames"], result["samples"]
    lines = ["| window s | phase | sweeps received | processed | dropped (queue) | latency p50 / p99 ms | "
             "processing p50 ms | RSS MB | GPU MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    prev = {"lidar_received": 0, "frames_processed": 0, "frames_dropped": 0}
    end = samples[-1]["t"] if samples else 0
    for lo in np.arange(0, end, window_s):
        inside = [s for s in samples if lo <= s["t"] < lo + window_s]
        if not inside:
            continue
        last = inside[-1]
        lat = [f["latency_ms"] for f in frames if lo <= f["t"] < lo + window_s]
        proc = [f["processing_ms"] for f in frames if lo <= f["t"] < lo + window_s]
        delta = {k: last[k] - prev[k] for k in prev}
        prev = {k: last[k] for k in prev}
        lines.append(f"| {lo:.0f}-{lo + window_s:.0f} | {last['phase']} | {delta['lidar_received']} | "
                     f"{delta['frames_processed']} | {delta['frames_dropped']} | {pct(lat, 50):.1f} / "
                     f"{pct(lat, 99):.1f} | {pct(proc, 50):.1f} | {last['rss_mb']:.0f} | {last['gpu_mb']:.0f} |")
    final = result["final"]
    steady = [s for s in samples if s["phase"] == "steady"]
    rss = [s["rss_mb"] for s in steady]
    lines.append("")
    if len(rss) > 120:
        first_min = np.median(rss[60:120])
        lines.append(f"resident memory: {first_min:.0f} MB in minute 2, {np.median(rss[-60:]):.0f} MB in the "
                     f"last minute of the steady phase, max {max(s['rss_mb'] for s in samples):.0f} MB")
    gpu = [s["gpu_mb"] for s in samples if not math.isnan(s["gpu_mb"])]
    if gpu:
        lines.append(f"GPU memory held by torch: {gpu[len(gpu) // 10]:.0f} MB early, {gpu[-1]:.0f} MB at the end, "
                     f"max {max(gpu):.0f} MB")
    for name, lo, hi in result["phases"]:
        lat = [f["latency_ms"] for f in frames if lo <= f["t"] < hi]
        lines.append(f"{name}: {len(lat)} frames processed, latency receipt -> publish p50 {pct(lat, 50):.1f} ms, "
                     f"p99 {pct(lat, 99):.1f} ms, max {max(lat, default=math.nan):.1f} ms")
        e2e = [f["e2e_ms"] for f in result["delivered"] if lo <= f["t"] < hi]
        if e2e:
            lines.append(f"{name}: {len(e2e)} fused clouds received by a subscriber, end to end (played -> "
                         f"received) p50 {pct(e2e, 50):.1f} ms, p99 {pct(e2e, 99):.1f} ms, max {max(e2e):.1f} ms")
    stages = {k: pct([f[k] for f in frames if not math.isnan(f.get(k, math.nan))], 50)
              for k in ("sync_wait_ms", "queue_wait_ms", "decode_ms", "align_ms", "fuse_ms", "encode_ms", "gc_ms",
                        "processing_ms")}
    lines.append("per frame, p50 ms: " + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in stages.items()))
    received = int(final.get("lidar_received", 0))
    lines.append(f"sweeps sent {result['sweeps_sent']}, received by the node {received}, processed "
                 f"{final.get('frames_processed')}, dropped by its queue {final.get('frames_dropped')} "
                 f"(largest queue seen {max((s['queue_length'] for s in samples), default=0)}), without camera "
                 f"{final.get('frames_without_camera')}, paired with a camera cloud that came while queued "
                 f"{final.get('frames_paired_late')}, with error {final.get('frames_with_error')}; "
                 f"node exit {result['node_exit']}")
    lines.append(f"points a frame: {result['points']['lidar']} LiDAR + {result['points']['camera']} camera")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, samples = result["frames"], result["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    t = np.array([f["t"] for f in frames])
    lat = np.array([f["latency_ms"] for f in frames])
    axes[0].plot(t, lat, ".", ms=2, alpha=0.4, label="per frame")
    if len(t):
        edges = np.arange(0, t.max() + 30, 30)
        mids, p50, p99 = [], [], []
        for lo in edges[:-1]:
            sel = lat[(t >= lo) & (t < lo + 30)]
            if len(sel):
                mids.append(lo + 15)
                p50.append(np.percentile(sel, 50))
                p99.append(np.percentile(sel, 99))
        axes[0].plot(mids, p50, "-o", label="p50 (30 s)")
        axes[0].plot(mids, p99, "-o", label="p99 (30 s)")
    axes[0].set_ylabel("latency receipt -> publish (ms)")
    axes[0].set_yscale("log")
    axes[0].legend(loc="upper right")
    ts = [s["t"] for s in samples]
    axes[1].plot(ts, [s["rss_mb"] for s in samples], label="node resident memory")
    if any(not math.isnan(s["gpu_mb"]) for s in samples):
        axes[1].plot(ts, [s["gpu_mb"] for s in samples], label="GPU memory (torch reserved)")
    axes[1].set_ylabel("MB")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(loc="lower right")
    for key, label in (("lidar_received", "sweeps received"), ("frames_processed", "processed"),
                       ("frames_dropped", "dropped by the queue")):
        axes[2].plot(ts, [s[key] for s in samples], label=label)
    axes[2].set_ylabel("frames (cumulative)")
    axes[2].set_xlabel("time (s)")
    axes[2].legend(loc="upper left")
    for ax in axes:
        for name, lo, hi in result["phases"]:
            if name == "burst":
                ax.axvspan(lo, hi, color="red", alpha=0.15)
    p = result["points"]
    fig.suptitle(f"ros_ot_fusion node, {result['args']['hz']:g} Hz ({result['args']['burst']:g}x burst shaded), "
                 f"{p['lidar']} + {p['camera']} points a frame, device {result['final'].get('device', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="steady phase (min)")
    ap.add_argument("--hz", type=float, default=20.0)
    ap.add_argument("--burst", type=float, default=5.0, help="burst rate, times --hz")
    ap.add_argument("--burst-s", type=float, default=10.0)
    ap.add_argument("--recover-s", type=float, default=60.0)
    ap.add_argument("--bag-frames", type=int, default=40)
    ap.add_argument("--beams", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1024, help="LiDAR azimuth steps")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--qos", default="reliable", choices=("reliable", "best_effort"))
    ap.add_argument("-p", action="append", default=[], metavar="NAME:=VALUE", help="a node parameter")
    ap.add_argument("--window", type=float, default=60.0, help="table window (s)")
    ap.add_argument("--no-subscriber", action="store_true",
                    help="no subscriber to the fused cloud (the node publishes to no reader)")
    ap.add_argument("--domain", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "43")))
    ap.add_argument("--out", default="build/soak")
    args = ap.parse_args()
    result = run(args)
    out = Path(args.out)
    (out / "soak.json").write_text(json.dumps(result))
    text = report(result, args.window)
    (out / "soak.md").write_text(text + "\n")
    print(text)
    plot(result, out / "soak.png")
    print(f"\nwritten: {out / 'soak.json'}, {out / 'soak.md'}, {out / 'soak.png'}")


if __name__ == "__main__":
    main()
