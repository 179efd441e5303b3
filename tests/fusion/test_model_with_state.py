"""``model_with_state``: the fused model built around the fused tensors, without copying
the template's tensors first; the same model as deepcopy + load_state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from otfusion.fusion.engine import model_with_state


class _Tied(nn.Module):
    """Tied weights, BatchNorm statistics and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("scratch", torch.arange(2.0), persistent=False)

    def forward(self, x):
        return self.b(self.norm(self.a(x))) + self.scratch.sum()


def _new_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: (t + 1 if t.is_floating_point() else t + 5).clone()
            for name, t in model.state_dict().items()}


def test_the_copy_holds_the_state_and_equals_deepcopy_then_load():
    template = _Tied()
    before = copy.deepcopy(template.state_dict())
    state = _new_state(template)
    built = model_with_state(template, state)
    loaded = copy.deepcopy(template)
    loaded.load_state_dict(state)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor), name
    assert built.b.weight is built.a.weight and built.a.weight.requires_grad
    assert torch.equal(built.scratch, template.scratch) and built.scratch is not template.scratch
    for name, tensor in template.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # the template is untouched
    x = torch.randn(4, 3)
    torch.testing.assert_close(built.eval()(x), loaded.eval()(x), rtol=0, atol=0)


def test_the_state_is_cast_to_the_templates_dtypes():
    template = _Tied().double()
    built = model_with_state(template, {k: v.float() for k, v in _new_state(template).items()})
    assert built.a.weight.dtype == torch.float64
    assert built.norm.num_batches_tracked.dtype == torch.int64


def test_a_wrong_shape_is_named():
    template = _Tied()
    state = _new_state(template)
    state["a.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="'a.bias' has shape \\(4,\\)"):
        model_with_state(template, state)


def test_a_state_that_names_other_tensors_goes_through_load_state_dict():
    template = _Tied()
    state = _new_state(template)
    del state["norm.running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        model_with_state(template, state)  # load_state_dict's own error
