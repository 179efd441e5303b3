"""``benchmarks/simulation_paths.py`` keeps the deprecated ``run_simulation`` beside
Flower's supported path to compare their wall times: both paths must still run the same
job (the same seeded replies, so the same global accuracy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "simulation_paths.py"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_both_simulation_paths_run_the_same_job():
    out = subprocess.run([sys.executable, str(SCRIPT), "--clients", "3", "--repeats", "1"],
                         check=True, capture_output=True, text=True, timeout=580).stdout
    result = json.loads((SCRIPT.parent / "results" / "simulation_paths.json").read_text())
    assert result["clients"] == 3
    assert all(len(times) == 1 and times[0] > 0 for times in result["seconds"].values())
    accuracy = result["global_accuracy"]
    assert set(accuracy) == {"flwr run", "run_simulation"}
    assert accuracy["flwr run"] == accuracy["run_simulation"] > 0.5, out
