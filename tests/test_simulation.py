"""End to end through Flower's simulation engine: 20 virtual clients, one-shot round."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from otfusion.server.flower_server import simulate
from otfusion.task.config import RunConfig
from otfusion.zoo import build_model

pytestmark = pytest.mark.slow


def test_one_shot_simulation_with_20_clients_beats_fedavg(tmp_path):
    config = RunConfig(output_dir=str(tmp_path))
    simulate(config, num_clients=20)
    (run,) = tmp_path.glob("run-*")
    report = json.loads((run / "report.json").read_text())
    table = report["comparison"]
    assert table["global model (otfusion)"] > table["FedAvg (same replies)"] + 0.2
    assert report["train_metrics"]["1"]["accepted-replies"] == 20
    model = build_model("mlp")
    model.load_state_dict(load_file(run / "global_model.safetensors"))
    assert report["central_evaluation"]["1"]["accuracy"] == pytest.approx(
        table["global model (otfusion)"])
    assert (run / "report.png").stat().st_size > 0
