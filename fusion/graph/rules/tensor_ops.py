"""Arithmetic, concatenation and the shape ops that move aligned dimensions around."""

from __future__ import annotations

import itertools
import operator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import layouts as L
from ..spec import AxisSpec, UnsupportedModelError
from . import function_rule_for, method_rule_for, register_rule
from .pointwise import padded


def _where(call) -> str:
    return f"node '{call.node.name}'"


def _dims(call, index: int, name: str):
    """A dims argument given as one tuple/list or as varargs from position ``index``."""
    value = call.value(index, name, None)
    if isinstance(value, tuple | list) or value is None:
        return value
    return tuple(call.value(i, name) for i in range(index, len(call.node.args)))


def unify(tracer, specs, where: str) -> AxisSpec | None:
    """One dimension shared by several tensors (added, concatenated side by side): their
    groups become one; ``"data"`` (an unaligned dimension of size > 1) fixes it, and
    the dimension stays unaligned. A group met along heads holds one value per head
    (:meth:`~..tracer.Tracer.per_head`). Data that meets the units within heads is refused
    here, so that the tracer keeps those units in place and the heads still move
    (:meth:`~..tracer.Tracer.visit_keeping_heads`)."""
    grouped = [s for s in specs if isinstance(s, AxisSpec)]
    if not grouped:
        return None
    heads = [s for s in grouped if s.part == "block"]
    values = [s for s in grouped if (s.outer, s.inner, s.part) == (1, 1, None)]
    if heads and values and len(heads) + len(values) == len(grouped):
        for spec in values:  # one value per head: a bias, slope, temperature or gate
            tracer.per_head(spec.group, heads[0].group, where)
        grouped = heads
    grouped = _added_to_concatenation(tracer, grouped, where)
    first = grouped[0]
    for other in grouped[1:]:
        if (other.outer, other.inner, other.part) != (first.outer, first.inner, first.part):
            raise UnsupportedModelError(f"{where} combines tensors whose units are laid out "
                                        "differently")
        tracer.union(first.group, other.group)
    if "data" in specs:
        if first.part == "unit":
            raise UnsupportedModelError(f"{where} combines the units within heads with data")
        tracer.fix(first.group)
        return None
    return replace(first, kind="neuron")


def _added_to_concatenation(tracer, grouped: list[AxisSpec], where: str) -> list[AxisSpec]:
    """The specs of ``grouped`` left to join as one group. Where one of them is a
    concatenation, a layer's output units among the others are split into its parts
    instead (:meth:`~..tracer.Tracer.add_to_concatenation`); a parameter's own axis (a
    bias added) stays, to join the concatenation whole, and so does a layer's output
    already split otherwise (refused when the graph is finished)."""
    concatenation = next((s for s in grouped if tracer.concatenation(s.group)), None)
    if concatenation is None:
        return grouped
    kept = []
    for spec in grouped:
        if (spec is concatenation or tracer.concatenation(spec.group)
                or spec.group in tracer.split_groups
                or tracer.passive_only(tracer.find(spec.group))
                or (spec.outer, spec.inner, spec.part) != (1, 1, None)):
            kept.append(spec)
        else:
            tracer.add_to_concatenation(spec.group, concatenation.group, where)
    return kept


def _operand_specs(operands, shapes, offset: int):
    """Per operand, its spec at ``-offset`` (right-aligned broadcasting), ``"data"`` for
    an unaligned dimension of size > 1. A dimension of size 1 broadcast against a larger
    one (a gate of one unit scaling every hidden unit) meets nothing."""
    sizes = {shape[-offset] for shape in shapes if shape is not None and offset <= len(shape)}
    specs = []
    for layout, shape in zip(operands, shapes, strict=True):
        if offset > len(layout):
            continue
        spec = layout[-offset]
        if shape is not None and shape[-offset] == 1 and max(sizes, default=1) > 1:
            continue
        if spec is not None:
            specs.append(spec)
        elif shape is not None and shape[-offset] != 1:
            specs.append("data")
    return specs


_OPERANDS = {torch.where: ("condition", "input", "other"), torch.polar: ("abs", "angle"),
             torch.complex: ("real", "imag"),
             torch.masked_fill: ("input", "mask", "value"),
             "masked_fill": ("self", "mask", "value"), "masked_fill_": ("self", "mask", "value")}
"""The tensor operands of the elementwise ops that do not take ``(input, other)``, by
position and keyword."""


@function_rule_for(operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                   operator.imul, operator.truediv, operator.itruediv, torch.add, torch.sub,
                   torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
                   torch.masked_fill, operator.eq, operator.ne, operator.lt, operator.le,
                   operator.gt, operator.ge, operator.and_, operator.or_, torch.eq, torch.ne,
                   torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or,
                   torch.polar, torch.complex)
@method_rule_for("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "masked_fill",
                 "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
                 "logical_or")
def broadcast(tracer, call):
    """Elementwise op of tensors (arithmetic, comparison, logic): dimensions that meet
    share one coupling."""
    shape = call.shape
    if shape is None:
        if L.has_groups(call.args):
            raise UnsupportedModelError(f"{_where(call)}: unknown output shape")
        return None  # arithmetic on sizes
    names = _OPERANDS.get(call.node.target, ("input", "other"))
    operands = [(call.layout(i, name), call.value(i, name, None))
                for i, name in enumerate(names)]
    pairs = [(layout, L.shape_of(arg)) for layout, arg in operands if L.is_layout(layout)]
    return _broadcast_layout(tracer, pairs, len(shape), _where(call))


@function_rule_for(torch.cat, torch.concat, torch.concatenate)
def concatenate(tracer, call):
    """Side by side along one dimension: the other dimensions meet (as in an addition);
    along the concatenated one, aligned parts give a direct sum of their couplings."""
    parts = call.layout(0, "tensors")
    if parts is None:  # the pieces of an op without a rule, which holds no aligned unit
        return L.plain(call.node)
    shapes = _shapes(call.value(0, "tensors"))
    ndim = len(shapes[0])
    dim = call.value(1, "dim", 0) % ndim
    result = []
    for d in range(ndim):
        if d != dim:
            result.append(unify(tracer, _operand_specs(parts, shapes, ndim - d), _where(call)))
            continue
        specs = [p[d] for p in parts]
        if all(s is None for s in specs):
            result.append(None)
            continue
        if any(s is not None and (s.outer, s.inner, s.part) != (1, 1, None) for s in specs):
            raise UnsupportedModelError(f"{_where(call)} concatenates reshaped aligned units, "
                                        "or heads")
        result.append(tracer.direct_sum(call.node.name, [
            (s, shape[d]) for s, shape in zip(specs, shapes, strict=True)]))
    return tuple(result)


@function_rule_for(torch.stack)
def stack(tracer, call):
    parts = call.layout(0, "tensors")
    if parts is None:
        return L.plain(call.node)
    shapes = _shapes(call.value(0, "tensors"))
    ndim = len(shapes[0])
    dim = call.value(1, "dim", 0) % (ndim + 1)
    merged = [unify(tracer, _operand_specs(parts, shapes, ndim - d), _where(call))
              for d in range(ndim)]
    return (*merged[:dim], None, *merged[dim:])


def _shapes(tensors) -> list[tuple[int, ...] | None]:
    """The shapes of the tensors listed, or of the tuple one node returned (the pieces
    of ``h.chunk(2)`` passed on whole, ``torch.stack(h.chunk(2), 1)``)."""
    if isinstance(tensors, fx.Node):
        return [tuple(meta.shape) for meta in tensors.meta["tensor_meta"]]
    return [L.shape_of(n) for n in tensors]


@function_rule_for(torch.flatten)
@method_rule_for("flatten")
def flatten(tracer, call):
    return L.flatten(call.layout(), call.input_shape,
                     call.value(1, "start_dim", 0), call.value(2, "end_dim", -1), _where(call))


@register_rule(nn.Flatten)
def flatten_module(tracer, call, name, module):
    return L.flatten(call.layout(), call.input_shape, module.start_dim,
                     module.end_dim, f"module '{name}'")


@function_rule_for(torch.reshape, torch.unflatten)
@method_rule_for("view", "reshape", "unflatten", "view_as", "reshape_as")
def reshape(tracer, call):
    source, result = call.input_shape, call.shape
    if source is None or result is None:
        raise UnsupportedModelError(f"{_where(call)}: unknown shape")
    layout = call.layout()
    for d in _expanded(call.value(0, "input", None)):
        if 0 < d and layout[d - 1] is not None and layout[d - 1].part == "block" \
                and layout[d] is None and source[d] > 1:
            # heads, each expanded to the query heads it serves (Hugging Face's repeat_kv)
            layout = tracer.repeat_heads(layout, d - 1, source[d - 1], source[d], _where(call))
            layout = (*layout[:d], *layout[d + 1:])
            source = (*source[:d - 1], source[d - 1] * source[d], *source[d + 1:])
            break
    return L.reshape(layout, source, result, _where(call), tracer)


def _expanded(node) -> list[int]:
    """The dimensions that ``node``, an ``expand``, filled from a size of one."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "expand"):
        return []
    before, after = L.shape_of(node.args[0]), L.shape_of(node)
    if before is None or after is None:
        return []
    extra = len(after) - len(before)
    return [d for d in range(extra, len(after)) if before[d - extra] == 1 and after[d] > 1]


@function_rule_for(torch.repeat_interleave)
@method_rule_for("repeat_interleave")
def repeat_interleave(tracer, call):
    """Every entry repeated in place ``repeats`` times along ``dim`` (GPT-J's table of
    angles, each twice): a unit stays one unit, on more entries (its ``inner``); heads
    repeated (the key and value heads of grouped-query attention) are repeated heads
    (:meth:`~..tracer.Tracer.repeat_heads`); units within heads are refused."""
    layout, dim = call.layout(), call.value(2, "dim", None)
    repeats = call.value(1, "repeats", None)
    if not isinstance(repeats, int) or dim is None:
        if L.has_groups(layout):
            raise UnsupportedModelError(f"{_where(call)} repeats aligned units by a tensor of "
                                        "counts or flattened, which is not supported")
        return L.plain(call.node)
    spec = layout[dim]
    if spec is not None and spec.part == "block":  # grouped-query attention's key heads
        return tracer.repeat_heads(layout, dim, call.input_shape[dim], repeats, _where(call))
    if spec is not None and spec.part is not None:
        raise UnsupportedModelError(f"{_where(call)} repeats units within heads, which is "
                                    "not supported")
    if spec is not None:
        spec = replace(spec, inner=spec.inner * repeats)
    return (*layout[:dim % len(layout)], spec, *layout[dim % len(layout) + 1:])


@function_rule_for(torch.view_as_complex)
def view_as_complex(tracer, call):
    """Pairs of entries read as complex numbers (rotary embeddings' ``(..., D / 2, 2)``):
    the last dimension, of two, is gone, and may hold no aligned unit."""
    layout = call.layout()
    L.require_unaligned(tracer, layout, (-1,), _where(call), "reads pairs of aligned units "
                        "as complex numbers")
    return layout[:-1]


@function_rule_for(torch.view_as_real)
def view_as_real(tracer, call):
    """Complex numbers as pairs of real ones, on a new last dimension of two."""
    return (*call.layout(), None)


@register_rule(nn.Unflatten)
def unflatten_module(tracer, call, name, module):
    return L.reshape(call.layout(), call.input_shape, call.shape, f"module '{name}'", tracer)


@function_rule_for(torch.transpose, torch.swapaxes)
@method_rule_for("transpose", "swapaxes")
def transpose(tracer, call):
    return L.transpose(call.layout(), call.value(1, "dim0"), call.value(2, "dim1"))


@function_rule_for(torch.permute)
@method_rule_for("permute")
def permute(tracer, call):
    return L.permute(call.layout(), _dims(call, 1, "dims"))


@function_rule_for(torch.movedim)
@method_rule_for("movedim")
def movedim(tracer, call):
    layout = call.layout()
    ndim = len(layout)
    sources, targets = (
        [d % ndim for d in (v if isinstance(v, tuple | list) else (v,))]
        for v in (call.value(1, "source"), call.value(2, "destination")))
    rest = iter(d for d in range(ndim) if d not in sources)
    moved = dict(zip(targets, sources, strict=True))
    return L.permute(layout, [moved[d] if d in moved else next(rest) for d in range(ndim)])


@function_rule_for(torch.t)
@method_rule_for("t")
def matrix_transpose(tracer, call):
    layout = call.layout()
    return layout if len(layout) < 2 else L.transpose(layout, 0, 1)


@function_rule_for(getattr)
def attribute(tracer, call):
    """``x.T``, ``x.mT`` move dimensions; ``x.shape`` and the like are no tensors;
    ``.values`` and ``.indices`` pick from a pair."""
    layout, name = call.layout(), call.node.args[1]
    if name in ("T", "mT", "H", "mH"):
        if not L.is_layout(layout):
            raise UnsupportedModelError(f"{_where(call)}: .{name} of a non-tensor")
        if name in ("T", "H"):
            return tuple(reversed(layout))
        return L.transpose(layout, -2, -1)
    if name in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"):
        return None
    if name == "data":
        return layout
    if name in ("values", "indices") and isinstance(layout, tuple) and len(layout) == 2 \
            and not L.is_layout(layout):  # of a (values, indices) pair: h.max(1).values
        return layout[name == "indices"]
    if L.has_groups(layout):
        raise UnsupportedModelError(f"{_where(call)} reads attribute '{name}' of a tensor "
                                    "with aligned units")
    return L.plain(call.node)


@function_rule_for(operator.getitem)
def getitem(tracer, call):
    layout, item = call.layout(), call.value(1, "index")
    sliced = _slice_of_units(tracer, call.node, layout, item)
    if sliced is not None:
        return sliced
    return L.index(layout, item, _where(call), call.shape, tracer.split_groups, tracer.cut,
                   call.input_shape)


def _slice_of_units(tracer, node: fx.Node, layout, item):
    """``h[..., a:b]``, a slice of a layer's own output units (a GLU or an LSTM cell's
    gates written with slices, ``h[:, :n] * torch.sigmoid(h[:, n:])``): the units are
    split into pieces at every bound that the slices of ``h`` along that dimension use
    (:meth:`~..tracer.Tracer.pieces`), and the slice holds its pieces, concatenated.
    None for any other index."""
    found = _plain_slice(layout, item)
    if found is None:
        return None
    dim, entry = found
    spec, size = layout[dim], L.shape_of(node.args[0])[dim]
    root = tracer.find(spec.group)
    if (spec.outer, spec.inner, spec.part) != (1, 1, None) or tracer.passive_only(root) \
            or tracer.learned_positions(root) or tracer.tied_to_others(root):
        return None  # a table's own axis, learned tokens, tied units: as any index
    bounds = {0, size}
    for user in node.args[0].users:
        if user.target is not operator.getitem or len(user.args) < 2:
            continue
        index = L.known(user.args[1])
        other = _plain_slice(layout, index)
        if other is None and _cuts(layout, index, dim):
            return None  # cut there otherwise (a bound not known, a step): as any index
        if other is not None and other[0] == dim:
            bounds |= set(other[1].indices(size)[:2])
    bounds = sorted(bounds)
    start, stop, _ = entry.indices(size)
    if start >= stop:
        return None
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    pieces = tracer.pieces(spec.group, tuple(sizes), f"node '{node.name}'")
    held = [(AxisSpec(piece, "neuron"), n) for piece, n, a in zip(pieces, sizes, bounds[:-1],
                                                                    strict=True)
            if start <= a < stop]
    if sum(n for _, n in held) != stop - start:
        raise UnsupportedModelError(f"node '{node.name}': a slice of aligned units that "
                                    "its pieces do not cover")
    picked = held[0][0] if len(held) == 1 else tracer.direct_sum(node.name, held)
    return tuple(picked if d == dim else s for d, s in enumerate(layout))


def _index_items(layout, item) -> tuple:
    """The entries of the index ``item``, an ``...`` spelled out as whole slices."""
    items = item if isinstance(item, tuple) else (item,)
    if Ellipsis not in items:
        return items
    at = items.index(Ellipsis)
    return (*items[:at], *(slice(None),) * (len(layout) - len(items) + 1), *items[at + 1:])


def _cuts(layout, item, dim: int) -> bool:
    """Whether the index ``item`` does anything but take dimension ``dim`` whole."""
    items = _index_items(layout, item)
    return any(i is None for i in items[:dim + 1]) or (
        dim < len(items) and items[dim] != slice(None))


def _plain_slice(layout, item) -> tuple[int, slice] | None:
    """The dimension and the slice, if ``item`` takes one part of one dimension of
    aligned units by a slice of integers (step one) and every other dimension whole."""
    if not L.is_layout(layout):
        return None
    items = _index_items(layout, item)
    if len(items) > len(layout) or not all(isinstance(i, slice) for i in items):
        return None
    cut = [(d, i) for d, i in enumerate(items) if i != slice(None)]
    if len(cut) != 1:
        return None
    dim, entry = cut[0]
    ends = (entry.start, entry.stop)
    if layout[dim] is None or entry.step not in (None, 1) or not all(
            e is None or isinstance(e, int) for e in ends):
        return None
    return dim, entry


@function_rule_for(torch.squeeze)
@method_rule_for("squeeze")
def squeeze(tracer, call):
    layout, source = call.layout(), call.input_shape
    dims = call.value(1, "dim", None)
    if dims is None:
        dims = [d for d, size in enumerate(source) if size == 1]
    dims = {d % len(layout) for d in (dims if isinstance(dims, tuple | list) else (dims,))
            if source[d] == 1}
    # a group of one unit (a Linear to one output) has nothing to permute
    L.require_unaligned(tracer, layout,
                        [d for d in dims if layout[d] is not None and layout[d].part],
                        _where(call), "squeezes away aligned units")
    return tuple(s for d, s in enumerate(layout) if d not in dims)


@function_rule_for(torch.unsqueeze)
@method_rule_for("unsqueeze")
def unsqueeze(tracer, call):
    layout = list(call.layout())
    dim = call.value(1, "dim")
    layout.insert(dim % (len(layout) + 1), None)
    return tuple(layout)


@function_rule_for(torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp)
@method_rule_for("mean", "sum", "amax", "amin", "logsumexp")
def reduction(tracer, call):
    """Reductions are invariant to permuting the units they reduce over."""
    return L.reduce(call.layout(), call.value(1, "dim", None), call.value(2, "keepdim", False),
                    _where(call))


@function_rule_for(torch.std, torch.var)
@method_rule_for("std", "var")
def spread(tracer, call):
    """Standard deviation and variance, reductions like the mean (AdaIN's statistics
    over space, an x-vector's statistics pooling over time); ``keepdim`` comes after
    ``unbiased``, and ``h.std(False)`` (unbiased given alone) reduces everything."""
    dim = call.value(1, "dim", None)
    return L.reduce(call.layout(), None if isinstance(dim, bool) else dim,
                    call.value(3, "keepdim", False), _where(call))


@function_rule_for(torch.std_mean, torch.var_mean)
def spread_and_mean(tracer, call):
    """``torch.std_mean`` and ``torch.var_mean``: both reduced alike."""
    reduced = spread(tracer, call)
    return (reduced, reduced)


@function_rule_for(torch.flip)
@method_rule_for("flip")
def flip(tracer, call):
    return _along(tracer, call, _dims(call, 1, "dims"), "flip")


@function_rule_for(torch.roll)
@method_rule_for("roll")
def roll(tracer, call):
    dims = call.value(2, "dims", None)
    if dims is None:  # rolls the flattened tensor
        dims = tuple(range(len(call.layout())))
    return _along(tracer, call, dims if isinstance(dims, tuple | list) else (dims,), "roll")


@function_rule_for(torch.cumsum, torch.cumprod)
@method_rule_for("cumsum", "cumprod")
def cumulative(tracer, call):
    return _along(tracer, call, [call.value(1, "dim")], "accumulate")


@function_rule_for(F.pad)
def pad(tracer, call):
    return padded(tracer, call, call.value(1, "pad"),
                  call.value(2, "mode", "constant") == "constant", _where(call))


def _along(tracer, call, dims, verb: str):
    """Ops that move or combine entries along ``dims`` and keep every other dimension
    (``flip``, ``roll``, ``cumsum``): along unaligned ones (time, space: test-time
    flips, Swin's shifted windows) the layout stays; along
    aligned units they would reorder or mix units, and are refused."""
    layout = call.layout()
    L.require_unaligned(tracer, layout, dims, _where(call), f"would {verb} the units themselves")
    return layout


@function_rule_for(torch.max, torch.min)
@method_rule_for("max", "min")
def extremum(tracer, call):
    """``h.max()`` of every entry, ``torch.max(h, g)`` entry by entry (as
    ``torch.maximum``), or ``h.max(dim)``: its values are a reduction over ``dim``; its
    indices, where ``dim`` holds aligned units, say which unit, which the alignment
    changes: refused when read (``h.max(1)[0]``, ``.values`` and ``v, _ = ...`` fuse)."""
    dim = call.value(1, "dim", None)
    if isinstance(dim, fx.Node) or "other" in call.node.kwargs:
        return broadcast(tracer, call)
    layout = call.layout()
    if dim is None:
        return L.reduce(layout, None, False, _where(call))
    values = L.reduce(layout, dim, call.value(2, "keepdim", False), _where(call))
    _indices_of_units(tracer, call, layout, dim)
    return values, values


@function_rule_for(torch.sort)
@method_rule_for("sort")
def sort(tracer, call):
    return _ranked(tracer, call, call.value(1, "dim", -1))


@function_rule_for(torch.topk)
@method_rule_for("topk")
def topk(tracer, call):
    """As :func:`_ranked`; unsorted (``sorted=False``), the largest of aligned units come
    in an order that moves with the units: refused."""
    dim = call.value(2, "dim", -1)
    if not call.value(4, "sorted", True):
        L.require_unaligned(tracer, call.layout(), (dim,), _where(call),
                            "takes the largest of aligned units unsorted (sorted=False), "
                            "in an order that moves with them")
    return _ranked(tracer, call, dim)


def _ranked(tracer, call, dim: int):
    """``sort`` or ``topk`` along ``dim`` (k-max pooling over time): along time the
    layout stays; the values of aligned units, sorted, no longer depend on their order,
    and are unaligned; their indices say which unit (as for :func:`extremum`)."""
    layout = call.layout()
    values = L.reduce(layout, dim, True, _where(call))
    _indices_of_units(tracer, call, layout, dim)
    return values, values


def _indices_of_units(tracer, call, layout, dim: int) -> None:
    """The indices that ``max``, ``sort`` and the like return, where ``dim`` holds
    aligned units, say which unit, which the alignment changes: refused when read,
    unless the units turn out unaligned (the classes a model returns)."""
    spec = layout[dim % len(layout)]
    if spec is not None and L.second_read(call.node, "values"):
        tracer.must_stay_unaligned(spec.group, f"{_where(call)}: the indices of the largest "
                                   "or smallest of aligned units are used, and the alignment "
                                   "moves the units; not supported")


@function_rule_for(torch.norm, torch.linalg.norm, torch.linalg.vector_norm)
@method_rule_for("norm")
def norm(tracer, call):
    """A norm over some dimensions (all by default; ``dim`` third, ``keepdim`` fourth in
    every form): a reduction, which any permutation of the units it reduces keeps
    (``h / h.norm(dim=-1, keepdim=True)``, CLIP's normalised features)."""
    return L.reduce(call.layout(), call.value(2, "dim", None), call.value(3, "keepdim", False),
                    _where(call))


@function_rule_for(F.cosine_similarity, F.pairwise_distance, torch.cdist)
def distance(tracer, call):
    """Similarities and distances between two tensors' vectors (a siamese network's
    cosine similarity or pairwise distance; ``torch.cdist`` to prototypes, FedProto's):
    the vectors' units share one coupling, which any permutation of them keeps, and are
    reduced away; ``cdist`` pairs the rows of the first with those of the second."""
    if call.node.target is F.cosine_similarity:
        return _between_vectors(tracer, call, call.value(2, "dim", 1), False)
    if call.node.target is F.pairwise_distance:
        return _between_vectors(tracer, call, -1, call.value(4, "keepdim", False))
    (first, one), (second, two) = _vectors(call)
    unify(tracer, _operand_specs([first, second], [one, two], 1), _where(call))
    L.require_unaligned(tracer, (first[-2], second[-2]), range(2), _where(call),
                        "pairs rows that hold aligned units")
    batch = [(first[:-2], one[:-2]), (second[:-2], two[:-2])]
    return (*_broadcast_layout(tracer, batch, max(len(one), len(two)) - 2, _where(call)),
            None, None)


@register_rule(nn.CosineSimilarity, nn.PairwiseDistance)
def distance_module(tracer, call, name, module):
    if isinstance(module, nn.CosineSimilarity):
        return _between_vectors(tracer, call, module.dim, False)
    return _between_vectors(tracer, call, -1, module.keepdim)


def _vectors(call) -> list[tuple]:
    """The layouts and shapes of the two tensors ``x1`` and ``x2``."""
    pairs = [(call.layout(i, name), L.shape_of(call.value(i, name)))
             for i, name in enumerate(("x1", "x2"))]
    if not all(L.is_layout(layout) and shape is not None for layout, shape in pairs):
        raise UnsupportedModelError(f"{_where(call)}: unknown input shapes")
    return pairs


def _between_vectors(tracer, call, dim: int, keepdim: bool):
    """A similarity or distance of ``x1`` and ``x2``, broadcast, along ``dim``."""
    pairs = _vectors(call)
    ndim = max(len(shape) for _, shape in pairs)
    return L.reduce(_broadcast_layout(tracer, pairs, ndim, _where(call)), dim, keepdim,
                    _where(call))


def _broadcast_layout(tracer, pairs, ndim: int, where: str) -> tuple:
    """The ``ndim`` dimensions of tensors (``(layout, shape)`` pairs) broadcast together
    (right-aligned): dimensions that meet share one coupling."""
    layouts, shapes = [p[0] for p in pairs], [p[1] for p in pairs]
    result = [None] * ndim
    for offset in range(1, ndim + 1):
        result[-offset] = unify(tracer, _operand_specs(layouts, shapes, offset), where)
    return tuple(result)


@method_rule_for("expand", "expand_as", "repeat", "tile")
def expand(tracer, call):
    """Repeats along dimensions of size one (``expand``) keep the layout; ``repeat``
    must not tile aligned units."""
    layout, source, result = call.layout(), call.input_shape, call.shape
    extra = len(result) - len(layout)
    for d, spec in enumerate(layout):
        if spec is not None and result[d + extra] != source[d]:
            raise UnsupportedModelError(f"{_where(call)} repeats aligned units")
    return (None,) * extra + tuple(layout)


@method_rule_for("size", "dim", "numel")
def size(tracer, call):
    return None


@function_rule_for(F.glu)
def glu(tracer, call):
    layout = call.layout()
    return _gated_halves(tracer, layout, call.value(1, "dim", -1) % len(layout), _where(call))


@register_rule(nn.GLU)
def glu_module(tracer, call, name, module):
    layout = call.layout()
    return _gated_halves(tracer, layout, module.dim % len(layout), f"module '{name}'")


def _gated_halves(tracer, layout, dim: int, where: str):
    """``a * sigmoid(b)`` of the two halves along ``dim`` (a GLU): as ``chunk(2)`` then a
    product, so the halves of a layer's outputs share one coupling."""
    spec = layout[dim]
    if spec is None:
        return layout
    if spec.part is not None or (spec.outer, spec.inner) != (1, 1):
        raise UnsupportedModelError(f"{where} splits aligned units apart unevenly")
    halves = [replace(spec, group=g) for g in tracer.pieces(spec.group, (1, 1), where)]
    return (*layout[:dim], unify(tracer, halves, where), *layout[dim + 1:])


@function_rule_for(torch.chunk, torch.split, torch.unbind)
@method_rule_for("chunk", "split", "unbind")
def split(tracer, call):
    """Pieces along an unaligned dimension keep the other dimensions' layout; pieces of
    a layer's own outputs (a packed ``qkv``, ``split([3, 5])``) become groups of their own;
    unbinding a dimension of pieces gives each piece's layout."""
    layout = call.layout()
    unbind = call.node.target in ("unbind", torch.unbind)
    dim = (call.value(1, "dim", 0) if unbind else call.value(2, "dim", 0)) % len(layout)
    count = len(call.node.meta.get("tensor_meta", ())) or 1
    spec = layout[dim]
    if unbind:
        if spec is not None and spec.part != "piece":
            raise UnsupportedModelError(f"{_where(call)} splits aligned units apart")
        return tuple(L.pick(layout, dim, i, tracer.split_groups) for i in range(count))
    if spec is None:
        return tuple(layout for _ in range(count))
    sizes = tuple(tuple(meta.shape)[dim] for meta in call.node.meta["tensor_meta"])
    if spec.part is not None or (spec.outer, spec.inner) != (1, 1):
        raise UnsupportedModelError(f"{_where(call)} splits aligned units apart unevenly")
    groups = tracer.pieces(spec.group, sizes, _where(call))
    return tuple(tuple(replace(spec, group=g) if d == dim else s for d, s in enumerate(layout))
                 for g in groups)
