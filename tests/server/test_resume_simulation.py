"""A real crash: ``flower-server --simulation`` is SIGKILLed in the middle of a run and
restarted with ``--resume``; no completed round is lost or repeated, and the final model
is bit-identical to that of an uninterrupted run with the same seeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from otfusion.deploy.processes import ManagedProcess, descendants, executable

pytestmark = pytest.mark.slow

ROUNDS = 3


def command(output: Path, *extra: str) -> list[str]:
    """flower-server showing Flower's log (``--verbose``), with its state beside the
    outputs."""
    return [executable("flower-server"), "--simulation", "--num-clients", "3",
            "--num-server-rounds", str(ROUNDS), "--local-epochs", "20", "--verbose",
            "--output-dir", str(output), "--state-dir", str(output.parent / "state"), *extra]


def run_to_end(argv: list[str], log: Path) -> str:
    with open(log, "wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=400,
                              env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text[-3000:]
    return text


def completed_round(output: Path) -> int:
    try:
        return json.loads((output / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError):
        return 0


def kill_tree(process: ManagedProcess) -> None:
    """SIGKILL the whole process tree at once, as a crash would."""
    for pid in (process.pid, *descendants(process.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.process.wait(timeout=10)


def final_model(output: Path) -> dict:
    (run,) = output.glob("run-*")
    return load_file(run / "global_model.safetensors")


@pytest.mark.timeout(900)
def test_killed_simulation_resumes_after_its_last_completed_round(tmp_path):
    reference = tmp_path / "uninterrupted"
    run_to_end(command(reference), tmp_path / "uninterrupted.log")

    crashed = tmp_path / "crashed"
    process = ManagedProcess(command(crashed), log_path=tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 300
        while completed_round(crashed) < 1:
            assert process.alive(), process.log_tail(60)
            assert time.monotonic() < deadline, process.log_tail(60)
            time.sleep(0.05)
        kill_tree(process)
    finally:
        process.stop(grace=1)
    done = completed_round(crashed)
    assert 1 <= done < ROUNDS, f"the run was not killed in the middle (round {done})"
    saved = json.loads((crashed / "checkpoint" / "state.json").read_text())
    assert not list(crashed.glob("run-*"))  # it never finished

    text = run_to_end(command(crashed, "--resume"), tmp_path / "resumed.log")
    assert f"Resuming after round {done} of {ROUNDS}" in text
    assert f"[ROUND {ROUNDS - done}/{ROUNDS - done}]" in text  # only the missing rounds ran
    assert f"[ROUND {ROUNDS - done + 1}/" not in text

    (run,) = crashed.glob("run-*")
    report = json.loads((run / "report.json").read_text())
    assert sorted(report["train_metrics"], key=int) == [str(r) for r in range(1, ROUNDS + 1)]
    for rnd, metrics in saved["train_metrics_clientapp"].items():
        assert report["train_metrics"][rnd] == metrics  # kept, not trained again
    expected, got = final_model(reference), final_model(crashed)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert (got[name] == tensor).all(), name
