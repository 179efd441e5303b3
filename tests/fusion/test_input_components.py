"""Principal components of the clients' inputs: what a client computes and sends, how
the server checks and pools them, and the correlated synthetic inputs drawn from them."""

from __future__ import annotations

import pytest
import torch

from otfusion.fusion import InputMoments, input_moments, pool_moments
from otfusion.fusion import moments as moments_module
from otfusion.fusion.config import DistillationConfig
from otfusion.fusion.distillation import distill
from otfusion.fusion.moments import (
    MIN_EXAMPLES_PER_COMPONENT,
    leading_components,
    principal_components,
    synthetic_inputs,
)
from otfusion.strategies.replies import (
    MAX_INPUT_COMPONENTS,
    check_input_components,
    reply_digest,
)
from otfusion.zoo import build_model


def _low_rank(count: int, features: int, rank: int, seed: int,
              shift: float = 0.0) -> torch.Tensor:
    """``count`` inputs of ``features`` (as 2 x features/2) on a random ``rank``-dimensional
    affine subspace, so that ``rank`` components describe their covariance exactly."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, features, generator=generator, dtype=torch.float64)
    x = torch.randn(count, rank, generator=generator, dtype=torch.float64) @ basis
    return (x + shift + torch.randn(features, generator=generator)).reshape(count, 2, -1)


def _covariance(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The population covariance of the flattened rows of ``x``, each row weighted by
    ``weights`` (summing to one; uniform by default), written out."""
    flat = x.reshape(len(x), -1).double()
    a = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64) if weights is None else weights
    mean = (a[:, None] * flat).sum(0)
    centred = flat - mean
    return (a[:, None] * centred).T @ centred


def _gram(components: torch.Tensor) -> torch.Tensor:
    flat = components.double().flatten(1)
    return flat.T @ flat


@pytest.mark.parametrize("count, features", [(200, 6), (40, 50)])  # both Gram matrices
def test_principal_components_are_the_covariance_leading_eigenpairs(count, features):
    """Against an eigendecomposition of the covariance written out: ``components.T @
    components`` is its best approximation of rank 2, and the whole covariance when the
    data have rank 3 and three components are asked for."""
    x = _low_rank(count, features, rank=3, seed=0)
    covariance = _covariance(x)
    values, vectors = torch.linalg.eigh(covariance)
    best = (vectors[:, -2:] * values[-2:]) @ vectors[:, -2:].T
    two = principal_components(x, 2)
    assert two.shape == (2, 2, features // 2) and two.dtype == torch.float32
    torch.testing.assert_close(_gram(two), best, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_gram(principal_components(x, 3)), covariance, rtol=1e-4,
                               atol=1e-4)
    assert len(principal_components(x, 10)) == 3  # the data's rank, no vanishing ones
    assert torch.equal(input_moments(x, components=2).components, two)
    assert input_moments(x).components is None


def test_a_client_describes_one_component_per_ten_examples():
    x = _low_rank(3 * MIN_EXAMPLES_PER_COMPONENT - 1, 8, rank=6, seed=1)
    assert len(principal_components(x, 16)) == 2
    assert principal_components(x[:MIN_EXAMPLES_PER_COMPONENT - 1], 16) is None
    assert principal_components(x, 0) is None


def test_the_randomised_path_finds_the_same_components(monkeypatch):
    """Past the size of an exact decomposition, a seeded randomised SVD: on rows of
    rank 4 its four components give the same matrix, and again on a second call."""
    rows = _low_rank(30, 20, rank=4, seed=2).flatten(1)
    exact = leading_components(rows, 4)
    monkeypatch.setattr(moments_module, "_DIRECT_LIMIT", 5)
    randomised = leading_components(rows, 4)
    torch.testing.assert_close(_gram(randomised), _gram(exact), rtol=1e-8, atol=1e-8)
    assert torch.equal(leading_components(rows, 4), randomised)


def test_pooled_components_describe_the_mixture_covariance():
    """Three clients of rank-2 data around different means, each sending its two
    components: the pooled components are the whole covariance of the union, each
    client's examples weighted by its weight (written out example by example), and the
    pooled variance its diagonal."""
    parts = [_low_rank(40, 6, 2, seed=s, shift=s) for s in range(3)]
    weights = [1.0, 2.0, 3.0]
    pooled = pool_moments([input_moments(x, components=2) for x in parts], weights,
                          outlier_factor=None)
    per_example = torch.cat([torch.full((len(x),), w / len(x), dtype=torch.float64)
                             for x, w in zip(parts, weights, strict=True)]) / sum(weights)
    union = _covariance(torch.cat(parts), per_example)
    torch.testing.assert_close(_gram(pooled.components), union, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled.var.double().flatten(), union.diagonal(), rtol=1e-4,
                               atol=1e-4)
    assert pool_moments([input_moments(x) for x in parts], weights).components is None


def test_a_shrunk_client_has_its_components_shrunk_too():
    """A client whose inputs spread a hundred times wider than the others is shrunk
    towards the median before pooling: its components by the same factor as its
    standard deviations, so the pooled components never describe more variance than
    the pooled variance holds."""
    honest = [input_moments(_low_rank(50, 6, 3, seed=s), components=3) for s in range(4)]
    wide = input_moments(100 * _low_rank(50, 6, 3, seed=9), components=3)
    pooled = pool_moments([*honest, wide], [1.0] * 5)
    described = _gram(pooled.components).diagonal()
    assert bool((described <= pooled.var.double().flatten() * (1 + 1e-4)).all())
    assert float(pooled.var.max()) < 1e3


def test_correlated_inputs_have_the_components_covariance_and_the_variances():
    """Many draws: their covariance is ``components.T @ components`` plus the variance
    the components leave out on the diagonal, and each feature's variance is ``var``."""
    components = torch.tensor([[[1.0, 0.5, 0.0]], [[0.0, 0.5, -0.5]]])
    var = torch.tensor([[1.5, 0.6, 0.25]])
    moments = InputMoments(torch.tensor([[1.0, -2.0, 0.5]]), var, components=components)
    draws = synthetic_inputs(moments, 200_000, torch.Generator().manual_seed(0))
    assert draws.shape == (200_000, 1, 3)
    expected = _gram(components)
    expected += torch.diag(var.double().flatten() - expected.diagonal())
    torch.testing.assert_close(_covariance(draws), expected, rtol=0, atol=0.02)
    torch.testing.assert_close(draws.mean(0), moments.mean, rtol=0, atol=0.01)


def test_without_components_inputs_are_drawn_feature_by_feature_as_before():
    mean, var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 4.0, 0.25])
    draws = synthetic_inputs(InputMoments(mean, var), 5, torch.Generator().manual_seed(3))
    noise = torch.randn((5, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(draws, mean + var.sqrt() * noise)


def test_a_share_of_the_inputs_is_drawn_along_the_components():
    """``correlated=0.3`` of 10 inputs: the first 3 along the components, written out
    from the same generator, then 7 feature by feature; 0 ignores the components."""
    components = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    moments = InputMoments(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([5.0, 2.0, 2.5]),
                           components=components)
    draws = synthetic_inputs(moments, 10, torch.Generator().manual_seed(7), correlated=0.3)
    generator = torch.Generator().manual_seed(7)
    z = torch.randn((3, 2), generator=generator)
    left_out = torch.tensor([5.0 - 4.0, 2.0 - 1.0, 2.5 - 2.0]).sqrt()
    along = moments.mean + z @ components + left_out * torch.randn((3, 3), generator=generator)
    rest = moments.mean + moments.var.sqrt() * torch.randn((7, 3), generator=generator)
    torch.testing.assert_close(draws, torch.cat([along, rest]))
    plain = synthetic_inputs(moments._replace(components=None), 10,
                             torch.Generator().manual_seed(7))
    assert torch.equal(synthetic_inputs(moments, 10, torch.Generator().manual_seed(7),
                                        correlated=0.0), plain)


def test_distillation_uses_the_components_unless_told_not_to():
    """The same student, teacher and moments: with ``correlated`` 0 the components make
    no difference; otherwise they change the synthetic inputs and so the distilled
    student."""
    x = _low_rank(200, 8, 3, seed=4).reshape(200, 8)
    moments = input_moments(x, components=3)
    teacher = build_model("mlp", seed=1, in_features=8, widths=(6,))
    students = {}
    for name, config, given in [
            ("plain", DistillationConfig(steps=5, samples=64, correlated=0), moments),
            ("stripped", DistillationConfig(steps=5, samples=64),
             moments._replace(components=None)),
            ("correlated", DistillationConfig(steps=5, samples=64), moments)]:
        student = build_model("mlp", seed=0, in_features=8, widths=(6,))
        distill(student, [teacher], [1.0], given, config)
        students[name] = student.state_dict()
    for name, tensor in students["plain"].items():
        assert torch.equal(tensor, students["stripped"][name])
    assert any(not torch.equal(tensor, students["correlated"][name])
               for name, tensor in students["plain"].items())


def _sent(moments: InputMoments) -> list[float]:
    return moments.components.flatten().tolist()


def test_the_server_accepts_honest_components_and_rejects_what_widens_the_inputs():
    moments = input_moments(_low_rank(100, 6, 4, seed=5), components=3)
    plain = moments._replace(components=None)
    checked = check_input_components(plain, _sent(moments))
    assert torch.equal(checked.components, moments.components)
    assert check_input_components(plain, None) is plain
    assert check_input_components(None, _sent(moments)) is None  # no moments to add to
    assert reply_digest({}, 1.0, None, checked) != reply_digest({}, 1.0, None, plain)
    reasons = {
        "too wide": moments.components * 2,  # more variance than input-var holds
        "ragged": _sent(moments)[:-1],
        "too many": [0.0] * (6 * (MAX_INPUT_COMPONENTS + 1)),
        "not finite": [float("nan")] * 6,
        "not a list": 3.0,
    }
    for what, value in reasons.items():
        sent = value.flatten().tolist() if isinstance(value, torch.Tensor) else value
        reason = check_input_components(plain, sent)
        assert isinstance(reason, str) and "input-components" in reason, what
    assert "more variance than 'input-var'" in check_input_components(
        plain, reasons["too wide"].flatten().tolist())


def test_screening_draws_feature_by_feature_whatever_the_components():
    """The screening's thresholds were measured on inputs drawn feature by feature: the
    components change nothing it decides."""
    from otfusion.fusion import FusionConfig
    from otfusion.fusion.screening import screened_out

    x = _low_rank(400, 16, 4, seed=6).reshape(400, 16)
    moments = input_moments(x, components=4)
    models = [build_model("mlp", seed=s, in_features=16, widths=(8,)) for s in range(6)]
    with torch.no_grad():
        models[5].head.weight.mul_(-30)
    config = FusionConfig()
    assert (screened_out(models, moments, None, config)
            == screened_out(models, moments._replace(components=None), None, config))
