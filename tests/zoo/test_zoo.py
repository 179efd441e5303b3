"""The model zoo: construction, shapes, tracing, seeding, width kwargs, errors."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from otfusion.zoo import available_models, build_model

MODELS = [
    "mlp", "cnn", "vgg11", "resnet20", "resnet18", "resnet_gn", "mobilenet", "rnn", "lstm",
    "gru", "vit", "transformer", "llama",
]

#: A width keyword per model, and the parameter whose shape it changes.
WIDTH_KWARGS = {
    "mlp": ({"widths": (32, 16, 8)}, "layers.0.weight"),
    "cnn": ({"channels": (8, 12), "hidden": 20}, "features.0.weight"),
    "vgg11": ({"width_multiplier": 0.125}, "features.0.weight"),
    "resnet20": ({"width_multiplier": 0.5}, "conv1.weight"),
    "resnet18": ({"width_multiplier": 0.125}, "conv1.weight"),
    "resnet_gn": ({"width_multiplier": 0.5}, "conv1.weight"),
    "mobilenet": ({"width_multiplier": 0.5}, "conv1.weight"),
    "rnn": ({"hidden_size": 24}, "rnn.weight_hh_l0"),
    "lstm": ({"hidden_size": 24}, "rnn.weight_hh_l0"),
    "gru": ({"hidden_size": 24}, "rnn.weight_hh_l0"),
    "vit": ({"dim": 16, "heads": 2}, "patch_embed.weight"),
    "transformer": ({"dim": 16, "heads": 2}, "embed.weight"),
    "llama": ({"dim": 16, "heads": 4, "kv_heads": 2}, "embed.weight"),
}




def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_available_models_lists_the_zoo() -> None:
    assert set(MODELS) <= set(available_models())
    assert available_models() == sorted(available_models())


@pytest.mark.parametrize("name", MODELS)
def test_builds_with_defaults_and_outputs_logits(name: str) -> None:
    model = build_model(name)
    assert isinstance(model.input_shape, tuple)
    assert model.num_classes == 10
    assert type(model).__doc__ and "nput shape" in type(model).__doc__
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(3, *model.input_shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_fx_traceable_and_equivalent(name: str) -> None:
    model = build_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.rand(4, *model.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_seeding_is_deterministic_and_local(name: str) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = _state(build_model(name, seed=7)), _state(build_model(name, seed=7))
    assert torch.equal(torch.get_rng_state(), before), "global RNG state was disturbed"
    c = _state(build_model(name, seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_seed_none_uses_global_rng() -> None:
    torch.manual_seed(5)
    a = _state(build_model("mlp", seed=None))
    torch.manual_seed(5)
    b = _state(build_model("mlp", seed=None))
    c = _state(build_model("mlp", seed=None))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


@pytest.mark.parametrize("name", MODELS)
def test_width_kwargs_change_parameter_shapes(name: str) -> None:
    kwargs, key = WIDTH_KWARGS[name]
    default = build_model(name).state_dict()
    narrow = build_model(name, **kwargs)
    assert narrow.state_dict()[key].shape != default[key].shape
    assert narrow(torch.rand(2, *narrow.input_shape)).shape == (2, 10)
    assert set(narrow.state_dict()) == set(default)


def test_width_details() -> None:
    mlp = build_model("mlp", in_features=784, num_classes=3, widths=(50, 40, 30, 20))
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [50, 40, 30, 20, 3]
    assert all(lin.bias is not None for lin in linears)
    assert mlp.input_shape == (784,)
    assert mlp(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    assert build_model("mlp", widths=()).head.in_features == 64

    vgg = build_model("vgg11")
    convs = [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [16, 32, 64, 64, 128, 128, 128, 128]
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 3
    big = build_model("vgg11", in_channels=3, image_size=32, batch_norm=True)
    assert sum(isinstance(m, nn.MaxPool2d) for m in big.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in big.modules()) == 8
    assert big(torch.rand(2, 3, 32, 32)).shape == (2, 10)

    r20 = build_model("resnet20")
    assert [r20.layer1[0].conv1.out_channels, r20.layer3[0].conv1.out_channels] == [16, 64]
    assert sum(1 for m in r20.modules() if type(m).__name__ == "BasicBlock") == 9
    assert isinstance(r20.layer1[0].shortcut, nn.Identity)
    assert isinstance(r20.layer2[0].shortcut, nn.Sequential)
    r18 = build_model("resnet18")
    assert r18.layer4[0].conv1.out_channels == 128
    assert sum(1 for m in r18.modules() if type(m).__name__ == "BasicBlock") == 8

    gn = build_model("resnet_gn")
    assert [gn.layer1[0].conv1.out_channels, gn.layer3[0].conv1.out_channels] == [16, 64]
    assert sum(1 for m in gn.modules() if type(m).__name__ == "BasicBlock") == 9
    norms = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 9 * 2 + 2 and all(m.num_groups == 2 for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert isinstance(gn.layer1[0].shortcut, nn.Identity)
    assert isinstance(gn.layer2[0].shortcut, nn.Sequential)
    assert build_model("resnet_gn", num_groups=4).layer1[0].bn1.num_groups == 4

    mobile = build_model("mobilenet")
    blocks = list(mobile.blocks)
    assert [b.use_residual for b in blocks] == [True, False, True, False, True]
    assert [b.project.out_channels for b in blocks] == [16, 24, 24, 32, 32]
    assert blocks[1].expand.out_channels == 16 * 4
    assert all(b.depthwise.groups == b.depthwise.in_channels == b.expand.out_channels
               for b in blocks)
    assert build_model("mobilenet", expansion=6).blocks[0].expand.out_channels == 96
    assert mobile(torch.rand(2, 1, 32, 32)).shape == (2, 10)

    lstm = build_model("lstm", num_layers=2, hidden_size=10)
    assert lstm.rnn.num_layers == 2 and lstm.rnn.batch_first
    assert build_model("rnn").rnn.nonlinearity == "tanh"


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="available models: .*mlp"):
        build_model("perceiver")


def test_bad_kwargs() -> None:
    with pytest.raises(TypeError, match="'cnn'"):
        build_model("cnn", widths=(3,))
    with pytest.raises(ValueError, match="widths"):
        build_model("mlp", widths=(10, 0))
    with pytest.raises(ValueError, match="divisible"):
        build_model("cnn", image_size=6)
    with pytest.raises(ValueError, match="num_groups"):
        build_model("resnet_gn", num_groups=3)
    with pytest.raises(ValueError, match="num_groups"):
        build_model("resnet_gn", num_groups=0)
    with pytest.raises(ValueError, match="expansion"):
        build_model("mobilenet", expansion=1.5)
    with pytest.raises(ValueError, match="width_multiplier"):
        build_model("mobilenet", width_multiplier=0)
    with pytest.raises(TypeError, match="'mobilenet'"):
        build_model("mobilenet", num_groups=2)
