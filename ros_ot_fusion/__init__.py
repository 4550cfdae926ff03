"""ros_ot_fusion: LiDAR-camera fusion by multi-scale sparse optimal transport."""
__version__ = "0.1.0"
