"""``benchmarks/peer_dense.py``, the DENSE-style comparison row: its generator starts in
the clients' input range, its BatchNorm prior is DeepInversion's, and it distils the
student towards the teachers without changing them."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from otfusion.fusion import InputMoments
from otfusion.fusion.distillation import ensemble_probabilities
from otfusion.fusion.moments import synthetic_inputs
from otfusion.zoo import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from peer_dense import Generator, _BatchNormPrior, dense_distill  # noqa: E402

MOMENTS = InputMoments(torch.linspace(0, 1, 64), torch.linspace(0.01, 0.2, 64))


def test_the_generator_starts_at_the_clients_input_moments():
    generator = Generator(MOMENTS, num_classes=10)
    torch.manual_seed(0)
    x = generator(torch.randn(512, generator.noise), torch.randint(0, 10, (512,)))
    assert x.shape == (512, 64)
    torch.testing.assert_close(x.mean(dim=0), MOMENTS.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(x.var(dim=0, unbiased=False), MOMENTS.var, atol=1e-3, rtol=1e-3)


def test_the_batchnorm_prior_is_zero_exactly_at_the_running_statistics():
    norm = nn.BatchNorm1d(3).eval()
    x = torch.randn(50, 3) * 2 + 1
    prior = _BatchNormPrior([norm])
    norm.running_mean.copy_(x.mean(dim=0))
    norm.running_var.copy_(x.var(dim=0, unbiased=False))
    norm(x)
    assert float(prior.take()) < 1e-5
    norm.running_mean.add_(0.5)
    norm(x)
    assert abs(float(prior.take()) - 0.5 * 3 ** 0.5) < 1e-4
    prior.close()
    norm(x)
    assert prior.losses == []


def test_dense_distill_moves_the_student_towards_the_unchanged_teachers():
    teachers = [build_model("mlp", seed=k, widths=(16, 12)) for k in range(3)]
    frozen = [copy.deepcopy(t.state_dict()) for t in teachers]
    student = build_model("mlp", seed=7, widths=(16, 12))
    x = synthetic_inputs(MOMENTS, 500, torch.Generator().manual_seed(1))
    target = ensemble_probabilities(teachers, [1, 2, 3], x)

    def divergence() -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(student(x), dim=1), target,
                                  reduction="batchmean"))

    before = divergence()
    dense_distill(student, teachers, [1, 2, 3], MOMENTS, steps=60, batch_size=64, lr=1e-2)
    assert divergence() < 0.5 * before
    for teacher, state in zip(teachers, frozen, strict=True):
        assert all(torch.equal(teacher.state_dict()[n], t) for n, t in state.items())
        assert all(p.requires_grad for p in teacher.parameters())
