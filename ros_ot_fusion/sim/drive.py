"""A vehicle drives down the simulated street; each frame becomes LiDAR + camera messages in a bag.

Frames: world (x along the street, z up) -> base (vehicle, on the ground) -> lidar (roof,
x forward, y left, z up) -> camera (ROS optical: z forward, x right, y down). The camera
extrinsic is `lidar_T_camera`: p_lidar = R @ p_camera + t; its pose form is
[x, y, z, qx, qy, qz, qw] (see ros_ot_fusion.transforms).

The bag holds, per frame and all with the same stamp (header and bag time):
  /lidar/points              sensor_msgs/PointCloud2   frame `lidar`, fields x y z intensity
  /camera/points             sensor_msgs/PointCloud2   frame `camera`, fields x y z rgb
  /calibration/ground_truth  geometry_msgs/TransformStamped  lidar <- camera, the TRUE extrinsic
Beside it, `<bag>.params.yaml` gives the node a MISCALIBRATED prior: the truth rotated by
exactly `miscalib_deg` about a random axis and shifted by exactly `miscalib_m` in a random
direction (see `miscalibrate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ros_ot_fusion import transforms as tf
from ros_ot_fusion.io.transform_msg import matrix_to_msg
from ros_ot_fusion.sim.scene import Scene, ground_height
from ros_ot_fusion.sync import header
from ros_ot_fusion.sim.sensors import CameraConfig, DepthCamera, LidarConfig, SimCloud, SpinningLidar

EPOCH_NS = 1_700_000_000 * 1_000_000_000          # stamp of frame 0
LIDAR_HEIGHT = 1.9                                   # m above the ground, roof mount
OPTICAL_TO_BODY = np.array([[0.0, 0.0, 1.0],          # optical z (forward) -> x
                            [-1.0, 0.0, 0.0],         # optical x (right)   -> -y
                            [0.0, -1.0, 0.0]])        # optical y (down)    -> -z
TOPICS = {"lidar": "/lidar/points", "camera": "/camera/points", "truth": "/calibration/ground_truth"}


def true_extrinsic() -> np.ndarray:
    """lidar_T_camera as mounted: 25 cm ahead, 10 cm right, 35 cm below the LiDAR, looking
    forward, pitched 2° down, yawed 1° and rolled 0.5° (a real bracket is never square)."""
    tilt = tf.euler_to_matrix(np.radians(0.5), np.radians(2.0), np.radians(1.0))
    return tf.make_transform(tilt @ OPTICAL_TO_BODY, [0.25, -0.10, -0.35])


def miscalibrate(truth: np.ndarray, angle_deg: float, offset_m: float,
                 rng: np.random.Generator) -> np.ndarray:
    """A prior off from `truth` by exactly `angle_deg` and `offset_m`, in random directions.

    R_prior = R_delta @ R_truth (R_delta: angle_deg about a random unit axis) and
    t_prior = t_truth + offset_m · (random unit vector), so
    `tf.pose_error(prior, truth) == (angle_deg, offset_m)`.
    """
    axis, direction = rng.normal(size=3), rng.normal(size=3)
    R = tf.axis_angle_to_matrix(axis, np.radians(angle_deg)) @ truth[:3, :3]
    return tf.make_transform(R, truth[:3, 3] + offset_m * direction / np.linalg.norm(direction))


@dataclass
class DriveConfig:
    frames: int = 20
    seed: int = 0
    rate_hz: float = 10.0
    speed: float = 8.0                  # m/s along the street
    start_x: float = 10.0
    lane_y: float = -1.9                # right-hand lane
    weave_m: float = 0.4                # lateral weave amplitude (period 4 s), so frames differ
    miscalib_deg: float = 3.0
    miscalib_m: float = 0.15
    lidar: LidarConfig = field(default_factory=LidarConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    extrinsic: np.ndarray = field(default_factory=true_extrinsic)   # TRUE lidar_T_camera
    epoch_ns: int = EPOCH_NS


@dataclass
class Frame:
    index: int
    stamp_ns: int
    world_T_lidar: np.ndarray           # 4x4
    world_T_camera: np.ndarray          # 4x4 = world_T_lidar @ truth
    lidar: SimCloud                     # LiDAR frame
    camera: SimCloud                    # camera optical frame


class Drive:
    """The scene, the two sensors, the true and prior extrinsics, and the vehicle's path.

    `Drive(config).frame(k)` is frame k (reproducible on its own); iterate for all frames.
    """

    def __init__(self, config: DriveConfig | None = None, scene: Scene | None = None):
        self.config = c = config or DriveConfig()
        if c.frames < 1 or c.rate_hz <= 0 or c.miscalib_deg < 0 or c.miscalib_m < 0:
            raise ValueError("need frames >= 1, rate_hz > 0, miscalib_deg >= 0 and miscalib_m >= 0")
        street = max(200.0, c.start_x + c.speed * c.frames / c.rate_hz + 60.0)
        self.scene = scene or Scene(seed=c.seed, length=street)
        self.lidar, self.camera = SpinningLidar(c.lidar), DepthCamera(c.camera)
        self.truth = np.asarray(c.extrinsic, float)
        self.prior = miscalibrate(self.truth, c.miscalib_deg, c.miscalib_m,
                                  np.random.default_rng([c.seed, 1]))

    def vehicle_pose(self, time_s: float) -> np.ndarray:
        """world_T_base: along the street with a gentle weave; heading follows the path plus a
        small wobble; pitch and roll follow the ground's slope plus a little body motion."""
        c = self.config
        w = 2 * np.pi / 4.0
        x = c.start_x + c.speed * time_s
        y = c.lane_y + c.weave_m * np.sin(w * time_s)
        yaw = np.arctan2(c.weave_m * w * np.cos(w * time_s), c.speed) + np.radians(0.5) * np.sin(2.3 * time_s)
        h = 0.5                                        # wheelbase-ish baseline for the slope
        dzdx = (ground_height(x + h, y) - ground_height(x - h, y)) / (2 * h)
        dzdy = (ground_height(x, y + h) - ground_height(x, y - h)) / (2 * h)
        pitch = -np.arctan(dzdx) + np.radians(0.3) * np.sin(3.1 * time_s)
        roll = np.arctan(dzdy) + np.radians(0.3) * np.sin(2.7 * time_s + 1.0)
        R = tf.euler_to_matrix(roll, pitch, yaw)
        return tf.make_transform(R, [x, y, float(ground_height(x, y))])

    def frame(self, k: int) -> Frame:
        c = self.config
        time_s = k / c.rate_hz
        world_T_lidar = self.vehicle_pose(time_s) @ tf.make_transform(t=[0.0, 0.0, LIDAR_HEIGHT])
        world_T_camera = world_T_lidar @ self.truth
        rng = np.random.default_rng([c.seed, 2, k])
        return Frame(index=k, stamp_ns=c.epoch_ns + round(time_s * 1e9),
                     world_T_lidar=world_T_lidar, world_T_camera=world_T_camera,
                     lidar=self.lidar.capture(self.scene, world_T_lidar, rng),
                     camera=self.camera.capture(self.scene, world_T_camera, rng))

    def __iter__(self) -> Iterator[Frame]:
        return (self.frame(k) for k in range(self.config.frames))


# ---------------------------------------------------------------------------- messages and files

def frame_messages(frame: Frame, truth: np.ndarray) -> dict[str, object]:
    """topic -> rclpy message for one frame."""
    from ros_ot_fusion.io import pointcloud2 as pc2

    return {TOPICS["lidar"]: pc2.encode(header("lidar", frame.stamp_ns), frame.lidar.xyz,
                                        intensity=frame.lidar.intensity),
            TOPICS["camera"]: pc2.encode(header("camera", frame.stamp_ns), frame.camera.xyz,
                                         rgb=frame.camera.rgb),
            TOPICS["truth"]: matrix_to_msg(truth, header("lidar", frame.stamp_ns), "camera")}


def params_path(bag: str | Path) -> Path:
    """Where the params YAML of a bag goes: beside the bag directory, `<bag>.params.yaml`."""
    bag = Path(bag)
    return bag.with_name(bag.name + ".params.yaml")


def _pose_text(T: np.ndarray) -> str:
    return "[" + ", ".join(repr(float(v)) for v in tf.matrix_to_pose(T)) + "]"   # shortest exact


def write_params(path: str | Path, prior: np.ndarray, truth: np.ndarray, config: DriveConfig) -> None:
    """A ROS 2 params file holding the miscalibrated prior (the truth only in a comment)."""
    Path(path).write_text(
        f"# ros-ot-fusion simulate: seed {config.seed}, prior off the truth by "
        f"{config.miscalib_deg:g} deg and {config.miscalib_m:g} m\n"
        f"# true extrinsic (camera->lidar, [x, y, z, qx, qy, qz, qw]): {_pose_text(truth)}\n"
        "ros_ot_fusion:\n"
        "  ros__parameters:\n"
        f"    prior_extrinsic: {_pose_text(prior)}\n")


@dataclass
class BagSummary:
    bag: Path
    params: Path
    frames: int
    lidar_points: list[int]
    camera_points: list[int]
    truth: np.ndarray
    prior: np.ndarray

    def report(self) -> str:
        def stats(n):
            return f"{int(np.mean(n))} mean ({min(n)}..{max(n)})"
        return "\n".join([
            f"bag:            {self.bag} ({self.frames} frames)",
            f"params:         {self.params}",
            f"lidar points:   {stats(self.lidar_points)} per frame",
            f"camera points:  {stats(self.camera_points)} per frame",
            f"true extrinsic: {_pose_text(self.truth)}  (camera->lidar, x y z qx qy qz qw)",
            f"prior:          {_pose_text(self.prior)}  (off by "
            f"{tf.rotation_angle_deg(self.prior[:3, :3] @ self.truth[:3, :3].T):.3f} deg, "
            f"{np.linalg.norm(self.prior[:3, 3] - self.truth[:3, 3]):.3f} m)"])


def write_bag(path: str | Path, config: DriveConfig | None = None, storage: str = "mcap",
              progress: Callable[[int, int], None] | None = None, scene: Scene | None = None) -> BagSummary:
    """Simulate `config.frames` frames into a new bag at `path` and the prior into
    `params_path(path)`. Raises FileExistsError if `path` exists (a bag is never overwritten).
    `progress(k, n)` is called after frame k of n; `scene` reuses an already built street."""
    from ros_ot_fusion.io.bag import BagWriter

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new bag path (bags are never overwritten)")
    drive = Drive(config, scene=scene)
    lidar_points, camera_points = [], []
    with BagWriter(path, storage=storage) as writer:
        for frame in drive:
            for topic, msg in frame_messages(frame, drive.truth).items():
                writer.write(topic, msg, frame.stamp_ns)
            lidar_points.append(len(frame.lidar))
            camera_points.append(len(frame.camera))
            if progress:
                progress(frame.index + 1, drive.config.frames)
    params = params_path(path)
    write_params(params, drive.prior, drive.truth, drive.config)
    return BagSummary(bag=path, params=params, frames=drive.config.frames, lidar_points=lidar_points,
                      camera_points=camera_points, truth=drive.truth, prior=drive.prior)
