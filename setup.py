from glob import glob

from setuptools import find_packages, setup

package_name = "ros_ot_fusion"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(include=[package_name, f"{package_name}.*"]) + [f"{package_name}.kernels"],
    package_dir={f"{package_name}.kernels": "kernels"},
    package_data={package_name: ["fastdds_large_clouds.xml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"share/{package_name}", ["package.xml"]),
        (f"share/{package_name}/launch", glob("launch/*.launch.py")),
        (f"share/{package_name}/config", glob("config/*")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="ros_ot_fusion maintainers",
    maintainer_email="maintainers@ros-ot-fusion.dev",
    description="LiDAR-camera fusion by multi-scale sparse optimal transport (Triton GPU kernels)",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "ros-ot-fusion = ros_ot_fusion.cli:main",
            # `ros2 run ros_ot_fusion fusion_node` and the launch file use this one
            "fusion_node = ros_ot_fusion.cli:node_main",
        ],
    },
)
