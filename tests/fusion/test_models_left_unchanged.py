"""Fusing models leaves them as they were, even when their ``forward`` keeps state:
assigns ``self.features = h`` (for a later loss or a hook), counts its calls or keeps
an average in a buffer. Tracing such a model with torch.fx used to leave fx proxies in
those attributes (the model then failed, and so did the fusion), and every run of a
client for the screening, the teachers or the activations moved its buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from otfusion.fusion import FusionConfig, InputMoments, align, build_alignment_graph, fuse
from otfusion.fusion.graph import tracer
from otfusion.fusion.modes import left_as_it_was


class Stateful(nn.Module):
    """An MLP whose forward keeps its hidden features (as an attribute and in a dict),
    counts its calls (in a buffer, and in a plain tensor attribute) and keeps a running
    mean of its activations' scale through ``.data``, which counts no change; its output
    does not depend on them."""

    input_shape = (6,)

    def __init__(self):
        super().__init__()
        self.hidden, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.features, self.cache, self.steps = None, {}, torch.zeros(())

    def forward(self, x):
        h = torch.relu(self.hidden(x))
        self.features = self.cache["h"] = h.detach()
        self.calls += 1
        self.steps.add_(1)
        self.scale.data.mul_(0.9).add_(0.1 * h.detach().abs().mean())
        return self.head(h)


def _snapshot(model: Stateful) -> tuple[dict, dict, dict, torch.Tensor]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, dict(vars(model)),
            dict(model.cache), model.steps.clone())


def _assert_unchanged(model: Stateful, snapshot: tuple[dict, dict, dict, torch.Tensor]
                      ) -> None:
    state, attributes, cache, steps = snapshot
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert vars(model).keys() == attributes.keys()
    assert model.features is attributes["features"] and model.cache == cache
    assert torch.equal(model.steps, steps)


def _permuted(model: Stateful, seed: int) -> Stateful:
    """``model`` with its hidden units permuted (written here, not by the engine)."""
    order = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.hidden.weight.copy_(model.hidden.weight[order])
        other.hidden.bias.copy_(model.hidden.bias[order])
        other.head.weight.copy_(model.head.weight[:, order])
    return other


def _clients() -> list[Stateful]:
    torch.manual_seed(0)
    clients = [Stateful() for _ in range(3)]
    x = torch.randn(5, 6)
    for model in clients:
        model(x)  # features set, buffers moved
    return clients


def test_a_default_fusion_leaves_every_client_as_it_was():
    clients = _clients()
    before = [_snapshot(m) for m in clients]
    moments = InputMoments(torch.zeros(6), torch.ones(6))
    fused = fuse(clients, config=FusionConfig.from_options(distill_steps=20),
                 input_moments=moments)
    for model, snapshot in zip(clients, before, strict=True):
        _assert_unchanged(model, snapshot)
    assert isinstance(fused(torch.randn(4, 6)), torch.Tensor)
    assert isinstance(fused.cache["h"], torch.Tensor)  # not an fx proxy: it saves


def test_a_model_fused_with_its_permuted_copy_and_aligned_computes_its_function():
    model = _clients()[0]
    other = _permuted(_clients()[1], seed=3)
    x = torch.randn(7, 6)
    exact = FusionConfig.from_options(distill_steps=0)
    with torch.no_grad():
        expected = model(x)
        fused = fuse([model, _permuted(model, seed=1)], config=exact)
        torch.testing.assert_close(fused(x), expected)
        torch.testing.assert_close(align(other, model, config=exact)(x), other(x))


def test_the_quiet_input_check_leaves_the_model_as_it_was():
    model = _clients()[0]
    snapshot = _snapshot(model)
    assert tracer.input_linear(model, 6) == "hidden"
    _assert_unchanged(model, snapshot)


def test_left_as_it_was_puts_back_attributes_modules_and_buffer_values():
    model = _clients()[0]
    snapshot = _snapshot(model)
    with left_as_it_was(model):
        model(torch.randn(2, 6))
        model.extra = 1
        model.head = nn.Linear(8, 3)
        model.register_buffer("added", torch.ones(1))
        model.calls = torch.tensor(7.0)
    _assert_unchanged(model, snapshot)
    assert not hasattr(model, "extra") and "added" not in dict(model.named_buffers())


def test_a_lazy_module_not_initialised_is_refused_by_name():
    def lazy():
        return nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))

    with pytest.raises(ValueError, match="'0.weight' is not initialised yet"):
        fuse([lazy(), lazy()], config=FusionConfig.from_options(distill_steps=0),
             inputs=torch.randn(4, 6))
    with pytest.raises(ValueError, match="not initialised yet"):
        build_alignment_graph(lazy(), torch.randn(4, 6))
