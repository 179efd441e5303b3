"""The alignment graph's rules one by one: parameters read directly, the readable
print, user rules for custom modules and explicit alignment specs.

Each model here has a permutation written by hand below (independently of the
engine); fusing permuted copies and ``align`` must give back the same function.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from otfusion.fusion import FusionConfig, align, build_alignment_graph, fuse

CONFIG = FusionConfig.from_options(distill_steps=0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


class DirectParameter(nn.Module):
    """A parameter used directly in ``forward`` (an fx ``get_attr`` node): the scale
    follows the hidden units it multiplies."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)) * self.scale)


def permute_direct_parameter(model: DirectParameter, perm: torch.Tensor) -> DirectParameter:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.fc.weight.copy_(model.fc.weight[perm])
        out.fc.bias.copy_(model.fc.bias[perm])
        out.scale.copy_(model.scale[perm])
        out.head.weight.copy_(model.head.weight[:, perm])
    return out


def _models(factory, count=2):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return [factory() for _ in range(count)]


def test_parameter_used_directly_follows_its_units():
    a, b = _models(DirectParameter)
    with torch.no_grad():
        b.scale.copy_(torch.rand(8) + 0.5)
    x = torch.randn(16, 6)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    copy_ = permute_direct_parameter(a, perm)
    assert rel(copy_(x), a(x)) < 1e-6 and not torch.equal(copy_.scale, a.scale)
    fused = fuse([a, copy_], config=CONFIG, inputs=x)
    assert rel(fused(x), a(x)) < 1e-5
    aligned = align(b, a, config=CONFIG, inputs=x)
    assert rel(aligned(x), b(x)) < 1e-5
    assert torch.allclose(align(copy_, a, config=CONFIG, inputs=x).scale, a.scale)


def test_graph_prints_its_groups():
    model = DirectParameter()
    text = str(build_alignment_graph(model, torch.zeros(2, 6)))
    assert text.splitlines()[0] == "AlignmentGraph: 2 groups, 5 tensors"
    assert "group 0 'fc'" in text and "scale[0]" in text and "head.weight[1 in]" in text
    assert "group 1 'head' (output)" in text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_fuse_in_float32_and_keep_their_dtype(dtype):
    a, b = (m.to(dtype) for m in _models(DirectParameter))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    x = torch.randn(16, 6)
    fused = fuse([a, permute_direct_parameter(a, perm)], config=CONFIG, inputs=x.to(dtype))
    assert {t.dtype for t in fused.state_dict().values()} == {dtype}
    assert torch.equal(fused.fc.weight, a.fc.weight)
    aligned = align(b, a, config=CONFIG, inputs=x.to(dtype))
    assert aligned.fc.weight.dtype == dtype
    assert rel(aligned(x.to(dtype)).float(), b(x.to(dtype)).float()) < 1e-2


def _block_permutations(blocks: int, size: int):
    """Every permutation of ``blocks * size`` units that moves whole blocks and units
    within blocks, as index tensors (brute force)."""
    import itertools

    for order in itertools.permutations(range(blocks)):
        for inner in itertools.product(itertools.permutations(range(size)), repeat=blocks):
            yield torch.tensor([order[i] * size + inner[i][j] for i in range(blocks)
                                for j in range(size)])


@pytest.mark.parametrize("seed", range(5))
def test_block_plan_is_the_best_block_structured_permutation(seed):
    from otfusion.fusion.transport import block_marginal, block_plan

    cost = torch.rand(6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    uniform = torch.full((6,), 1 / 6, dtype=torch.float64)
    plan = block_plan(cost, uniform, uniform, CONFIG.transport, blocks=3)
    best = min(float(cost[torch.arange(6), p].sum()) for p in _block_permutations(3, 2))
    assert torch.allclose(plan.sum(dim=1), uniform) and torch.allclose(plan.sum(dim=0), uniform)
    assert float((plan * cost).sum()) * 6 == pytest.approx(best)
    forced = torch.eye(3, dtype=torch.float64).flip(0) / 3
    forced_plan = block_plan(cost, uniform, uniform, CONFIG.transport, 3, forced)
    assert torch.allclose(block_marginal(forced_plan, 3), forced)


class ScaledLinear(nn.Module):
    """A user's own layer: a product without bias (by ``torch.mm``, which has no rule)
    followed by a learned per-unit scale."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs) / inputs ** 0.5)
        self.scale = nn.Parameter(torch.rand(outputs) + 0.5)

    def forward(self, x):
        return torch.mm(x, self.weight.t()) * self.scale


class WithCustomLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.custom = ScaledLinear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.custom(x)))


def scaled_linear_rule(tracer, call, name, module):
    """The rule a user writes: new units on the last dimension, fed by the input's last
    dimension; the scale follows the units."""
    from otfusion.fusion.graph import AxisSpec

    source = call.layout()
    units = AxisSpec(tracer.new_group(name), "neuron")
    feeds = None if source[-1] is None else AxisSpec(source[-1].group, "input")
    tracer.record(name, "weight", (units, feeds), cost=True)
    tracer.record(name, "scale", (units,), cost=False)
    return (*source[:-1], units)


def permute_custom(model: WithCustomLayer, perm: torch.Tensor) -> WithCustomLayer:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.custom.weight.copy_(model.custom.weight[perm])
        out.custom.scale.copy_(model.custom.scale[perm])
        out.head.weight.copy_(model.head.weight[:, perm])
    return out


def test_a_registered_rule_describes_a_custom_module():
    from otfusion.fusion import UnsupportedModelError, register_rule
    from otfusion.fusion.graph import rules

    a, b = _models(WithCustomLayer)
    x = torch.randn(16, 6)
    with pytest.raises(UnsupportedModelError, match=r"call_function mm\) acts on aligned"):
        fuse([a, b], config=CONFIG, inputs=x)
    register_rule(ScaledLinear)(scaled_linear_rule)
    try:
        copy_ = permute_custom(a, torch.randperm(8, generator=torch.Generator().manual_seed(3)))
        assert rel(copy_(x), a(x)) < 1e-6
        assert rel(fuse([a, copy_], config=CONFIG, inputs=x)(x), a(x)) < 1e-5
        assert rel(align(b, a, config=CONFIG, inputs=x)(x), b(x)) < 1e-5
        assert "custom.scale[0]" in str(build_alignment_graph(a, x))
    finally:
        rules._MODULES.pop(ScaledLinear)


class Untraceable(nn.Module):
    """Control flow on a traced value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.norm(self.fc(x))
        if x.shape[0] > 0:
            h = torch.relu(h)
        return self.head(h)


UNTRACEABLE_SPEC = {
    "fc.weight": ("hidden", None), "fc.bias": ("hidden",),
    "norm.weight": ("hidden",), "norm.bias": ("hidden",),
    "head.weight": ("classes", "hidden"), "head.bias": ("classes",),
}


def test_an_explicit_spec_fuses_what_the_tracer_cannot():
    from otfusion.fusion import UnsupportedModelError, alignment_spec

    a, b = _models(Untraceable)
    with torch.no_grad():
        a.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(16, 6)
    with pytest.raises(UnsupportedModelError, match="Untraceable"):
        fuse([a, b], config=CONFIG, inputs=x)
    graph = alignment_spec(UNTRACEABLE_SPEC, outputs={"classes"},
                           follows={"norm.weight", "norm.bias"})
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(4))
    copy_ = copy.deepcopy(a)
    with torch.no_grad():
        for tensor in (copy_.fc.weight, copy_.fc.bias, copy_.norm.weight, copy_.norm.bias):
            tensor.copy_(tensor[perm])
        copy_.head.weight.copy_(copy_.head.weight[:, perm])
    assert rel(copy_(x), a(x)) < 1e-6
    assert rel(fuse([a, copy_], config=CONFIG, graph=graph)(x), a(x)) < 1e-5
    assert rel(align(b, a, config=CONFIG, graph=graph)(x), b(x)) < 1e-5
    text = str(graph)
    assert "group 0 'hidden'" in text and "group 1 'classes' (output)" in text


def test_an_explicit_spec_matches_the_traced_graph():
    from otfusion.fusion import alignment_spec
    from otfusion.zoo import build_model

    models = [build_model("mlp", seed=s, widths=(12, 10)) for s in range(3)]
    spec = {}
    for layer, group, previous in (("layers.0", "h1", None), ("layers.2", "h2", "h1"),
                                   ("head", "classes", "h2")):
        spec[f"{layer}.weight"] = (group, previous)
        spec[f"{layer}.bias"] = (group,)
    traced = fuse(models, config=CONFIG)
    explicit = fuse(models, config=CONFIG, graph=alignment_spec(spec, outputs={"classes"}))
    for name, tensor in traced.state_dict().items():
        assert torch.equal(tensor, explicit.state_dict()[name]), name


def nanogpt_spec(block_sources: bool = True, t5_bias: bool = False, heads_of: bool = True):
    """The axes of ``tests/attention_models.py``'s NanoGPT (separate Q/K/V, tied head)
    written as data, as the tracer describes them; ``t5_bias``: its variant with T5's
    relative position bias (4 heads), one value per head (``heads_of``)."""
    from otfusion.fusion import alignment_spec

    axes = {"tok.weight": (None, "res"), "pos.weight": (None, "res"),
            "lm_head.weight": (None, "res")}
    follows, blocks, values = {"lm_head.weight"}, {}, {}
    for i in range(2):
        block = f"blocks.{i}"
        for norm in ("ln1", "ln2"):
            axes[f"{block}.{norm}.weight"] = axes[f"{block}.{norm}.bias"] = ("res",)
            follows |= {f"{block}.{norm}.weight", f"{block}.{norm}.bias"}
        for name, group in (("q", f"qk{i}"), ("k", f"qk{i}"), ("v", f"vo{i}")):
            axes[f"{block}.attn.{name}.weight"] = (group, "res")
        axes[f"{block}.attn.proj.weight"] = ("res", f"vo{i}")
        axes[f"{block}.attn.proj.bias"] = ("res",)
        axes[f"{block}.mlp.fc1.weight"], axes[f"{block}.mlp.fc1.bias"] = (f"ff{i}", "res"), (
            f"ff{i}",)
        axes[f"{block}.mlp.fc2.weight"], axes[f"{block}.mlp.fc2.bias"] = ("res", f"ff{i}"), (
            "res",)
        blocks[f"qk{i}"] = blocks[f"vo{i}"] = 4 if t5_bias else 2
        if t5_bias:
            axes[f"{block}.attn.relative.weight"] = (None, f"bias{i}")
            axes[f"{block}.attn.mask"] = (None, None)
            values[f"bias{i}"] = f"qk{i}"
    axes["ln_f.weight"] = axes["ln_f.bias"] = ("res",)
    follows |= {"ln_f.weight", "ln_f.bias"}
    sources = {f"vo{i}": f"qk{i}" for i in range(2)} if block_sources else None
    return alignment_spec(axes, follows=follows, blocks=blocks, block_sources=sources,
                          heads_of=values if heads_of else None)


@pytest.mark.parametrize(("name", "spec", "without"), [
    ("nanogpt", "nanogpt_spec", {"block_sources": False}),
    ("nanogpt-t5-bias", "t5_spec", {"heads_of": False}),
    ("llama", "llama_spec", {"rigid": False}),
])
def test_an_explicit_attention_spec_matches_the_traced_graph(name, spec, without):
    """Value heads that follow the query/key heads (``block_sources``), a bias per head
    that follows its heads (``heads_of``) and rotary queries and keys whose units keep
    their places (``rigid``) give the traced fusion exactly; without them the fused
    model differs (the heads of V and Q/K matched apart; the biases matched on their
    own; Q/K units matched within heads, which rotary embeddings forbid)."""
    from attention_models import build

    spec = globals()[spec]
    models = [build(name, seed=s) for s in range(3)]
    tokens = torch.randint(0, 12, (4, 5), generator=torch.Generator().manual_seed(0))
    traced = fuse(models, config=CONFIG, inputs=tokens).state_dict()
    explicit = fuse(models, config=CONFIG, graph=spec()).state_dict()
    for key, tensor in traced.items():
        assert torch.equal(tensor, explicit[key]), key
    other = fuse(models, config=CONFIG, graph=spec(**without)).state_dict()
    assert any(not torch.equal(tensor, other[key]) for key, tensor in traced.items())


@pytest.mark.parametrize(("blocks", "sources", "message"), [
    ({"a": 2}, {"b": "a"}, "same number of blocks"),
    ({"a": 2, "b": 4}, {"b": "a"}, "same number of blocks"),
    ({"a": 2, "b": 2}, {"a": "b"}, "must be solved first"),
    ({"a": 2, "b": 2}, {"b": "c"}, r"groups \['c'\] label no axis"),
])
def test_block_sources_are_checked(blocks, sources, message):
    from otfusion.fusion import alignment_spec

    axes = {"fa.weight": ("a", None), "fb.weight": ("b", None),
            "head.weight": ("classes", "a")}
    with pytest.raises(ValueError, match=message):
        alignment_spec(axes, outputs={"classes"}, blocks=blocks, block_sources=sources)


def test_a_spec_that_leaves_out_a_tensor_names_it():
    from otfusion.fusion import alignment_spec

    a, b = _models(Untraceable)
    spec = {name: labels for name, labels in UNTRACEABLE_SPEC.items() if "norm" not in name}
    with pytest.raises(ValueError, match=r"does not describe \['norm.weight', 'norm.bias'\]"):
        fuse([a, b], config=CONFIG, graph=alignment_spec(spec, outputs={"classes"}))


def test_otfusion_takes_an_explicit_spec():
    from otfusion.fusion import alignment_spec
    from otfusion.strategies import OTFusion

    graph = alignment_spec(UNTRACEABLE_SPEC, outputs={"classes"},
                           follows={"norm.weight", "norm.bias"})
    strategy = OTFusion(Untraceable, graph=graph)
    assert strategy.settings.graph is graph and strategy.settings.num_classes == 3


class FailsAtRunTime(nn.Module):
    """Traces, but its forward fails on the example input (a shape mismatch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.fc(x))


def test_a_model_that_fails_is_named_without_fx_printing_its_traceback(capfd):
    from otfusion.fusion import UnsupportedModelError

    a, b = _models(FailsAtRunTime)
    with pytest.raises(UnsupportedModelError, match="example input of shape"):
        fuse([a, b], config=CONFIG, inputs=torch.randn(4, 6))
    assert capfd.readouterr().err == ""


def t5_spec(heads_of: bool = True):
    return nanogpt_spec(t5_bias=True, heads_of=heads_of)


def llama_spec(rigid: bool = True):
    """The axes of ``tests/attention_models.py``'s Llama (rotary Q/K, SwiGLU, RMSNorm)
    written as data; ``rigid``: Q/K keep their units in place within heads, as the
    tracer describes them."""
    from otfusion.fusion import alignment_spec

    axes = {"tok.weight": (None, "res")}
    follows, blocks = set(), {}
    for i in range(2):
        block = f"blocks.{i}"
        for name, group in (("q", f"qk{i}"), ("k", f"qk{i}"), ("v", f"vo{i}")):
            axes[f"{block}.attn.{name}.weight"] = (group, "res")
        axes[f"{block}.attn.proj.weight"] = ("res", f"vo{i}")
        for name in ("gate", "up"):
            axes[f"{block}.mlp.{name}.weight"] = (f"ff{i}", "res")
        axes[f"{block}.mlp.down.weight"] = ("res", f"ff{i}")
        for norm in ("ln1", "ln2"):
            axes[f"{block}.{norm}.weight"] = ("res",)
            follows.add(f"{block}.{norm}.weight")
        blocks[f"qk{i}"] = blocks[f"vo{i}"] = 2
    axes["norm.weight"], axes["head.weight"] = ("res",), ("vocab", "res")
    follows.add("norm.weight")
    return alignment_spec(axes, outputs={"vocab"}, follows=follows, blocks=blocks,
                          block_sources={f"vo{i}": f"qk{i}" for i in range(2)},
                          rigid={"qk0", "qk1"} if rigid else ())


@pytest.mark.parametrize("linked", [{"heads_of": {"t": "qk"}},
                                    {"block_sources": {"t": "qk"}}])
def test_groups_that_move_together_are_outputs_together_or_not_at_all(linked):
    """An output is kept as it is: a group whose blocks move with it (values per head,
    heads that follow) would move while it stays, so the spec is refused."""
    from otfusion.fusion import alignment_spec

    axes = {"fa.weight": ("qk", None), "fb.weight": ("t", None),
            "head.weight": ("classes", "qk")}
    with pytest.raises(ValueError, match=r"groups \['t', 'qk'\] move their blocks together"):
        alignment_spec(axes, outputs={"classes", "t"}, blocks={"qk": 2, "t": 2}, **linked)


def test_values_per_head_of_values_per_head_are_refused():
    from otfusion.fusion import alignment_spec

    axes = {"fa.weight": ("qk", None), "fb.weight": ("t", None), "fc.weight": ("u", None),
            "head.weight": ("classes", "qk")}
    with pytest.raises(ValueError, match=r"groups \['t'\] hold values per block"):
        alignment_spec(axes, outputs={"classes"}, blocks={"qk": 2, "t": 2},
                       heads_of={"t": "qk", "u": "t"})


def test_values_per_head_need_one_value_per_head():
    """A spec that says a group holds one value per head of a group of 2 heads, for a
    tensor of 3 values, is refused by name when it meets the models."""
    from otfusion.fusion import alignment_spec

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale, self.head = nn.Linear(4, 4), nn.Parameter(torch.ones(3)), \
                nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.fc(x)) * self.scale.sum()

    spec = alignment_spec({"fc.weight": ("h", None), "fc.bias": ("h",), "scale": ("t",),
                           "head.weight": ("classes", "h"), "head.bias": ("classes",)},
                          outputs={"classes"}, blocks={"h": 2}, heads_of={"t": "h"})
    with pytest.raises(ValueError, match="one value per head of 'h' .2 heads., but has width"):
        fuse(_models(Scaled), config=CONFIG, graph=spec)


def test_rigid_groups_of_an_explicit_spec_need_blocks():
    from otfusion.fusion import alignment_spec

    with pytest.raises(ValueError, match=r"groups \['a'\] keep their units' places"):
        alignment_spec({"fa.weight": ("a", None), "head.weight": ("classes", "a")},
                       outputs={"classes"}, rigid={"a"})
