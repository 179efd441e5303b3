"""Recurrent layers: one group per layer and direction holding all gate blocks; a
projected LSTM adds a group for its projection; a bidirectional layer's output is the
concatenation of its two directions. A cell (``nn.LSTMCell`` and kin, stepped in
``forward``) is one such layer whose state is carried by the caller."""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils import rnn as rnn_utils

from ..layouts import Packed, Stacked, as_input, has_groups, is_layout, require_unaligned
from ..spec import AxisSpec, UnsupportedModelError
from . import function_rule_for, register_rule

GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
def recurrent(tracer, call, name, module):
    source = call.layout()
    where = f"module '{name}'"
    packed = isinstance(source, Packed)
    if packed:  # its data are (positions, features)
        source = (None, source.features)
    elif not is_layout(source):
        raise UnsupportedModelError(f"{where}: its input is a PackedSequence made otherwise "
                                    "than by pack_padded_sequence, which is not supported")
    require_unaligned(tracer, source, range(len(source) - 1), where,
                      "runs over a time or batch dimension that holds aligned units")
    gates = _gates(GATES, module)
    proj = getattr(module, "proj_size", 0)
    directions = ("", "_reverse") if module.bidirectional else ("",)
    previous = as_input(source[-1])
    outputs, cells = [], []
    for layer in range(module.num_layers):
        specs = []
        for suffix in directions:
            label = f"{name}.l{layer}{suffix}"
            cell = tracer.new_group(label)
            gated = AxisSpec(cell, "neuron", outer=gates)
            out = AxisSpec(tracer.new_group(f"{label}.proj"), "neuron") if proj else (
                AxisSpec(cell, "neuron"))
            tensor = f"l{layer}{suffix}"
            tracer.record(name, f"weight_ih_{tensor}", (gated, previous), cost=True)
            tracer.record(name, f"weight_hh_{tensor}", (gated, as_input(out)), cost=True)
            if module.bias:
                tracer.record(name, f"bias_ih_{tensor}", (gated,), cost=True)
                tracer.record(name, f"bias_hh_{tensor}", (gated,), cost=True)
            if proj:
                tracer.record(name, f"weight_hr_{tensor}",
                              (out, AxisSpec(cell, "input")), cost=True)
            specs.append(out)
            cells.append(AxisSpec(cell, "neuron"))
        outputs.extend(specs)
        width = proj or module.hidden_size
        merged = specs[0] if len(specs) == 1 else tracer.direct_sum(
            f"{name}.l{layer}", [(s, width) for s in specs])
        previous = as_input(merged)
    output = Packed(merged) if packed else (*source[:-1], merged)
    if len(outputs) == 1 and not proj and not packed:
        tracer.add_site(merged.group, name, 0, len(source) - 1, output)
    batch = (None,) if packed else (None,) * (len(source) - 2)

    def stacked(specs, what):
        if len(specs) == 1:
            return (None, *batch, specs[0])
        return Stacked(tuple((*batch, s) for s in specs),
                       f"the stacked {what} of '{name}' (index one layer, e.g. h_n[-1])")

    lstm = isinstance(module, nn.LSTM)
    for (layout, node), rows in zip(_given_states(call, lstm), (outputs, cells), strict=False):
        if has_groups(layout):
            _join_initial_state(tracer, layout, rows, where)
        else:
            _refuse_data(node, where)
    hidden = stacked(outputs, "hidden states")
    state = (hidden, stacked(cells, "cell states")) if lstm else hidden
    return (output, state)


def _join_initial_state(tracer, layout, rows: list[AxisSpec], where: str) -> None:
    """A layer's initial state with aligned units (a decoder started from its encoder's
    ``h_n``): row ``i`` (layer ``i // directions``, direction ``i % directions``) holds
    the units of ``rows[i]``, the layer's own; a state whose rows all hold one group (one
    layer's ``h_n`` repeated) gives every row that group."""
    if isinstance(layout, Stacked):
        if len(layout.items) != len(rows):
            raise UnsupportedModelError(f"{where}: an initial state of {len(layout.items)} "
                                        f"stacked states for {len(rows)} layers and "
                                        "directions is not supported")
        specs = [_state_spec(item, where) for item in layout.items]
    else:
        specs = [_state_spec(layout, where)] * len(rows)
    for row, spec in zip(rows, specs, strict=True):
        tracer.union(row.group, spec.group)


@function_rule_for(rnn_utils.pack_padded_sequence)
def pack_padded_sequence(tracer, call):
    """Positions reordered by their lengths: they must hold no aligned units."""
    layout = call.layout()
    require_unaligned(tracer, layout, range(len(layout) - 1), f"node '{call.node.name}'",
                      "packs positions that hold aligned units")
    return Packed(layout[-1])


@function_rule_for(rnn_utils.pad_packed_sequence)
def pad_packed_sequence(tracer, call):
    """The padded tensor (positions padded with a constant, which every permutation
    keeps) and the lengths."""
    packed = call.layout(0, "sequence")
    if not isinstance(packed, Packed):
        raise UnsupportedModelError(f"node '{call.node.name}': pad_packed_sequence of "
                                    "something other than a PackedSequence")
    return ((None, None, packed.features), (None,))


CELL_GATES = {nn.RNNCell: 1, nn.GRUCell: 3, nn.LSTMCell: 4}


@register_rule(nn.RNNCell, nn.GRUCell, nn.LSTMCell)
def recurrent_cell(tracer, call, name, module):
    """One step: the new state's units are the cell's group, and the state it is given
    (the previous step's) joins that group. A state without aligned units must be a fill
    (zeros by default), as a layer's initial state must."""
    source = call.layout()
    where = f"module '{name}'"
    cell = tracer.new_group(name)
    out = AxisSpec(cell, "neuron")
    gated = AxisSpec(cell, "neuron", outer=_gates(CELL_GATES, module))
    tracer.record(name, "weight_ih", (gated, as_input(source[-1])), cost=True)
    tracer.record(name, "weight_hh", (gated, as_input(out)), cost=True)
    if module.bias:
        tracer.record(name, "bias_ih", (gated,), cost=True)
        tracer.record(name, "bias_hh", (gated,), cost=True)
    lstm = isinstance(module, nn.LSTMCell)
    for layout, node in _given_states(call, lstm):
        if has_groups(layout):
            tracer.union(cell, _state_spec(layout, where).group)
        else:
            _refuse_data(node, where)
    step = (*source[:-1], out)
    if lstm:
        tracer.add_site(cell, name, 0, len(source) - 1, step)
        return step, step
    tracer.add_site(cell, name, None, len(source) - 1, step)
    return step


def _gates(table: dict[type, int], module: nn.Module) -> int:
    """The gate blocks of ``module``, whose type may derive from the layer's (a layer
    under weight_norm)."""
    return next(gates for kind, gates in table.items() if isinstance(module, kind))


def _given_states(call, lstm: bool) -> list[tuple[object, object]]:
    """The layout and node of every state handed to a recurrent module (``hx``): h, and c
    for an LSTM ((h, c) may be one node); None for both when none is given."""
    state, value = call.layout(1, "hx"), call.value(1, "hx", None)
    layouts = state if lstm and state is not None else (state,)
    nodes = value if isinstance(value, tuple | list) else (value,) * len(layouts)
    return list(zip(layouts, nodes, strict=True))


def _refuse_data(node, where: str) -> None:
    """A state without aligned units must be the zeros (or another fill) that every
    permutation keeps: read from data, it would stay as it is while the units move."""
    if node is not None and not _filled(node):
        raise UnsupportedModelError(f"{where}: a state read from data, which nothing can "
                                    "permute, is not supported (start from zeros, or from a "
                                    "layer's output)")


def _state_spec(layout, where: str) -> AxisSpec:
    """The units of a state handed to a cell: its last dimension, of plain units."""
    spec = layout[-1]
    if not isinstance(spec, AxisSpec) or (spec.outer, spec.inner, spec.part) != (1, 1, None) \
            or has_groups(layout[:-1]):
        raise UnsupportedModelError(f"{where}: a state whose units are reshaped or spread "
                                    "over other dimensions is not supported")
    return spec


FILLS_LIKE = (torch.zeros_like, torch.ones_like, torch.full_like, "new_zeros", "new_ones",
              "new_full")
"""Fills of another tensor's shape (also of a stacked ``h_n``, see the tracer)."""
_FILLS = {torch.zeros, torch.ones, torch.full, *FILLS_LIKE, "zero_", "fill_"}


KEEPS_ROWS = ("detach", "contiguous", "clone", "to", "cpu", "cuda", "float", "type_as")
"""Methods that keep a tensor as it is, rows too (also a stacked ``h_n``'s)."""
_KEEPING = {*KEEPS_ROWS, "double", "half", "bfloat16", "type", "expand", "expand_as",
            "repeat", "requires_grad_"}
"""Methods whose result is filled with one value when the tensor they are called on is."""


def _filled(node) -> bool:
    """Whether ``node`` is a tensor filled with one value (``h.new_zeros(b, n)``,
    ``torch.zeros(L, b, n).to(x.device)``), which every permutation of its units keeps."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _KEEPING:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") \
        and node.target in _FILLS
