"""Quiet input features: found from the clients' moments, folded from a first Linear's
weights into its bias, and scrambled in the distillation for any model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otfusion.fusion import FusionConfig, InputMoments, fuse_result
from otfusion.fusion.graph.tracer import input_linear
from otfusion.fusion.quiet_inputs import fold_quiet_inputs, quiet_inputs, scramble_quiet
from otfusion.zoo import build_model


def _moments(var: torch.Tensor, mean: torch.Tensor | None = None) -> InputMoments:
    return InputMoments(torch.zeros_like(var) if mean is None else mean, var)


def _mlp(seed: int = 0) -> nn.Module:
    return build_model("mlp", in_features=6, widths=(5,), num_classes=3, seed=seed).eval()


def _fold(model: nn.Module, moments: list[InputMoments]) -> int:
    """The number of quiet features (ratio 0.1) folded into ``model``'s first Linear."""
    quiet = quiet_inputs(moments, 0.1)
    return quiet.count if quiet is not None and fold_quiet_inputs(model, quiet) else 0


LIVE = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 0.0])  # the last feature never varies
MEAN = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.7])


def test_a_quiet_feature_is_folded_at_its_mean():
    model = _mlp()
    folded = copy.deepcopy(model)
    assert _fold(folded, [_moments(LIVE, MEAN)] * 3) == 1
    x = torch.randn(8, 6)
    x[:, 5] = 0.7  # the clients' data: the quiet feature at its mean
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
        triggered = x.clone()
        triggered[:, 5] = 50.0  # a trigger there reaches nothing
        torch.testing.assert_close(folded(triggered), folded(x))
    assert torch.equal(folded.layers[0].weight[:, :5], model.layers[0].weight[:, :5])


def test_a_minority_cannot_make_a_feature_varied_or_quiet():
    honest = [_moments(LIVE, MEAN)] * 3
    liars = [_moments(torch.tensor([1.0, 0.0, 0.5, 1.5, 1.0, 9.0]), MEAN)] * 2
    model = _mlp()
    assert _fold(model, honest + liars) == 1
    assert torch.all(model.layers[0].weight[:, 5] == 0)  # quiet, whatever two claim
    assert torch.all(model.layers[0].weight[:, 1] != 0)  # loud, whatever two claim


class _ConvFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(12, 3)
        self.input_shape = (6,)

    def forward(self, x):
        return self.fc(self.conv(x.unsqueeze(1)).flatten(1))


class _Standardised(nn.Module):
    """The input is standardised before the Linear: its weights see other values."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("scale", torch.full((6,), 2.0))

    def forward(self, x):
        return self.fc(x * self.scale)


@pytest.mark.parametrize("factory", [_ConvFirst, _Standardised])
def test_nothing_is_folded_unless_a_linear_reads_the_input_first(factory):
    model = factory()
    before = copy.deepcopy(model.state_dict())
    assert _fold(model, [_moments(LIVE)] * 3) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Flattened(nn.Module):
    """An MLP on images, flattened as user code often does it, its first layer used
    once (``reuse=""``), applied again to its own output (``"again"``), tied to a second
    layer's weight (``"tied"``) or read directly (``"read"``)."""

    def __init__(self, reuse: str = ""):
        super().__init__()
        self.reuse, self.fc, self.head = reuse, nn.Linear(6, 6), nn.Linear(6, 3)
        self.second = nn.Linear(6, 6)
        if reuse == "tied":
            self.second.weight = self.fc.weight

    def forward(self, x):
        h = torch.relu(self.fc(x.view(x.size(0), -1)))
        if self.reuse == "again":
            h = self.fc(h)
        elif self.reuse == "read":
            h = F.linear(h, self.fc.weight)
        return self.head(self.second(h) if self.reuse == "tied" else h)


def test_input_linear_follows_flattening_only():
    assert input_linear(build_model("mlp", in_features=6, widths=(5,)), 6) == "layers.0"
    assert input_linear(_Flattened(), 6) == "fc"
    for reuse in ("again", "tied", "read"):  # its weights see other inputs too
        assert input_linear(_Flattened(reuse), 6) is None, reuse
    assert input_linear(_Standardised(), 6) is None
    assert input_linear(_ConvFirst(), 6) is None
    assert input_linear(build_model("mlp", in_features=6, widths=(5,)), 3) is None


def test_half_of_the_clients_cannot_make_a_feature_quiet():
    honest = [_moments(torch.ones(6))] * 2
    liars = [_moments(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0]))] * 2
    assert _fold(_mlp(), honest + liars) == 0


class _Counting(nn.Module):
    """Counts its calls in a buffer that forward updates (tracing leaves a proxy there)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_the_folded_model_still_runs():
    model = _Counting()
    assert _fold(model, [_moments(LIVE, MEAN)] * 3) == 1
    assert isinstance(model.calls, torch.Tensor) and model(torch.randn(2, 6)).shape == (2, 3)


def test_fewer_than_three_clients_fold_nothing():
    assert _fold(_mlp(), [_moments(LIVE)] * 2) == 0


def test_the_fusion_folds_with_the_clients_moments_and_counts_them():
    models = [_mlp(seed) for seed in range(3)]
    moments = [_moments(LIVE, MEAN)] * 3
    on = fuse_result(models, config=FusionConfig.from_options(
        distill_steps=0, robust_quiet_inputs=0.1), input_moments=moments)
    off = fuse_result(models, config=FusionConfig.from_options(distill_steps=0),
                      input_moments=moments)  # off by default
    assert (on.quiet_inputs, off.quiet_inputs) == (1, 0)
    assert torch.all(on.model.layers[0].weight[:, 5] == 0)
    assert torch.equal(on.model.layers[0].weight[:, :5], off.model.layers[0].weight[:, :5])


def test_scrambling_draws_half_of_the_quiet_features_across_the_range():
    quiet = quiet_inputs([_moments(LIVE, MEAN)] * 3, 0.1)
    assert quiet.mask.tolist() == [False] * 5 + [True]
    spread = 3 * LIVE.sqrt()
    assert (quiet.low, quiet.high) == pytest.approx(
        (float((MEAN - spread).min()), float((MEAN + spread).max())))
    x = torch.randn(4000, 6)
    scrambled = scramble_quiet(x, quiet, torch.Generator().manual_seed(0))
    assert torch.equal(scrambled[:, :5], x[:, :5])
    changed = scrambled[:, 5] != x[:, 5]
    assert 0.45 < changed.double().mean() < 0.55
    values = scrambled[changed, 5]
    assert quiet.low <= values.min() and values.max() <= quiet.high
    assert values.std() > 0.25 * (quiet.high - quiet.low)  # spread across the range


def _sensitivity(model: nn.Module, feature: int, value: float) -> float:
    """How far ``model``'s probabilities move when a trigger sets ``feature`` to ``value``
    on inputs like the clients' data."""
    x = MEAN + LIVE.sqrt() * torch.randn(512, 6, generator=torch.Generator().manual_seed(1))
    triggered = x.clone()
    triggered[:, feature] = value
    with torch.no_grad():
        return float((F.softmax(model(triggered), 1) - F.softmax(model(x), 1)).abs().mean())


def test_the_distillation_teaches_a_convolution_to_ignore_quiet_features():
    """A convolution cannot be folded; its distillation on scrambled quiet features
    leaves it nearly blind to a trigger there."""
    teachers = []
    for seed in range(3):
        torch.manual_seed(seed)
        teachers.append(_ConvFirst().eval())
    moments = [_moments(LIVE, MEAN)] * 3

    def fused(**options):
        return fuse_result(teachers, config=FusionConfig.from_options(
            robust_screen=False, **options), input_moments=moments)

    on, off = fused(robust_quiet_inputs=0.1), fused()
    assert (on.quiet_inputs, off.quiet_inputs) == (1, 0)
    high = float(quiet_inputs(moments, 0.1).high)
    assert _sensitivity(on.model, 5, high) < 0.2 * _sensitivity(off.model, 5, high)
    assert _sensitivity(on.model, 1, 4.0) > 0.5 * _sensitivity(off.model, 1, 4.0)


@pytest.mark.parametrize("patience", [None, 1])
def test_agreeing_clients_still_teach_the_fused_model_to_ignore_quiet_features(patience):
    """Clients that agree leave nothing to distil on the data's inputs; the scrambled
    quiet features still are (and early stopping measures them scrambled too)."""
    torch.manual_seed(0)
    client = _ConvFirst().eval()
    moments = [_moments(LIVE, MEAN)] * 3
    result = fuse_result([client] * 3, config=FusionConfig.from_options(
        robust_screen=False, robust_quiet_inputs=0.1, distill_patience=patience),
        input_moments=moments)
    high = float(quiet_inputs(moments, 0.1).high)
    assert result.quiet_inputs == 1
    assert _sensitivity(result.model, 5, high) < 0.2 * _sensitivity(client, 5, high)
