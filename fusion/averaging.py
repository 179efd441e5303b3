"""The last step of fusion: the clients' tensors, mapped through their couplings to
the fused coordinates, averaged into the fused model's tensors.

A tensor is averaged with the client weights, except along two kinds of axis:

- the output group's axis (the classes), with per-class weights such as the clients'
  label counts (``class_weights``), so that a class is fused from the clients that saw it;
- a hidden neuron axis, with per-neuron weights (``neuron_weights``): each client
  neuron's share in the fused neuron it is coupled to grows with its importance, the
  norm of its outgoing weights.

A tensor that comes out the same from every client once mapped (a frozen pretrained
backbone under heads each client fine-tuned) is kept bit for bit, not averaged.

``rescale`` then scales each fused plain hidden unit so that the norm of its incoming
weights and bias is the same-weighted mean of the norms of the client units coupled to
it, which undoes the shrinkage of averaging imperfectly matched units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .graph import AlignmentGraph, AxisSpec, TensorSpec, is_recurrent
from .projection import Coupling, apply_axis, project, row_sq_norms
from .robust import Combine, weighted_mean
from .validation import all_finite, is_same_constant

_NEURONS = AxisSpec(group=-1, kind="neuron")


@dataclass(frozen=True)
class AveragingWeights:
    """Client weights (summing to one), optionally per class of the output group and
    per fused neuron of hidden groups (client x neuron, summing to one per neuron)."""

    clients: list[float]
    per_class: list[list[float]] | None = None
    per_neuron: dict[int, list[torch.Tensor]] | None = None


def average_states(graph: AlignmentGraph | None, template_state: dict[str, torch.Tensor],
                   states: list[dict[str, torch.Tensor]],
                   couplings: list[dict[int, Coupling]], weights: AveragingWeights,
                   rescale: bool = False, combine: Combine = weighted_mean
                   ) -> dict[str, torch.Tensor]:
    """The fused state: every floating tensor of every client mapped through its
    couplings and combined with ``weights`` (by ``combine``: the weighted mean, or a
    robust estimator); integer buffers come from the template."""
    if weights.per_class is not None:
        assert graph is not None
        _check_class_count(graph, template_state, len(weights.per_class[0]))
    plain = plain_unit_groups(graph) if rescale and graph is not None else set()
    fused: dict[str, torch.Tensor] = {}
    norms = _NormTargets(len(states))
    for name, like in template_state.items():
        if not like.is_floating_point():
            fused[name] = like.clone()
            continue
        spec = graph.tensors[name] if graph is not None else None
        axes = spec.axes if spec is not None else ()
        if not all_finite(like):
            fused[name] = _infinite_constant(name, like, states)
            continue
        projected = [project(state[name], axes, maps)
                     for state, maps in zip(states, couplings, strict=True)]
        agreed = all(torch.equal(projected[0], t) for t in projected[1:])
        fused[name] = (projected[0].clone() if agreed  # e.g. a frozen backbone: bit for bit
                       else combine(projected, _tensor_weights(graph, spec, like, weights)))
        if spec is not None and spec.cost and spec.axes[spec.neuron_axis].group in plain:
            norms.add(spec, fused[name], projected, agreed)
    for spec, scale in norms.scales(weights, combine):
        axis = spec.neuron_axis
        fused[spec.name] = fused[spec.name] * _along(scale, spec.axes[axis], axis,
                                                     fused[spec.name])
    return fused


def _infinite_constant(name: str, like: torch.Tensor, states: list[dict[str, torch.Tensor]]
                       ) -> torch.Tensor:
    """A tensor holding infinities (a causal attention mask's -inf) is a constant, kept
    as it is (averaging it could give NaN): it must be the same in every client. The
    engine has made sure that no alignment moves it (``engine._check_constants_unaligned``)."""
    if not all(is_same_constant(like, state[name]) for state in states):
        raise ValueError(f"'{name}' contains Inf values and differs between the models: only "
                         "a tensor that is the same in every model may hold infinities")
    return like.clone()


def _tensor_weights(graph: AlignmentGraph | None, spec: TensorSpec | None,
                    like: torch.Tensor, weights: AveragingWeights) -> list:
    """Per client, the factor of its mapped tensor: a number, or weights laid out along
    the output (class) axis or along the tensor's own neuron axis."""
    if spec is None:
        return list(weights.clients)
    if weights.per_class is not None:
        for axis, a in enumerate(spec.axes):
            if a is not None and a.group in graph.outputs:
                return [_along(row, a, axis, like) for row in weights.per_class]
    axis = spec.neuron_axis
    if weights.per_neuron is not None and axis is not None:
        rows = weights.per_neuron.get(spec.axes[axis].group)
        if rows is not None:
            return [_along(row, spec.axes[axis], axis, like) for row in rows]
    return list(weights.clients)


class _NormTargets:
    """Squared row norms of the fused plain units and of the client units mapped onto
    them, summed over the member tensors of each group (incoming weights and bias)."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.fused: dict[int, torch.Tensor] = {}
        self.mapped: dict[int, list] = {}
        self.members: dict[int, list[TensorSpec]] = {}
        self.differing: set[int] = set()

    def add(self, spec: TensorSpec, fused: torch.Tensor, projected: list[torch.Tensor],
            agreed: bool = False):
        """A member tensor of a group; ``agreed``: the same in every client."""
        axis = spec.neuron_axis
        neuron = spec.axes[axis]
        group = neuron.group
        if not agreed:
            self.differing.add(group)
        self.fused[group] = self.fused.get(group, 0) + _sq_rows(fused, axis, neuron)
        totals = self.mapped.setdefault(group, [0] * self.clients)
        for k, tensor in enumerate(projected):
            totals[k] = totals[k] + _sq_rows(tensor, axis, neuron)
        self.members.setdefault(group, []).append(spec)

    def scales(self, weights: AveragingWeights, combine: Combine):
        """(member tensor, per-neuron scale) pairs: target norm over fused norm; none for
        a group whose every member is the same in every client (its scale is one)."""
        for group, own in self.fused.items():
            if group not in self.differing:
                continue
            mix = ((weights.per_neuron or {}).get(group)
                   or [torch.full_like(own, w) for w in weights.clients])
            target = combine([c.sqrt() for c in self.mapped[group]], mix)
            scale = target / own.sqrt().clamp_min(1e-30)
            for spec in self.members[group]:
                yield spec, scale


def _sq_rows(tensor: torch.Tensor, axis: int, neuron: AxisSpec) -> torch.Tensor:
    return row_sq_norms(tensor, axis, neuron).double()


def plain_unit_groups(graph: AlignmentGraph) -> set[int]:
    """Groups whose neurons are plain units (output proportional to their incoming
    weights and bias): neither fixed, nor recurrent, nor normalised (BatchNorm or
    LayerNorm would undo or mis-scale a rescaling)."""
    groups = {g.id for g in graph.groups if not g.fixed}
    for spec in graph.tensors.values():
        if spec.neuron_axis is not None and (not spec.cost or is_recurrent(spec)):
            groups.discard(spec.axes[spec.neuron_axis].group)
    return groups


def neuron_importance_weights(graph: AlignmentGraph, states, couplings, weights: list[float],
                              how: str) -> dict[int, list[torch.Tensor]]:
    """Per hidden group, per client: the share of the client's neuron coupled to each
    fused neuron, ``weights[k] * importance`` normalised over the clients. A neuron's
    importance is the norm (``outgoing``) or squared norm (``outgoing-sq``) of its
    outgoing weights, summed over its consumers."""
    out: dict[int, list[torch.Tensor]] = {}
    for group in graph.groups:
        if group.fixed or group.id not in couplings[0]:
            continue
        consumers = [(spec, axis, a) for spec in graph.tensors.values()
                     for axis, a in enumerate(spec.axes)
                     if a is not None and a.group == group.id and a.kind == "input"]
        if not consumers:
            continue
        mapped = []
        for k, state in enumerate(states):
            squared = sum(row_sq_norms(state[spec.name], axis, a).double()
                          for spec, axis, a in consumers)
            importance = squared if how == "outgoing-sq" else squared.sqrt()
            mapped.append(weights[k] * apply_axis(importance, 0, _NEURONS, couplings[k][group.id]))
        stacked = torch.stack(mapped)
        stacked = stacked / stacked.sum(dim=0, keepdim=True).clamp_min(1e-300)
        out[group.id] = list(stacked)
    return out


def normalize_class_weights(class_weights, weights: list[float]) -> list[list[float]] | None:
    """``class_weights`` (K x C) normalised per class to sum one; a class of zero total
    weight gets the client weights ``weights``. None stays None."""
    if class_weights is None:
        return None
    rows = [[float(v) for v in row] for row in (
        class_weights.tolist() if isinstance(class_weights, torch.Tensor) else class_weights)]
    if len(rows) != len(weights):
        raise ValueError(f"class_weights has {len(rows)} rows for {len(weights)} models")
    sizes = {len(row) for row in rows}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"class_weights rows must have one common, non-zero length: {sizes}")
    if any(not math.isfinite(v) or v < 0 for row in rows for v in row):
        raise ValueError("class_weights must be finite and non-negative")
    columns = []
    for column in zip(*rows, strict=True):
        total = sum(column)
        columns.append([v / total for v in column] if total > 0 else list(weights))
    return [list(row) for row in zip(*columns, strict=True)]


def _check_class_count(graph: AlignmentGraph, state: dict[str, torch.Tensor],
                       classes: int) -> None:
    widths = graph.widths(state, "target")
    found = sorted({widths[g] for g in graph.outputs})
    if found != [classes]:
        raise ValueError(f"class_weights has {classes} columns but the model's output "
                         f"width is {found[0] if len(found) == 1 else found}")


def _along(values: Sequence[float] | torch.Tensor, spec: AxisSpec, axis: int,
           like: torch.Tensor) -> torch.Tensor:
    """One value per neuron of ``spec``, laid out along ``axis`` of a tensor ``like``
    this one (repeated over the axis's ``outer`` blocks and ``inner`` positions)."""
    column = torch.as_tensor(values, dtype=torch.float64).to(like.dtype)
    column = column.repeat_interleave(spec.inner).repeat(spec.outer)
    shape = [1] * like.dim()
    shape[axis] = -1
    return column.to(like.device).reshape(shape)
