"""Every bad input and fault of bench/fault_table.py against the live node over DDS (~1 min).

The script publishes each bad input to a node in its own process, then a good frame; it exits 0
only when every bad input was flagged at its expected level, every good frame after one was
fused with a sane extrinsic, and the node stayed up and exited cleanly on SIGINT.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fault_table(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    domain = str(60 + os.getpid() % 40)
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "fault_table.py"), "--device", "cpu",
                          "--out", str(tmp_path), "--json", str(out), "--domain", domain],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert all(r["good_frame_fused"] and r["node_alive"] for r in rows)
    assert {r["level"] for r in rows if "malformed" in r["message"]} == {"ERROR", "WARN"}
