"""One frame of the node, without DDS: messages in, messages out.

    decode -> check -> align (OT) -> accept / smooth -> fuse -> encode

The node calls `Pipeline.process` from its worker thread and `process-bag` calls it over a bag,
so both run exactly the same code. `process` never raises for bad input: it says what happened
in `FrameOutput.level` / `.message` and keeps the last good extrinsic.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ros_ot_fusion import params as P
from ros_ot_fusion.fusion.align import Aligner, AlignConfig, AlignState
from ros_ot_fusion.fusion.fuse import fuse
from ros_ot_fusion.io import pointcloud2 as pc2
from ros_ot_fusion.io.transform_msg import matrix_to_msg
from ros_ot_fusion.transforms import pose_error, pose_to_matrix, transform_points

OK, WARN, ERROR = 0, 1, 2
FUTURE_TOLERANCE_NS = 1_000_000_000     # stamps this far ahead of the node's clock are suspect
log = logging.getLogger(__name__)


@dataclass
class FrameOutput:
    fused: object | None = None          # sensor_msgs/PointCloud2 (LiDAR frame)
    extrinsic: object | None = None      # geometry_msgs/TransformStamped (LiDAR <- camera)
    level: int = OK                      # diagnostic_msgs/DiagnosticStatus level
    message: str = ""
    stats: dict = field(default_factory=dict)


def pick_device(name: str) -> tuple[torch.device, str]:
    """The torch device for the `device` parameter, and a warning when the wish cannot be met."""
    if name in ("auto", "cuda"):
        try:
            if torch.cuda.is_available():
                torch.zeros(1, device="cuda")           # a broken driver fails here, not mid-frame
                return torch.device("cuda"), ""
        except Exception as exc:                         # noqa: BLE001 - any CUDA failure means CPU
            return torch.device("cpu"), f"CUDA unusable ({exc}); running on the CPU"
        if name == "cuda":
            return torch.device("cpu"), "device=cuda but no CUDA device is available; running on the CPU"
    return torch.device("cpu"), ""


class Pipeline:
    """Per-frame fusion with the state one sensor pair carries between frames."""

    def __init__(self, params: dict):
        self.params = P.validate(params)
        self.device, self.device_warning = pick_device(self.params["device"])
        self.prior = pose_to_matrix(self.params["prior_extrinsic"])
        self.aligner = Aligner(AlignConfig.from_params(self.params), self.device)
        self.reset()

    def reset(self) -> None:
        """Forget the warm start and the estimate (a new drive, a bag loop)."""
        self.state: AlignState | None = None
        self.estimate: np.ndarray | None = None    # the last accepted estimate (published)
        self.last_stamp_ns = -1

    def warm_up(self, points: int = 200_000) -> FrameOutput:
        """One synthetic frame through every stage, then the state is reset. On the GPU the first
        frame of a process loads the kernels and captures the graphs: 1.5 s on an H200, where a
        cold frame takes 60 ms after; the node does this before it subscribes, so that its first
        sweeps are not dropped behind it. The scene: a room (floor, two walls, end wall) in
        front of the camera, sampled `points` times for the camera and half as often for the LiDAR,
        which sees it through the prior (sizes like a real frame's: the same graphs)."""
        from ros_ot_fusion.sync import header

        gen = torch.Generator().manual_seed(0)

        def room(n: int) -> torch.Tensor:
            """Camera optical frame (x right, y down, z forward): floor, walls at x = +-5, end wall."""
            a, b = torch.rand(2, n, generator=gen)
            one = torch.ones_like(a)
            sides = torch.stack([torch.stack([10 * a - 5, 1.5 * one, 2 + 16 * b], 1),
                                 torch.stack([-5 * one, 6 * a - 4.5, 2 + 16 * b], 1),
                                 torch.stack([5 * one, 6 * a - 4.5, 2 + 16 * b], 1),
                                 torch.stack([10 * a - 5, 6 * b - 4.5, 18 * one], 1)])
            pick = torch.randint(0, 4, (n,), generator=gen)
            return sides[pick, torch.arange(n)] + 0.01 * torch.randn(n, 3, generator=gen)

        camera = room(points)
        lidar = torch.as_tensor(transform_points(self.prior, room(points // 2)), dtype=torch.float32)
        rgb = (camera.abs() * 40 % 256).to(torch.uint8)
        frames = self.params["lidar_frame"] or "lidar", self.params["camera_frame"] or "camera"
        out = self.process(pc2.encode(header(frames[0], 0), lidar, intensity=torch.ones(len(lidar))),
                           pc2.encode(header(frames[1], 0), camera, rgb=rgb))
        self.reset()
        return out

    def set_params(self, changes: dict) -> None:
        """Apply run-time changes (raises ValueError, changing nothing, when any is invalid)."""
        for name in changes:
            if name in P.BY_NAME and P.BY_NAME[name].read_only:
                raise ValueError(f"{name} is read-only while running")
        params = P.validate({**self.params, **changes})
        self.params = params
        self.aligner.config = AlignConfig.from_params(params)
        if "prior_extrinsic" in changes:
            self.prior = pose_to_matrix(params["prior_extrinsic"])
            self.reset()

    @property
    def extrinsic(self) -> np.ndarray:
        """The transform published now: the last accepted estimate, or the prior before one."""
        return self.estimate if self.estimate is not None else self.prior

    def process(self, lidar_msg, camera_msg=None, now_ns: int | None = None) -> FrameOutput:
        """One frame. `now_ns`, the node's clock, lets stamps from the future be flagged (such a
        frame is fused but does not become the reference that later stamps must follow)."""
        try:
            return self._process(lidar_msg, camera_msg, now_ns)
        except torch.cuda.OutOfMemoryError:
            # this frame is lost; the next ones run on half the points (the warm start goes too)
            torch.cuda.empty_cache()
            budget = max(int(P.BY_NAME["max_points"].low), self.aligner.config.max_points // 2)
            self.params["max_points"] = self.aligner.config.max_points = budget
            self.state = None
            return self._fail(FrameOutput(stats={"device": self.device.type}), WARN,
                              f"GPU out of memory: frame skipped, point budget lowered to {budget}")

    def _process(self, lidar_msg, camera_msg, now_ns) -> FrameOutput:
        t0 = time.perf_counter()
        out = FrameOutput(stats={"device": self.device.type})
        try:
            lidar = pc2.decode_to(lidar_msg, self.device)
        except pc2.PointCloudError as exc:
            return self._fail(out, ERROR, f"malformed LiDAR message: {exc}")
        camera, note = None, ""
        if camera_msg is not None:
            try:
                camera = pc2.decode_to(camera_msg, self.device)
            except pc2.PointCloudError as exc:
                note = f"malformed camera message: {exc}"
        p = self.params
        if p["lidar_frame"] and lidar.frame_id != p["lidar_frame"]:
            return self._fail(out, ERROR, f"LiDAR frame_id {lidar.frame_id!r} is not {p['lidar_frame']!r}")
        if camera is not None and p["camera_frame"] and camera.frame_id != p["camera_frame"]:
            camera, note = None, f"camera frame_id {camera.frame_id!r} is not {p['camera_frame']!r}"
        if len(lidar) == 0:
            return self._fail(out, ERROR, "LiDAR cloud has no valid points")
        if now_ns and lidar.stamp_ns > now_ns + FUTURE_TOLERANCE_NS:
            note = f"stamp {(lidar.stamp_ns - now_ns) / 1e9:.1f} s ahead of the clock"
        else:
            if lidar.stamp_ns < self.last_stamp_ns:
                self.reset()
                note = "stamps went backwards: warm start reset"
            self.last_stamp_ns = lidar.stamp_ns
        out.stats.update(lidar_points=len(lidar), camera_points=len(camera) if camera is not None else 0,
                         decode_ms=_ms(t0))

        t1 = time.perf_counter()
        alignment = None
        level, message = OK, "aligned"
        if camera is None or len(camera) == 0:
            level, message = WARN, note or "no camera cloud: LiDAR only"
        else:
            alignment, level, message, stats = self._align(lidar, camera)
            out.stats.update(stats)
            if note:
                level, message = max(level, WARN), f"{message}; {note}"
        out.stats["align_ms"] = _ms(t1)

        t2 = time.perf_counter()
        T = self.extrinsic
        columns = fuse(self.aligner, lidar.xyz, lidar.intensity, None if camera is None else camera.xyz,
                       None if camera is None else camera.rgb, T, alignment, p["fused_content"])
        out.stats["fuse_ms"] = _ms(t2)

        t3 = time.perf_counter()
        header = lidar_msg.header
        out.fused = pc2.encode(header, columns["xyz"], rgb=columns["rgb"], intensity=columns["intensity"],
                               extra={"confidence": columns["confidence"]})
        out.extrinsic = matrix_to_msg(T, header, camera.frame_id if camera is not None and camera.frame_id
                                      else (p["camera_frame"] or "camera"))
        out.stats["encode_ms"] = _ms(t3)
        out.stats["total_ms"] = _ms(t0)
        out.level, out.message = level, message
        return out

    def _align(self, lidar, camera):
        """Align one frame; accept, smooth or refuse the estimate.
        Returns (alignment for fusing or None, level, message, stats)."""
        p = self.params
        try:
            a = self.aligner.align(lidar.xyz, camera.xyz, camera.rgb, state=self.state, prior=self.prior)
        except torch.cuda.OutOfMemoryError:
            raise                                        # process() shrinks the budget
        except (FloatingPointError, RuntimeError, ValueError) as exc:
            self.state = None
            return None, ERROR, f"alignment failed ({exc}); keeping the last extrinsic", {}
        stats = {"iterations": a.iterations, "solves": len(a.steps)}
        if a.steps:
            last = a.steps[-1]
            stats.update(marginal_error=last["marginal_error"], residual_m=last["residual_m"],
                         matched=last["matched"], conditioning=last["conditioning"], eps=last["eps"])
        if not a.ok:
            self.state = None
            return a if a.result is not None else None, WARN, f"{a.reason}; keeping the last extrinsic", stats
        rot, trans = pose_error(a.T, self.prior)
        if rot > p["max_correction_deg"] or trans > p["max_correction_m"]:
            self.state = None
            return None, WARN, (f"estimate {rot:.2f} deg / {trans:.3f} m from the prior exceeds the limits; "
                                f"keeping the last extrinsic"), stats
        self.state = a.state
        self.estimate = a.T           # already fused with the earlier frames' information (align.py)
        return a, OK, "aligned", stats

    def _fail(self, out: FrameOutput, level: int, message: str) -> FrameOutput:
        out.level, out.message = level, message
        return out


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
