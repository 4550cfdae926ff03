"""Message I/O: PointCloud2 codec and ROS 2 bag reading/writing. Knows ROS messages, no solver."""
