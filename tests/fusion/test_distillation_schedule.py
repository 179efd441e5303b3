"""How long and how the distillation trains: early stopping on held-out synthetic
inputs, the learning-rate schedule, the temperature, and the progress it reports.

Pinned behaviour on small MLPs: early stopping stops after ``patience`` measurements
without improvement and keeps the best measured student; the cosine schedule's learning
rates are the formula's; a temperature softens the teachers as written by hand; the
progress callback sees every measurement and changes nothing.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from otfusion.fusion import FusionConfig, InputMoments
from otfusion.fusion.distillation import distill, ensemble_probabilities
from otfusion.fusion.moments import synthetic_inputs
from otfusion.zoo import build_model

SMALL = {"widths": (16, 12)}
MOMENTS = InputMoments(torch.full((64,), 0.5), torch.full((64,), 0.1))
BASE = FusionConfig.from_options(distill_samples=256, distill_batch_size=64,
                                 distill_lr=1e-2).distillation
WEIGHTS = [1.0, 2.0, 3.0]


def _teachers():
    return [build_model("mlp", seed=k, **SMALL) for k in range(3)]


def _student():
    return build_model("mlp", seed=7, **SMALL)


def _held_out_divergence(student, teachers, config) -> float:
    """The student's divergence on the held-out inputs, drawn here as the distillation
    draws them: after its ``samples`` training inputs, from the same seed."""
    generator = torch.Generator().manual_seed(config.seed)
    synthetic_inputs(MOMENTS, config.samples, generator)
    held_out = synthetic_inputs(MOMENTS, config.samples // 4, generator)
    targets = ensemble_probabilities(teachers, WEIGHTS, held_out)
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student(held_out), dim=1), targets,
                              reduction="batchmean"))


def _run(config, student=None):
    """Distil a fresh student (or ``student``); the student and the progress calls."""
    student = student or _student()
    calls = []
    distill(student, _teachers(), WEIGHTS, MOMENTS, config,
            progress=lambda step, steps, divergence: calls.append((step, steps, divergence)))
    return student, calls


def test_early_stopping_stops_after_patience_measurements_without_improvement():
    """A learning rate so large that every step makes the student worse: training stops
    after ``patience`` measurements and the student is the one it started as."""
    config = BASE.model_copy(update={"steps": 1000, "lr": 50.0, "patience": 2,
                                     "eval_every": 5})
    start = _student()
    student, calls = _run(config, copy.deepcopy(start))
    assert [(step, steps) for step, steps, _ in calls] == [(5, 1000), (10, 1000)]
    before = _held_out_divergence(start, _teachers(), config)
    assert all(divergence > before for _, _, divergence in calls)
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, start.state_dict()[name]), name


def test_early_stopping_keeps_the_best_measured_student():
    config = BASE.model_copy(update={"steps": 300, "lr": 3e-2, "patience": 3,
                                     "eval_every": 10})
    student, calls = _run(config)
    measured = [divergence for _, _, divergence in calls]
    best = min(range(len(measured)), key=measured.__getitem__)
    assert _held_out_divergence(student, _teachers(), config) == pytest.approx(
        measured[best], rel=1e-5)
    stopped = calls[-1][0] < 300
    assert not stopped or len(measured) - 1 - best == config.patience
    assert measured[best] < 0.5 * _held_out_divergence(_student(), _teachers(), config)


def test_without_patience_every_step_is_taken_and_progress_changes_nothing():
    config = BASE.model_copy(update={"steps": 45, "eval_every": 10})
    student, calls = _run(config)
    assert [step for step, _, _ in calls] == [10, 20, 30, 40, 45]
    assert all(math.isfinite(loss) and loss >= 0 for _, _, loss in calls)
    quiet = _student()
    distill(quiet, _teachers(), WEIGHTS, MOMENTS, config)
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, quiet.state_dict()[name]), name


def test_cosine_schedule_anneals_the_learning_rate_to_zero(monkeypatch):
    rates = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    config = BASE.model_copy(update={"steps": 8, "schedule": "cosine"})
    _run(config)
    expected = [config.lr * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(8)]
    assert rates == pytest.approx(expected, rel=1e-9)
    rates.clear()
    _run(config.model_copy(update={"schedule": "constant"}))
    assert rates == [config.lr] * 8


def test_temperature_softens_every_teacher_before_the_mean():
    teachers = _teachers()
    x = synthetic_inputs(MOMENTS, 32, torch.Generator().manual_seed(1))
    with torch.no_grad():
        by_hand = sum(w / 6 * F.softmax(t(x) / 4.0, dim=1)
                      for w, t in zip(WEIGHTS, teachers, strict=True))
    softened = ensemble_probabilities(teachers, WEIGHTS, x, temperature=4.0)
    torch.testing.assert_close(softened, by_hand)
    plain = ensemble_probabilities(teachers, WEIGHTS, x)
    assert softened.max() < plain.max()


def test_a_temperature_still_distils_towards_the_ensemble():
    config = BASE.model_copy(update={"steps": 60, "temperature": 4.0})
    start = _held_out_divergence(_student(), _teachers(), config)
    student, _ = _run(config)
    assert _held_out_divergence(student, _teachers(), config) < 0.5 * start


def test_the_round_logs_the_distillation_progress_and_its_final_divergence(caplog):
    """What the ServerApp log (and the flower-server console) shows of a distillation."""
    from flower_replies import client_states, global_model, reply

    from otfusion.fusion import input_moments
    from otfusion.strategies import OTFusion

    config = FusionConfig.from_options(distill_steps=30, distill_eval_every=10,
                                       distill_samples=128, distill_batch_size=32)
    generator = torch.Generator().manual_seed(0)
    replies = []
    for k, state in enumerate(client_states()):
        m = input_moments(torch.rand(20, 64, generator=generator))
        replies.append(reply(5 + k, state, 20, **{"input-mean": m.mean.tolist(),
                                                   "input-var": m.var.tolist()}))
    with caplog.at_level("INFO"):
        _, metrics = OTFusion(global_model, config).aggregate_train(1, replies)
    steps = [line for line in caplog.messages if "distillation step" in line]
    assert [line.split("step ")[1].split(",")[0] for line in steps] == ["10/30", "20/30",
                                                                         "30/30"]
    assert f"final divergence {metrics['distill-kl']:.4f}" in caplog.text

