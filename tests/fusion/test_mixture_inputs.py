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


@pytest.mark.parametrize("component", [False, True])
def test_a_client_with_extreme_moments_is_shrunk_as_pooling_shrinks_it(component):
    """The median spread is 1: the hostile client is brought within 3 of the median
    mean, root mean square over its features, its variance and its components alike
    (a variance of 1e12 carried by one component of 1e6)."""
    honest = [_client(0.0, 1.0) for _ in range(4)]
    big = torch.full((FEATURES,), 1e6)
    hostile = (InputMoments(big, big) if not component else
               InputMoments(big, torch.full((FEATURES,), 1e12), components=big[None]))
    x = mixture_inputs([*honest, hostile], [1.0] * 5, 4000, torch.Generator().manual_seed(2))
    assert float(x.square().mean(dim=1).sqrt().max()) < 3 * 6
    assert float((x.abs() > 100).double().mean()) == 0.0


def test_float64_components_and_no_samples():
    client = InputMoments(torch.zeros(FEATURES), torch.ones(FEATURES),
                          components=torch.ones(2, FEATURES, dtype=torch.float64))
    x = mixture_inputs([client, _client(1.0)], [1.0, 1.0], 10, torch.Generator())
    assert x.dtype == torch.float32 and x.shape == (10, FEATURES)
    assert mixture_inputs([client], [1.0], 0, torch.Generator()).shape == (0, FEATURES)
    with pytest.raises(ValueError, match="one weight per set"):
        mixture_inputs([client], [1.0, 2.0], 10, torch.Generator())


def _recorded_inputs(monkeypatch, client_moments, mixture: float, **options
                     ) -> list[torch.Tensor]:
    """The inputs the teachers of one fusion's distillation were asked about, in order
    (screening off: it asks them too): the training inputs, then any held-out ones."""
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
                                       robust_screen=False, **options)
    fuse_result(models, [1.0] * len(models), config, input_moments=client_moments)
    return seen


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
    training, held_out = _recorded_inputs(monkeypatch, [_apart(-3.0), _apart(3.0)], mixture,
                                          distill_patience=1, distill_eval_every=5)
    assert (len(training), len(held_out)) == (2000, 500)
    for x, tolerance in ((training, 0.035), (held_out, 0.07)):
        between = float((x[:, 0].abs() < 1.5).double().mean())
        assert between == pytest.approx((1 - mixture) * 0.383, abs=tolerance)


@pytest.mark.parametrize("correlated", [0.0, 1.0])
def test_each_clients_inputs_follow_its_components_as_correlated_says(monkeypatch,
                                                                      correlated):
    """Features 1 and 2 vary together (correlation 1) in both clients' components."""
    clients = []
    for offset in (-3.0, 3.0):
        moments = _apart(offset)
        direction = torch.zeros(1, FEATURES)
        direction[0, 1:3] = 1.0
        clients.append(moments._replace(components=direction))
    (x,) = _recorded_inputs(monkeypatch, clients, 1.0, distill_correlated=correlated)
    correlation = float(torch.corrcoef(x[:, 1:3].T)[0, 1])
    assert correlation == pytest.approx(correlated, abs=0.1)


def test_without_every_clients_moments_all_inputs_come_from_the_pooled_ones(monkeypatch):
    """Also when they came per class: those are pooled and drawn class by class."""
    for clients in ([_apart(-3.0), _apart(3.0), None],
                    [m._replace(class_mean=m.mean[None], class_var=m.var[None],
                                class_count=torch.ones(1)) for m in (_apart(-3), _apart(3))]):
        (x,) = _recorded_inputs(monkeypatch, clients, 1.0)
        between = float((x[:, 0].abs() < 1.5).double().mean())
        assert between == pytest.approx(0.383, abs=0.035)
