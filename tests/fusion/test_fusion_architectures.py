"""The fusion engine on architectures beyond the zoo (``tests/architectures.py``).

Oracles, for every supported architecture (exact OT, ``FusionConfig.from_options(distill_steps=0)``,
eval mode):

1. sanity: the hand-written permutation helper returns a copy that computes the same
   function and whose state really differs (``-k sanity`` runs these, and the checks
   that each oracle has teeth);
2. invariance: fusing a model with two permuted copies of itself gives back its function;
3. align: ``align(b, a)`` of two independently initialised models computes b's function
   with b's tensors really reordered toward a;
4. align undoes a permutation: ``align(permuted copy, model)`` has the model's state.

Refusals: models whose hidden units must not be permuted (pooling across them, a conv's
channels used as an LSTM's time axis) raise ``UnsupportedModelError`` naming the module.
dtypes: bfloat16 and float16 models keep their dtype through fuse and align.
"""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import (
    REFUSED,
    SUPPORTED,
    make_conv_lstm,
    make_maxpool_hidden,
    make_mlp,
    permute_mlp,
    pool_inputs,
    vector_inputs,
)
from model_checks import assert_same_layout, changed_keys
from torch import nn

TOL = 1e-5
STATE_TOL = 1e-6

CASES = [pytest.param(name, id=name) for name in SUPPORTED]
REFUSAL_CASES = [pytest.param(name, id=name) for name in REFUSED]
DTYPE_CASES = [
    pytest.param(torch.bfloat16, 1e-2, id="bfloat16"),
    pytest.param(torch.float16, 1e-3, id="float16"),
]


def engine():
    """``otfusion.fusion``, imported by the tests that call it, so that the sanity checks
    of the permutation helpers do not depend on the engine's state."""
    from otfusion import fusion

    return fusion


def fuse(models, **kwargs) -> nn.Module:
    fusion = engine()
    return fusion.fuse(models, config=fusion.FusionConfig.from_options(distill_steps=0), **kwargs)


def align(model, reference, **kwargs) -> nn.Module:
    fusion = engine()
    return fusion.align(model, reference, config=fusion.FusionConfig.from_options(distill_steps=0),
                        **kwargs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).float()


def family(name: str, seed: int = 0, copies: int = 2):
    """The model (seed ``seed``), ``copies`` permuted copies of it, and a batch of inputs."""
    arch = SUPPORTED[name]
    generator = torch.Generator().manual_seed(500 + seed)
    model = arch.make(seed)
    permuted = [arch.permute(model, generator) for _ in range(copies)]
    return model, permuted, arch.inputs(generator)


def assert_same_state(got: nn.Module, expected: nn.Module, tol: float = STATE_TOL) -> None:
    state, other = expected.state_dict(), got.state_dict()
    assert list(other) == list(state)
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            assert torch.equal(other[key], tensor), key
            continue
        assert torch.allclose(other[key].float(), tensor.float(), rtol=tol, atol=tol), key


# ------------------------------------------------------------ 1. the permutation helpers


@pytest.mark.parametrize("name", CASES)
def test_sanity_permuted_copy_computes_the_same_function(name):
    model, (permuted,), x = family(name, copies=1)
    before = copy.deepcopy(model.state_dict())
    assert permuted is not model
    assert rel(outputs(permuted, x), outputs(model, x)) < TOL
    assert changed_keys(model, permuted), "the helper permuted nothing"
    assert_same_layout(permuted, model)
    for key, tensor in before.items():  # the original is left alone
        assert torch.equal(model.state_dict()[key], tensor), key


@pytest.mark.parametrize("name", CASES)
def test_sanity_a_broken_permutation_is_detected(name):
    """The function check has teeth: reordering the rows of the first weight matrix alone
    changes the outputs."""
    model, _, x = family(name, copies=0)
    broken = copy.deepcopy(model)
    first = next(p for p in broken.parameters() if p.dim() >= 2)
    with torch.no_grad():
        first.copy_(first.roll(1, dims=0))
    assert rel(outputs(broken, x), outputs(model, x)) > 1e-3


@pytest.mark.parametrize("name", CASES)
def test_sanity_independent_seeds_give_different_functions(name):
    """Oracle 3 compares two models that really differ."""
    arch = SUPPORTED[name]
    x = arch.inputs(torch.Generator().manual_seed(0))
    assert rel(outputs(arch.make(1), x), outputs(arch.make(0), x)) > 1e-2


def test_sanity_groupnorm_needs_whole_groups():
    """A perm of GroupNorm(4, 8)'s channels that mixes two groups, applied consistently
    (conv1 rows, gn1, conv2 columns), changes the function: only block-structured perms
    are symmetries, so the engine must couple whole groups."""
    model, _, x = family("groupnorm", copies=0)
    broken = copy.deepcopy(model)
    swap = torch.tensor([2, 1, 0, 3, 4, 5, 6, 7])  # channel 0 (group 0) <-> 2 (group 1)
    with torch.no_grad():
        broken.conv1.weight.copy_(broken.conv1.weight[swap])
        broken.conv1.bias.copy_(broken.conv1.bias[swap])
        broken.gn1.weight.copy_(broken.gn1.weight[swap])
        broken.gn1.bias.copy_(broken.gn1.bias[swap])
        broken.conv2.weight.copy_(broken.conv2.weight[:, swap])
    assert rel(outputs(broken, x), outputs(model, x)) > 1e-3


def test_sanity_refused_axes_are_not_permutable():
    """What would be a legal perm without the pooling / the recurrence changes these
    models' functions, so refusing them is right."""
    generator = torch.Generator().manual_seed(0)
    pool = make_maxpool_hidden(0)
    x = pool_inputs(generator)
    moved = copy.deepcopy(pool)
    perm = torch.randperm(10, generator=generator)
    with torch.no_grad():
        moved.fc1.weight.copy_(moved.fc1.weight[perm])
        moved.fc1.bias.copy_(moved.fc1.bias[perm])
        moved.fc2.weight.copy_(moved.fc2.weight[:, perm])
    assert rel(outputs(moved, x), outputs(pool, x)) > 1e-3

    conv_lstm = make_conv_lstm(0)
    x = REFUSED["conv-lstm"][1](generator)
    moved = copy.deepcopy(conv_lstm)
    perm = torch.randperm(6, generator=generator)
    with torch.no_grad():
        moved.conv.weight.copy_(moved.conv.weight[perm])
        moved.conv.bias.copy_(moved.conv.bias[perm])
    assert rel(outputs(moved, x), outputs(conv_lstm, x)) > 1e-3


@pytest.mark.parametrize("name", REFUSAL_CASES)
def test_sanity_refused_models_run(name):
    make, inputs, _ = REFUSED[name]
    y = outputs(make(0), inputs(torch.Generator().manual_seed(0)))
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("dtype,tol", DTYPE_CASES)
def test_sanity_low_precision_permuted_copy(dtype, tol):
    generator = torch.Generator().manual_seed(7)
    model = make_mlp(0, dtype)
    permuted = permute_mlp(model, generator)
    x = vector_inputs(generator).to(dtype)
    assert all(p.dtype == dtype for p in permuted.parameters())
    assert rel(outputs(permuted, x), outputs(model, x)) < tol
    assert changed_keys(model, permuted)


# ------------------------------------------------------------------------- 2. invariance


@pytest.mark.parametrize("name", CASES)
def test_fuse_permuted_copies_gives_back_the_function(name):
    model, (p1, p2), x = family(name)
    fused = fuse([model, p1, p2], inputs=x)
    assert_same_layout(fused, model)
    assert rel(outputs(fused, x), outputs(model, x)) < TOL


# --------------------------------------------------------------------------- 3. align


@pytest.mark.parametrize("name", CASES)
def test_align_independent_models_keeps_the_function(name):
    arch = SUPPORTED[name]
    a, b = arch.make(1), arch.make(2)
    x = arch.inputs(torch.Generator().manual_seed(3))
    before = copy.deepcopy(b.state_dict())
    aligned = align(b, a, inputs=x)
    assert_same_layout(aligned, b)
    assert rel(outputs(aligned, x), outputs(b, x)) < TOL
    assert changed_keys(b, aligned), "nothing was permuted toward the reference"
    for key, tensor in before.items():  # the aligned model is a new one
        assert torch.equal(b.state_dict()[key], tensor), key


# ------------------------------------------------------------ 4. align undoes a permutation


@pytest.mark.parametrize("name", CASES)
def test_align_undoes_a_permutation(name):
    model, (p1,), x = family(name, seed=4, copies=1)
    aligned = align(p1, model, inputs=x)
    assert_same_state(aligned, model)
    assert rel(outputs(aligned, x), outputs(model, x)) < TOL


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", REFUSAL_CASES)
def test_fuse_refuses(name):
    make, inputs, module = REFUSED[name]
    model, other = make(0), make(1)
    x = inputs(torch.Generator().manual_seed(0))
    with pytest.raises(engine().UnsupportedModelError, match=rf"\b{module}\b"):
        fuse([model, other], inputs=x)


@pytest.mark.parametrize("name", REFUSAL_CASES)
def test_align_refuses(name):
    make, inputs, module = REFUSED[name]
    model, other = make(0), make(1)
    x = inputs(torch.Generator().manual_seed(0))
    with pytest.raises(engine().UnsupportedModelError, match=rf"\b{module}\b"):
        align(other, model, inputs=x)


def test_unsupported_model_error_is_a_value_error():
    assert issubclass(engine().UnsupportedModelError, ValueError)


# ------------------------------------------------------------------------------ dtypes


def _low_precision_family(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(11)
    model = make_mlp(0, dtype)
    permuted = [permute_mlp(model, generator) for _ in range(2)]
    return model, permuted, vector_inputs(generator).to(dtype)


def _assert_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == dtype, key


@pytest.mark.parametrize("dtype,tol", DTYPE_CASES)
def test_fuse_low_precision_keeps_dtype_and_function(dtype, tol):
    model, (p1, p2), x = _low_precision_family(dtype)
    fused = fuse([model, p1, p2], inputs=x)
    _assert_dtype(fused, dtype)
    assert rel(outputs(fused, x), outputs(model, x)) < tol


@pytest.mark.parametrize("dtype,tol", DTYPE_CASES)
def test_align_low_precision_keeps_dtype_and_function(dtype, tol):
    model, (p1, _), x = _low_precision_family(dtype)
    other = make_mlp(1, dtype)
    aligned = align(other, model, inputs=x)
    _assert_dtype(aligned, dtype)
    assert rel(outputs(aligned, x), outputs(other, x)) < tol
    assert changed_keys(other, aligned)

    back = align(p1, model, inputs=x)
    _assert_dtype(back, dtype)
    assert_same_state(back, model, tol=tol)
