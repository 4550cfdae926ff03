"""`ros-ot-fusion process-bag`: the node's pipeline over a bag, offline, bag -> bag.

Messages stream through in time order. A LiDAR sweep waits until the stream has moved `slop`
past its stamp (so a camera cloud stamped just after it still pairs with it), then goes through
`Pipeline.process`, the same code the node runs. Output: `/ros_ot_fusion/fused` and
`/ros_ot_fusion/extrinsic` per frame; a summary with latency percentiles and, when the bag has
`/calibration/ground_truth`, the extrinsic error of every frame.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from ros_ot_fusion.io.bag import BagWriter, bag_topics, read_bag
from ros_ot_fusion.pipeline import Pipeline
from ros_ot_fusion.sync import CameraBuffer, stamp_ns
from ros_ot_fusion.io.transform_msg import msg_to_matrix
from ros_ot_fusion.transforms import pose_error

GROUND_TRUTH = "/calibration/ground_truth"
FUSED, EXTRINSIC = "/ros_ot_fusion/fused", "/ros_ot_fusion/extrinsic"
STAGES = ("decode_ms", "align_ms", "fuse_ms", "encode_ms", "total_ms")


class Progress:
    """A one-line progress bar on a terminal; a line per 10% otherwise."""

    def __init__(self, total: int | None, stream=sys.stderr):
        self.total, self.stream, self.t0, self.shown = total, stream, time.monotonic(), -1

    def update(self, done: int, note: str = "") -> None:
        rate = done / max(time.monotonic() - self.t0, 1e-9)
        if self.stream.isatty():
            frac = done / self.total if self.total else 0
            bar = "#" * int(30 * frac)
            self.stream.write(f"\r[{bar:30s}] {done}/{self.total or '?'} frames  {rate:.1f} frames/s  {note:40.40s}")
            self.stream.flush()
        elif self.total and int(10 * done / self.total) > self.shown:
            self.shown = int(10 * done / self.total)
            self.stream.write(f"{done}/{self.total} frames, {rate:.2f} frames/s {note}\n")

    def close(self) -> None:
        if self.stream.isatty():
            self.stream.write("\n")


def process_bag(in_bag: str | Path, out_bag: str | Path | None, params: dict, storage: str = "mcap",
                progress: bool = True, on_frame=None, png: str | Path | None = None) -> dict:
    """Run the pipeline over `in_bag`; write `out_bag` (None: write nothing); return the summary.

    on_frame(lidar_msg, camera_msg, output, pipeline), if given, is called after every frame;
    png: a top view of the last frame with the camera cloud placed by the prior and by the estimate."""
    pipe = Pipeline(params)
    if out_bag is not None and Path(out_bag).exists():
        raise FileExistsError(f"{out_bag} exists; not overwriting it")
    p = pipe.params
    lidar_topic, camera_topic = p["lidar_topic"], p["camera_topic"]
    topics = bag_topics(in_bag)
    for needed in (lidar_topic, camera_topic):
        if needed not in topics:
            raise ValueError(f"{in_bag} has no {needed} (it has {', '.join(sorted(topics))})")
    slop = int(p["sync_slop_s"] * 1e9)
    cameras, pending = CameraBuffer(slop), deque()
    truth: dict[int, np.ndarray] = {}
    frames: list[dict] = []
    bar = Progress(topics[lidar_topic][1]) if progress else None
    writer = BagWriter(out_bag, storage) if out_bag is not None else None

    def run(lidar_msg) -> None:
        stamp = stamp_ns(lidar_msg)
        camera_msg = cameras.nearest(stamp)
        out = pipe.process(lidar_msg, camera_msg)
        row = {"stamp_ns": stamp, "level": out.level, "message": out.message, **out.stats}
        gt = truth.get(stamp, truth[max(truth)] if truth else None)     # else the latest
        if gt is not None and out.extrinsic is not None:
            row["rot_err_deg"], row["trans_err_m"] = pose_error(msg_to_matrix(out.extrinsic), gt)
        frames.append(row)
        if writer is not None:
            if out.fused is not None:
                writer.write(FUSED, out.fused, stamp)
            if out.extrinsic is not None:
                writer.write(EXTRINSIC, out.extrinsic, stamp)
        if on_frame is not None:
            on_frame(lidar_msg, camera_msg, out, pipe)
        if bar is not None:
            err = f"err {row['rot_err_deg']:.3f} deg {100 * row['trans_err_m']:.1f} cm" if "rot_err_deg" in row else ""
            bar.update(len(frames), err)

    last = {}
    if png is not None:
        user_hook = on_frame

        def on_frame(lidar_msg, camera_msg, out, pipe_):
            if camera_msg is not None:
                last.update(lidar=lidar_msg, camera=camera_msg, T=pipe_.extrinsic)
            if user_hook is not None:
                user_hook(lidar_msg, camera_msg, out, pipe_)

    try:
        if writer is not None:
            writer.__enter__()
        for topic, t_ns, msg in read_bag(in_bag, [lidar_topic, camera_topic, GROUND_TRUTH]):
            if topic == GROUND_TRUTH:
                truth[stamp_ns(msg)] = msg_to_matrix(msg)
                continue
            if topic == camera_topic:
                cameras.add(stamp_ns(msg), msg)
            else:
                pending.append(msg)
            while pending and t_ns > stamp_ns(pending[0]) + slop:
                run(pending.popleft())
        while pending:
            run(pending.popleft())
    finally:
        if writer is not None:
            writer.__exit__(None, None, None)
        if bar is not None:
            bar.close()
    summary = summarize(frames)
    if png is not None and last:
        summary["png"] = str(plot_last(png, last["lidar"], last["camera"], pipe.prior, last["T"], in_bag))
    return summary


def plot_last(path, lidar_msg, camera_msg, prior: np.ndarray, estimate: np.ndarray, name) -> Path:
    from ros_ot_fusion.io import pointcloud2 as pc2
    from ros_ot_fusion.transforms import transform_points
    from ros_ot_fusion.viz import plot_alignment

    lidar, camera = pc2.decode(lidar_msg).xyz, pc2.decode(camera_msg).xyz
    return plot_alignment(path, lidar, transform_points(prior, camera), transform_points(estimate, camera),
                          title=f"{Path(name).name}: camera cloud (orange) on the LiDAR cloud (grey), top view")


def report(summary: dict) -> str:
    """The summary as a few lines for a terminal."""
    lat = summary["latency_ms"]["total_ms"]
    lines = [f"frames: {summary['frames']} (ok {summary['levels']['ok']}, warn {summary['levels']['warn']}, "
             f"error {summary['levels']['error']})"]
    if lat:
        lines.append("latency ms p50/p95/p99: " + ", ".join(
            f"{s[:-3]} {v['p50']:.1f}/{v['p95']:.1f}/{v['p99']:.1f}" for s, v in summary["latency_ms"].items() if v))
    if summary["iterations"]:
        lines.append(f"Sinkhorn iterations per frame p50/p95: {summary['iterations']['p50']:.0f}/"
                     f"{summary['iterations']['p95']:.0f}")
    err = summary.get("error_after_first_second")
    if err:
        lines.append(f"extrinsic error after the first second ({err['frames']} frames): rotation median "
                     f"{err['rot_deg']['p50']:.3f} deg p95 {err['rot_deg']['p95']:.3f} deg, translation median "
                     f"{100 * err['trans_m']['p50']:.2f} cm p95 {100 * err['trans_m']['p95']:.2f} cm; "
                     f"within 0.5 deg / 5 cm: {100 * err['within_0.5deg_5cm']:.1f}%")
    if "png" in summary:
        lines.append(f"picture: {summary['png']}")
    return "\n".join(lines)


def _percentiles(values) -> dict:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {}
    return {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max())}


def summarize(frames: list[dict], settle_s: float = 1.0) -> dict:
    """Latency percentiles per stage, iterations, and extrinsic errors (all frames, and after the
    first `settle_s` of the drive)."""
    summary = {"frames": len(frames),
               "levels": {name: sum(f["level"] == lvl for f in frames) for lvl, name in enumerate(("ok", "warn", "error"))},
               "latency_ms": {s: _percentiles([f[s] for f in frames if s in f]) for s in STAGES},
               "iterations": _percentiles([f["iterations"] for f in frames if "iterations" in f])}
    with_err = [f for f in frames if "rot_err_deg" in f]
    if with_err:
        t0 = frames[0]["stamp_ns"]
        settled = [f for f in with_err if f["stamp_ns"] - t0 >= settle_s * 1e9] or with_err
        rot = np.array([f["rot_err_deg"] for f in settled])
        trans = np.array([f["trans_err_m"] for f in settled])
        summary["error_after_first_second"] = {
            "frames": len(settled),
            "rot_deg": _percentiles(rot), "trans_m": _percentiles(trans),
            "within_0.5deg_5cm": float(np.mean((rot <= 0.5) & (trans <= 0.05))),
        }
    summary["per_frame"] = frames
    return summary
