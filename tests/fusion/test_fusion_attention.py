"""Fusion and alignment of attention models (multi-head attention, Transformers).

The permuted copies come from ``tests/attention_models.py``, which writes the symmetries
of a Transformer down by hand and imports nothing from the engine: one permutation of
the residual stream through every block (embeddings, positional embedding, class token,
LayerNorms, Q/K/V input columns, output projections, MLP, head), whole-head
permutations, a within-head permutation shared by Q and K and another shared by V and
the output projection, and the MLP hidden units. A permuted copy computes exactly the
same function, so:

* fusing a model with two permuted copies of it must give back its function;
* aligning one model onto another must keep its function (and move its weights);
* aligning a permuted copy onto the original must give back the original's weights.

LayerNorm weights and biases and all biases are random (:func:`attention_models.build`),
so an engine that couples, e.g., a LayerNorm or the K rows differently from the stream
or the Q rows shows up as different outputs.

The engine is imported by the ``engine`` fixture, not at module level, so that the
sanity checks of the permutation helper run whatever state the engine is in.

Tolerances: relative L2 difference of the outputs 1e-5 (exact OT on permuted copies is
exact up to float32 summation order); weights 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch
from attention_models import (
    BROKEN,
    MODEL_NAMES,
    build,
    make_inputs,
    permute,
    position_buffers,
    relative_difference,
    shared_by_heads,
)

EXACT_TOL = 1e-5
STATE_TOL = 1e-6
BROKEN_MIN = 1e-3

MODELS = [pytest.param(name, id=name) for name in MODEL_NAMES]


@pytest.fixture
def engine():
    """``(config, fuse, align)``: exact OT, no post-fusion distillation."""
    from otfusion.fusion import FusionConfig, align, fuse

    return FusionConfig.from_options(distill_steps=0), fuse, align


def family(name: str, seed: int = 0, copies: int = 2):
    """The model ``name`` (random LayerNorms and biases, eval mode), ``copies``
    independently permuted copies of it, and a batch of inputs."""
    generator = torch.Generator().manual_seed(2000 + seed)
    original = build(name, seed=seed)
    permuted = [permute(original, generator) for _ in range(copies)]
    return original, permuted, make_inputs(name, generator)


def changed_keys(model: torch.nn.Module, other: torch.nn.Module, tol: float = 0.0
                 ) -> list[str]:
    """Floating-point state entries that differ by more than ``tol`` (absolute), or in
    where and what their infinities are (a causal mask's -inf)."""
    state, other_state = model.state_dict(), other.state_dict()
    return [key for key, tensor in state.items()
            if tensor.is_floating_point() and _differs(tensor, other_state[key], tol)]


def _differs(tensor: torch.Tensor, other: torch.Tensor, tol: float) -> bool:
    finite = tensor.isfinite()
    if not torch.equal(finite, other.isfinite()) or not torch.equal(tensor[~finite],
                                                                   other[~finite]):
        return True
    return bool(finite.any()) and float((tensor - other)[finite].abs().max()) > tol


def assert_same_layout(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    state, expected_state = model.state_dict(), expected.state_dict()
    assert list(state) == list(expected_state)
    for key, tensor in expected_state.items():
        assert state[key].shape == tensor.shape, key
        assert state[key].dtype == tensor.dtype, key


# --------------------------------------------------------- the permutation helper (sanity)


@pytest.mark.parametrize("name", MODELS)
def test_sanity_permuted_copy_computes_the_same_function(name):
    original, (permuted,), inputs = family(name, copies=1)
    assert relative_difference(permuted, original, inputs) <= EXACT_TOL
    assert_same_layout(permuted, original)
    changed = changed_keys(permuted, original)
    floating = [k for k, t in original.state_dict().items() if t.is_floating_point()]
    buffers = position_buffers(original)
    # every tensor moves except the classifier's output bias (classes are not permuted),
    # the buffers over positions (causal masks, rotary tables) and per-head Q/K norms
    assert set(floating) - set(changed) <= {"head.bias"} | buffers | shared_by_heads(original)
    assert not buffers & set(changed)
    assert permuted.training is False


@pytest.mark.parametrize("name", MODELS)
def test_sanity_permuted_copies_differ_from_each_other(name):
    _, (first, second), _ = family(name, copies=2)
    assert changed_keys(first, second)


_PER_HEAD_KINDS = ("logit-scale", "t5-bias", "alibi", "head-gate")
ROTARY = [name for name in MODEL_NAMES if name.startswith("llama") and "no-rotary" not in name]
PER_HEAD = [name for name in MODEL_NAMES if name.removeprefix("nanogpt-") in _PER_HEAD_KINDS]


@pytest.mark.parametrize(("name", "broken"), [
    *((name, broken) for name in MODEL_NAMES for broken in BROKEN),
    *((name, "rotary") for name in ROTARY), *((name, "per-head") for name in PER_HEAD)])
def test_sanity_broken_permutation_changes_the_function(name, broken):
    """The output check has teeth: coupling K differently from Q, leaving the LayerNorms
    unpermuted, or giving V another head order all change the outputs; so do Q and K
    sharing a within-head permutation under rotary embeddings (their units must stay in
    place) and values per head moved in another order than their heads."""
    generator = torch.Generator().manual_seed(3000)
    original = build(name, seed=0)
    inputs = make_inputs(name, generator)
    wrong = permute(original, generator, broken=broken)
    assert relative_difference(wrong, original, inputs) > BROKEN_MIN


def test_sanity_nanogpt_keeps_its_tied_head():
    original, (permuted,), _ = family("nanogpt", copies=1)
    assert permuted.lm_head.weight is permuted.tok.weight
    assert original.lm_head.weight is original.tok.weight


def test_sanity_independent_seeds_compute_different_functions():
    for name in MODEL_NAMES:
        first, second = build(name, seed=0), build(name, seed=1)
        inputs = make_inputs(name, torch.Generator().manual_seed(0))
        assert relative_difference(second, first, inputs) > 0.1, name


# ------------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("name", MODELS)
def test_fusion_of_permuted_copies_computes_the_original_function(name, engine):
    config, fuse, _ = engine
    original, permuted, inputs = family(name, seed=1)
    fused = fuse([original, *permuted], config=config, inputs=inputs)
    assert isinstance(fused, type(original))
    assert_same_layout(fused, original)
    assert relative_difference(fused, original, inputs) <= EXACT_TOL


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("name", MODELS)
def test_align_independent_models_keeps_the_function(name, engine):
    config, _, align = engine
    reference, model = build(name, seed=2), build(name, seed=3)
    inputs = make_inputs(name, torch.Generator().manual_seed(2))
    aligned = align(model, reference, config=config, inputs=inputs)
    assert_same_layout(aligned, model)
    assert relative_difference(aligned, model, inputs) <= EXACT_TOL
    # the units were reordered to match the reference: the weights moved
    assert changed_keys(aligned, model, tol=STATE_TOL)


@pytest.mark.parametrize("name", MODELS)
def test_align_permuted_copy_gives_back_the_original(name, engine):
    config, _, align = engine
    original, (permuted,), inputs = family(name, seed=4, copies=1)
    aligned = align(permuted, original, config=config, inputs=inputs)
    assert_same_layout(aligned, original)
    got = aligned.state_dict()
    for key, tensor in original.state_dict().items():
        if tensor.is_floating_point():
            assert torch.allclose(got[key], tensor, rtol=STATE_TOL, atol=STATE_TOL), key
        else:
            assert torch.equal(got[key], tensor), key
    assert relative_difference(aligned, original, inputs) <= EXACT_TOL


# ---------------------------------------------------------- rotary position embeddings

@pytest.mark.parametrize("name", ROTARY)
def test_rotary_queries_and_keys_keep_their_units_in_place(name):
    """The graph keeps the units of Q and K in place within every head, and only them:
    the values' units, the MLP's and the residual stream's still move."""
    from otfusion.fusion import build_alignment_graph

    model = build(name)
    graph = build_alignment_graph(model, make_inputs(name, torch.Generator().manual_seed(0)))
    rigid = {group.label for group in graph.groups if group.rigid}
    assert len(rigid) in (2, 4)  # Q and K together, K following Q's heads, or repeated
    assert all(group.blocks > 1 for group in graph.groups if group.rigid)
    assert all(".attn.q" in label or ".attn.k" in label for label in rigid)
    assert not any("attn.v" in label for label in rigid)


@pytest.mark.parametrize("name", [name for name in ROTARY if "gqa" not in name])
def test_align_moves_rotary_heads_back_whole(name, engine):
    """A copy whose heads are swapped in every layer (Q, K, V rows and the output
    projection's columns, whole heads) is aligned back onto the original exactly."""
    from reindex import take

    config, _, align = engine
    original = build(name, seed=5)
    swapped = copy.deepcopy(original)
    size = original.blocks[0].attn.head_dim
    heads = torch.cat([torch.arange(size, 2 * size), torch.arange(size)])
    with torch.no_grad():
        for block in swapped.blocks:
            for layer in (block.attn.q, block.attn.k, block.attn.v):
                take(layer.weight, 0, heads)
            take(block.attn.proj.weight, 1, heads)
    inputs = make_inputs(name, torch.Generator().manual_seed(5))
    assert relative_difference(swapped, original, inputs) <= EXACT_TOL
    assert changed_keys(swapped, original, tol=STATE_TOL)
    aligned = align(swapped, original, config=config, inputs=inputs)
    assert not changed_keys(aligned, original, tol=STATE_TOL)


@pytest.mark.parametrize("name", [name for name in MODEL_NAMES if "gqa" in name])
def test_grouped_query_heads_repeat_the_key_and_value_heads(name):
    """Under grouped-query attention, the query heads and the repeated key heads are one
    group whose coupling repeats the key heads' (never solved itself), and so are the
    repeated value heads, which the output projection reads; the value heads follow the
    key heads."""
    from otfusion.fusion import build_alignment_graph

    model = build(name)
    graph = build_alignment_graph(model, make_inputs(name, torch.Generator().manual_seed(0)))
    groups = graph.groups_by_id
    repeated = {groups[group.repeats[0]].label: group for group in graph.groups
                if group.repeats is not None}
    for i in range(2):
        keys, values = repeated[f"blocks.{i}.attn.k"], repeated[f"blocks.{i}.attn.v"]
        assert keys.repeats[1] == values.repeats[1] == 2
        assert keys.blocks == values.blocks == 4
        assert keys.label.startswith(f"blocks.{i}.attn.q")
        assert groups[groups[values.repeats[0]].block_source].label == f"blocks.{i}.attn.k"


@pytest.mark.parametrize("name", [name for name in MODEL_NAMES if "mqa" in name])
def test_multi_query_heads_repeat_the_one_key_and_value_head(name):
    """Under multi-query attention (one key and one value head, repeated, or broadcast in
    ``q @ k.T``), the query heads are the key head repeated for each of them, and the
    output projection reads the value head repeated: the key's and the value's units
    move, no head does, and no attention group is fixed."""
    from otfusion.fusion import build_alignment_graph

    model = build(name)
    graph = build_alignment_graph(model, make_inputs(name, torch.Generator().manual_seed(0)))
    groups = graph.groups_by_id
    repeated = {groups[group.repeats[0]].label: group for group in graph.groups
                if group.repeats is not None}
    assert len(repeated) == 4
    for i in range(2):
        keys, values = repeated[f"blocks.{i}.attn.k"], repeated[f"blocks.{i}.attn.v"]
        assert keys.repeats[1] == values.repeats[1] == keys.blocks == values.blocks == 4
        assert keys.label.startswith(f"blocks.{i}.attn.q")
        assert groups[keys.repeats[0]].blocks == groups[values.repeats[0]].blocks == 1
    assert not any(group.fixed or group.rigid for group in graph.groups
                   if ".attn." in group.label)


def test_repeated_heads_need_as_many_query_heads_in_every_model(engine):
    """A client with twice the query heads over one key and value head of the same size
    is refused by name (once a RuntimeError deep in the averaging)."""
    config, fuse, _ = engine
    from attention_models import Llama

    narrow, wide = (Llama(dim=2 * heads, heads=heads, kv_heads=1, style=None,
                          repeat="broadcast").eval() for heads in (4, 8))
    inputs = make_inputs("llama", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="repeats 'blocks.0.attn.k' 4 times, so its width"):
        fuse([narrow, wide], config=config, inputs=inputs)


def test_rotary_heads_need_one_width_in_every_model(engine):
    """Units kept in place cannot be matched across heads of different sizes."""
    config, fuse, _ = engine
    from attention_models import Llama

    narrow, wide = Llama(dim=8), Llama(dim=12)
    inputs = make_inputs("llama", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="keeps its units at their places"):
        fuse([narrow, wide], config=config, inputs=inputs)


# ------------------------------------------------------------------ one value per head

@pytest.mark.parametrize("name", PER_HEAD)
def test_values_per_head_follow_the_heads_they_meet(name):
    """A temperature, bias or slopes per head follow the query/key heads whose scores
    they meet; a gate per head, the value heads whose outputs it scales."""
    from otfusion.fusion import build_alignment_graph

    model = build(name)
    graph = build_alignment_graph(model, make_inputs(name, torch.Generator().manual_seed(0)))
    groups = graph.groups_by_id
    followers = [group for group in graph.groups if group.heads_of is not None]
    assert len(followers) == 2  # one per layer
    for group in followers:
        heads = groups[group.heads_of]
        assert heads.blocks == 4
        assert (".attn.v" in heads.label) == name.endswith("head-gate"), heads.label
