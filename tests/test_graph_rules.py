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

CONFIG = FusionConfig(distill_steps=0)


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
    plan = block_plan(cost, uniform, uniform, CONFIG, blocks=3)
    best = min(float(cost[torch.arange(6), p].sum()) for p in _block_permutations(3, 2))
    assert torch.allclose(plan.sum(dim=1), uniform) and torch.allclose(plan.sum(dim=0), uniform)
    assert float((plan * cost).sum()) * 6 == pytest.approx(best)
    forced = torch.eye(3, dtype=torch.float64).flip(0) / 3
    assert torch.allclose(block_marginal(block_plan(cost, uniform, uniform, CONFIG, 3, forced),
                                         3), forced)
