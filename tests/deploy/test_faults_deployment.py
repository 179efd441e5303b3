"""Faults with a real SuperLink and SuperNodes on loopback.

Eight SuperNodes run ``faulty_clientapp`` (this package's ClientApp with its train reply
damaged as the node config says): two honest nodes, five that send a different kind of
malformed update in each round, and one that hangs in training and is killed there.

- Run A (``min-train-nodes=2``, two rounds): every malformed update is rejected with a
  log line naming the node and the reason; the killed node does not stop the round,
  which goes on once its reply is known to be missing (bounded by ``round-timeout``);
  the saved global model equals the fusion of the honest replies alone.
- Run B (``min-train-nodes=3``): only two valid replies, so the global model stays the
  initial one and the log says why.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from deployment_helpers import assert_no_leftovers, free_ports, write_client_data
from safetensors import safe_open
from safetensors.torch import load_file

from otfusion.deploy.flwr_cli import final_status, stream_run
from otfusion.deploy.processes import executable
from otfusion.deploy.security import Security
from otfusion.deploy.state_files import (
    CONNECTION,
    app_pyproject,
    write_flwr_config,
    write_run_config,
)
from otfusion.deploy.superlink import health_check, superlink_command
from otfusion.fusion import fuse
from otfusion.strategies.replies import reply_digest
from otfusion.task.config import RunConfig
from otfusion.zoo import build_model

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]  # faulty_clientapp.py is at its root
# round 1, round 2 fault of each malformed node, and the reason the server must log
MALFORMED = {
    "nan,inf": ("contains NaN or Inf", "contains NaN or Inf"),
    "shape,missing-key": ("has shape", "missing keys"),
    "extra-key,dtype": ("unexpected keys", "has dtype int32"),
    "huge,architecture": ("> max_abs_weight", "missing keys"),
    "zero-examples,negative-examples": ("'num-examples' is 0", "'num-examples' is -5"),
}
HONEST = 2


def app_dir(folder: Path) -> Path:
    """This app with ``faulty_clientapp`` as its ClientApp."""
    folder.mkdir()
    shutil.copy(TESTS / "faulty_clientapp.py", folder)
    pyproject = app_pyproject()
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "faulty_clientapp:app"
    (folder / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return folder


def run_app(app: Path, config: RunConfig, env: dict, state: Path) -> tuple[str, str]:
    """``flwr run`` to the end; (status, its output)."""
    run_config = write_run_config(state / f"{Path(config.output_dir).name}.toml",
                                  config)
    lines: list[str] = []
    start = time.monotonic()

    def echo(line: str) -> None:
        lines.append(line)
        print(f"[{time.monotonic() - start:6.1f} s] {line}", end="", flush=True)

    code, run_id = stream_run(
        [executable("flwr"), "run", str(app), CONNECTION,
         "--run-config", str(run_config), "--stream"], env, echo=echo)
    output = "".join(lines)
    assert run_id is not None, output
    status, _ = final_status(run_id, env)
    return status, output


@pytest.mark.timeout(800)
def test_killed_and_malformed_clients(tmp_path, processes):  # noqa: F811
    link, *node_ports = ports = free_ports(1 + HONEST + len(MALFORMED) + 1)
    state = tmp_path / "state"
    state.mkdir()
    env = processes.env
    write_flwr_config(Path(env["FLWR_HOME"]), f"127.0.0.1:{link}",
                      Security(insecure=True))
    app = app_dir(tmp_path / "app")
    data = write_client_data(tmp_path, len(node_ports))
    marker = tmp_path / "hanging"
    roles = ["none"] * HONEST + list(MALFORMED) + ["hang"]
    try:
        processes.start("superlink", superlink_command(
            "127.0.0.1", link, Security(insecure=True), None))
        deadline = time.monotonic() + 120
        while not health_check("127.0.0.1", link, Security(insecure=True)):
            assert time.monotonic() < deadline, processes.logs_text()
            time.sleep(0.5)
        nodes = []
        for k, (port, path, faults) in enumerate(zip(node_ports, data, roles, strict=True)):
            config = (f"data-path='{path}' faults='{faults}' dump='{tmp_path / f'dump{k}'}' "
                      f"marker='{marker}'")
            nodes.append(processes.start(f"node{k}", [
                executable("flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{link}", "--node-config", config,
                "--host", "127.0.0.1", "--port", str(port)]))

        # --- run A: the killed node and the malformed ones are left out -------------
        base = RunConfig(local_epochs=1, num_server_rounds=2, round_timeout=90,
                         min_train_nodes=HONEST, output_dir=str(tmp_path / "outA"))
        killer_started = time.monotonic()
        status, output = _run_while_killing(app, base, env, state, marker, nodes[-1])
        assert status == "finished:completed", output + processes.logs_text()
        assert time.monotonic() - killer_started < 2 * 90 + 120  # bounded by the timeouts

        rejected = re.findall(r"aggregate_train \(round (\d)\): rejected reply from node "
                              r"(\S+): (.*)", output)
        for rnd in (1, 2):
            reasons = [reason for r, _, reason in rejected if r == str(rnd)]
            for expected in (pair[rnd - 1] for pair in MALFORMED.values()):
                assert any(expected in reason for reason in reasons), (rnd, expected, reasons)
            assert all(node.isdigit() for r, node, _ in rejected if r == str(rnd))
        (run,) = (tmp_path / "outA").glob("run-*")
        report = json.loads((run / "report.json").read_text())
        for rnd in ("1", "2"):
            assert report["train_metrics"][rnd]["accepted-replies"] == HONEST
            assert report["train_metrics"][rnd]["rejected-replies"] >= len(MALFORMED)

        honest = [_dumped(tmp_path / f"dump{k}" / "round-2.safetensors") for k in range(HONEST)]
        honest.sort(key=lambda item: reply_digest(item[0], item[1]))
        models = []
        for state_dict, _ in honest:
            model = build_model("mlp", seed=0)
            model.load_state_dict(state_dict)
            models.append(model)
        expected = fuse(models, [w for _, w in honest], target=build_model("mlp", seed=0))
        saved = load_file(run / "global_model.safetensors")
        for name, tensor in expected.state_dict().items():  # up to float rounding of weights
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6, msg=name)

        # --- run B: fewer valid replies than min-train-nodes ------------------------
        config_b = base.model_copy(update={"num_server_rounds": 1, "min_train_nodes": 3,
                                           "round_timeout": 60,
                                           "output_dir": str(tmp_path / "outB")})
        status, output = run_app(app, config_b, env, state)
        assert status == "finished:completed", output + processes.logs_text()
        assert "fewer than the 3 needed; the global model is not updated" in output
        (run,) = (tmp_path / "outB").glob("run-*")
        saved = load_file(run / "global_model.safetensors")
        for name, tensor in build_model("mlp", seed=0).state_dict().items():
            assert torch.equal(saved[name], tensor), name
    finally:
        processes.stop_all()
        assert_no_leftovers(ports)


def _run_while_killing(app, config, env, state, marker, node) -> tuple[str, str]:
    """Run the app; kill ``node`` as soon as it reports that it is training."""
    def kill_when_training():
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        node.stop(grace=0)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    try:
        return run_app(app, config, env, state)
    finally:
        killer.join(timeout=310)
        assert marker.exists() and not node.alive()


def _dumped(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """An honest reply as the server sees it: tensors in the model's key order."""
    with safe_open(str(path), framework="pt") as handle:
        examples = float(handle.metadata()["num-examples"])
    tensors = load_file(str(path))
    return {name: tensors[name] for name in build_model("mlp").state_dict()}, examples
