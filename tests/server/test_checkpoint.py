"""Per-round checkpoints and resume: the storage (atomic, checked) and OTFusion.start."""

from __future__ import annotations

import json

import pytest
import torch
from flower_replies import FakeGrid, global_model, reply
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from otfusion.server.checkpoint import CheckpointError, RunCheckpoint
from otfusion.strategies import OTFusion

RUN_CONFIG = {"model": "mlp", "num-server-rounds": 3, "seed": 0, "resume": False}


def arrays_of(seed: int) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord({k: torch.randn_like(v) for k, v in global_model().state_dict().items()})


def history(rounds: int) -> Result:
    return Result(train_metrics_clientapp={r: MetricRecord({"fusion-seconds": 0.5 * r})
                                           for r in range(1, rounds + 1)},
                  evaluate_metrics_serverapp={r: MetricRecord({"accuracy": r / 10})
                                              for r in range(rounds + 1)})


def assert_same_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    left, right = a.to_torch_state_dict(), b.to_torch_state_dict()
    assert list(left) == list(right)
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_save_then_load_returns_the_round_arrays_and_history(tmp_path):
    checkpoint = RunCheckpoint(tmp_path / "ckpt", RUN_CONFIG)
    assert checkpoint.load() is None
    checkpoint.save(1, arrays_of(1), history(1))
    checkpoint.save(2, arrays_of(2), history(2))
    completed, arrays, saved = checkpoint.load()
    assert completed == 2
    assert_same_arrays(arrays, arrays_of(2))
    assert {r: dict(m) for r, m in saved.train_metrics_clientapp.items()} == {
        1: {"fusion-seconds": 0.5}, 2: {"fusion-seconds": 1.0}}
    assert sorted(saved.evaluate_metrics_serverapp) == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "global_model-00002.safetensors", "state.json"]  # older rounds and temp files gone


def test_an_interrupted_write_leaves_the_previous_round(tmp_path, monkeypatch):
    checkpoint = RunCheckpoint(tmp_path, RUN_CONFIG)
    checkpoint.save(1, arrays_of(1), history(1))
    real_replace = __import__("os").replace

    def crash_on_state(source, target):
        if str(target).endswith("state.json"):
            raise KeyboardInterrupt("killed while committing")
        real_replace(source, target)

    monkeypatch.setattr("otfusion.server.checkpoint.os.replace", crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(2, arrays_of(2), history(2))
    monkeypatch.undo()
    completed, arrays, _ = RunCheckpoint(tmp_path, RUN_CONFIG).load()
    assert completed == 1
    assert_same_arrays(arrays, arrays_of(1))


def test_a_damaged_model_file_is_refused(tmp_path):
    checkpoint = RunCheckpoint(tmp_path, RUN_CONFIG)
    checkpoint.save(1, arrays_of(1), history(1))
    model = tmp_path / "global_model-00001.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        checkpoint.load()
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoint.load()


def test_resume_refuses_other_settings_but_allows_more_rounds(tmp_path):
    RunCheckpoint(tmp_path, RUN_CONFIG).save(1, arrays_of(1), history(1))
    more_rounds = {**RUN_CONFIG, "num-server-rounds": 5, "resume": True}
    assert RunCheckpoint(tmp_path, more_rounds).load()[0] == 1
    with pytest.raises(CheckpointError, match="model: 'mlp' -> 'cnn'"):
        RunCheckpoint(tmp_path, {**RUN_CONFIG, "model": "cnn"}).load()


def test_clear_removes_the_checkpoint(tmp_path):
    checkpoint = RunCheckpoint(tmp_path, RUN_CONFIG)
    checkpoint.save(1, arrays_of(1), history(1))
    checkpoint.clear()
    assert not checkpoint.exists() and checkpoint.load() is None
    assert list(tmp_path.iterdir()) == []


# --- OTFusion.start with a checkpoint -----------------------------------------------

class Killed(Exception):
    """Stands for the server process dying in the middle of a round."""


def training_grid(kill_in_round: int | None = None) -> FakeGrid:
    """Clients that 'train': reply with the received arrays plus a deterministic step
    that depends on the round and the node, so every round's result depends on the
    arrays the round started from."""
    grid = FakeGrid(None)

    def reply_for(rnd, node):
        if rnd == kill_in_round:
            raise Killed(f"round {rnd}")
        received = grid.sent[-1][1].to_torch_state_dict()
        generator = torch.Generator().manual_seed(100 * rnd + node)
        trained = {k: v + 0.1 * torch.randn(v.shape, generator=generator)
                   for k, v in received.items()}
        return reply(node, trained, 10 + node)

    grid.reply_for = reply_for
    return grid


def strategy() -> OTFusion:
    return OTFusion(global_model, min_available_nodes=3, fraction_evaluate=0.0)


@pytest.mark.usefixtures("task_identity")
def test_killed_run_resumes_without_losing_or_repeating_a_round(tmp_path):
    initial = ArrayRecord(global_model().state_dict())
    evaluated: list[int] = []

    def evaluate_fn(rnd, arrays):
        evaluated.append(rnd)
        return MetricRecord({"mean": float(arrays.to_torch_state_dict()["head.bias"].mean())})

    uninterrupted = strategy().start(training_grid(), initial, num_rounds=3,
                                     evaluate_fn=evaluate_fn,
                                     checkpoint=RunCheckpoint(tmp_path / "a", RUN_CONFIG))

    checkpoint = RunCheckpoint(tmp_path / "b", RUN_CONFIG)
    with pytest.raises(Killed):
        strategy().start(training_grid(kill_in_round=3), initial, num_rounds=3,
                         evaluate_fn=evaluate_fn, checkpoint=checkpoint)
    assert json.loads(checkpoint.state_path.read_text())["round"] == 2
    evaluated.clear()
    grid = training_grid()
    resumed = strategy().start(grid, initial, num_rounds=3, evaluate_fn=evaluate_fn,
                               checkpoint=checkpoint)

    assert {rnd for rnd, _ in grid.sent} == {3}  # only the missing round is trained
    assert evaluated == [2, 3]  # the restored model, then round 3
    assert_same_arrays(resumed.arrays, uninterrupted.arrays)
    assert sorted(resumed.train_metrics_clientapp) == [1, 2, 3]
    for name in ("train_metrics_clientapp", "evaluate_metrics_serverapp"):
        got, want = getattr(resumed, name), getattr(uninterrupted, name)
        assert sorted(got) == sorted(want)
        assert {r: dict(m).keys() for r, m in got.items()} == {
            r: dict(m).keys() for r, m in want.items()}
    assert dict(resumed.evaluate_metrics_serverapp[3]) == dict(
        uninterrupted.evaluate_metrics_serverapp[3])
    assert json.loads(checkpoint.state_path.read_text())["round"] == 3


@pytest.mark.usefixtures("task_identity")
def test_a_finished_run_resumes_to_nothing(tmp_path):
    checkpoint = RunCheckpoint(tmp_path, RUN_CONFIG)
    initial = ArrayRecord(global_model().state_dict())
    first = strategy().start(training_grid(), initial, num_rounds=2, checkpoint=checkpoint)
    grid = training_grid()
    again = strategy().start(grid, initial, num_rounds=2, checkpoint=checkpoint)
    assert grid.sent == []
    assert_same_arrays(again.arrays, first.arrays)
    assert sorted(again.train_metrics_clientapp) == [1, 2]
