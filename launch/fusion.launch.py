"""Launch the ros_ot_fusion node, and RViz with the shipped view when asked.

    ros2 launch ros_ot_fusion fusion.launch.py [params_file:=FILE] [lidar_topic:=T] [camera_topic:=T]
        [use_sim_time:=true] [namespace:=NS] [rviz:=true] [fastdds_builtin_transports:=DEFAULT]

The topics are remappings of the node's default inputs (/lidar/points, /camera/points). Fast DDS
gets LARGE_DATA transports (multi-MB clouds are dropped without them), unless the environment or
the `fastdds_builtin_transports` argument says otherwise, and the node its large-cloud shared-memory
profile unless FASTDDS_DEFAULT_PROFILES_FILE names one (README). The RViz view expects the node at
/ros_ot_fusion (no namespace) and the LiDAR frame named `lidar`.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

PACKAGE = "ros_ot_fusion"


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    use_sim_time = ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)
    env = {"FASTDDS_BUILTIN_TRANSPORTS": LaunchConfiguration("fastdds_builtin_transports")}
    remappings = [("/lidar/points", LaunchConfiguration("lidar_topic")),
                  ("/camera/points", LaunchConfiguration("camera_topic"))]

    arguments = [
        DeclareLaunchArgument(
            "params_file", default_value=os.path.join(share, "config", "fusion.yaml"),
            description="ROS 2 params file for the node (every parameter, documented)"),
        DeclareLaunchArgument(
            "lidar_topic", default_value="/lidar/points",
            description="LiDAR PointCloud2 topic (remapped onto /lidar/points)"),
        DeclareLaunchArgument(
            "camera_topic", default_value="/camera/points",
            description="camera PointCloud2 topic, camera frame (remapped onto /camera/points)"),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false", choices=["true", "false"],
            description="use /clock (bag replay with --clock) instead of the system clock"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="namespace of the node (outputs move to <ns>/ros_ot_fusion/...; a params file "
                        "keyed ros_ot_fusion then needs the key /**/ros_ot_fusion)"),
        DeclareLaunchArgument(
            "rviz", default_value="false", choices=["true", "false"],
            description="also start RViz with config/fusion.rviz"),
        DeclareLaunchArgument(
            "fastdds_builtin_transports",
            default_value=EnvironmentVariable("FASTDDS_BUILTIN_TRANSPORTS", default_value="LARGE_DATA"),
            description="FASTDDS_BUILTIN_TRANSPORTS for the launched processes (LARGE_DATA for big clouds)"),
    ]

    fusion = Node(
        package=PACKAGE,
        executable="fusion_node",
        name="ros_ot_fusion",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file"), {"use_sim_time": use_sim_time}],
        remappings=remappings,
        additional_env=env,
        output="screen",
        emulate_tty=True,
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", os.path.join(share, "config", "fusion.rviz")],
        parameters=[{"use_sim_time": use_sim_time}],
        remappings=remappings,                 # its input displays follow the chosen topics
        additional_env=env,
        condition=IfCondition(LaunchConfiguration("rviz")),
        output="screen",
    )
    return LaunchDescription([*arguments, fusion, rviz])
