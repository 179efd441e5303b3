"""``flwr run .`` on this Flower App with Flower's own CLI: the local SuperLink in
simulation mode, offline (no ``uv sync`` of the app's dependencies)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from otfusion.deploy.processes import child_env, executable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_flwr_run_dot_in_simulation(tmp_path):
    home, outputs = tmp_path / "flwr-home", tmp_path / "outputs"
    home.mkdir()
    env = {**child_env(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    try:
        done = subprocess.run(
            [executable("flwr"), "run", ".", "--stream",
             "--federation-config", "num-supernodes=4",
             "--run-config", f"local-epochs=2 output-dir='{outputs}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    finally:  # flwr run leaves its local SuperLink running in the background
        subprocess.run(["pkill", "-f", str(home)], check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "uv sync" not in output
    (run,) = outputs.glob("run-*")
    report = json.loads((run / "report.json").read_text())
    assert report["train_metrics"]["1"]["accepted-replies"] == 4
    assert report["run_config"]["local-epochs"] == 2
    assert (run / "global_model.safetensors").stat().st_size > 0
