"""Deriving an :class:`~.spec.AlignmentGraph` from a torch model.

The model is traced with ``torch.fx``; node by node, the tracer propagates which group
lives on which dimension of every intermediate tensor (a *layout*: one
:class:`~.spec.AxisSpec` or ``None`` per dimension). What each module, function or
method does to a layout is a rule of :mod:`.rules`. Anything no rule covers raises
:class:`~.spec.UnsupportedModelError` naming the module or node, so a model is never
fused silently wrong.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import math
import operator
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import rnn as rnn_utils

from ..modes import left_as_it_was, temporary_mode
from ..validation import check_initialised
from . import rules
from .finisher import Finisher, merge_blocks
from .layouts import NUMBER, Layout, Packed, Stacked, is_layout, known, plain, shape_of
from .rules.recurrent import FILLS_LIKE, KEEPS_ROWS
from .spec import ActivationSite, AlignmentGraph, AxisSpec, UnsupportedModelError

_MISSING = object()
_NUMPY_ALIASES = {"dim": "axis", "keepdim": "keepdims"}


@dataclass(frozen=True)
class Call:
    """One fx node being visited: its raw arguments and their layouts."""

    node: fx.Node
    args: tuple
    kwargs: dict

    def value(self, index: int, name: str, default=_MISSING):
        """The argument at position ``index`` or keyword ``name`` (or its NumPy alias:
        ``axis`` for ``dim``, ``keepdims`` for ``keepdim``), a number computed from shapes
        (``h.dim() - 1``) as its number."""
        if index < len(self.node.args):
            return known(self.node.args[index])
        for key in (name, _NUMPY_ALIASES.get(name)):
            if key in self.node.kwargs:
                return known(self.node.kwargs[key])
        if default is _MISSING:
            raise UnsupportedModelError(f"node '{self.node.name}': missing argument '{name}'")
        return default

    def layout(self, index: int = 0, name: str = "input"):
        """The layout of the argument at position ``index`` or keyword ``name``."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name)

    @property
    def shape(self) -> tuple[int, ...] | None:
        return shape_of(self.node)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of the first argument (``input``)."""
        return shape_of(self.value(0, "input", None))

    def argument_shapes(self, start: int, skip: tuple[str, ...] = ()
                        ) -> list[tuple[int, ...]]:
        """The shapes of the tensors among the arguments from position ``start`` and the
        keyword arguments other than ``skip``."""
        values = (*self.node.args[start:],
                  *(v for k, v in self.node.kwargs.items() if k not in skip))
        return [shape for shape in map(shape_of, values) if shape is not None]


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every module with a rule (built-in or registered) whole,
    reads buffers as graph nodes (fx's default bakes them in as constants, which cannot
    be sliced by a traced size, as in ``self.mask[:T, :T]``), and records the functions
    of ``torch.nn.utils.rnn`` as calls (packing reads the lengths' values)."""

    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__(autowrap_modules=(math, rnn_utils))
        # fx would take every public callable there for a function to record, the classes
        # and typing names it imports among them: isinstance(h, Tensor) would then fail
        self._autowrap_function_ids -= {
            id(value) for value in vars(rnn_utils).values()
            if not (inspect.isfunction(value) and value.__module__ == rnn_utils.__name__)}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return rules.module_rule(module) is not None or super().is_leaf_module(
            module, qualified_name)


class PackedTensor(NamedTuple):
    """A state tensor that packs the tensors of several groups along ``axis`` (Q, K and
    V rows; a layer's outputs added to a concatenation): each piece's axes, whether
    they define their groups' costs, and the pieces' proportions along ``axis``."""

    axis: int
    pieces: list[tuple]
    cost: bool
    shares: tuple[int, ...]


class Tracer:
    """Union-find over groups, the axes recorded for every tensor, and the traversal."""

    def __init__(self, model: nn.Module, in_place: dict[str, tuple[str, str]] | None = None,
                 spatial: set[str] | None = None):
        self.model = model
        self.spatial = set(spatial or ())  # splits read as channels and positions
        self.piece_origins: dict[int, str] = {}  # group -> the split that made pieces of it
        self.in_place = dict(in_place or {})  # groups whose units keep their places in
        # heads: label -> (node, refusal) that found them
        self.given_in_place = len(self.in_place)  # the rest were found by this walk
        self.rigid: set[int] = set()  # the groups whose units within heads were made plain
        self.modules = dict(model.named_modules())
        self.state = dict(model.state_dict(keep_vars=True))
        self.parent: list[int] = []
        self.labels: list[str] = []
        self.passive: set[int] = set()
        self.fixed: set[int] = set()
        self.outputs: set[int] = set()
        self.blocks: dict[int, tuple[int, int | None, str]] = {}
        self.values_per_head: list[tuple[int, int, str]] = []
        self.repeats: dict[int, tuple[int, int, str]] = {}
        self.parts: dict[int, tuple[tuple[int | None, int], ...]] = {}
        self.uses: dict[int, list[tuple[str, tuple, bool]]] = {}
        self.grouped: dict[int, int] = {}
        self.packed: dict[str, PackedTensor] = {}
        self.split_groups: dict[int, list[int]] = {}
        self.shares: dict[int, tuple[int, ...]] = {}  # a split group's pieces' proportions
        self.split_members: dict[int, frozenset[int]] = {}  # the groups joined when split
        self.sites: list[tuple[int, ActivationSite]] = []
        self.unaligned_required: list[tuple[int, str]] = []
        self.opaque_groups: set[int] = set()
        self.parameter_axes: set[int] = set()
        self.carried: set[int] = set()

    # -- groups
    def new_group(self, label: str, passive: bool = False) -> int:
        """A new group; a ``passive`` one (a parameter's axis) only joins others."""
        self.parent.append(len(self.parent))
        self.labels.append(label)
        if passive:
            self.passive.add(len(self.parent) - 1)
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

    def fix(self, group: int) -> None:
        """``group`` keeps the identity coupling (it meets unaligned data)."""
        self.fixed.add(group)

    def cut(self, axis: AxisSpec, where: str) -> bool:
        """Whether ``axis`` may be sliced or indexed: it may when it is still a parameter's
        or buffer's own axis, met by no layer yet (a positional table or a causal mask
        cut to the sequence length), or learned tokens concatenated to the data's
        positions (the class token picked from them). Its entries are then picked by
        position, so the axis must turn out unaligned (met by positions, or by nothing),
        or the model is refused."""
        root = self.find(axis.group)
        if self.learned_positions(root):
            self.fix(root)
            return True
        if not self.passive_only(root):
            return False
        self.must_stay_unaligned(axis.group, (
            f"{where} picks entries of a parameter or buffer by position along an axis "
            "that meets aligned units, which cannot be permuted then"))
        return True

    def must_stay_unaligned(self, group: int, problem: str) -> None:
        """``group`` is used in a way no coupling can follow (its entries picked or mixed
        by position): it must turn out unaligned (met by data, or by nothing), or
        ``problem`` is raised when the graph is finished."""
        self.unaligned_required.append((self.find(group), problem))

    def constrain_blocks(self, group: int, blocks: int, where: str,
                         source: int | None = None) -> None:
        """``group``'s coupling may only move whole blocks (and units within them)."""
        if blocks > 1:
            self.blocks[group] = merge_blocks(self.blocks.get(group), (blocks, source, where))

    def per_head(self, group: int, heads: int, where: str) -> None:
        """``group``'s units are one value per head of the group ``heads`` (a per-head
        bias, slope, temperature or gate): they move as its heads move."""
        self.values_per_head.append((group, heads, where))

    def repeat_heads(self, layout: Layout, dim: int, heads: int, count: int,
                     where: str) -> Layout:
        """``layout`` with its ``heads`` heads on ``dim`` each repeated ``count`` times in
        place (the key and value heads of grouped-query attention, each serving ``count``
        query heads): they and their units become a new group, whose coupling repeats
        theirs."""
        spec = layout[dim]
        if spec is None or spec.part != "block":
            raise UnsupportedModelError(f"{where} repeats entries along aligned units, "
                                        "which is supported only for whole heads")
        root = self.find(spec.group)
        group = self.new_group(f"{self.labels[spec.group]}*{count}")
        self.repeats[group] = (spec.group, count, where)
        self.constrain_blocks(group, heads * count, where)
        return tuple(replace(s, group=group) if s is not None and self.find(s.group) == root
                     else s for s in layout)

    def share_head(self, layout: Layout, dim: int, heads: int, where: str) -> Layout:
        """``layout`` read by ``heads`` heads on ``dim``, where it has one entry for all
        of them or unaligned data (multi-query attention: one key and one value head for
        every query head). Its one group of units is then one head, repeated ``heads``
        times (:meth:`repeat_heads`); any other layout is returned as it is."""
        aligned = [d for d, spec in enumerate(layout) if spec is not None]
        if len(aligned) != 1 or layout[dim] is not None:
            return layout
        spec = layout[aligned[0]]
        if spec.part is not None or (spec.outer, spec.inner) != (1, 1):
            return layout
        one = tuple(replace(spec, part="block") if d == dim else
                    replace(spec, part="unit") if d == aligned[0] else s
                    for d, s in enumerate(layout))
        return self.repeat_heads(one, dim, 1, heads, where)

    def per_head_axis(self, name: str, spec: AxisSpec) -> AxisSpec:
        """An axis of the state tensor ``name`` along the heads of ``spec`` (a norm's or a
        convolution's channels that are heads: a generator's ``fc(z).view(-1, C, H, W)``):
        a group of one value per head, which moves with its head."""
        values = self.new_group(name)
        self.per_head(values, spec.group, f"'{name}'")
        return AxisSpec(values, spec.kind)

    def kept_in_place(self, group: int) -> bool:
        """Whether ``group``'s units keep their places within its heads (only whole
        heads move)."""
        return any(self.find(g) == self.find(group) for g in self.rigid)

    def spatial_split(self, group: int, heads: int, where: str) -> None:
        """``group`` split by ``where`` into ``heads`` channels whose units become
        positions (a generator's ``fc(z).view(-1, C, H, W)``): its couplings move whole
        channels and keep the units within them in place."""
        self.heads(group, heads, where)
        self.rigid.add(group)

    def repeated(self, group: int) -> bool:
        """Whether ``group``'s heads are repeated ones (:meth:`repeat_heads`)."""
        return any(self.find(g) == self.find(group) for g in self.repeats)

    def heads(self, group: int, count: int, where: str) -> None:
        """``group`` is split into ``count`` heads: couplings move whole heads."""
        self.constrain_blocks(group, count, where)

    def pieces(self, group: int, shares: tuple[int, ...], where: str) -> list[int]:
        """``group`` turns out to pack groups in those proportions (a ``qkv`` Linear's
        output split into query, key and value, ``(1, 1, 1)``): the tensors of every
        group joined with it (a per-unit scale, another layer added to it) become packed,
        one new group a piece."""
        divisor = math.gcd(*shares)
        shares = tuple(share // divisor for share in shares)
        if group in self.split_groups:
            if self.shares[group] != shares:
                raise UnsupportedModelError(f"{where} splits '{self.labels[group]}' into "
                                            "other pieces than before")
            return self.split_groups[group]
        if self.tied_to_others(group):
            raise UnsupportedModelError(f"{where} splits units that are tied to others into "
                                        f"{len(shares)} pieces")
        root = self.find(group)
        members = frozenset(g for g in range(len(self.parent)) if self.find(g) == root)
        new = [self.new_group(f"{self.labels[group]}#{i}") for i in range(len(shares))]
        for key, uses in list(self.uses.items()):
            found = [(use, d) for use in uses for d, a in enumerate(use[1])
                     if a is not None and self.find(a.group) == root]
            if not found:
                continue
            (name, axes, cost), axis = found[0]
            spec = axes[axis]
            if len(uses) != 1 or len(found) != 1 or spec.kind != "neuron" or (
                    spec.outer, spec.inner) != (1, 1):
                raise UnsupportedModelError(f"{where} splits the units of '{name}' into "
                                            "pieces, which is supported only for a layer's "
                                            "own outputs")
            self.uses[key] = []
            previous = next((packed for other, packed in self.packed.items()
                             if self.state[other] is self.state[name]), None)
            if previous is None:
                self.packed[name] = PackedTensor(axis, [
                    tuple(replace(a, group=g) if d == axis else a for d, a in enumerate(axes))
                    for g in new], cost, shares)
            else:
                self._split_again(name, previous, axes, axis, shares, new, where)
        self.sites = [(g, site) for g, site in self.sites if self.find(g) != root]
        for member in members:
            self.split_groups[member] = new
            self.shares[member] = shares
            self.split_members[member] = members
        return new

    def tied_to_others(self, group: int) -> bool:
        """Whether ``group``'s units are tied in a way that pieces cannot follow: fixed,
        moved in blocks or the source of another group's blocks, kept in place within
        heads, values per head or repeated heads, or a concatenation or a part of one,
        itself or a group joined with it."""
        root = self.find(group)
        tied = (self.fixed | set(self.blocks) | set(self.parts) | set(self.repeats)
                | self.rigid
                | {source for _, source, _ in self.blocks.values() if source is not None}
                | {g for g, _, _ in self.values_per_head}
                | {g for _, g, _ in self.values_per_head}
                | {p for parts in self.parts.values() for p, _ in parts if p is not None}
                | {source for source, _, _ in self.repeats.values()})
        return any(self.find(g) == root for g in tied)

    def _split_again(self, name: str, previous: PackedTensor, axes: tuple, axis: int,
                     shares: tuple[int, ...], new: list[int], where: str) -> None:
        """A packed tensor used again (a layer called at every step of a hand-written
        recurrent cell), read with ``axes``, and split again along the same axis in the
        same proportions: piece ``i`` of this use (group ``new[i]``) joins piece ``i`` of
        the first, and its other axes join theirs."""
        if (axis, shares) != (previous.axis, previous.shares):
            raise UnsupportedModelError(f"{where} splits '{name}' into other pieces than "
                                        "before")
        for group, old in zip(new, previous.pieces, strict=True):
            for d, (first, other) in enumerate(zip(old, axes, strict=True)):
                self._tie(name, first, replace(other, group=group) if d == axis else other)

    def concatenation(self, group: int) -> tuple[tuple[int | None, int], ...] | None:
        """The parts of ``group``'s concatenation, if it is one."""
        root = self.find(group)
        return next((value for g, value in self.parts.items() if self.find(g) == root), None)

    def add_to_concatenation(self, group: int, concatenation: int, where: str) -> None:
        """A layer's units added to a concatenation (a CIFAR ResNet's residual sum with a
        shortcut padded with channels of zeros): the layer's tensors are split into
        pieces as wide as the concatenation's parts, nested ones flattened, and each
        piece joins its part (a part of unaligned data stays in place)."""
        if self.tied_to_others(group):
            raise UnsupportedModelError(
                f"{where} adds the units of '{self.labels[group]}', tied to others (a norm's "
                "groups of channels, heads, fixed data), to a concatenation, "
                "which is not supported")
        leaves = self._leaves(self.concatenation(concatenation))
        pieces = self.pieces(group, tuple(size for _, size in leaves), where)
        for piece, (part, _) in zip(pieces, leaves, strict=True):
            if part is None:
                self.fix(piece)
            else:
                self.union(part, piece)

    def _leaves(self, parts) -> list[tuple[int | None, int]]:
        leaves = []
        for part, size in parts:
            nested = None if part is None else self.concatenation(part)
            leaves += [(part, size)] if nested is None else self._leaves(nested)
        return leaves

    def direct_sum(self, label: str, parts: list[tuple[AxisSpec | None, int]]) -> AxisSpec:
        """A group whose coupling is the block-diagonal of its parts' couplings (a
        concatenation); a ``None`` part is unaligned data of the given size."""
        group = self.new_group(label)
        self.parts[group] = tuple((None if spec is None else spec.group, size)
                                  for spec, size in parts)
        return AxisSpec(group, "neuron")

    # -- recording
    def record(self, module: str, param: str, axes, cost: bool, groups: int = 1) -> None:
        """The axes of ``module.param`` at one of its uses (tied tensors have several);
        ``groups``: see :class:`~.spec.TensorSpec`."""
        name = f"{module}.{param}" if module else param
        if name not in self.state:
            for original, its_axes in self._originals(module, param, name, tuple(axes), groups):
                whole = its_axes == tuple(axes)
                self.record_tensor(original, its_axes, cost and whole, groups if whole else 1)
            return
        self.record_tensor(name, axes, cost, groups)

    def _originals(self, module: str, param: str, name: str, axes: tuple, groups: int):
        """The state entries a parametrized ``module.param`` is computed from
        (``torch.nn.utils.parametrizations``: weight_norm's magnitude and direction,
        spectral_norm's weight and power-iteration vectors), each with its axes. Only
        parametrizations along the weight's first axis (``dim=0``) are described, and
        spectral_norm on an ungrouped layer."""
        prefix = f"{module}.parametrizations.{param}." if module else f"parametrizations.{param}."
        keys = [key for key in self.state if key.startswith(prefix)]
        if not keys:
            raise UnsupportedModelError(
                f"'{name}' is not in the model's state_dict (computed from other tensors "
                "by a hook), which is not supported")
        chain = self.modules[module].parametrizations[param]
        if any(getattr(p, "dim", 0) != 0 for p in chain) or groups > 1 and any(
                key.endswith(("._u", "._v")) for key in keys):
            raise UnsupportedModelError(
                f"'{name}' is parametrized along another axis than its first (dim != 0, as "
                "spectral_norm does for a transposed convolution) or is a grouped "
                "convolution's under spectral_norm, which is not supported")
        shape = tuple(getattr(self.modules[module], param).shape)
        found = []
        for key in keys:
            size, leaf = tuple(self.state[key].shape), key.rsplit(".", 1)[-1]
            if size == shape:
                found.append((key, axes))
            elif len(size) == len(shape) and size[0] == shape[0] and set(size[1:]) <= {1}:
                found.append((key, (axes[0], *(None,) * (len(size) - 1))))  # a norm per unit
            elif leaf == "_u" and size == shape[:1]:
                found.append((key, axes[:1]))
            elif leaf == "_v" and size == (math.prod(shape[1:]),):  # inputs x kernel
                found.append((key, (None if axes[1] is None else
                                    replace(axes[1], inner=axes[1].inner * size[0] // shape[1]),)))
            else:
                raise UnsupportedModelError(f"'{key}' (a parametrization of '{name}') has a "
                                            "shape the alignment cannot relate to the weight's")
        return found

    def record_tensor(self, name: str, axes, cost: bool, groups: int = 1) -> None:
        """The axes of the state entry ``name`` at one of its uses."""
        tensor = self.state[name]
        axes = tuple(self.per_head_axis(name, a) if a is not None and a.part == "block"
                     and self.kept_in_place(a.group) else a for a in axes)
        if any(a is not None and a.part is not None for a in axes):
            raise UnsupportedModelError(f"'{name}' is used on units split into heads")
        if len(axes) != tensor.dim():
            raise UnsupportedModelError(f"'{name}' has {tensor.dim()} dims, but its rule "
                                        f"describes {len(axes)}")
        uses = self.uses.setdefault(id(tensor), [])
        if uses:
            if groups > 1 or self.grouped.get(id(tensor), 1) > 1:
                raise UnsupportedModelError(f"'{name}': a grouped convolution weight used "
                                            "in several places is not supported")
            for first, other in zip(uses[0][1], axes, strict=True):
                self._tie(name, first, other)
        if groups > 1:
            self.grouped[id(tensor)] = groups
        uses.append((name, axes, cost))

    def record_packed(self, module: str, param: str, axis: int, pieces, cost: bool) -> None:
        """``module.param`` packs equal pieces along ``axis`` (Q, K and V rows), each
        with its own axes."""
        name = f"{module}.{param}" if module else param
        tensor = self.state[name]
        if id(tensor) in self.uses:
            raise UnsupportedModelError(f"'{name}': a packed tensor used in several places "
                                        "is not supported")
        self.uses[id(tensor)] = []
        self.packed[name] = PackedTensor(axis, [tuple(axes) for axes in pieces], cost,
                                         (1,) * len(pieces))

    def _tie(self, name: str, first: AxisSpec | None, other: AxisSpec | None) -> None:
        if first is None and other is None:
            return
        if first is None or other is None:
            self.fix((first or other).group)
            return
        if (first.outer, first.inner) != (other.outer, other.inner):
            raise UnsupportedModelError(
                f"'{name}' is used in two places that lay out its units differently")
        self.union(first.group, other.group)

    def add_site(self, group: int, module: str, output_index: int | None, dim: int,
                 layout: tuple) -> None:
        """``module``'s output (its item ``output_index`` if a tuple), of ``layout``,
        carries ``group``'s units on ``dim``: a site whose activations can define them
        (``cost="activations"``), unless another dimension carries units too (a token
        mixer's hidden units over channels): its samples would come in each client's
        own order of those units, so the group's weights define it instead."""
        if all(spec is None for d, spec in enumerate(layout) if d != dim):
            self.sites.append((group, ActivationSite(module, output_index, dim, layout[dim])))

    # -- traversal
    def run(self, example_input: torch.Tensor) -> AlignmentGraph:
        gm = _trace(self.model)
        key = _structure(self.model, self.state, gm, example_input)
        if key in _GRAPHS:
            return _GRAPHS[key]
        _propagate_shapes(gm, example_input)
        tracer = self
        while True:
            try:
                graph = tracer.walk(gm)
                break
            except _UnitsInPlace:
                tracer = Tracer(self.model, tracer.in_place, tracer.spatial)
        if len(_GRAPHS) >= _GRAPHS_KEPT:
            del _GRAPHS[next(iter(_GRAPHS))]
        _GRAPHS[key] = graph
        return graph

    def walk(self, gm: fx.GraphModule) -> AlignmentGraph:
        """The graph of the traced ``gm``, node by node (:meth:`visit_keeping_heads`)."""
        layouts: dict[fx.Node, object] = {}
        with_units: list[fx.Node] = []  # the nodes whose layouts hold units within heads
        for node in gm.graph.nodes:
            if node.op == "output":
                for layout in _output_layouts(node.args[0], layouts):
                    for spec in layout:
                        if spec is not None:
                            self.fix(spec.group)
                            self.outputs.add(spec.group)
                continue
            layout = self.visit_keeping_heads(node, layouts, with_units)
            layouts[node] = _map_specs(layout, self.keep_in_place) if self.in_place else layout
            if any(spec.part == "unit" for spec in _specs(layouts[node])):
                with_units.append(node)
            if node.op != "get_attr":
                self.carried.update(spec.group for spec in _specs(layouts[node]))
        if len(self.in_place) > self.given_in_place:
            raise _UnitsInPlace
        return Finisher(self).graph()

    def visit_keeping_heads(self, node: fx.Node, layouts: dict,
                            with_units: list[fx.Node]) -> object:
        """``node``'s layout. The units within heads that it refuses (it slices them,
        rotates pairs of them, scales them with one table for every head: rotary position
        embeddings, a per-head norm; or any refusal among whose inputs they are) are kept
        in place: plain positions, so that only whole heads move. They are added to
        ``in_place``, the layouts met so far (of the nodes ``with_units``) are made so, and
        the node is visited again.
        The walk goes on, to find every such head, and ends with :class:`_UnitsInPlace`,
        to be made again from the start with all of them in place; a refusal of
        anything else after one was found ends it at once. A refusal of the pieces that a
        split into three dimensions made (read as a packed ``qkv``, ``(3, H, D)``) walks
        again at once with that split read as channels and positions (``spatial``: a
        generator's ``fc(z).view(-1, C, H, W)`` before a BatchNorm)."""
        while True:
            try:
                return self.visit(node, layouts)
            except UnsupportedModelError as error:
                specs = [spec for n in node.all_input_nodes for spec in _specs(layouts[n])]
                heads = {self.find(spec.group) for spec in specs if spec.part == "unit"}
                if not heads:
                    splits = {self.piece_origins[spec.group] for spec in specs
                              if spec.part == "piece" and spec.group in self.piece_origins}
                    if splits - self.spatial:  # a (C, H, W) split read as packed pieces
                        self.spatial |= splits
                        raise _UnitsInPlace from None
                    if len(self.in_place) > self.given_in_place:  # perhaps a consequence
                        raise _UnitsInPlace from None  # of the heads just kept in place
                    raise self._explained(error, node, specs) from None
                new = {self.labels[g]: (node.name, str(error))
                       for g in range(len(self.parent)) if self.find(g) in heads}
                self.in_place.update(new)
                for n in with_units:
                    layouts[n] = _map_specs(layouts[n], self.keep_in_place)

    def _explained(self, error: UnsupportedModelError, node: fx.Node, specs
                   ) -> UnsupportedModelError:
        """``error`` at ``node``, saying why the heads among ``specs`` keep their units in
        place; the first refusal, if ``node`` made them (keeping them in place did not
        help)."""
        why = next((self.in_place[self.labels[g]] for spec in specs if spec.part == "block"
                    for g in range(len(self.parent)) if self.find(g) == self.find(spec.group)
                    and self.labels[g] in self.in_place), None)
        if why is None:
            return error
        if why[0] == node.name:
            return UnsupportedModelError(why[1])
        return UnsupportedModelError(f"{error}; the units of those heads keep their places "
                                     f"(only whole heads move), since {why[1]}")

    def keep_in_place(self, spec: AxisSpec) -> AxisSpec | None:
        """The units within a head whose places are kept are plain positions (None)."""
        if spec.part != "unit" or self.labels[spec.group] not in self.in_place:
            return spec
        # a packed group's units are its pieces' (Q and K viewed (B, T, 2, H, D))
        self.rigid.update(self.split_groups.get(spec.group, [spec.group]))
        return None

    def visit(self, node: fx.Node, layouts: dict) -> object:
        if node.op == "placeholder":
            return plain(node)
        if node.op == "get_attr":
            return self.attribute(node)
        call = Call(node, *fx.node.map_arg((node.args, node.kwargs), lambda n: layouts[n]))
        if any(isinstance(v, Packed) for v in _leaves([*call.args, *call.kwargs.values()])) \
                and not _takes_packed(node, self.modules):
            raise UnsupportedModelError(f"node '{node.name}' uses a PackedSequence, which only "
                                        "recurrent layers and pad_packed_sequence may take")
        if node.op == "call_module":
            return self.visit_module(call)
        rule = (rules.method_rule(node.target) if node.op == "call_method"
                else rules.function_rule(node.target))
        stacked = next((v for v in _leaves([*call.args, *call.kwargs.values()])
                        if isinstance(v, Stacked)), None)  # also in a list: cat([h_n, c_n])
        if stacked is not None and node.target not in _READS_STACKED:
            if node.target in KEEPS_ROWS and call.args and call.args[0] is stacked:
                return stacked  # h_n.detach(), h_n.contiguous()
            if node.target in FILLS_LIKE:
                return plain(node)  # torch.zeros_like(h_n): a fill of its shape
            raise UnsupportedModelError(f"node '{node.name}' uses {stacked.why}")
        if rule is not None:
            return rule(self, call)
        groups = {self.find(spec.group) for spec in _specs([*call.args, *call.kwargs.values()])}
        if not groups:
            return plain(node)
        name = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target))
        problem = (f"node '{node.name}' ({node.op} {name}) acts on aligned neurons in a way "
                   "the alignment graph does not support")
        if not all(self.passive_only(g) for g in groups) or any(
                _carries_data(layouts[n], shape_of(n)) for n in node.all_input_nodes):
            raise UnsupportedModelError(problem)  # aligned units, or data among the inputs
        # computed from parameters' or buffers' own axes alone (a table built from a
        # buffer): allowed as long as none of those axes, nor the result's, is aligned
        for group in groups:
            self.must_stay_unaligned(group, problem)
        return self.opaque(node, problem)

    def passive_only(self, root: int) -> bool:
        """Whether the group of ``root`` is made of parameters' and buffers' own axes
        alone, met by no layer yet."""
        return all(g in self.passive for g in range(len(self.parent)) if self.find(g) == root)

    def learned_positions(self, root: int) -> bool:
        """Whether the group of ``root`` is a concatenation of the data's positions with
        parameters' or buffers' own axes alone (DeiT's class and distillation tokens,
        register or prompt tokens before an attention)."""
        parts = self.concatenation(root)
        return parts is not None and any(g is None for g, _ in parts) and all(
            g is None or self.passive_only(self.find(g)) for g, _ in parts)

    def opaque(self, node: fx.Node, problem: str) -> Layout | None:
        """The layout of a tensor nothing can permute: every axis a group of its own,
        which must turn out unaligned, or ``problem`` is raised."""
        shape = shape_of(node)
        if shape is None:
            return None
        axes = tuple(None if size == 1 else AxisSpec(
            self.new_group(f"{node.name}[{d}]", passive=True), "neuron")
            for d, size in enumerate(shape))
        for a in axes:
            if a is not None:
                self.must_stay_unaligned(a.group, problem)
                self.opaque_groups.add(a.group)
        return axes

    def visit_module(self, call: Call) -> object:
        name = call.node.target
        module = self.modules[name]
        given = (*call.args, *call.kwargs.values())
        if isinstance(module, nn.RNNBase):  # its initial state may stack layers (an h_n)
            given = (call.layout(0, "input"),)
        for value in given:
            if isinstance(value, Stacked):
                raise UnsupportedModelError(f"module '{name}' consumes {value.why}")
        rule = rules.module_rule(module)
        if rule is None:
            raise UnsupportedModelError(
                f"module '{name}' of type {type(module).__name__} is not supported by the "
                "alignment graph (register a rule for it with "
                "otfusion.fusion.register_rule, or pass an explicit alignment spec)")
        layout = rule(self, call, name, module)
        prefix = f"{name}." if name else ""
        missing = [f"{prefix}{p}" for p, _ in _own_state(module)
                   if id(self.state[f"{prefix}{p}"]) not in self.uses]
        if missing:
            raise UnsupportedModelError(
                f"the rule for module '{name}' ({type(module).__name__}) does not describe "
                f"{', '.join(missing)}")
        return layout

    def attribute(self, node: fx.Node) -> Layout | None:
        """A parameter or buffer read directly: its axes join whatever they meet. A
        tensor outside the state_dict may meet no aligned unit."""
        if node.target not in self.state:
            return self.opaque(node, (
                f"'{node.target}', a tensor outside the model's state_dict (a non-persistent "
                "buffer, or a plain tensor attribute that torch.fx bakes into the graph), "
                "meets aligned units, which the alignment cannot permute; register it as a "
                "persistent buffer"))
        tensor = self.state[node.target]
        axes = tuple(None if size == 1 else AxisSpec(
            self.new_group(f"{node.target}[{d}]", passive=True), "neuron")
            for d, size in enumerate(tensor.shape))
        if isinstance(tensor, nn.Parameter):
            self.parameter_axes.update(a.group for a in axes if a is not None)
        if id(tensor) in self.uses and node.users and all(map(_reads_shape, node.users)):
            return axes  # read again for its shape alone: no use of its values
        self.record("", node.target, axes, cost=False)
        return axes


def _carries_data(layout, shape) -> bool:
    """Whether a tensor has an unaligned dimension of size > 1 (data: the input's)."""
    return is_layout(layout) and shape is not None and any(
        spec is None and size > 1 for spec, size in zip(layout, shape, strict=False))


def _leaves(value):
    """Every entry of a (nested) layout value: axis specs, stacked layouts, None."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _specs(value):
    """Every axis spec in a (nested) layout value."""
    return (v for v in _leaves(value) if isinstance(v, AxisSpec))


def _map_specs(value, fn):
    """A (nested) layout value with every axis spec of its tuples, lists and dicts
    mapped by ``fn`` (stacked and packed layouts hold recurrent units, never heads)."""
    if isinstance(value, AxisSpec):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_specs(v, fn) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_map_specs(v, fn) for v in value)
    return value


class _UnitsInPlace(Exception):
    """A walk found heads whose units must keep their places (added to its tracer's
    ``in_place``): the graph is walked again from the start (:meth:`Tracer.walk`)."""


_READS_STACKED = (operator.getitem, getattr, "size", "dim", "numel")
"""What may be done to a stacked tensor (``h_n``): index one entry, or read its shape;
also keep it as it is (:data:`~.rules.recurrent.KEEPS_ROWS`) or fill a tensor of its
shape (:data:`~.rules.recurrent.FILLS_LIKE`)."""


def _takes_packed(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` may take a PackedSequence: a recurrent layer, unpacking, moving
    it to a device, or picking one from the outputs of a layer."""
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.RNNBase)
    if node.op == "call_method":
        return node.target in ("to", "cuda", "cpu")
    return node.op == "call_function" and (
        node.target is rnn_utils.pad_packed_sequence
        or node.target is operator.getitem and isinstance(node.args[0], fx.Node)
        and node.args[0].op == "call_module")


def _own_state(module: nn.Module):
    return [*module.named_parameters(), *module.named_buffers()]


def _trace(model: nn.Module) -> fx.GraphModule:
    """fx graph of ``model``; optional forward arguments keep their defaults."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: let fx try
        parameters = []
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward needs more than one input (also "
            f"{', '.join(required)}); the fusion runs models on one input tensor")
    concrete = {p.name: p.default for p in parameters
                if p.default is not inspect.Parameter.empty}
    check_initialised(model, type(model).__name__)
    _refuse_forward_hooks(model)
    try:
        with left_as_it_was(model):  # fx keeps the tensor constants it meets on the model
            graph = _LeafTracer().trace(model, concrete_args=concrete or None)
            # a call fx recorded whole would make the code register wrap("torch.nn.utils.
            # rnn.pack_padded_sequence"), a name no later trace finds: fx would then fail
            for node in graph.nodes:
                node.meta.pop("is_wrapped", None)
            return fx.GraphModule(model, graph)
    except Exception as exc:  # fx raises many types for untraceable code
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced by torch.fx: {exc}") from exc


_FLATTENS = {"flatten", "view", "reshape"}


def input_linear(model: nn.Module, width: int) -> str | None:
    """The name of the ``nn.Linear`` that ``model`` applies first to its input, once,
    flattened in order to ``width`` features (``nn.Flatten``, ``x.flatten(1)``,
    ``x.view(x.size(0), -1)``), so that its weight's columns are the input's features;
    None for any other model (a convolution first, the input scaled, permuted or used
    elsewhere, the layer used again, or no fx graph). Only a model with a Linear that
    wide is traced."""
    if not any(type(m) is nn.Linear and m.in_features == width for m in model.modules()):
        return None
    try:
        gm = _trace(model)
    except UnsupportedModelError:
        return None
    modules = dict(gm.named_modules())
    node = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    while node is not None:
        users = [u for u in node.users if not _reads_shape(u)]
        if len(users) != 1:
            return None
        node = users[0]
        module = modules.get(node.target) if node.op == "call_module" else None
        if type(module) is nn.Linear:
            return node.target if (module.in_features == width
                                   and _used_once(gm, node.target)) else None
        if not (type(module) is nn.Flatten or node.op in ("call_method", "call_function")
                and getattr(node.target, "__name__", node.target) in _FLATTENS):
            return None
    return None


def _used_once(gm: fx.GraphModule, name: str) -> bool:
    """Whether module ``name`` is called once and its parameters are used nowhere else
    (tied to another module's, or read directly: ``F.linear(h, self.fc.weight)``)."""
    own = {id(p) for p in gm.get_submodule(name).parameters(recurse=False)}
    holders = sum(id(p) in own for _, p in gm.named_parameters(remove_duplicate=False))
    read = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    return (sum(n.op == "call_module" and n.target == name for n in gm.graph.nodes) == 1
            and holders == len(own)
            and not any(id(functools.reduce(getattr, t.split("."), gm)) in own for t in read))


def _refuse_forward_hooks(model: nn.Module) -> None:
    """torch.fx leaves forward hooks out of the graph, so what they do to units (a
    scale by a per-unit buffer, say) would be left unaligned."""
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise UnsupportedModelError(
                f"module '{name or type(model).__name__}' has a forward hook or pre-hook "
                "(the legacy torch.nn.utils.weight_norm and spectral_norm add one), which "
                "torch.fx does not trace; write what it does into forward")


_GRAPHS: dict[tuple, AlignmentGraph] = {}
"""The graphs traced last, by :func:`_structure`: a server fuses the same architecture
every round, and running the model for its shapes is most of a trace."""
_GRAPHS_KEPT = 8


def _structure(model: nn.Module, state: dict[str, torch.Tensor], gm: fx.GraphModule,
               example_input: torch.Tensor) -> tuple:
    """What a model's alignment graph depends on: its traced code, every module's type
    and plain attributes (a convolution's groups, an attention's number of heads), the
    names, shapes and dtypes of its ``state``, which of those names are one tensor (tied
    weights), the shapes of the tensors outside it (non-persistent buffers, plain tensor
    attributes), and the example input's shape and dtype."""
    plain_types = (bool, int, float, str, tuple, type(None))
    modules = tuple((name, type(m).__qualname__, type(m).__module__,
                     tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                                  if isinstance(v, plain_types) and k != "training")))
                    for name, m in model.named_modules())
    first_name: dict[int, str] = {}
    shapes = tuple((name, tuple(t.shape), t.dtype, first_name.setdefault(id(t), name))
                   for name, t in state.items())
    others = tuple((name, k, tuple(v.shape)) for name, m in model.named_modules()
                   for k, v in [*m.named_buffers(recurse=False), *vars(m).items()]
                   if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))
    return (gm.code, modules, shapes, others, tuple(example_input.shape),
            example_input.dtype)


class ExampleRunError(UnsupportedModelError):
    """The model failed when run on the example input it is traced on."""


_SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement"}


class _ShapeProp(ShapeProp):
    """fx's shape propagation, also keeping the numbers computed from shapes alone
    (``h.dim() - 1``, ``x.shape[1] // 2``), so that rules read them as numbers; numbers
    read from a tensor's values (``.item()``) may differ between the models one traced
    graph serves, and stay nodes."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if (isinstance(result, int | float) or (
                isinstance(result, tuple) and all(isinstance(v, int) for v in result))) and (
                _reads_shape(n) or all(NUMBER in m.meta for m in n.all_input_nodes)):
            n.meta[NUMBER] = result
        return result

    def call_function(self, target, args, kwargs):
        return _describable(super().call_function(target, args, kwargs))

    def call_method(self, target, args, kwargs):
        return _describable(super().call_method(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        return _describable(super().call_module(target, args, kwargs))


class _DescribedPacked(rnn_utils.PackedSequence):
    """A PackedSequence that fx's shape propagation can describe: it rebuilds a named
    tuple from its fields' descriptions, which PackedSequence itself refuses."""

    def __new__(cls, data, batch_sizes=None, sorted_indices=None, unsorted_indices=None):
        return tuple.__new__(cls, (data, batch_sizes, sorted_indices, unsorted_indices))


def _describable(value):
    """``value`` with any PackedSequence in it (an RNN returns one in a tuple) as a
    :class:`_DescribedPacked`, which computes the same."""
    if isinstance(value, rnn_utils.PackedSequence):
        return _DescribedPacked(*value)
    if type(value) is tuple:
        return tuple(_describable(v) for v in value)
    return value


def _reads_shape(node: fx.Node) -> bool:
    """Whether ``node`` reads a tensor's shape: ``x.size()``, ``x.dim()``, ``x.shape``."""
    return (node.op == "call_method" and node.target in _SHAPE_METHODS
            or node.op == "call_function" and node.target is getattr
            and node.args[1] in ("shape", "ndim"))


def _propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Runs the model once, recording every node's shape and every number computed from
    shapes (fx's own traceback, which it prints to stderr on failure, is kept out of the
    user's terminal)."""
    try:
        with torch.no_grad(), temporary_mode(gm), contextlib.redirect_stderr(io.StringIO()):
            _ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        raise ExampleRunError(
            f"running the model on an example input of shape {tuple(example_input.shape)} "
            f"failed: {exc}"
        ) from exc


def _output_layouts(value, layouts):
    """Every tensor layout the model returns."""
    value = fx.node.map_arg(value, lambda n: layouts[n])
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Stacked):
            raise UnsupportedModelError(f"the model returns {item.why}")
        if isinstance(item, Packed):
            yield (item.features,)
        elif isinstance(item, tuple) and all(isinstance(v, AxisSpec | None) for v in item):
            yield item
        elif isinstance(item, tuple | list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def build_alignment_graph(model: nn.Module, example_input: torch.Tensor) -> AlignmentGraph:
    """Derive the alignment graph of ``model`` by tracing it on ``example_input``."""
    return Tracer(model).run(example_input)
