"""Recurrent layers: one group per layer and direction holding all gate blocks; a
projected LSTM adds a group for its projection; a bidirectional layer's output is the
concatenation of its two directions."""

from __future__ import annotations

from torch import nn

from ..layouts import Stacked, as_input, has_groups, require_unaligned
from ..spec import AxisSpec, UnsupportedModelError
from . import register_rule

GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
def recurrent(tracer, call, name, module):
    source = call.layout()
    where = f"module '{name}'"
    require_unaligned(tracer, source, range(len(source) - 1), where,
                      "runs over a time or batch dimension that holds aligned units")
    if len(call.args) > 1 and has_groups(call.args[1:]):
        raise UnsupportedModelError(f"{where}: an initial state with aligned units is not "
                                    "supported")
    gates = GATES[type(module)]
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
    output = (*source[:-1], merged)
    if len(outputs) == 1 and not proj:
        tracer.add_site(merged.group, name, 0, len(source) - 1, merged)
    batch = (None,) * (len(source) - 2)

    def stacked(specs, what):
        if len(specs) == 1:
            return (None, *batch, specs[0])
        return Stacked(tuple((*batch, s) for s in specs),
                       f"the stacked {what} of '{name}' (index one layer, e.g. h_n[-1])")

    hidden = stacked(outputs, "hidden states")
    state = (hidden, stacked(cells, "cell states")) if isinstance(module, nn.LSTM) else hidden
    return (output, state)
