"""Every parameter of the fusion pipeline, in one table: name, default, range, meaning.

The node declares them from this table (descriptors with ranges, read-only where a change needs
a restart), `process-bag` reads the same names from a ROS 2 params file, and
`config/fusion.yaml` documents them (a test keeps the two in step). `validate` gives every reason
a set of values is wrong, so a bad params file or a bad `ros2 param set` is refused with words.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

NODE_NAME = "ros_ot_fusion"


@dataclass(frozen=True)
class Param:
    name: str
    default: object
    description: str
    low: float | None = None            # inclusive numeric range (numbers and number lists)
    high: float | None = None
    choices: tuple | None = None        # allowed strings
    read_only: bool = False             # fixed once the node runs (topics, QoS, device)


PARAMS: tuple[Param, ...] = (
    # inputs, QoS, synchronisation
    Param("lidar_topic", "/lidar/points", "LiDAR PointCloud2 topic", read_only=True),
    Param("camera_topic", "/camera/points", "camera PointCloud2 topic (camera frame, x y z rgb)", read_only=True),
    Param("qos_reliability", "best_effort", "subscription reliability (sensor data QoS is best effort)",
          choices=("best_effort", "reliable"), read_only=True),
    Param("qos_depth", 5, "subscription history depth", 1, 100, read_only=True),
    Param("sync_slop_s", 0.05, "largest stamp difference of a LiDAR/camera pair (s)", 0.0, 1.0),
    Param("sync_wait_s", 0.1, "how long (wall time) a sweep waits for its camera cloud after its own arrival "
          "or the last camera cloud's, whichever is later; never longer than camera_timeout_s (s)", 0.0, 2.0),
    Param("queue_size", 2, "frames waiting for the solver; the oldest is dropped (and counted)", 1, 10),
    Param("lidar_frame", "", "expected LiDAR frame_id ('' accepts the message's)"),
    Param("camera_frame", "", "expected camera frame_id ('' accepts the message's)"),
    Param("camera_timeout_s", 1.0, "camera silent this long: LiDAR-only output and a WARN (s)", 0.05, 60.0),
    Param("camera_silent_output", "lidar_only", "what to publish while the camera is silent",
          choices=("lidar_only", "none")),
    # geometry
    Param("prior_extrinsic", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
          "prior camera->LiDAR transform [x y z qx qy qz qw]: p_lidar = R p_camera + t"),
    Param("min_range_m", 0.5, "points nearer than this to their sensor are dropped (m)", 0.0, 100.0),
    Param("max_range_m", 80.0, "points farther than this from their sensor are dropped (m)", 1.0, 1000.0),
    Param("camera_max_range_m", 20.0, "camera points farther than this are not used for alignment "
          "(depth noise grows with range) (m)", 1.0, 1000.0),
    Param("lidar_voxel_m", 0.25, "LiDAR voxel size for alignment (m)", 0.01, 5.0),
    Param("camera_voxel_m", 0.2, "camera voxel size for alignment (m)", 0.01, 5.0),
    Param("normal_radius_m", 0.4, "neighbourhood for the camera surface normals (m)", 0.05, 10.0),
    Param("max_points", 8000, "point budget per cloud for alignment (subsampled above it)", 100, 2000000),
    Param("crop_margin_m", 1.0, "LiDAR kept this far beyond the camera's view when cropping (m)", 0.0, 50.0),
    Param("camera_range_margin_m", 2.0, "LiDAR points used for alignment only this much nearer than "
          "camera_max_range_m: near the camera's range cut its noisy surfaces are one-sided, since points "
          "pushed past the cut by depth noise are gone, and pull the targets toward the camera; 0: no range cut (m)",
          0.0, 100.0),
    # solver
    Param("pyramid_voxel_sizes", [2.0, 0.5], "coarse solver levels, voxel sizes coarse->fine (m)", 0.01, 100.0),
    Param("eps_schedule", [0.25, 0.0025],
          "entropic blur schedule [start, final] (m^2): annealed by eps_scaling per alignment step", 1e-6, 100.0),
    Param("eps_scaling", 0.25, "ratio between successive eps of the schedule (a cold frame's alignment steps: "
          "0.25 gives 5 steps from 0.25 to 0.0025, where 0.5 gave 8, for the same accuracy)", 0.05, 0.95),
    Param("rho", 0.05, "KL marginal penalty (m^2); smaller lets more unmatched points go", 1e-4, 100.0),
    Param("tol", 1e-3, "marginal error (L1) at which each Sinkhorn solve stops", 1e-6, 1.0),
    Param("max_iter", 300, "Sinkhorn iterations per solve at most", 10, 100000),
    Param("rigid_steps", 3, "most alignment steps (solve + rigid update) at the final eps; a warm frame "
          "stops after a step that moves the camera by under 2 mm", 1, 50),
    Param("warm_start", True, "start each frame from the last one's transform, eps and potentials"),
    Param("device", "auto", "compute device (auto: CUDA when available)", choices=("auto", "cuda", "cpu"),
          read_only=True),
    Param("precision", "fp32", "solver precision", choices=("fp32",)),
    # output
    Param("fused_content", "both", "fused cloud: LiDAR points, camera points moved to the LiDAR frame, or both",
          choices=("both", "lidar", "camera")),
    Param("smoothing", True, "fuse each frame's constraints with those of earlier frames (the extrinsic "
          "changes slowly; one frame pins some directions down poorly)"),
    Param("smoothing_alpha", 0.2, "how fast earlier frames are forgotten: their information decays by "
          "(1 - smoothing_alpha) per frame", 0.01, 1.0),
    Param("max_correction_deg", 15.0, "estimates farther than this from the prior are refused (deg)", 0.1, 180.0),
    Param("max_correction_m", 1.0, "estimates farther than this from the prior are refused (m)", 0.01, 100.0),
)

BY_NAME = {p.name: p for p in PARAMS}


def defaults() -> dict:
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default) for p in PARAMS}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def check(name: str, value) -> str | None:
    """Why `value` is not acceptable for parameter `name`, or None when it is."""
    p = BY_NAME.get(name)
    if p is None:
        return f"unknown parameter {name!r}"
    want, got = _kind(p.default), _kind(value)
    if want != got or (isinstance(p.default, int) and not isinstance(p.default, bool)
                       and isinstance(value, float) and not value.is_integer()):
        label = "an integer" if isinstance(p.default, int) and want == "number" else _LABELS[want]
        return f"{name} must be {label}, got {value!r}"
    if p.choices is not None and value not in p.choices:
        return f"{name} must be one of {', '.join(p.choices)}, got {value!r}"
    numbers = list(value) if want == "list" else [value] if want == "number" else []
    if want == "list":
        if any(_kind(v) != "number" for v in numbers):
            return f"{name} must hold numbers, got {value!r}"
        if isinstance(p.default, list) and name in _LENGTHS and len(numbers) != _LENGTHS[name]:
            return f"{name} must hold {_LENGTHS[name]} numbers, got {len(numbers)}"
        if not numbers and name != "pyramid_voxel_sizes":
            return f"{name} must not be empty"
    for v in numbers:
        if not math.isfinite(v):
            return f"{name} must be finite, got {value!r}"
        if (p.low is not None and v < p.low) or (p.high is not None and v > p.high):
            return f"{name} must lie in [{p.low:g}, {p.high:g}], got {v!r}"
    if name == "prior_extrinsic" and math.sqrt(sum(q * q for q in numbers[3:])) < 1e-6:
        return "prior_extrinsic: the quaternion [qx qy qz qw] must not be zero"
    return None


_LABELS = {"bool": "true or false", "number": "a number", "str": "a string", "list": "a list"}
_LENGTHS = {"prior_extrinsic": 7, "eps_schedule": 2}


def validate(params: dict) -> dict:
    """All parameters (defaults filled in), or ValueError listing every reason they are wrong."""
    values = defaults()
    values.update({k: v for k, v in params.items() if k != "use_sim_time"})   # rclpy's own
    reasons = [r for r in (check(k, v) for k, v in values.items()) if r]
    if not reasons:
        start, final = values["eps_schedule"]
        if start < final:
            reasons.append(f"eps_schedule must not increase: [{start:g}, {final:g}]")
        if values["min_range_m"] >= values["max_range_m"]:
            reasons.append("min_range_m must be under max_range_m")
    if reasons:
        raise ValueError("; ".join(reasons))
    if isinstance(values["max_points"], float):
        values["max_points"] = int(values["max_points"])
    return values


def overrides(items: list[str]) -> dict:
    """`-p NAME:=VALUE` command-line overrides as a dict, each value read as YAML (1.0, [1, 2], true)."""
    import yaml

    out = {}
    for item in items:
        name, sep, value = item.partition(":=")
        if not sep:
            raise ValueError(f"-p wants NAME:=VALUE, got {item!r}")
        out[name] = yaml.safe_load(value)
    return out


def load_params_file(path: str | Path, node_name: str = NODE_NAME) -> dict:
    """The `ros__parameters` of `node_name` (or of `/**`) in a ROS 2 params YAML file."""
    import yaml

    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a ROS 2 params file (a mapping of node names)")
    found = {}
    # wildcards first, then the node's own keys: "ros_ot_fusion", "/ros_ot_fusion", "/**/ros_ot_fusion"
    keys = ["/**"] + [k for k in doc if k != "/**" and str(k).lstrip("/").split("/")[-1] == node_name]
    for key in keys:
        section = doc.get(key)
        if isinstance(section, dict):
            found.update(section.get("ros__parameters") or {})
    if not found and doc:
        raise ValueError(f"{path}: no ros__parameters for {node_name!r} or '/**'")
    return found
