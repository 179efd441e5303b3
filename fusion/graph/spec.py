"""The alignment graph as data: which tensor axes share one coupling.

A *group* is a set of neurons (hidden units, channels) that one coupling per client
acts on: the outputs of a layer, every tensor added into the same residual stream, or
the hidden state of a recurrent layer with all its gate blocks. Every axis of every
state_dict entry is described by an :class:`AxisSpec`, or ``None`` when the axis is never
permuted (input features, kernel positions, classes). What is tied is data here;
:mod:`otfusion.fusion.barycenter` decides how it is solved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


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

    On traced activations only, a group split into heads (``view(B, T, H, D // H)``)
    spans two dimensions: ``part="block"`` indexes its blocks (heads), ``part="unit"``
    the units within a block; ``part="piece"`` indexes the pieces of a packed group
    (the query, key and value of one ``qkv`` Linear), which indexing picks apart.
    """

    group: int
    kind: Literal["neuron", "input"]
    outer: int = 1
    inner: int = 1
    part: Literal["block", "unit", "piece"] | None = None


@dataclass(frozen=True)
class TensorSpec:
    """Axes of one state_dict entry; ``cost`` tensors define their neurons' identity.

    ``groups > 1``: a grouped convolution's weight, stored with ``1/groups`` of its input
    channels on axis 1; ``axes`` describe its dense, block-diagonal form
    (:func:`~otfusion.fusion.projection.dense_state`).
    """

    name: str
    axes: tuple[AxisSpec | None, ...]
    cost: bool
    groups: int = 1

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
    """One coupling per client; ``fixed`` groups keep identity (inputs, classes).

    ``blocks > 1``: the neurons form that many contiguous blocks of equal size (the
    groups of a grouped convolution or a GroupNorm), and a coupling may only move whole
    blocks and units within a block. ``block_source``: another group whose block-level
    coupling this one must repeat (a grouped convolution's output blocks follow its
    input blocks). ``parts``: the group is a concatenation, ``(group or None, width)``
    per part in order; its coupling is the block-diagonal of the parts' couplings (a
    ``None`` part is unaligned data, coupled by the identity; a part no tensor
    describes is as wide as traced), never solved itself.
    ``rigid``: the units keep their places within their block and only whole blocks
    move (the queries and keys of attention heads under rotary position embeddings,
    which pair units by their place in the head). ``heads_of``: the group holds one
    value per block (head) of that group (a per-head bias, slope, temperature or gate);
    its coupling is that group's coupling of whole blocks, never solved itself.
    ``repeats``: ``(group, count)``: the units are that group's, each block (head)
    repeated ``count`` times in place (grouped-query attention's key and value heads,
    each serving ``count`` query heads); its coupling repeats that group's, never solved
    itself.
    """

    id: int
    label: str
    fixed: bool
    blocks: int = 1
    block_source: int | None = None
    parts: tuple[tuple[int | None, int], ...] | None = None
    rigid: bool = False
    heads_of: int | None = None
    repeats: tuple[int, int] | None = None


@dataclass(frozen=True)
class AlignmentGraph:
    """Groups in solve order, and the axes of every state_dict entry."""

    groups: tuple[Group, ...]
    tensors: dict[str, TensorSpec]
    activation_sites: dict[int, tuple[ActivationSite, ...]]
    outputs: frozenset[int] = frozenset()
    """Groups that reach the model's output (its classes): fixed, identity coupling."""
    packed: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    """State entries that pack several tensors (``nn.MultiheadAttention``'s Q, K and V
    rows, in equal shares; a layer's outputs added to a concatenation, in its parts'
    proportions): name -> (axis, shares); each piece is described as ``name#i``
    (:func:`~otfusion.fusion.projection.dense_state`)."""

    def widths(self, state_dict: dict[str, torch.Tensor], who: str = "model") -> dict[int, int]:
        """Width of every group in ``state_dict``, checked for consistency. A tensor of
        integers or booleans on aligned units is refused: it can be neither averaged nor
        moved with them."""
        undescribed = [name for name, tensor in state_dict.items()
                       if name not in self.tensors and tensor.is_floating_point()]
        if undescribed:
            raise ValueError(f"{who}: the alignment graph does not describe "
                             f"{undescribed[:5]}; give every state_dict entry its axes "
                             "(None for an axis that is never permuted)")
        widths: dict[int, int] = {}
        for spec in self.tensors.values():
            if spec.name not in state_dict:
                raise ValueError(f"{who}: the state_dict has no '{spec.name}'")
            shape = state_dict[spec.name].shape
            if not state_dict[spec.name].is_floating_point() and any(
                    a is not None and not self.groups_by_id[a.group].fixed for a in spec.axes):
                raise UnsupportedModelError(
                    f"'{spec.name}' ({state_dict[spec.name].dtype}) meets aligned units, but a "
                    "tensor of integers or booleans can be neither averaged nor permuted with "
                    "them; store it as floats (a mask as 0.0 and 1.0)")
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
        for group in self.groups:
            if group.repeats is not None and group.repeats[0] in widths:  # may hold no tensor
                repeated = widths[group.repeats[0]] * group.repeats[1]
                if widths.setdefault(group.id, repeated) != repeated:
                    raise ValueError(f"{who}: group '{group.label}' repeats "
                                     f"'{self.groups_by_id[group.repeats[0]].label}' "
                                     f"{group.repeats[1]} times, so its width must be "
                                     f"{repeated}, not {widths[group.id]}")
            if group.parts is not None:
                total = sum(widths.get(g, size) for g, size in group.parts)
                if widths.setdefault(group.id, total) != total:
                    raise ValueError(f"{who}: concatenation '{group.label}' has width "
                                     f"{widths[group.id]}, but its parts add up to {total}")
            if group.blocks > 1 and widths.get(group.id, 0) % group.blocks:
                raise ValueError(f"{who}: group '{group.label}' has width "
                                 f"{widths.get(group.id)}, not a multiple of its "
                                 f"{group.blocks} blocks")
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

    def __str__(self) -> str:
        members: dict[int, list[str]] = {}
        for spec in self.tensors.values():
            for axis, a in enumerate(spec.axes):
                if a is None:
                    continue
                shape = "" if (a.outer, a.inner) == (1, 1) else f" {a.outer}x.x{a.inner}"
                role = "" if a.kind == "neuron" else " in"
                members.setdefault(a.group, []).append(f"{spec.name}[{axis}{role}{shape}]")
        lines = [f"AlignmentGraph: {len(self.groups)} groups, {len(self.tensors)} tensors"]
        for group in self.groups:
            notes = [note for note, on in (
                ("output" if group.id in self.outputs else "fixed", group.fixed),
                (f"{group.blocks} blocks", group.blocks > 1),
                (f"blocks follow group {group.block_source}", group.block_source is not None),
                ("units keep their places in blocks", group.rigid),
                (f"one per block of group {group.heads_of}", group.heads_of is not None),
                ("blocks of group {} repeated {} times".format(*group.repeats or (0, 0)),
                 group.repeats is not None),
                ("concatenation of " + " ++ ".join(
                    "data" if g is None else f"group {g}" for g, _ in group.parts or ()),
                 group.parts is not None),
            ) if on]
            lines.append(f"  group {group.id} '{group.label}'"
                         + (f" ({', '.join(notes)})" if notes else ""))
            lines.append("      " + ", ".join(members.get(group.id, [])))
        unaligned = [s.name for s in self.tensors.values() if all(a is None for a in s.axes)]
        if unaligned:
            lines.append(f"  not aligned: {', '.join(unaligned)}")
        return "\n".join(lines)
