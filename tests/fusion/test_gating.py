"""The gated teacher: each client's vote on a synthetic input weighted by its Gaussian
density there, from the input moments it sent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otfusion.fusion import FusionConfig, InputMoments, fuse_result, input_moments, pool_moments
from otfusion.fusion.distillation import distill, ensemble_probabilities
from otfusion.fusion.gating import gates, log_densities
from otfusion.zoo import build_model

SMALL = {"in_features": 6, "widths": (8,), "num_classes": 3}


def _moments(mean: float, std: float, components: torch.Tensor | None = None,
             features: int = 6) -> InputMoments:
    return InputMoments(torch.full((features,), mean), torch.full((features,), std ** 2),
                        components=components)


def test_log_densities_are_the_gaussians_log_densities_per_feature():
    """Against torch.distributions: covariance components.T @ components plus the
    variance they leave out and the floor, log-density divided by the features, up to
    one constant shared by the clients."""
    generator = torch.Generator().manual_seed(0)
    components = torch.randn(2, 6, generator=generator) * 0.3
    clients = [_moments(0.5, 1.0, components), _moments(-1.0, 0.5)]
    clients[0] = clients[0]._replace(var=clients[0].var + torch.arange(6.0) / 10)
    x = torch.randn(5, 6, generator=generator)
    floor = 0.05
    got = log_densities(clients, x, floor)
    for k, m in enumerate(clients):
        c = (torch.zeros(0, 6) if m.components is None else m.components).double()
        diagonal = (m.var.double() - c.square().sum(0)).clamp_min(0) + floor
        gaussian = torch.distributions.MultivariateNormal(
            m.mean.double(), covariance_matrix=c.T @ c + torch.diag(diagonal))
        expected = (gaussian.log_prob(x.double()) + 3 * math.log(2 * math.pi)) / 6
        torch.testing.assert_close(got[k], expected)


def test_gates_follow_the_client_that_saw_inputs_like_it():
    far, near = _moments(-3.0, 0.3), _moments(3.0, 0.3)
    x = torch.cat([torch.full((4, 6), 3.0), torch.full((4, 6), -3.0)])
    g = gates([far, near], [1.0, 1.0], 9.0, x)
    assert g.shape == (8, 2)
    torch.testing.assert_close(g.sum(dim=1), torch.ones(8, dtype=torch.float64))
    assert bool((g[:4, 1] > 0.999).all()) and bool((g[4:, 0] > 0.999).all())
    same = gates([near, near], [1.0, 3.0], 9.0, x)  # alike clients: their weights
    torch.testing.assert_close(same, torch.tensor([[0.25, 0.75]] * 8, dtype=torch.float64))


def test_balanced_gates_give_every_client_its_weight_on_average():
    """A client whose moments are broad, likely everywhere, would win most inputs; the
    balanced gates hold its mean share to its weight."""
    specialists = [_moments(-2.0, 0.5), _moments(2.0, 0.5)]
    broad = _moments(0.0, 2.0)
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(1)) * 2
    weights = [1.0, 1.0, 1.0]
    greedy = gates([*specialists, broad], weights, 4.0, x, balanced=False)
    assert float(greedy[:, 2].mean()) > 0.6  # the broad client takes most inputs
    held = gates([*specialists, broad], weights, 4.0, x)
    torch.testing.assert_close(held.mean(dim=0), torch.full((3,), 1 / 3, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(held.sum(dim=1), torch.ones(400, dtype=torch.float64))
    silent = gates([*specialists, broad], [1.0, 0.0, 1.0], 4.0, x)
    assert bool(silent.isfinite().all()) and float(silent[:, 1].max()) == 0.0
    torch.testing.assert_close(silent.mean(dim=0), torch.tensor([0.5, 0, 0.5],
                                                                dtype=torch.float64),
                               atol=1e-6, rtol=0)


class _Constant(nn.Module):
    """Always the same logits: one class, confidently."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(F.one_hot(torch.tensor(label), 3).float() * 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), 3)


def test_the_gated_ensemble_takes_each_input_from_the_client_that_knows_it():
    models = [_Constant(0), _Constant(2)]
    x = torch.cat([torch.full((2, 6), -3.0), torch.full((2, 6), 3.0)])
    g = gates([_moments(-3.0, 0.3), _moments(3.0, 0.3)], [1.0, 1.0], 9.0, x)
    got = ensemble_probabilities(models, [1.0, 1.0], x, class_share=0.0, gates=g)
    assert got[:2].argmax(dim=1).tolist() == [0, 0] and got[2:].argmax(dim=1).tolist() == [2, 2]
    counts = [[5, 5, 0], [0, 5, 5]]
    mixed = ensemble_probabilities(models, [1.0, 1.0], x, class_weights=counts,
                                   class_share=0.5)
    gated_mixed = ensemble_probabilities(models, [1.0, 1.0], x, class_weights=counts,
                                         class_share=0.5, gates=g)
    by_class = ensemble_probabilities(models, [1.0, 1.0], x, class_weights=counts)
    torch.testing.assert_close(gated_mixed, 0.5 * by_class + 0.5 * got)
    assert not torch.allclose(gated_mixed, mixed)
    plain = ensemble_probabilities(models, [1.0, 1.0], x)  # without counts: half the mean
    torch.testing.assert_close(ensemble_probabilities(models, [1.0, 1.0], x, class_share=0.5,
                                                      gates=g), 0.5 * plain + 0.5 * got)


def _distilled_state(teacher: str, client_moments, seed: int = 9) -> dict[str, torch.Tensor]:
    teachers = [build_model("mlp", seed=k, **SMALL) for k in range(2)]
    student = build_model("mlp", seed=seed, **SMALL)
    pooled = _moments(0.0, 2.0)
    config = FusionConfig.from_options(distill_teacher=teacher, distill_steps=20,
                                       distill_samples=64).distillation
    distill(student, teachers, [1.0, 1.0], pooled, config, [[5, 5, 0], [0, 5, 5]],
            client_moments=client_moments)
    return student.state_dict()


def test_without_every_clients_moments_the_gated_teacher_is_the_mixed_one():
    mixed = _distilled_state("mixed", None)
    for known in (None, [_moments(-1.0, 1.0), None]):  # pooled only, or one kept its own
        gated = _distilled_state("gated", known)
        assert all(torch.equal(gated[k], t) for k, t in mixed.items())
    gated = _distilled_state("gated", [_moments(-1.0, 1.0), _moments(1.0, 1.0)])
    assert any(not torch.equal(gated[k], t) for k, t in mixed.items())


@pytest.mark.parametrize("teacher", ["gated", "mixed"])
def test_fuse_result_gates_with_the_clients_own_moments(teacher, monkeypatch):
    import otfusion.fusion.distillation as distillation

    seen = []
    original = distillation.gates
    monkeypatch.setattr(distillation, "gates",
                        lambda moments, *args, **kwargs: seen.append(moments)
                        or original(moments, *args, **kwargs))
    models = [build_model("mlp", seed=k, **SMALL) for k in range(3)]
    sent = [_moments(float(k), 1.0) for k in range(3)]
    config = FusionConfig.from_options(distill_teacher=teacher, distill_steps=5,
                                       robust_screen=False)
    fuse_result(models, [1.0, 1.0, 1.0], config, input_moments=sent,
                class_weights=[[5, 5, 0], [0, 5, 5], [5, 0, 5]])
    assert (seen[0] == sent) if teacher == "gated" else not seen


def test_the_floor_is_in_units_of_the_pooled_variance():
    clients = [_moments(-1.0, 0.5), _moments(2.0, 0.2)]
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    logs = log_densities(clients, x, 0.3 * 2.5)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    expected = torch.softmax(w.log()[:, None] + logs / 0.1, dim=0).T
    torch.testing.assert_close(gates(clients, [1.0, 3.0], 2.5, x, balanced=False), expected)


def test_one_client_claiming_a_huge_variance_does_not_widen_the_others():
    """The floor comes from the pooled moments, whose outliers are shrunk: the gates
    of honest specialists stay sharp beside a client claiming a variance of 1e6."""
    specialists = [_moments(-3.0, 0.3), _moments(3.0, 0.3)]
    wide = _moments(0.0, 1000.0)
    x = torch.cat([torch.full((4, 6), 3.0), torch.full((4, 6), -3.0)])
    for_all = [*specialists, wide]
    weights = [1.0, 1.0, 0.02]
    pooled = pool_moments(for_all, weights)
    g = gates(for_all, weights, float(pooled.var.double().mean()), x)
    assert float(g[:4, 1].min()) > 0.9 and float(g[4:, 0].min()) > 0.9


def test_the_strategy_gates_with_the_moments_every_reply_sent():
    from flower_replies import client_states, fusion_order, global_model, load, reply

    from otfusion.strategies import OTFusion

    config = FusionConfig.from_options(distill_steps=20, distill_samples=128)
    states, weights = client_states(), [10, 20, 30]
    generator = torch.Generator().manual_seed(3)
    moments = [input_moments(torch.rand(40, 64, generator=generator) + k, components=2)
               for k in range(3)]
    replies = [reply(5 + k, s, n, **{"input-mean": m.mean.tolist(), "input-var": m.var.tolist(),
                                     "input-components": m.components.flatten().tolist()})
               for k, (s, n, m) in enumerate(zip(states, weights, moments, strict=True))]
    arrays, _ = OTFusion(global_model, config).aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    order = fusion_order(states, weights, moments)
    args = ([load(states[k]) for k in order], [weights[k] / 30 for k in order], config)
    gated = fuse_result(*args, target=global_model(),
                        input_moments=[moments[k] for k in order]).model.state_dict()
    assert all(torch.equal(got[name], tensor) for name, tensor in gated.items())
    pooled = fuse_result(*args, target=global_model(), input_moments=pool_moments(
        [moments[k] for k in order], [weights[k] for k in order])).model.state_dict()
    assert any(not torch.equal(got[name], tensor) for name, tensor in pooled.items())
