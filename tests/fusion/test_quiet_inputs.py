"""Folding a first Linear's weights on quiet input features into its bias."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otfusion.fusion import FusionConfig, InputMoments, fuse_result
from otfusion.fusion.graph.tracer import input_linear
from otfusion.fusion.quiet_inputs import fold_quiet_inputs
from otfusion.zoo import build_model


def _moments(var: torch.Tensor, mean: torch.Tensor | None = None) -> InputMoments:
    return InputMoments(torch.zeros_like(var) if mean is None else mean, var)


def _mlp(seed: int = 0) -> nn.Module:
    return build_model("mlp", in_features=6, widths=(5,), num_classes=3, seed=seed).eval()


LIVE = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 0.0])  # the last feature never varies
MEAN = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.7])


def test_a_quiet_feature_is_folded_at_its_mean():
    model = _mlp()
    folded = copy.deepcopy(model)
    assert fold_quiet_inputs(folded, [_moments(LIVE, MEAN)] * 3, 0.1) == 1
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
    assert fold_quiet_inputs(model, honest + liars, 0.1) == 1
    assert torch.all(model.layers[0].weight[:, 5] == 0)  # quiet, whatever two claim
    assert torch.all(model.layers[0].weight[:, 1] != 0)  # loud, whatever two claim


class _ConvFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(12, 3)

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
    assert fold_quiet_inputs(model, [_moments(LIVE)] * 3, 0.1) == 0
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
    assert fold_quiet_inputs(_mlp(), honest + liars, 0.1) == 0


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
    assert fold_quiet_inputs(model, [_moments(LIVE, MEAN)] * 3, 0.1) == 1
    assert isinstance(model.calls, torch.Tensor) and model(torch.randn(2, 6)).shape == (2, 3)


def test_fewer_than_three_clients_fold_nothing():
    assert fold_quiet_inputs(_mlp(), [_moments(LIVE)] * 2, 0.1) == 0


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
