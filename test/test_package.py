"""Static checks of the ament_python metadata: what `colcon build` on a ROS 2 install needs."""
import ast
import configparser
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def setup_call():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: k.value for k in call.keywords}


def test_package_xml_format3_ament_python():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "ros_ot_fusion"
    for tag in ("version", "description", "maintainer", "license"):
        assert root.findtext(tag), tag
    assert root.find("maintainer").get("email")
    depends = {d.text for d in root.findall("depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "diagnostic_msgs"} <= depends
    assert root.findall("exec_depend") and root.findall("test_depend")
    assert root.find("export/build_type").text == "ament_python"


def test_setup_py_follows_ament_python_conventions():
    source = (ROOT / "setup.py").read_text()
    assert 'package_name = "ros_ot_fusion"' in source
    for entry in ("share/ament_index/resource_index/packages", "resource/{package_name}",
                  "share/{package_name}", '"package.xml"', "launch/*.launch.py", "config/*"):
        assert entry in source, entry
    assert 'package_dir={f"{package_name}.kernels": "kernels"}' in source
    assert "ros-ot-fusion = ros_ot_fusion.cli:main" in source
    assert (ROOT / "resource" / "ros_ot_fusion").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["develop"]["script_dir"] == "$base/lib/ros_ot_fusion"
    assert cfg["install"]["install_scripts"] == "$base/lib/ros_ot_fusion"


def test_installed_package_imports_kernels_and_console_script():
    import importlib.metadata as md

    import ros_ot_fusion.kernels as kernels
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"
    scripts = {e.name: e.value for e in md.entry_points(group="console_scripts")}
    assert scripts["ros-ot-fusion"] == "ros_ot_fusion.cli:main"


def test_version_agrees():
    import ros_ot_fusion
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.findtext("version") == ros_ot_fusion.__version__ == ast.literal_eval(setup_call()["version"])


def test_processes_run_fast_dds_with_the_large_cloud_profile_unless_another_is_named(monkeypatch, tmp_path):
    from ros_ot_fusion import cli

    ns = {"d": "http://www.eprosima.com"}
    root = ET.parse(cli.DDS_PROFILE).getroot()
    shm = [t for t in root.iterfind(".//d:transport_descriptor", ns) if t.findtext("d:type", namespaces=ns) == "SHM"]
    # a segment holds the clouds in flight: the fused history (depth 2) of 10 MB clouds, and more
    assert len(shm) == 1 and int(shm[0].findtext("d:segment_size", namespaces=ns)) >= 32 * 2**20
    used = {t.text for t in root.iterfind(".//d:participant//d:userTransports/d:transport_id", ns)}
    assert used == {t.findtext("d:transport_id", namespaces=ns) for t in root.iterfind(".//d:transport_descriptor", ns)}
    assert cli.DDS_PROFILE.name in ast.unparse(setup_call()["package_data"])      # installed with the package
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", "")     # so that what the test sets is undone
    monkeypatch.delenv("FASTDDS_DEFAULT_PROFILES_FILE")
    cli.use_dds_profile(str(tmp_path / "no-such-dir"))          # no shared memory: the defaults
    assert "FASTDDS_DEFAULT_PROFILES_FILE" not in os.environ

    def free(mb):
        return lambda path: SimpleNamespace(f_bavail=mb * 2**20 // 4096, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", free(64))
    cli.use_dds_profile()                                        # a container's 64 MB: the defaults
    assert "FASTDDS_DEFAULT_PROFILES_FILE" not in os.environ
    monkeypatch.setattr(os, "statvfs", free(24 * 1024))
    cli.use_dds_profile()
    assert os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] == str(cli.DDS_PROFILE)
    monkeypatch.setenv("FASTDDS_DEFAULT_PROFILES_FILE", "/etc/mine.xml")
    cli.use_dds_profile()
    assert os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] == "/etc/mine.xml"
