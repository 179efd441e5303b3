"""Alignment graph: which tensor axes share one coupling, derived from a torch model.

A *group* is a set of neurons (hidden units, channels) that one coupling per client
acts on: the outputs of a layer, or every tensor added into the same residual stream,
or the hidden state of a recurrent layer with all its gate blocks. Every axis of every
tensor of the state_dict is described by an :class:`AxisSpec` (or ``None`` when the
axis is never permuted: input features, kernel positions, classes). What is tied is
data here; :mod:`.barycenter` decides how it is solved.

The description is derived by tracing the model with ``torch.fx`` and propagating, node
by node, which group lives on which dimension of every intermediate tensor. Anything the
rules do not cover raises :class:`UnsupportedModelError` naming the module or node, so a
model is never fused silently wrong.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .modes import temporary_mode


class UnsupportedModelError(ValueError):
    """The model uses a construct the alignment graph cannot describe."""


@dataclass(frozen=True)
class AxisSpec:
    """How a group's neurons are laid out along one tensor axis.

    The axis has ``outer * width * inner`` entries: ``outer`` blocks (the gates of an
    LSTM), each holding every neuron once, each neuron repeated ``inner`` times
    contiguously (spatial positions after a flatten). ``kind`` says whether the axis
    indexes the neurons themselves (``"neuron"``: incoming weights, biases,
    normalisation parameters; averaged over coupled neurons) or their consumers'
    inputs (``"input"``: the next layer's weights; summed, so splitting or merging
    neurons keeps the function).
    """

    group: int
    kind: Literal["neuron", "input"]
    outer: int = 1
    inner: int = 1


@dataclass(frozen=True)
class TensorSpec:
    """Axes of one state_dict entry; ``cost`` tensors define their neurons' identity."""

    name: str
    axes: tuple[AxisSpec | None, ...]
    cost: bool

    @property
    def neuron_axis(self) -> int | None:
        found = [i for i, a in enumerate(self.axes) if a is not None and a.kind == "neuron"]
        return found[0] if found else None


def is_recurrent(spec: TensorSpec) -> bool:
    """Whether ``spec`` maps its own group to itself (a hidden-to-hidden matrix)."""
    neuron = spec.neuron_axis
    group = spec.axes[neuron].group
    return any(a is not None and a.group == group and i != neuron
               for i, a in enumerate(spec.axes))


@dataclass(frozen=True)
class ActivationSite:
    """Where a group's activations can be read: a module's output dimension."""

    module: str
    output_index: int | None
    dim: int
    spec: AxisSpec


@dataclass(frozen=True)
class Group:
    """One coupling per client; ``fixed`` groups keep identity (inputs, classes)."""

    id: int
    label: str
    fixed: bool


@dataclass(frozen=True)
class AlignmentGraph:
    """Groups in solve order, and the axes of every state_dict entry."""

    groups: tuple[Group, ...]
    tensors: dict[str, TensorSpec]
    activation_sites: dict[int, tuple[ActivationSite, ...]]
    outputs: frozenset[int] = frozenset()
    """Groups that reach the model's output (its classes): fixed, identity coupling."""

    def widths(self, state_dict: dict[str, torch.Tensor], who: str = "model") -> dict[int, int]:
        """Width of every group in ``state_dict``, checked for consistency."""
        widths: dict[int, int] = {}
        for spec in self.tensors.values():
            shape = state_dict[spec.name].shape
            if len(shape) != len(spec.axes):
                raise ValueError(
                    f"{who}: '{spec.name}' has {len(shape)} dims, expected {len(spec.axes)}"
                )
            for axis, a in enumerate(spec.axes):
                if a is None:
                    continue
                block = a.outer * a.inner
                width, rest = divmod(shape[axis], block)
                if rest or width == 0:
                    raise ValueError(
                        f"{who}: '{spec.name}' axis {axis} has size {shape[axis]}, "
                        f"not a multiple of {block}"
                    )
                if widths.setdefault(a.group, width) != width:
                    raise ValueError(
                        f"{who}: group '{self.groups_by_id[a.group].label}' has width "
                        f"{widths[a.group]} but '{spec.name}' axis {axis} implies {width}"
                    )
        return widths

    @property
    def groups_by_id(self) -> dict[int, Group]:
        return {g.id: g for g in self.groups}

    def cost_tensors(self, group: int) -> list[TensorSpec]:
        """The tensors whose neuron axis belongs to ``group`` and that define it."""
        return [
            s for s in self.tensors.values()
            if s.cost and s.axes[s.neuron_axis].group == group
        ]


# ----------------------------------------------------------------------------- tracing

Layout = tuple  # per-dim AxisSpec | None, for a tensor value


class _Opaque:
    """Layout of a value whose neuron layout cannot be expressed (stacked layers)."""

    def __init__(self, why: str):
        self.why = why


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Softmax, nn.LogSoftmax,
)
_F = torch.nn.functional
_ELEMENTWISE_FUNCTIONS = {
    _F.relu, _F.relu6, _F.leaky_relu, _F.elu, _F.selu, _F.gelu, _F.silu, _F.mish,
    _F.hardtanh, _F.softplus, _F.dropout, _F.max_pool1d, _F.max_pool2d, _F.max_pool3d,
    _F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d, _F.adaptive_avg_pool1d,
    _F.adaptive_avg_pool2d, _F.adaptive_max_pool2d, _F.softmax, _F.log_softmax,
    torch.relu, torch.tanh, torch.sigmoid, torch.softmax, torch.log_softmax,
    _F.tanh, _F.sigmoid,
}
_ELEMENTWISE_METHODS = {
    "relu", "tanh", "sigmoid", "softmax", "log_softmax", "contiguous", "clone", "detach",
}
_BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv,
    torch.add, torch.sub, torch.mul,
}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "div"}
_RECURRENT_GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4}


class _Tracer:
    """Propagates per-dimension group layouts through an fx graph."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.parent: list[int] = []
        self.labels: list[str] = []
        self.fixed: set[int] = set()
        self.outputs: set[int] = set()
        self.specs: dict[str, tuple[tuple[AxisSpec | None, ...], bool]] = {}
        self.sites: list[tuple[int, ActivationSite]] = []

    # -- union-find over groups
    def new_group(self, label: str) -> int:
        self.parent.append(len(self.parent))
        self.labels.append(label)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    # -- recording
    def record(self, module: str, param: str, axes, cost: bool) -> None:
        name = f"{module}.{param}" if module else param
        if name in self.specs:
            raise UnsupportedModelError(
                f"module '{module}' is called more than once (shared weights are not supported)"
            )
        self.specs[name] = (tuple(axes), cost)

    def run(self, example_input: torch.Tensor) -> AlignmentGraph:
        try:
            gm = fx.symbolic_trace(self.model)
        except Exception as exc:  # fx raises many types for untraceable code
            raise UnsupportedModelError(
                f"{type(self.model).__name__} cannot be traced by torch.fx: {exc}"
            ) from exc
        _propagate_shapes(gm, example_input)
        layouts: dict[fx.Node, object] = {}
        for node in gm.graph.nodes:
            if node.op == "output":
                for layout in _flatten_layouts(_map_args(node.args[0], layouts)):
                    for spec in layout:
                        if spec is not None:
                            self.fixed.add(spec.group)
                            self.outputs.add(spec.group)
                continue
            layouts[node] = self.visit(node, layouts)
        return self.finish()

    def finish(self) -> AlignmentGraph:
        roots = sorted({self.find(g) for g in range(len(self.parent))})
        fixed_roots = {self.find(g) for g in self.fixed}
        canonical = {root: i for i, root in enumerate(roots)}
        labels: dict[int, list[str]] = {}
        for g in range(len(self.parent)):
            labels.setdefault(self.find(g), []).append(self.labels[g])

        def canon(spec: AxisSpec | None) -> AxisSpec | None:
            return None if spec is None else replace(spec, group=canonical[self.find(spec.group)])

        groups = tuple(
            Group(canonical[root], "+".join(labels[root]), root in fixed_roots) for root in roots
        )
        tensors = {
            name: TensorSpec(name, tuple(canon(a) for a in axes), cost)
            for name, (axes, cost) in self.specs.items()
        }
        sites: dict[int, list[ActivationSite]] = {}
        for g, site in self.sites:
            root = self.find(g)
            sites.setdefault(canonical[root], []).append(replace(site, spec=canon(site.spec)))
        expected = set(self.model.state_dict().keys())
        missing = sorted(expected - set(tensors))
        if missing:
            raise UnsupportedModelError(
                "these parameters or buffers are used outside the supported layers, so their "
                f"alignment is unknown: {', '.join(missing)}"
            )
        outputs = frozenset(canonical[self.find(g)] for g in self.outputs)
        return AlignmentGraph(groups, tensors, {g: tuple(s) for g, s in sites.items()},
                              outputs)

    # -- node rules
    def visit(self, node: fx.Node, layouts: dict) -> object:
        if node.op == "placeholder":
            return _plain_layout(node)
        if node.op == "get_attr":
            return _plain_layout(node)
        if node.op == "call_module":
            return self.visit_module(node, layouts)
        args = _map_args(node.args, layouts)
        kwargs = _map_args(node.kwargs, layouts)
        target = node.target
        if node.op == "call_method":
            if target in _ELEMENTWISE_METHODS:
                return args[0]
            if target in _BINARY_METHODS:
                return self.broadcast(node, args[:2])
        elif target in _ELEMENTWISE_FUNCTIONS:
            return args[0]
        elif target in _BINARY_FUNCTIONS:
            return self.broadcast(node, args[:2])
        elif target is getattr:
            return None
        elif target is operator.getitem:
            return _getitem(node, args[0], node.args[1])
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if name in ("flatten", "view", "reshape"):
            return _reshape(node, args[0])
        if name in ("size", "dim"):
            return None
        if name in ("transpose", "permute"):
            return _permute(node, args[0], node.args[1:], name)
        if _has_groups([*args, *kwargs.values()]):
            raise UnsupportedModelError(
                f"node '{node.name}' ({node.op} {name}) acts on aligned neurons in a way the "
                "alignment graph does not support"
            )
        return _plain_layout(node)

    def visit_module(self, node: fx.Node, layouts: dict) -> object:
        name = node.target
        module = self.modules[name]
        source = layouts[node.args[0]] if isinstance(node.args[0], fx.Node) else None
        if isinstance(source, _Opaque):
            raise UnsupportedModelError(f"module '{name}' consumes {source.why}")
        if isinstance(module, _ELEMENTWISE_MODULES):
            return source
        if isinstance(module, nn.Flatten):
            return _flatten(node, source, module.start_dim, module.end_dim)
        if isinstance(module, nn.Linear):
            group = self.new_group(name)
            out = AxisSpec(group, "neuron")
            self.record(name, "weight", (out, _as_input(source[-1])), cost=True)
            if module.bias is not None:
                self.record(name, "bias", (out,), cost=True)
            self.sites.append((group, ActivationSite(name, None, len(source) - 1, out)))
            return (*source[:-1], out)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            if module.groups != 1:
                raise UnsupportedModelError(
                    f"module '{name}': grouped/depthwise convolutions are not supported"
                )
            group = self.new_group(name)
            out = AxisSpec(group, "neuron")
            kernel = (None,) * (module.weight.dim() - 2)
            self.record(name, "weight", (out, _as_input(source[1]), *kernel), cost=True)
            if module.bias is not None:
                self.record(name, "bias", (out,), cost=True)
            self.sites.append((group, ActivationSite(name, None, 1, out)))
            return (source[0], out, *source[2:])
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            return self.follow(name, module, _as_neuron(source[1]), source)
        if isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1:
                raise UnsupportedModelError(
                    f"module '{name}': LayerNorm over several dimensions is not supported"
                )
            return self.follow(name, module, _as_neuron(source[-1]), source)
        if isinstance(module, nn.Embedding):
            group = self.new_group(name)
            out = AxisSpec(group, "neuron")
            self.record(name, "weight", (None, out), cost=True)
            self.sites.append((group, ActivationSite(name, None, len(source), out)))
            return (*source, out)
        if type(module) in _RECURRENT_GATES:
            return self.recurrent(name, module, source)
        raise UnsupportedModelError(
            f"module '{name}' of type {type(module).__name__} is not supported by the "
            "alignment graph"
        )

    def follow(self, name: str, module: nn.Module, spec, source) -> object:
        """Per-channel parameters and statistics that follow their channel's coupling."""
        for param, tensor in [*module.named_parameters(recurse=False),
                              *module.named_buffers(recurse=False)]:
            if tensor.dim() == 0:
                self.record(name, param, (), cost=False)
            else:
                self.record(name, param, (spec,), cost=False)
        return source

    def recurrent(self, name: str, module: nn.RNNBase, source) -> object:
        if module.bidirectional or getattr(module, "proj_size", 0):
            raise UnsupportedModelError(
                f"module '{name}': bidirectional or projected recurrent layers are not supported"
            )
        gates = _RECURRENT_GATES[type(module)]
        previous = _as_input(source[-1])  # features are last, batch_first or not
        for layer in range(module.num_layers):
            group = self.new_group(f"{name}.l{layer}")
            gated = AxisSpec(group, "neuron", outer=gates)
            self.record(name, f"weight_ih_l{layer}", (gated, previous), cost=True)
            self.record(
                name, f"weight_hh_l{layer}", (gated, AxisSpec(group, "input")), cost=True
            )
            if module.bias:
                self.record(name, f"bias_ih_l{layer}", (gated,), cost=True)
                self.record(name, f"bias_hh_l{layer}", (gated,), cost=True)
            previous = AxisSpec(group, "input")
        out = AxisSpec(group, "neuron")
        self.sites.append((group, ActivationSite(name, 0, len(source) - 1, out)))
        output = (*source[:-1], out)
        if module.num_layers == 1:
            hidden = (None,) * (len(source) - 1) + (out,)
        else:
            hidden = _Opaque(f"the stacked hidden states of '{name}' (use its output instead)")
        state = (hidden, hidden) if isinstance(module, nn.LSTM) else hidden
        return (output, state)

    def broadcast(self, node: fx.Node, operands) -> Layout:
        """Elementwise op of two values: grouped dims added together share a coupling."""
        shape = _shape(node)
        if shape is None:
            raise UnsupportedModelError(f"node '{node.name}': unknown output shape")
        result: list[AxisSpec | None] = [None] * len(shape)
        tensors = [(op, _shape(arg)) for op, arg in zip(operands, node.args[:2], strict=False)
                   if isinstance(op, tuple)]
        for offset in range(1, len(shape) + 1):
            specs = []
            for layout, op_shape in tensors:
                if offset > len(layout):
                    continue
                spec = layout[-offset]
                if spec is not None:
                    specs.append(spec)
                elif op_shape is not None and op_shape[-offset] != 1:
                    specs.append("data")
            grouped = [s for s in specs if isinstance(s, AxisSpec)]
            if not grouped:
                continue
            first = grouped[0]
            for other in grouped[1:]:
                if (other.outer, other.inner) != (first.outer, first.inner):
                    raise UnsupportedModelError(
                        f"node '{node.name}' adds tensors whose neurons are laid out differently"
                    )
                self.union(first.group, other.group)
            if "data" in specs:
                self.fixed.add(first.group)
            result[-offset] = replace(first, kind="neuron")
        return tuple(result)


def _propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    try:
        with torch.no_grad(), temporary_mode(gm):
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise UnsupportedModelError(
            f"running the model on an example input of shape {tuple(example_input.shape)} "
            f"failed: {exc}"
        ) from exc


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _plain_layout(node: fx.Node) -> Layout | None:
    shape = _shape(node)
    return None if shape is None else (None,) * len(shape)


def _map_args(args, layouts):
    return fx.node.map_arg(args, lambda n: layouts[n])


def _flatten_layouts(value):
    if isinstance(value, tuple) and all(isinstance(v, AxisSpec | None) for v in value):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _flatten_layouts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten_layouts(item)
    elif isinstance(value, _Opaque):
        raise UnsupportedModelError(f"the model returns {value.why}")


def _has_groups(value) -> bool:
    """Whether a (nested) layout value carries any aligned dimension."""
    if isinstance(value, AxisSpec | _Opaque):
        return True
    return isinstance(value, tuple | list) and any(_has_groups(v) for v in value)


def _as_input(spec: AxisSpec | None) -> AxisSpec | None:
    return None if spec is None else replace(spec, kind="input")


def _as_neuron(spec: AxisSpec | None) -> AxisSpec | None:
    return None if spec is None else replace(spec, kind="neuron")


def _flatten(node: fx.Node, layout: Layout, start: int, end: int) -> Layout:
    shape = _shape(node.args[0])
    ndim = len(layout)
    start, end = start % ndim, end % ndim
    merged = layout[start:end + 1]
    grouped = [i for i, s in enumerate(merged) if s is not None]
    if not grouped:
        spec = None
    elif len(grouped) > 1:
        raise UnsupportedModelError(
            f"node '{node.name}' flattens several aligned dimensions together"
        )
    else:
        i = grouped[0]
        sizes = shape[start:end + 1]
        old = merged[i]
        spec = replace(
            old,
            outer=old.outer * math.prod(sizes[:i]),
            inner=old.inner * math.prod(sizes[i + 1:]),
        )
    return (*layout[:start], spec, *layout[end + 1:])


def _reshape(node: fx.Node, layout: Layout) -> Layout:
    """flatten/view/reshape: supported when it flattens trailing dimensions."""
    source, result = _shape(node.args[0]), _shape(node)
    if source is None or result is None:
        raise UnsupportedModelError(f"node '{node.name}': unknown shape")
    if source == result:
        return layout
    keep = len(result) - 1
    if source[:keep] == result[:keep] and math.prod(source[keep:]) == result[-1]:
        return _flatten(node, layout, keep, -1)
    if all(s is None for s in layout):
        return (None,) * len(result)
    raise UnsupportedModelError(
        f"node '{node.name}' reshapes {source} to {result}, which moves aligned neurons"
    )


def _permute(node: fx.Node, layout: Layout, dims, name: str) -> Layout:
    if name == "transpose":
        a, b = (d % len(layout) for d in dims)
        order = list(range(len(layout)))
        order[a], order[b] = order[b], order[a]
    else:
        order = list(dims[0] if len(dims) == 1 and isinstance(dims[0], tuple | list) else dims)
    return tuple(layout[d] for d in order)


def _getitem(node: fx.Node, value, index) -> object:
    if isinstance(value, _Opaque) or (isinstance(value, tuple) and value and not all(
        isinstance(v, AxisSpec | None) for v in value
    )):
        if isinstance(value, _Opaque):
            return value
        return value[index]
    if value is None:
        return _plain_layout(node)
    items = index if isinstance(index, tuple) else (index,)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(value) - (len(items) - 1 - sum(i is None for i in items))
        items = (*items[:at], *(slice(None),) * fill, *items[at + 1:])
    out: list[AxisSpec | None] = []
    dim = 0
    for item in items:
        if item is None:
            out.append(None)
            continue
        spec = value[dim]
        if spec is not None and not (isinstance(item, slice) and item == slice(None)):
            raise UnsupportedModelError(
                f"node '{node.name}' indexes into aligned neurons (dimension {dim})"
            )
        if isinstance(item, slice):
            out.append(spec)
        elif not isinstance(item, int):
            raise UnsupportedModelError(f"node '{node.name}': unsupported index {item!r}")
        dim += 1
    return (*out, *value[dim:])


def build_alignment_graph(model: nn.Module, example_input: torch.Tensor) -> AlignmentGraph:
    """Derive the alignment graph of ``model`` by tracing it on ``example_input``."""
    return _Tracer(model).run(example_input)
