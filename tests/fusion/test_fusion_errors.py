"""Invalid fusion inputs fail early with an error that says what is wrong."""

from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from otfusion.fusion import FusionConfig, UnsupportedModelError, fuse
from otfusion.zoo import build_model


def mlp(widths=(8, 6), seed=0, **kwargs) -> nn.Module:
    return build_model("mlp", seed=seed, widths=widths, **kwargs)


# ------------------------------------------------------------------------------- models


def test_empty_model_list():
    with pytest.raises(ValueError, match="empty"):
        fuse([])


def test_not_a_module():
    with pytest.raises(TypeError, match="model 1"):
        fuse([mlp(), {"layers.0.weight": torch.zeros(8, 64)}])


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda: mlp(widths=(8,)), id="shallower"),
        pytest.param(lambda: mlp(widths=(8, 6, 4)), id="deeper"),
        pytest.param(lambda: build_model("cnn", channels=(8, 6)), id="other-layer-types"),
        pytest.param(lambda: build_model("gru", hidden_size=8), id="recurrent"),
    ],
)
def test_different_architectures(other):
    with pytest.raises(ValueError, match="different architecture"):
        fuse([mlp(), other()])


def test_target_of_a_different_architecture():
    with pytest.raises(ValueError, match="different architecture"):
        fuse([mlp(), mlp(seed=1)], target=mlp(widths=(8,)))


def test_different_input_features_cannot_be_aligned():
    # the input features have no coupling group; the error must still be a clear one
    with pytest.raises(ValueError, match=r"input|layers\.0\.weight"):
        fuse([mlp(in_features=64), mlp(in_features=32)])


def test_different_numbers_of_classes_cannot_be_aligned():
    with pytest.raises(ValueError, match="width differs"):
        fuse([mlp(num_classes=10), mlp(num_classes=5)])


class _TokenClassifier(nn.Module):
    """Token ids in, class logits out; ``input_shape`` alone cannot say the ids are
    integers."""

    input_shape = (5,)

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(11, 6), nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def test_a_token_model_traced_on_zeros_of_its_input_shape_is_told_to_pass_inputs():
    models = [_TokenClassifier(), _TokenClassifier()]
    with pytest.raises(UnsupportedModelError,
                       match="zeros of its input_shape.*token ids.*inputs=x"):
        fuse(models)
    fuse(models, inputs=torch.randint(0, 11, (4, 5)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameter_is_named(bad):
    broken = mlp(seed=1)
    with torch.no_grad():
        broken.layers[2].weight[1, 2] = bad
    with pytest.raises(ValueError, match=r"model 1.*'layers\.2\.weight'.*(NaN|Inf) values"):
        fuse([mlp(), broken])


def test_infinities_in_the_first_model_alone_are_named():
    broken = mlp()
    with torch.no_grad():
        broken.layers[2].weight[1, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"model 1: 'layers\.2\.weight' differs from model "
                                         r"0's, and one of them contains Inf values"):
        fuse([broken, mlp(seed=1)])


def test_the_same_infinities_on_hidden_units_are_refused():
    """Infinities that every model shares pass the input check, but a tensor on hidden
    units is permuted and averaged, which would turn them into NaN."""
    models = [mlp(), mlp(seed=1)]
    with torch.no_grad():
        models[0].layers[2].weight[1, 2] = float("inf")
        models[1].layers[2].weight.copy_(models[0].layers[2].weight)
    with pytest.raises(ValueError, match=r"'layers\.2\.weight' contains Inf values on hidden "
                                         "units"):
        fuse(models)


def test_non_finite_buffer_is_named():
    broken = build_model("vgg11", seed=1, width_multiplier=0.125, batch_norm=True)
    broken.features[1].running_var[0] = float("inf")
    clean = build_model("vgg11", seed=0, width_multiplier=0.125, batch_norm=True)
    with pytest.raises(ValueError, match=r"'features\.1\.running_var'"):
        fuse([clean, broken])


# ------------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        pytest.param([1.0, 2.0], "2 weights for 3 models", id="too-few"),
        pytest.param([1.0, 2.0, 3.0, 4.0], "4 weights for 3 models", id="too-many"),
        pytest.param([1.0, -1.0, 2.0], "non-negative", id="negative"),
        pytest.param([0.0, 0.0, 0.0], "positive", id="all-zero"),
        pytest.param([1.0, float("nan"), 1.0], "finite", id="nan"),
        pytest.param([1.0, float("inf"), 1.0], "finite", id="inf"),
    ],
)
def test_invalid_client_weights(weights, message):
    models = [mlp(seed=k) for k in range(3)]
    with pytest.raises(ValueError, match=message):
        fuse(models, weights=weights)


def test_zero_weight_for_some_clients_is_fine():
    models = [mlp(seed=k) for k in range(3)]
    fused = fuse(models, weights=[0.0, 1.0, 0.0])
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fused(x), models[1](x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- config


def test_activation_cost_needs_inputs():
    with pytest.raises(ValueError, match="inputs"):
        fuse([mlp(), mlp(seed=1)], config=FusionConfig(cost="activations"))


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "fedavg"}, {"solver": "lp"}, {"reg": 0.0}, {"max_iter": 0}, {"unknown": 1}],
)
def test_invalid_config_values(kwargs):
    with pytest.raises(pydantic.ValidationError):
        FusionConfig.from_options(**kwargs)


def test_average_needs_identical_shapes():
    with pytest.raises(ValueError, match=r"identical shapes.*'layers\.0\.weight'"):
        fuse([mlp(widths=(8, 6)), mlp(widths=(10, 6))], config=FusionConfig(method="average"))


class _TwoInputs(nn.Module):
    """Token ids and dense features, as a Wide&Deep model takes them."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(20, 8), nn.Linear(11, 3)

    def forward(self, ids, dense):
        return self.fc(torch.cat([self.embed(ids).mean(1), dense], 1))


@pytest.mark.parametrize("pack", [tuple, list, lambda x: dict(enumerate(x))])
def test_several_inputs_are_refused_by_name(pack):
    """A model fed several tensors gets the refusal, not a crash inside the engine."""
    from otfusion.fusion import align, traced_graph

    a, b = _TwoInputs(), _TwoInputs()
    inputs = pack([torch.randint(0, 20, (4, 5)), torch.randn(4, 3)])
    for run in (lambda: fuse([a, b], inputs=inputs), lambda: align(b, a, inputs=inputs)):
        with pytest.raises(ValueError, match="inputs must be one batch tensor, got a"):
            run()
    assert traced_graph(a, inputs) is None


def test_model_without_input_shape_needs_inputs():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.relu(self.fc(x)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models = [Plain(), Plain()]
    with pytest.raises(ValueError, match="input_shape"):
        fuse(models)
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    fused = fuse(models, inputs=inputs)  # fine with inputs
    assert isinstance(fused, Plain)


# ------------------------------------------------------------------- unsupported models


class _ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle interleaves the channels of different groups, which no
    block-structured coupling describes."""

    def __init__(self):
        super().__init__()
        self.input_shape = (2, 8, 8)
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.stem(x))))
        b, c, h, w = x.shape
        x = x.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(x.mean((2, 3)))


class _Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_shape = (6,)
        self.fc = nn.Linear(6, 8)
        self.mix = nn.Bilinear(8, 8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.head(self.mix(h, h))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_shape = (6,)
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # data-dependent control flow
            h = torch.relu(h)
        return self.head(h)


@pytest.mark.parametrize(
    ("factory", "named"),
    [
        pytest.param(_ChannelShuffle, "channel shuffle", id="channel-shuffle"),
        pytest.param(_Bilinear, "'mix' of type Bilinear", id="module-without-rule"),
        pytest.param(_Untraceable, "_Untraceable", id="data-dependent-control-flow"),
    ],
)
def test_unsupported_model_is_named(factory, named):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        models = [factory(), factory()]
    with pytest.raises(UnsupportedModelError, match=named):
        fuse(models)


def test_unsupported_model_error_is_a_value_error():
    assert issubclass(UnsupportedModelError, ValueError)


def test_a_model_failing_on_the_inputs_passed_is_not_told_to_pass_inputs():
    with pytest.raises(UnsupportedModelError, match="failed") as raised:
        fuse([mlp(), mlp(seed=1)], inputs=torch.randn(4, 7))
    assert "inputs=x" not in str(raised.value)
