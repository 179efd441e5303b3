"""The traced alignment graphs kept per model structure: the same structure traced
again gives the graph back without running the model; anything the graph depends on
(forward code, a module's settings, shapes, the input) traces anew."""

from __future__ import annotations

import torch
from torch import nn

from otfusion.fusion.graph import build_alignment_graph
from otfusion.fusion.graph import tracer as tracer_module
from otfusion.zoo import build_model


class _Attention(nn.Module):
    def __init__(self, heads: int, pooled: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, heads, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.pooled = pooled
        self.input_shape = (5, 4)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(h.mean(dim=1) if self.pooled else h[:, 0])


def _graph(model: nn.Module, batch: int = 2) -> object:
    return build_alignment_graph(model, torch.zeros(batch, *model.input_shape))


def test_a_second_model_of_one_structure_gets_the_kept_graph_without_running(monkeypatch):
    first = _graph(build_model("cnn", seed=0))

    def not_run(*args):
        raise AssertionError("the model was run again")

    monkeypatch.setattr(tracer_module, "_propagate_shapes", not_run)
    assert _graph(build_model("cnn", seed=1).train()) is first


def test_what_the_graph_depends_on_traces_anew():
    base = _graph(_Attention(heads=2))
    assert _graph(_Attention(heads=4)) is not base  # same shapes, other heads
    assert _graph(_Attention(heads=2)).groups == base.groups
    flagged = _graph(_Attention(heads=2, pooled=False))  # other forward code
    assert flagged is not base
    assert _graph(_Attention(heads=2), batch=3) is not base  # another example input
    wider = build_model("mlp", seed=0, widths=(16, 8))
    assert _graph(wider) is not _graph(build_model("mlp", seed=0, widths=(16, 4)))
    block = {g.label: g.blocks for g in _graph(_Attention(heads=4)).groups}
    assert block != {g.label: g.blocks for g in base.groups}


def test_the_graphs_kept_are_bounded():
    for width in range(4, 4 + 2 * tracer_module._GRAPHS_KEPT):
        _graph(build_model("mlp", seed=0, widths=(width, 4)))
    assert len(tracer_module._GRAPHS) == tracer_module._GRAPHS_KEPT
