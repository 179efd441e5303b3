"""The fusion engine on re-typings of torchvision's classification models
(``tests/torchvision_like.py``: torchvision's module structure, state_dict keys and
forward idioms at reduced widths; torchvision itself cannot be installed here).

For every model the engine accepts (exact OT, ``FusionConfig.from_options(distill_steps=0)``, eval
mode), with ``a`` and ``b`` initialised from seeds 0 and 1:

1. ``align(b, a)`` computes b's function (relative L2 difference of the outputs below
   ``TOL``), with b's hidden tensors really reordered, and leaves b alone. In float64:
   float32 rounding over ResNet-18's depth reaches 2e-6, too close to ``TOL``; float64
   gives about 1e-15, and a wrong permutation gives more than 1e-3 in either;
2. ``fuse([a, b])`` (float32) runs and returns a model of a's architecture (same
   state_dict keys, shapes and dtypes) with finite outputs.

The models the engine refuses raise ``UnsupportedModelError`` naming the node, from both
``fuse`` and ``align``:

* ``shufflenet_v2_x0_5``: its channel shuffle (``view``/``transpose``/``view``)
  interleaves the units of two branches, which no per-group permutation describes.

The sanity checks (``-k sanity``) need no engine: the state_dict keys are torchvision's,
the function check has teeth, the two seeds give different functions, and the refused
models run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision_like as tv
from model_checks import assert_same_layout, changed_keys
from torch import nn

TOL = 1e-5

SUPPORTED = [
    "mobilenet_v2",
    "resnet18",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "densenet121",
    "regnet_y_400mf",
    "efficientnet_b0",
    "vit_b_16",
]
# model -> the node the refusal must name
REFUSED = {
    "shufflenet_v2_x0_5": "view_1",
}

# keys of torchvision's own state_dicts (at these models' depths)
TORCHVISION_KEYS = {
    "mobilenet_v2": ["features.0.0.weight", "features.0.1.running_var",
                     "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                     "features.2.conv.0.0.weight", "features.2.conv.1.0.weight",
                     "features.2.conv.2.weight", "features.2.conv.3.running_mean",
                     "classifier.1.weight"],
    "resnet18": ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight",
                 "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var",
                 "layer4.1.bn2.weight", "fc.weight"],
    "mobilenet_v3_small": ["features.0.0.weight", "features.1.block.0.0.weight",
                           "features.1.block.1.fc1.weight", "features.1.block.1.fc2.bias",
                           "features.1.block.2.1.running_var", "features.2.block.0.0.weight",
                           "features.4.block.2.fc1.weight", "classifier.0.weight",
                           "classifier.3.weight"],
    "efficientnet_b0": ["features.0.0.weight", "features.1.0.block.0.0.weight",
                        "features.1.0.block.1.fc1.weight", "features.1.0.block.2.1.weight",
                        "features.2.0.block.2.fc2.weight", "features.4.1.block.3.1.running_var",
                        "features.5.0.weight", "classifier.1.weight"],
    "shufflenet_v2_x0_5": ["conv1.0.weight", "stage2.0.branch1.0.weight",
                           "stage2.0.branch1.2.weight", "stage2.1.branch2.0.weight",
                           "stage4.1.branch2.6.running_mean", "conv5.1.weight", "fc.weight"],
    "squeezenet1_1": ["features.0.weight", "features.3.squeeze.weight",
                      "features.3.expand1x1.weight", "features.12.expand3x3.bias",
                      "classifier.1.weight"],
    "densenet121": ["features.conv0.weight", "features.norm0.running_mean",
                    "features.denseblock1.denselayer1.norm1.weight",
                    "features.denseblock1.denselayer2.conv2.weight",
                    "features.transition1.conv.weight", "features.norm5.running_var",
                    "classifier.weight"],
    "regnet_y_400mf": ["stem.0.weight", "stem.1.running_var",
                       "trunk_output.block1.block1-0.proj.0.weight",
                       "trunk_output.block1.block1-0.f.a.0.weight",
                       "trunk_output.block1.block1-0.f.b.0.weight",
                       "trunk_output.block2.block2-1.f.se.fc1.weight",
                       "trunk_output.block2.block2-1.f.c.1.bias", "fc.weight"],
    "vit_b_16": ["class_token", "conv_proj.weight", "encoder.pos_embedding",
                 "encoder.layers.encoder_layer_0.ln_1.weight",
                 "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                 "encoder.layers.encoder_layer_0.self_attention.out_proj.weight",
                 "encoder.layers.encoder_layer_1.mlp.0.weight",
                 "encoder.layers.encoder_layer_1.mlp.3.bias", "encoder.ln.weight",
                 "heads.head.weight"],
}

SUPPORTED_CASES = [pytest.param(name, id=name) for name in SUPPORTED]
REFUSED_CASES = [pytest.param(name, node, id=name) for name, node in REFUSED.items()]
ALL_CASES = [pytest.param(name, id=name) for name in tv.MODELS]


def engine():
    """``otfusion.fusion``, imported by the tests that call it (the sanity checks do not
    depend on the engine)."""
    from otfusion import fusion

    return fusion


def config():
    return engine().FusionConfig.from_options(distill_steps=0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def pair(name: str, dtype: torch.dtype = torch.float32):
    """Models a (seed 0) and b (seed 1) and a batch of inputs, in ``dtype``."""
    return tv.build(name, 0, dtype), tv.build(name, 1, dtype), tv.inputs(0, dtype=dtype)


def test_the_lists_cover_every_model():
    assert sorted([*SUPPORTED, *REFUSED]) == sorted(tv.MODELS) == sorted(TORCHVISION_KEYS)


# ---------------------------------------------------------------------------- sanity


@pytest.mark.parametrize("name", ALL_CASES)
def test_sanity_torchvision_state_dict_keys(name):
    model = tv.build(name, 0)
    keys = set(model.state_dict())
    missing = [key for key in TORCHVISION_KEYS[name] if key not in keys]
    assert not missing
    y = outputs(model, tv.inputs(0))
    assert y.shape == (2, tv.NUM_CLASSES)
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("name", ALL_CASES)
def test_sanity_norms_and_zero_inits_are_randomised(name):
    """Fresh norms (ones and zeros) and zero biases would hide a wrongly permuted tensor."""
    model = tv.build(name, 0)
    for key, tensor in model.state_dict().items():
        assert not tensor.is_floating_point() or bool(tensor.any()), key
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d | nn.LayerNorm):
            assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))
        if isinstance(norm, nn.BatchNorm2d):
            assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


@pytest.mark.parametrize("name", ALL_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sanity_the_outputs_depend_on_the_input(seed, name):
    """A model whose activations die out computes a constant, which any permutation
    keeps: the two images of the batch must give clearly different outputs."""
    y = outputs(tv.build(name, seed), tv.inputs(0))
    assert rel(y[0], y[1]) > 0.05


@pytest.mark.parametrize("name", SUPPORTED_CASES)
def test_sanity_the_function_check_has_teeth(name):
    """Reordering the output channels of the first weight alone changes the outputs well
    beyond ``TOL``."""
    _, b, x = pair(name)
    broken = copy.deepcopy(b)
    first = next(p for p in broken.parameters() if p.dim() >= 2 and p.shape[0] > 1)
    with torch.no_grad():
        first.copy_(first.roll(1, dims=0))
    assert rel(outputs(broken, x), outputs(b, x)) > 1e-3


@pytest.mark.parametrize("name", SUPPORTED_CASES)
def test_sanity_the_seeds_give_different_functions(name):
    a, b, x = pair(name)
    assert rel(outputs(a, x), outputs(b, x)) > 1e-2


def test_sanity_build_leaves_the_global_rng_alone():
    before = torch.random.get_rng_state()
    tv.build("resnet18", 3)
    assert torch.equal(torch.random.get_rng_state(), before)


# ---------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("name", SUPPORTED_CASES)
def test_align_keeps_the_function(name):
    a, b, x = pair(name, torch.float64)
    before = copy.deepcopy(b.state_dict())
    aligned = engine().align(b, a, config=config(), inputs=x)
    assert_same_layout(aligned, b)
    assert rel(outputs(aligned, x), outputs(b, x)) < TOL
    changed = changed_keys(b, aligned)
    assert changed, "nothing was permuted toward the reference"
    assert list(before)[-1] not in changed, "the classes were reordered"
    for key, tensor in before.items():  # the aligned model is a new one
        assert torch.equal(b.state_dict()[key], tensor), key


@pytest.mark.parametrize("name", SUPPORTED_CASES)
def test_fuse_gives_a_model_of_the_same_architecture(name):
    a, b, x = pair(name)
    fused = engine().fuse([a, b], config=config(), inputs=x)
    assert type(fused) is type(a)
    assert_same_layout(fused, a)
    assert bool(torch.isfinite(outputs(fused, x)).all())


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name,node", REFUSED_CASES)
def test_fuse_refuses(name, node):
    a, b, x = pair(name)
    with pytest.raises(engine().UnsupportedModelError, match=rf"'{node}'"):
        engine().fuse([a, b], config=config(), inputs=x)


@pytest.mark.parametrize("name,node", REFUSED_CASES)
def test_align_refuses(name, node):
    a, b, x = pair(name)
    with pytest.raises(engine().UnsupportedModelError, match=rf"'{node}'"):
        engine().align(b, a, config=config(), inputs=x)
