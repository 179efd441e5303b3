"""Layouts: which group lives on which dimension of a traced tensor, and the shape ops
that move dimensions around (flatten, reshape, transpose, indexing, reductions).

A layout is a tuple with one :class:`~.spec.AxisSpec` or ``None`` per dimension. Values
that are not one tensor have other layouts: ``None`` (no tensor: a size, a dtype), a
tuple of layouts (a module returning several tensors) and :class:`Stacked` (a tensor
whose first dimension stacks differently aligned tensors, such as the hidden states of a
stacked LSTM).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import fx

from .spec import AxisSpec, UnsupportedModelError

NUMBER = "otfusion_number"  # node.meta key: the number a node computed from shapes


def known(value):
    """``value`` with every node computed from shapes replaced by its number."""
    return fx.node.map_arg(value, lambda n: n.meta.get(NUMBER, n))

Layout = tuple  # per-dim AxisSpec | None, for one tensor value


class Stacked:
    """Layout of a tensor whose first dimension stacks tensors of different layouts
    (``items[i]`` is the layout of ``value[i]``); usable only by indexing it."""

    def __init__(self, items: tuple[Layout, ...], why: str):
        self.items = items
        self.why = why


class Packed:
    """Layout of a PackedSequence (``pack_padded_sequence``): the positions of the
    padded tensor it packs, reordered by their lengths, and its ``features``, whose units
    it keeps. Only recurrent layers and ``pad_packed_sequence`` take one."""

    def __init__(self, features: AxisSpec | None):
        self.features = features


def is_layout(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, AxisSpec | None) for v in value)


def shape_of(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def plain(node: fx.Node) -> Layout | None:
    """The layout of a tensor that carries no aligned dimension (None if not a tensor)."""
    shape = shape_of(node)
    return None if shape is None else (None,) * len(shape)


def has_groups(value) -> bool:
    """Whether a (nested) layout value carries any aligned dimension."""
    if isinstance(value, AxisSpec | Stacked):
        return True
    if isinstance(value, Packed):
        return value.features is not None
    if isinstance(value, dict):
        return any(has_groups(v) for v in value.values())
    return isinstance(value, tuple | list) and any(has_groups(v) for v in value)


def as_input(spec: AxisSpec | None) -> AxisSpec | None:
    return None if spec is None else replace(spec, kind="input")


def as_neuron(spec: AxisSpec | None) -> AxisSpec | None:
    return None if spec is None else replace(spec, kind="neuron")


def require_unaligned(tracer, layout: Layout, dims, where: str, why: str) -> None:
    """Refuse by name when an op mixes the units of an aligned dimension. A parameter's
    or buffer's own axis, met by no layer yet, may be mixed, if it stays unaligned
    (:meth:`~.tracer.Tracer.must_stay_unaligned`); so may positions that concatenate
    such axes with the data's (:meth:`~.tracer.Tracer.learned_positions`)."""
    for d in dims:
        spec = layout[d]
        if spec is None:
            continue
        problem = f"{where} {why} (dimension {d % len(layout)} holds aligned units)"
        root = tracer.find(spec.group)
        if tracer.passive_only(root):
            tracer.must_stay_unaligned(spec.group, problem)
        elif tracer.learned_positions(root):
            tracer.fix(root)  # learned tokens concatenated to the data's positions
        else:
            raise UnsupportedModelError(problem)


def merge(layout: Layout, sizes: tuple[int, ...], where: str) -> AxisSpec | None:
    """The spec of one dimension made by merging dimensions of ``sizes`` (row-major);
    a group's blocks followed by their units merge back into the group."""
    grouped = [i for i, s in enumerate(layout) if s is not None]
    if not grouped:
        return None
    i = grouped[0]
    old = layout[i]
    if len(grouped) == 2 and old.part == "block" and grouped[1] == i + 1:
        unit = layout[i + 1]
        if unit.part == "unit" and unit.group == old.group:
            return replace(old, part=None, outer=math.prod(sizes[:i]),
                           inner=math.prod(sizes[i + 2:]))
    if len(grouped) > 1:
        raise UnsupportedModelError(
            f"{where} merges several aligned dimensions into one (such as a channel "
            "shuffle, which interleaves the units of different groups)")
    if old.part is not None:
        raise UnsupportedModelError(f"{where} merges a group's heads or their units with "
                                    "other dimensions")
    return replace(old, outer=old.outer * math.prod(sizes[:i]),
                   inner=old.inner * math.prod(sizes[i + 1:]))


def split(spec: AxisSpec | None, size: int, sizes: tuple[int, ...], where: str,
          splitter=None) -> Layout:
    """The layout of dimensions of ``sizes`` made by splitting one of ``spec``: its
    units stay on one dimension; or a plain group is split into blocks (heads) on one
    dimension and their units on the next (``splitter.heads(group, count)``), possibly
    after a dimension of pieces (a packed ``qkv``: ``splitter.pieces(group, (1,) * count)``);
    or, into more dimensions or by a split the splitter reads so (``splitter.spatial``),
    into channels whose units become positions (``splitter.spatial_split``)."""
    if spec is None:
        return (None,) * len(sizes)
    if spec.part is None:
        for d in range(len(sizes)):
            before, after = math.prod(sizes[:d]), math.prod(sizes[d + 1:])
            if spec.outer % before == 0 and spec.inner % after == 0:
                return tuple(
                    replace(spec, outer=spec.outer // before, inner=spec.inner // after)
                    if i == d else None for i in range(len(sizes)))
        big = [d for d, n in enumerate(sizes) if n > 1]
        parts = {2: ("block", "unit"), 3: ("piece", "block", "unit")}.get(len(big))
        consecutive = big == list(range(big[0], big[0] + len(big))) if big else False
        if (spec.outer, spec.inner) == (1, 1) and splitter is not None and consecutive and (
                len(big) > 3 or len(big) == 3 and where in splitter.spatial):
            splitter.spatial_split(spec.group, sizes[big[0]], where)  # channels x positions
            return tuple(replace(spec, part="block") if d == big[0] else None
                         for d in range(len(sizes)))
        if ((spec.outer, spec.inner) == (1, 1) and splitter is not None and parts
                and consecutive):
            if len(big) == 3:
                splitter.piece_origins[spec.group] = where
                for piece in splitter.pieces(spec.group, (1,) * sizes[big[0]], where):
                    splitter.heads(piece, sizes[big[1]], where)
            else:
                splitter.heads(spec.group, sizes[big[0]], where)
            named = dict(zip(big, parts, strict=True))
            return tuple(replace(spec, part=named[d]) if d in named else None
                         for d in range(len(sizes)))
    raise UnsupportedModelError(f"{where} splits aligned units across dimensions {sizes} "
                                f"(of one dimension of size {size})")


def pick(layout: Layout, dim: int, piece: int, pieces: dict[int, list[int]]) -> Layout:
    """``layout`` without dimension ``dim``; if that dimension indexes the pieces of a
    packed group, every dimension of that group now holds piece ``piece``'s group."""
    spec = layout[dim]
    rest = tuple(s for d, s in enumerate(layout) if d != dim % len(layout))
    if spec is None or spec.part != "piece":
        return rest
    group = pieces[spec.group][piece]
    return tuple(None if s is None else replace(s, group=group) if s.group == spec.group
                 else s for s in rest)


def reshape(layout: Layout, source: tuple[int, ...], result: tuple[int, ...],
            where: str, splitter=None) -> Layout:
    """view/reshape/flatten/unflatten: dimensions are matched in runs of equal
    product; within a run, aligned units may be merged with or split from unaligned
    dimensions, as long as one unit stays on one dimension."""
    out: list[AxisSpec | None] = []
    i = j = 0
    while i < len(source) or j < len(result):
        i0, j0 = i, j
        a = b = 1
        if i < len(source):
            a, i = source[i], i + 1
        if j < len(result):
            b, j = result[j], j + 1
        while a != b:
            if a < b and i < len(source):
                a, i = a * source[i], i + 1
            elif a > b and j < len(result):
                b, j = b * result[j], j + 1
            else:
                raise UnsupportedModelError(f"{where}: cannot relate shapes {source} and "
                                            f"{result}")
        if (i - i0, j - j0) == (1, 1):
            out.append(layout[i0])  # a dimension kept as it is (heads too)
            continue
        spec = merge(layout[i0:i], source[i0:i], where)
        out.extend(split(spec, a, result[j0:j], where, splitter))
    return tuple(out)


def flatten(layout: Layout, shape: tuple[int, ...], start: int, end: int,
            where: str) -> Layout:
    ndim = len(layout)
    if ndim == 0:
        return layout
    start, end = start % ndim, end % ndim
    spec = merge(layout[start:end + 1], shape[start:end + 1], where)
    return (*layout[:start], spec, *layout[end + 1:])


def permute(layout: Layout, order) -> Layout:
    return tuple(layout[d] for d in order)


def transpose(layout: Layout, a: int, b: int) -> Layout:
    order = list(range(len(layout)))
    a, b = a % len(layout), b % len(layout)
    order[a], order[b] = order[b], order[a]
    return permute(layout, order)


def index(value, item, where: str, shape: tuple[int, ...] | None,
          pieces: dict[int, list[int]], cut: Callable[[AxisSpec, str], bool],
          source: tuple[int, ...] | None = None):
    """``value[item]``: tuples of outputs are picked from; a stacked tensor gives the
    layout of the entry an integer picks (then indexed by the rest of ``item``,
    ``h_n[-1, :, :]``); a tensor keeps the dimensions sliced whole (``:``, or a slice
    covering all of its ``source`` shape's size: GhostNet's ``out[:, :self.oup]``), and
    one piece of a packed group may be picked by an integer. Any other index of an axis
    needs ``cut(axis, where)`` to allow it (a state tensor's own axis, see
    :meth:`~.tracer.Tracer.cut`)."""
    if isinstance(value, Stacked):
        first, rest = (item[0], item[1:]) if isinstance(item, tuple) and item else (item, ())
        if isinstance(first, int):
            picked = value.items[first]
            return index(picked, rest, where, shape, pieces, cut) if rest else picked
        raise UnsupportedModelError(f"{where}: {value.why} can only be indexed by one integer "
                                    "first")
    if value is None:
        return None if shape is None else (None,) * len(shape)
    if not is_layout(value):
        return value[item]
    items = item if isinstance(item, tuple) else (item,)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(value) - sum(_dims_indexed(i) for i in items if i is not Ellipsis)
        items = (*items[:at], *(slice(None),) * fill, *items[at + 1:])
    if any(isinstance(i, fx.Node) for i in items):
        return _indexed_by_tensors(value, items, where, shape, cut)
    value = list(value)
    out: list[AxisSpec | None] = []
    dim = 0
    for entry in items:
        if entry is None:
            out.append(None)
            continue
        spec = value[dim]
        if spec is not None and spec.part == "piece" and isinstance(entry, int):
            value = list(pick(tuple(value), dim, entry, pieces))
            out = list(pick((*out, spec), len(out), entry, pieces))
            continue
        whole = isinstance(entry, slice) and (entry == slice(None) or source is not None
                                              and _covers(entry, source[dim]))
        if spec is not None and not whole and not cut(spec, where):
            raise UnsupportedModelError(f"{where} indexes into aligned units (dimension {dim})")
        if isinstance(entry, slice):
            out.append(spec)
        elif isinstance(entry, list | tuple) and spec is None and _one_list(items):
            out.append(None)  # positions picked by a list: the dimension stays
        elif not isinstance(entry, int):
            raise UnsupportedModelError(f"{where}: unsupported index {entry!r}")
        dim += 1
    return (*out, *value[dim:])


def _covers(entry: slice, size: int) -> bool:
    """Whether the slice ``entry`` (of plain integers) takes all ``size`` entries, in
    order."""
    ends = (entry.start, entry.stop, entry.step)
    return all(e is None or isinstance(e, int) for e in ends) and entry.indices(size) == (
        0, size, 1)


def _dims_indexed(entry) -> int:
    """How many dimensions an index entry consumes: none for a new axis, a boolean
    mask's rank for a mask, else one."""
    if entry is None:
        return 0
    return len(shape_of(entry) or ()) if _is_mask(entry) else 1


def _is_mask(entry) -> bool:
    """Whether the index entry is a boolean (or uint8) mask tensor."""
    meta = entry.meta.get("tensor_meta") if isinstance(entry, fx.Node) else None
    return getattr(meta, "dtype", None) in (torch.bool, torch.uint8)


def _indexed_by_tensors(layout: Layout, items: tuple, where: str,
                        shape: tuple[int, ...] | None,
                        cut: Callable[[AxisSpec, str], bool]) -> Layout:
    """``h[torch.arange(B), last]`` (the last token of each sequence), ``table[ids]``,
    ``h[mask]``: tensors index dimensions that hold no aligned units (or a parameter's
    own axis that ``cut`` allows), which become the index's dimensions, in their place
    when the tensors are side by side, else first; an integer computed in ``forward``
    (``n.item()``, a 0-d integer tensor) picks one entry as an integer does; the other
    dimensions are sliced whole or partly (unaligned ones), and keep their layouts."""
    if shape is None or any(i is None or isinstance(i, int | list | tuple) for i in items):
        raise UnsupportedModelError(f"{where}: indexing by tensors mixed with integers, "
                                    "lists or new axes is not supported")
    kept: list[AxisSpec | None] = []
    indexed, dim = [], 0
    for entry in items:
        tensor = isinstance(entry, fx.Node) and (_is_mask(entry) or bool(shape_of(entry)))
        count = _dims_indexed(entry)
        specs, dim = layout[dim:dim + count], dim + count
        if dim > len(layout):
            raise UnsupportedModelError(f"{where} indexes more dimensions than it has")
        if isinstance(entry, fx.Node):  # a tensor, or an integer (no place of its own)
            if any(s is not None and not cut(s, where) for s in specs):
                raise UnsupportedModelError(f"{where} indexes aligned units by a tensor")
            if tensor:
                indexed.append(len(kept) + len(indexed))
        elif entry != slice(None) and specs[0] is not None and not cut(specs[0], where):
            raise UnsupportedModelError(f"{where} indexes into aligned units (dimension "
                                        f"{dim - 1})")
        else:
            kept.append(specs[0])
    kept.extend(layout[dim:])
    if not indexed:
        return tuple(kept)
    new = (None,) * (len(shape) - len(kept))
    if indexed != list(range(indexed[0], indexed[-1] + 1)):
        return (*new, *kept)
    return (*kept[:indexed[0]], *new, *kept[indexed[0]:])


def _one_list(items: tuple) -> bool:
    """Whether the only advanced index among ``items`` is one list (several, or a list
    with integers or tensors, may move dimensions to the front)."""
    lists = sum(isinstance(i, list | tuple) for i in items)
    others = sum(isinstance(i, int | fx.Node) for i in items)
    return lists == 1 and others == 0


def refuse_heads(layout: Layout, dims, where: str, what: str) -> None:
    """Refuse an op that combines the entries of ``dims`` when one of them holds heads:
    it would combine one unit of every head, and each head's units are aligned by a
    coupling of their own."""
    if any(layout[d] is not None and layout[d].part == "block" for d in dims):
        raise UnsupportedModelError(f"{where} {what}, whose units are aligned differently")


def reduce(layout: Layout, dims, keepdim: bool, where: str) -> Layout:
    """A reduction (mean, sum, amax) over ``dims`` (all when None): the reduced
    dimensions are gone (or unaligned, with keepdim). Reducing over aligned units is
    invariant to permuting them."""
    if dims is None:
        dims = range(len(layout))
    dims = {d % len(layout) for d in (dims if isinstance(dims, tuple | list | range)
                                      else (dims,))}
    refuse_heads(layout, dims, where, "reduces over heads")
    if keepdim:
        return tuple(None if d in dims else s for d, s in enumerate(layout))
    return tuple(s for d, s in enumerate(layout) if d not in dims)


def second_read(node: fx.Node, first: str | None = None) -> bool:
    """Whether anything may read the second entry of the pair that ``node`` returns:
    any use of it but taking its first entry (``r[0]``, ``r[-2]``, ``r.<first>``) or an
    entry nothing reads (``out, _ = ...``)."""
    return any(not (user.target is operator.getitem and (user.args[1] in (0, -2)
                                                         or not user.users)
                    or user.target is getattr and (user.args[1] == first or not user.users))
               for user in node.users)
