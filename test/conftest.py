"""Test-session environment, set before anything imports rclpy or triton.

- DDS discovery stays on localhost (never multicast on external interfaces), for this
  process and every child process the tests start.
- Large clouds need Fast DDS's LARGE_DATA transports.
- Without a GPU, Triton kernels run in Triton's CPU interpreter.
"""
import os
import shutil

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
