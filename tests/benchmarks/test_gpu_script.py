"""``benchmarks/gpu.py`` is run once, by a session that has a GPU machine for a few
minutes: it must not have rotted by then. Its quick mode runs here on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def test_quick_run_fuses_and_distils_on_every_device_it_has():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    rows = json.loads((SCRIPT.parent / "results" / "gpu.json").read_text())
    devices = {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}
    assert {r["device"] for r in rows} == devices
    assert {r["case"] for r in rows} == {"mlp K=3", "cnn K=3"}
    for row in rows:
        assert row["fuse_s"] > 0 and row["distill_s"] > 0
        assert row["output_difference"] < 1e-3, row  # the same fused function
    if devices == {"cpu"}:
        assert "no CUDA device: CPU only" in out
