"""Ground-truth simulator: a street scene, a spinning LiDAR and a depth camera with a known
extrinsic, driven down the street into ROS 2 bags (see `drive` for frames and topics)."""
from ros_ot_fusion.sim.drive import (BagSummary, Drive, DriveConfig, Frame, miscalibrate, params_path,
                                     true_extrinsic, write_bag)
from ros_ot_fusion.sim.scene import KINDS, Hits, Scene, ground_height
from ros_ot_fusion.sim.sensors import CameraConfig, DepthCamera, LidarConfig, SimCloud, SpinningLidar

__all__ = ["BagSummary", "CameraConfig", "DepthCamera", "Drive", "DriveConfig", "Frame", "Hits", "KINDS",
           "LidarConfig", "Scene", "SimCloud", "SpinningLidar", "ground_height", "miscalibrate",
           "params_path", "true_extrinsic", "write_bag"]
