"""End to end on Flower's supported simulation path (a local SuperLink in simulation
mode, ``flwr run``): 20 virtual clients, one-shot round; the console shows the banner
and the table, Flower's log goes to run.log, and no process is left behind."""

from __future__ import annotations

import json
import re

import pytest
from deployment_helpers import assert_no_leftovers
from safetensors.torch import load_file

from otfusion.server.flower_server import simulate
from otfusion.task.config import RunConfig
from otfusion.zoo import build_model

pytestmark = pytest.mark.slow


def test_one_shot_simulation_with_20_clients_beats_fedavg(tmp_path, capsys):
    config = RunConfig(output_dir=str(tmp_path / "out"))
    state = tmp_path / "state"
    assert simulate(config, num_clients=20, state_dir=state) == 0
    shown = capsys.readouterr().err
    port = re.search(r"simulation mode on 127\.0\.0\.1:(\d+)", shown)
    assert port, shown
    assert_no_leftovers([int(port[1])])
    assert "flwr-otfusion simulation: 20 clients" in shown
    assert "global model (otfusion)" in shown and "test accuracy, last round" in shown
    assert "DEPRECATED" not in shown and "Warning" not in shown
    log = (state / "run.log").read_text()
    assert "Starting Flower Simulation" in log and "20 simulated SuperNodes" in log
    (run,) = (tmp_path / "out").glob("run-*")
    report = json.loads((run / "report.json").read_text())
    table = report["comparison"]
    assert table["global model (otfusion)"] > table["FedAvg (same replies)"] + 0.2
    assert report["train_metrics"]["1"]["accepted-replies"] == 20
    model = build_model("mlp")
    model.load_state_dict(load_file(run / "global_model.safetensors"))
    assert report["central_evaluation"]["1"]["accuracy"] == pytest.approx(
        table["global model (otfusion)"])
    assert (run / "report.png").stat().st_size > 0
    assert set(report["versions"]) == {"flwr-otfusion", "flwr", "torch"}
    phases = report["phase_seconds"]["1"]
    assert set(phases) == {"client training", "screening", "fusion", "distillation",
                           "central evaluation"}
    assert all(seconds > 0 for seconds in phases.values()) and report["total_seconds"] > 0


@pytest.mark.timeout(300)
def test_a_killed_flower_server_takes_its_superlink_along(tmp_path):
    """SIGKILL of flower-server alone (no cleanup can run): its SuperLink is killed with
    it (PR_SET_PDEATHSIG), and the SuperLink's own children follow."""
    import os
    import signal
    import subprocess
    import time

    from deployment_helpers import leftovers

    from otfusion.deploy.processes import executable

    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [executable("flower-server"), "--simulation", "--num-clients", "3",
             "--local-epochs", "50", "--output-dir", str(tmp_path / "out"),
             "--state-dir", str(tmp_path / "state")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "SuperLink healthy" not in log.read_text(errors="replace"):
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    port = int(re.search(r"simulation mode on 127\.0\.0\.1:(\d+)", log.read_text())[1])
    time.sleep(5)  # the run is under way
    assert leftovers([port]), "the SuperLink is not running"
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    assert_no_leftovers([port], timeout=90)
