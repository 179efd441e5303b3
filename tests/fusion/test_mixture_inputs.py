"""Synthetic inputs from the mixture of the clients' own Gaussians
(``DistillationConfig.mixture``, :func:`~otfusion.fusion.moments.mixture_inputs`).

Pinned: each client contributes its weight's share of the inputs, drawn from its own
moments (mean, variance and components), in a random order and deterministically; a
client with extreme moments is shrunk as pooling shrinks it; the distillation's teachers
are asked about inputs from the mixture exactly when every teacher sent its moments.
"""

from __future__ import annotations

import pytest
import torch

from otfusion.fusion import FusionConfig, InputMoments, fuse_result
from otfusion.fusion import distillation as distillation_module
from otfusion.fusion.moments import mixture_inputs
from otfusion.zoo import build_model

FEATURES = 6


def _client(centre: float, var: float = 0.01) -> InputMoments:
    return InputMoments(torch.full((FEATURES,), centre), torch.full((FEATURES,), var))


def _nearest(x: torch.Tensor, centres: list[float]) -> torch.Tensor:
    """Index of the centre each input lies next to (all features close to it)."""
    distances = torch.stack([(x - c).abs().amax(dim=1) for c in centres])
    return distances.argmin(dim=0)


def test_each_client_contributes_its_share_from_its_own_gaussian():
    clients = [_client(-4.0, 0.04), _client(0.0, 0.25), _client(4.0, 1.0)]
    weights = [1.0, 2.0, 5.0]
    x = mixture_inputs(clients, weights, 16000, torch.Generator().manual_seed(0),
                       outlier_factor=None)
    assert x.shape == (16000, FEATURES)
    who = _nearest(x, [-4.0, 0.0, 4.0])
    for k, client in enumerate(clients):
        share = float((who == k).double().mean())
        assert share == pytest.approx(weights[k] / sum(weights), abs=0.015)
        mine = x[who == k]
        torch.testing.assert_close(mine.mean(dim=0), client.mean, rtol=0, atol=0.05)
        torch.testing.assert_close(mine.var(dim=0), client.var, rtol=0.08, atol=0)
    first = who[:200]
    assert len(set(first.tolist())) == 3  # shuffled, not client by client
    again = mixture_inputs(clients, weights, 16000, torch.Generator().manual_seed(0),
                           outlier_factor=None)
    assert torch.equal(x, again)


def test_a_clients_components_correlate_its_inputs():
    direction = torch.zeros(1, FEATURES)
    direction[0, :2] = 2.0  # features 0 and 1 vary together, standard deviation 2
    var = torch.full((FEATURES,), 0.01)
    var[:2] += 4.0
    client = InputMoments(torch.zeros(FEATURES), var, components=direction)
    x = mixture_inputs([client, _client(50.0)], [1.0, 1.0], 20000,
                       torch.Generator().manual_seed(1), outlier_factor=None)
    mine = x[_nearest(x, [0.0, 50.0]) == 0]
    assert float(torch.corrcoef(mine[:, :2].T)[0, 1]) > 0.99
    assert abs(float(torch.corrcoef(mine[:, 2:4].T)[0, 1])) < 0.05


def test_a_client_with_extreme_moments_is_shrunk_as_pooling_shrinks_it():
    honest = [_client(0.0, 1.0) for _ in range(4)]
    hostile = InputMoments(torch.full((FEATURES,), 1e6), torch.full((FEATURES,), 1e6))
    x = mixture_inputs([*honest, hostile], [1.0] * 5, 4000, torch.Generator().manual_seed(2))
    # the median spread is 1: the hostile client is brought within 3 of the median mean,
    # root mean square over its features
    assert float(x.square().mean(dim=1).sqrt().max()) < 3 * 6
    assert float((x.abs() > 100).double().mean()) == 0.0


def _recorded_inputs(monkeypatch, client_moments, mixture: float) -> torch.Tensor:
    """The inputs the teachers of one fusion's distillation were asked about (screening
    off: it asks them too)."""
    seen = []
    original = distillation_module.ensemble_probabilities

    def recording(teachers, weights, inputs, **kwargs):
        seen.append(inputs.detach().clone())
        return original(teachers, weights, inputs, **kwargs)

    monkeypatch.setattr(distillation_module, "ensemble_probabilities", recording)
    models = [build_model("mlp", seed=k, in_features=FEATURES, widths=(8,), num_classes=3)
              for k in range(len(client_moments))]
    config = FusionConfig.from_options(distill_steps=5, distill_samples=2000,
                                       distill_batch_size=50, distill_mixture=mixture,
                                       robust_screen=False)
    fuse_result(models, [1.0] * len(models), config, input_moments=client_moments)
    return seen[0]


def _apart(offset: float) -> InputMoments:
    """Unit variance, but feature 0 is ``offset``, give or take 0.1: two such clients
    spread alike (nothing to shrink) and their pooled Gaussian has variance 9 there."""
    mean, var = torch.zeros(FEATURES), torch.ones(FEATURES)
    mean[0], var[0] = offset, 0.01
    return InputMoments(mean, var)


@pytest.mark.parametrize("mixture", [1.0, 0.5, 0.0])
def test_the_distillation_draws_its_share_from_the_clients_mixture(monkeypatch, mixture):
    """Clients at -3 and +3 in feature 0: their mixture never draws it within 1.5 of 0,
    their pooled moments' one Gaussian (standard deviation 3) in 38% of the inputs."""
    x = _recorded_inputs(monkeypatch, [_apart(-3.0), _apart(3.0)], mixture)
    assert len(x) == 2000
    between = float((x[:, 0].abs() < 1.5).double().mean())
    assert between == pytest.approx((1 - mixture) * 0.383, abs=0.035)


def test_without_every_clients_moments_all_inputs_come_from_the_pooled_ones(monkeypatch):
    x = _recorded_inputs(monkeypatch, [_apart(-3.0), _apart(3.0), None], 1.0)
    assert float((x[:, 0].abs() < 1.5).double().mean()) == pytest.approx(0.383, abs=0.035)
