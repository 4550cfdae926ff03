"""The launch file, the params file and the RViz view: present, consistent, loadable.

`launch` / `launch_ros` are not on PyPI: where they are importable (a ROS 2 install) the launch
description is built and introspected; otherwise the file is checked statically with `ast`.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from ros_ot_fusion import params as P

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "fusion.launch.py"
PARAMS_FILE = ROOT / "config" / "fusion.yaml"
RVIZ = ROOT / "config" / "fusion.rviz"
PACKAGE = "ros_ot_fusion"
ARGUMENTS = {"params_file", "lidar_topic", "camera_topic", "use_sim_time", "namespace", "rviz"}


# ---------------------------------------------------------------------------------------------
# config/fusion.yaml

def test_params_file_holds_exactly_the_table_at_its_defaults():
    doc = yaml.safe_load(PARAMS_FILE.read_text())
    section = doc[P.NODE_NAME]["ros__parameters"]
    assert list(section) == [p.name for p in P.PARAMS]
    for p in P.PARAMS:
        value = section[p.name]
        assert value == p.default, p.name
        # ROS types a parameter by its YAML value: 1.0 must not be written as 1
        assert type(value) is type(p.default), p.name
        if isinstance(value, list):
            assert all(type(v) is float for v in value), p.name
    assert P.validate(P.load_params_file(PARAMS_FILE)) == P.defaults()


def test_params_file_documents_every_parameter():
    lines = PARAMS_FILE.read_text().splitlines()
    for p in P.PARAMS:
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(p.name + ":"))
        comment = []
        for line in reversed(lines[:at]):              # the comment block right above the entry
            if not line.strip().startswith("#"):
                break
            comment.insert(0, line.strip().lstrip("#").strip())
        text = " ".join(comment)
        assert p.description.split(" (")[0] in text, p.name
        assert ("read-only" in text) == p.read_only, p.name
        for choice in p.choices or ():
            assert choice in text, p.name
        if p.low is not None:
            assert "[" in text and "]" in text, p.name


def test_params_file_loads_with_the_ros_parser():
    """rcl's own YAML parser (what --params-file uses) reads every value with the table's type."""
    import rclpy
    from rclpy.node import Node

    context = rclpy.Context()
    rclpy.init(args=["--ros-args", "--params-file", str(PARAMS_FILE)], context=context)
    try:
        node = Node(P.NODE_NAME, context=context, automatically_declare_parameters_from_overrides=True,
                    start_parameter_services=False)
        got = {name: param.value for name, param in node.get_parameters_by_prefix("").items()}
        for p in P.PARAMS:
            value = list(got[p.name]) if isinstance(p.default, list) else got[p.name]
            assert value == p.default and type(value) is type(p.default), p.name
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


# ---------------------------------------------------------------------------------------------
# config/fusion.rviz

def test_rviz_config_shows_input_and_fused_clouds_best_effort():
    doc = yaml.safe_load(RVIZ.read_text())
    manager = doc["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "lidar"
    clouds = {d["Topic"]["Value"]: d for d in manager["Displays"]
              if d["Class"] == "rviz_default_plugins/PointCloud2"}
    assert set(clouds) == {"/lidar/points", "/ros_ot_fusion/fused", "/camera/points"}
    for display in clouds.values():
        assert display["Topic"]["Reliability Policy"] == "Best Effort"
    assert clouds["/lidar/points"]["Color Transformer"] == "FlatColor"
    assert clouds["/lidar/points"]["Size (m)"] <= 0.02
    assert clouds["/ros_ot_fusion/fused"]["Color Transformer"] == "RGB8"
    assert 0.02 <= clouds["/ros_ot_fusion/fused"]["Size (m)"] <= 0.05
    assert "camera frame" in RVIZ.read_text()             # why the camera display needs TF


# ---------------------------------------------------------------------------------------------
# launch/fusion.launch.py

def console_scripts() -> dict[str, str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    for item in value.elts:
                        name, target = (s.strip() for s in item.value.split("="))
                        scripts[name] = target
    return scripts


def test_launch_targets_exist():
    """What the launch file names: the package, its executable, the installed config files."""
    assert ET.parse(ROOT / "package.xml").getroot().findtext("name") == PACKAGE
    assert console_scripts()["fusion_node"] == "ros_ot_fusion.cli:node_main"
    assert PARAMS_FILE.is_file() and RVIZ.is_file()
    setup = (ROOT / "setup.py").read_text()
    assert "launch/*.launch.py" in setup and "config/*" in setup    # both get installed to share/


class LaunchSource:
    """The launch file's AST, with names resolved to what they were assigned."""

    def __init__(self, path: Path):
        self.tree = ast.parse(path.read_text())
        self.assigned = {t.id: n.value for n in ast.walk(self.tree) if isinstance(n, ast.Assign)
                         for t in n.targets if isinstance(t, ast.Name)}

    def resolve(self, node):
        seen = 0
        while isinstance(node, ast.Name) and node.id in self.assigned and seen < 10:
            node, seen = self.assigned[node.id], seen + 1
        return node

    def constant(self, node):
        node = self.resolve(node)
        return node.value if isinstance(node, ast.Constant) else None

    def calls(self, name: str) -> list[ast.Call]:
        return [n for n in ast.walk(self.tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]

    def keywords(self, call: ast.Call) -> dict:
        return {k.arg: self.resolve(k.value) for k in call.keywords}


@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is not None, reason="launch_ros present: run below")
def test_launch_file_statically():
    src = LaunchSource(LAUNCH)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description"
               for n in src.tree.body)
    # every argument: declared with a default and a description
    declared = {}
    for call in src.calls("DeclareLaunchArgument"):
        kw = src.keywords(call)
        name = src.constant(call.args[0])
        assert "default_value" in kw, name
        assert isinstance(src.constant(kw.get("description")), str) and src.constant(kw["description"]), name
        declared[name] = kw["default_value"]
    assert ARGUMENTS <= set(declared)
    assert src.constant(declared["rviz"]) == "false" and src.constant(declared["use_sim_time"]) == "false"
    assert src.constant(declared["lidar_topic"]) == "/lidar/points"
    assert src.constant(declared["camera_topic"]) == "/camera/points"
    params_default = ast.dump(declared["params_file"])
    assert "get_package_share_directory" in ast.dump(src.tree) and "'fusion.yaml'" in params_default
    # the node: our package and console script, the name the params file uses, LARGE_DATA
    nodes = {src.constant(src.keywords(c)["package"]): src.keywords(c) for c in src.calls("Node")}
    fusion = nodes[PACKAGE]
    assert src.constant(fusion["executable"]) in console_scripts()
    assert src.constant(fusion["name"]) == P.NODE_NAME
    env = fusion["additional_env"]
    assert isinstance(env, ast.Dict) and [src.constant(k) for k in env.keys] == ["FASTDDS_BUILTIN_TRANSPORTS"]
    assert "LARGE_DATA" in ast.dump(src.tree)
    remaps = ast.dump(fusion["remappings"])
    for topic, argument in (("/lidar/points", "lidar_topic"), ("/camera/points", "camera_topic")):
        assert f"'{topic}'" in remaps and f"'{argument}'" in remaps
    for arg in ("params_file", "use_sim_time", "namespace"):
        assert f"'{arg}'" in ast.dump(src.tree.body[-1]), arg
    # RViz: only when asked, with the shipped view
    rviz = nodes["rviz2"]
    assert "IfCondition" in ast.dump(rviz["condition"]) and "'rviz'" in ast.dump(rviz["condition"])
    assert "'fusion.rviz'" in ast.dump(rviz["arguments"])


@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None, reason="launch_ros is not installed")
def test_launch_description_introspected(tmp_path, monkeypatch):
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument
    from launch.utilities import normalize_to_list_of_substitutions, perform_substitutions
    from launch_ros.actions import Node

    # an install prefix where get_package_share_directory finds this checkout
    share = tmp_path / "share"
    (share / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    (share / "ament_index" / "resource_index" / "packages" / PACKAGE).touch()
    (share / PACKAGE).mkdir()
    (share / PACKAGE / "config").symlink_to(ROOT / "config")
    monkeypatch.setenv("AMENT_PREFIX_PATH", f"{tmp_path}{os.pathsep}{os.environ.get('AMENT_PREFIX_PATH', '')}")
    spec = importlib.util.spec_from_file_location("fusion_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    context = LaunchContext()

    def text(value):
        return value if isinstance(value, str) else perform_substitutions(
            context, normalize_to_list_of_substitutions(value))

    arguments = {a.name: a for a in description.entities if isinstance(a, DeclareLaunchArgument)}
    assert ARGUMENTS <= set(arguments)
    for name, argument in arguments.items():
        assert argument.default_value is not None and argument.description, name
    assert Path(text(arguments["params_file"].default_value)).resolve() == PARAMS_FILE.resolve()
    nodes = [e for e in description.entities if isinstance(e, Node)]
    packages = {text(n.node_package): n for n in nodes}
    assert text(packages[PACKAGE].node_executable) in console_scripts()
    assert "rviz2" in packages and packages["rviz2"].condition is not None
