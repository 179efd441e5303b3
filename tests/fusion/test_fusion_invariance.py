"""Fusing a model with hidden-unit-permuted copies of itself must give back its function.

Permuted copies compute exactly the same function, so the barycenter of the copies is
the model itself: every coupling the engine finds must undo the permutations. The
permutations come from ``tests/permutations.py``, written independently of the engine,
so a wrong tie of axes in the engine's alignment graph (a missed BatchNorm statistic, a
residual stream split in two, a gate block permuted differently) shows up as different
logits.

Tolerances (relative L2 difference of the logits on a random batch):
* exact OT: 1e-5 (observed 0 to 1e-7 in float32: the couplings are exact permutations
  and only the weighted sum of identical tensors rounds);
* Sinkhorn, reg=1e-3 (relative to the largest cost): 1e-4. Observed: <= 3e-16 in float64
  and <= 2e-7 in float32, because the cost gaps between the right and the wrong matches
  are so large compared with reg that the entropic plans are permutations to machine
  precision. The blur grows fast with reg: worst case over these models 8e-5 at reg=1e-2
  and 0.27 at reg=5e-2, so 1e-4 holds only for small reg; it still fails on any
  mismatched neuron.
"""

from __future__ import annotations

import copy

import pytest
import torch
from permuted_families import make_family, relative_difference

from otfusion.fusion import FusionConfig, fuse
from otfusion.zoo import available_models, build_model

EXACT_TOL = 1e-5
SINKHORN_TOL = 1e-4
STATE_TOL = 1e-6

_RECURRENT = ({"hidden_size": 8, "num_layers": 1}, {"hidden_size": 8, "num_layers": 2})
VARIANTS: dict[str, tuple[dict, ...]] = {
    "mlp": ({"widths": (16, 12)},),
    "cnn": ({"channels": (4, 8), "hidden": 12},),
    "vgg11": ({"width_multiplier": 0.125, "batch_norm": False},
              {"width_multiplier": 0.125, "batch_norm": True}),
    "resnet18": ({"width_multiplier": 0.125},),
    "resnet20": ({"width_multiplier": 0.25},),
    "resnet_gn": ({"width_multiplier": 0.5},),
    "mobilenet": ({"width_multiplier": 0.5, "expansion": 2},),
    "vit": ({"dim": 8, "heads": 2, "hidden": 12, "patch": 4},),
    "transformer": ({"dim": 8, "heads": 2, "hidden": 12},),
    "llama": ({"dim": 8, "heads": 4, "kv_heads": 2, "hidden": 12},),
    "rnn": _RECURRENT,
    "lstm": _RECURRENT,
    "gru": _RECURRENT,
}


def _case_id(name: str, kwargs: dict) -> str:
    if kwargs.get("batch_norm"):
        return f"{name}-bn"
    if kwargs.get("num_layers", 1) > 1:
        return f"{name}-{kwargs['num_layers']}layers"
    return name


CASES = [
    pytest.param(name, kwargs, id=_case_id(name, kwargs))
    for name in available_models()
    for kwargs in VARIANTS.get(name, ({},))
]
RECURRENT_CASES = [case for case in CASES if case.values[0] in ("rnn", "lstm", "gru")]


def assert_same_layout(fused: torch.nn.Module, original: torch.nn.Module) -> None:
    fused_state, state = fused.state_dict(), original.state_dict()
    assert list(fused_state) == list(state)
    for key, tensor in state.items():
        assert fused_state[key].shape == tensor.shape, key
        assert fused_state[key].dtype == tensor.dtype, key


def assert_same_state(fused: torch.nn.Module, expected: torch.nn.Module) -> None:
    for key, tensor in expected.state_dict().items():
        got = fused.state_dict()[key]
        if not tensor.is_floating_point():
            assert torch.equal(got, tensor), key
            continue
        scale = max(float(tensor.abs().max()), 1e-12)
        assert float((got - tensor).abs().max()) <= STATE_TOL * scale, key


# ----------------------------------------------------------------- the permutation helper


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_permuted_copy_computes_the_same_function(name, kwargs):
    original, (permuted, *_), inputs = make_family(name, kwargs, copies=1)
    assert relative_difference(permuted, original, inputs) <= EXACT_TOL

    state, other = original.state_dict(), permuted.state_dict()
    changed = [k for k in state if state[k].is_floating_point() and not torch.equal(state[k],
                                                                                    other[k])]
    floating = [k for k in state if state[k].is_floating_point()]
    assert floating[0] in changed  # the first layer's rows are permuted
    # everything but the output bias (classes are never permuted) moves
    assert set(floating) - set(changed) <= {"head.bias"}
    for key in state:
        assert other[key].shape == state[key].shape


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_helper_self_check_detects_a_broken_permutation(name, kwargs):
    """The logit check has teeth: permuting the first layer's rows alone changes them."""
    original, _, inputs = make_family(name, kwargs, copies=0)
    broken = copy.deepcopy(original)
    first = next(p for p in broken.parameters() if p.dim() >= 2 and p.shape[0] > 1)
    with torch.no_grad():
        first.copy_(first.roll(1, dims=0))
    assert relative_difference(broken, original, inputs) > 1e-3


# ----------------------------------------------------------------------- exact transport


@pytest.mark.parametrize("arrangement", ["original-first", "original-third", "weighted"])
@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_exact_fusion_of_permuted_copies(name, kwargs, arrangement):
    original, permuted, inputs = make_family(name, kwargs)
    if arrangement == "original-first":
        models, weights, reference = [original, *permuted], None, original
    elif arrangement == "original-third":
        # equal weights: ties go to the first model, so the result is in its coordinates
        models = [permuted[0], permuted[1], original, permuted[2]]
        weights, reference = None, permuted[0]
    else:
        models = [permuted[0], original, permuted[1], permuted[2]]
        weights, reference = [1.0, 3.0, 2.0, 2.0], original
    fused = fuse(models, weights=weights, config=FusionConfig(method="wasserstein"))
    assert_same_layout(fused, original)
    assert relative_difference(fused, original, inputs) <= EXACT_TOL
    # the barycenter of identical neurons is the reference model itself
    assert_same_state(fused, reference)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_support_from_a_sample_of_permuted_copies(name, kwargs):
    """Only 2 of the 4 clients move the support; all 4 are then coupled to it."""
    original, permuted, inputs = make_family(name, kwargs, seed=3)
    models = [permuted[0], original, permuted[1], permuted[2]]
    fused = fuse(models, weights=[1.0, 3.0, 1.0, 2.0],
                 config=FusionConfig.from_options(support_clients=2))
    assert_same_layout(fused, original)
    assert relative_difference(fused, original, inputs) <= EXACT_TOL
    assert_same_state(fused, original)


@pytest.mark.parametrize(("name", "kwargs"), RECURRENT_CASES)
def test_gromov_wasserstein_fusion_of_permuted_copies(name, kwargs):
    original, permuted, inputs = make_family(name, kwargs, seed=1)
    models = [permuted[0], original, permuted[1], permuted[2]]
    fused = fuse(models, weights=[1.0, 3.0, 2.0, 2.0],
                 config=FusionConfig(method="gromov-wasserstein"))
    assert_same_layout(fused, original)
    assert relative_difference(fused, original, inputs) <= EXACT_TOL
    assert_same_state(fused, original)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_activation_cost_fusion_of_permuted_copies(name, kwargs):
    original, permuted, inputs = make_family(name, kwargs, seed=2)
    models = [original, *permuted]
    fused = fuse(models, weights=[2.0, 1.0, 1.0, 3.0],
                 config=FusionConfig(cost="activations"), inputs=inputs)
    assert_same_layout(fused, original)
    assert relative_difference(fused, original, inputs) <= EXACT_TOL
    assert_same_state(fused, permuted[2])


# -------------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_sinkhorn_fusion_of_permuted_copies(name, kwargs):
    # float64: Sinkhorn's stopping threshold (1e-9) is reachable, so it stops early
    original, permuted, inputs = make_family(name, kwargs, seed=3, dtype=torch.float64)
    models = [permuted[0], original, permuted[1], permuted[2]]
    fused = fuse(models, weights=[1.0, 3.0, 2.0, 2.0],
                 config=FusionConfig.from_options(solver="sinkhorn", reg=1e-3))
    assert_same_layout(fused, original)
    assert relative_difference(fused, original, inputs) <= SINKHORN_TOL


def test_sinkhorn_fusion_of_permuted_copies_float32():
    original, permuted, inputs = make_family("mlp", {"widths": (12, 8)}, seed=4, copies=2)
    fused = fuse([permuted[0], original, permuted[1]], weights=[0.2, 0.5, 0.3],
                 config=FusionConfig.from_options(solver="sinkhorn", reg=1e-3))
    assert relative_difference(fused, original, inputs) <= SINKHORN_TOL


# ---------------------------------------------------------------------------- one model


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_fusing_a_single_model_returns_its_function(name, kwargs):
    original, _, inputs = make_family(name, kwargs, seed=5, copies=0)
    for weights in (None, [7.0]):
        fused = fuse([original], weights=weights)
        assert fused is not original
        assert_same_layout(fused, original)
        assert relative_difference(fused, original, inputs) <= EXACT_TOL
        assert_same_state(fused, original)


def test_fusion_does_not_modify_the_clients():
    original, permuted, _ = make_family("vgg11", {"width_multiplier": 0.125,
                                                  "batch_norm": True}, seed=6)
    models = [original, *permuted]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    fuse(models, config=FusionConfig.from_options(solver="sinkhorn"))
    for model, state in zip(models, before, strict=True):
        for key, tensor in state.items():
            assert torch.equal(model.state_dict()[key], tensor), key


def test_a_tensor_the_same_in_every_client_is_kept_bit_for_bit():
    """Fine-tuning a frozen backbone: its tensors are the same in every client, and the
    fused backbone is that checkpoint exactly (averaging them drifted by one ulp), while
    the heads the clients trained are fused."""
    backbone = build_model("mlp", seed=3, widths=(16, 8), in_features=12, num_classes=4)
    clients = []
    for seed in (4, 5, 6):
        client = copy.deepcopy(backbone)
        torch.manual_seed(seed)
        client.head.reset_parameters()
        clients.append(client)
    fused = fuse(clients, weights=[0.3, 0.3, 0.4],
                 config=FusionConfig.from_options(distill_steps=0))
    for key, tensor in backbone.state_dict().items():
        if not key.startswith("head"):
            assert torch.equal(fused.state_dict()[key], tensor), key
    assert not torch.equal(fused.head.weight, clients[0].head.weight)


# ------------------------------------------------------------ wider residual networks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_fusion_of_permuted_resnet18_quarter_width(seed):
    """ResNet-18 at width 0.25 (16/32/64/128 channels), the original and one permuted
    copy. Regression test: the residual-stream group is solved before the blocks' inner
    conv1 groups; when its cost included every block's conv2 weights, whose input
    channels were then still in unaligned client coordinates, that term was noise for
    permuted copies and the assignment went wrong for seed 1 (relative logit error 0.09).
    """
    original, permuted, inputs = make_family(
        "resnet18", {"width_multiplier": 0.25}, seed=seed, copies=1
    )
    fused = fuse([original, *permuted])
    assert relative_difference(fused, original, inputs) <= EXACT_TOL


@pytest.mark.parametrize(
    ("name", "narrow", "wide"),
    [
        pytest.param("resnet20", 0.25, 0.5, id="resnet20"),
        pytest.param("resnet18", 0.125, 0.25, id="resnet18"),
    ],
)
def test_resnets_of_different_widths_fuse_into_the_target_width(name, narrow, wide):
    """Regression test, same root cause as above: with weight costs, the conv2 members of
    a residual stream were compared in their unaligned inner widths, which differ between
    clients, and the engine crashed with a torch size mismatch."""
    small = build_model(name, seed=0, width_multiplier=narrow).eval()
    large = build_model(name, seed=1, width_multiplier=wide).eval()
    inputs = torch.randn(8, *small.input_shape, generator=torch.Generator().manual_seed(0))
    for target in (small, large):
        fused = fuse([small, large], weights=[2.0, 1.0], target=target).eval()
        assert_same_layout(fused, target)
        with torch.no_grad():
            assert bool(torch.isfinite(fused(inputs)).all())
