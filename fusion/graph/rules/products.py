"""Products: ``@``/``matmul``, ``torch.outer``, ``torch.einsum``, ``F.linear``,
``F.conv*d`` and ``F.embedding`` on tensors of the state, and
``F.scaled_dot_product_attention``.

A dimension summed over in a product joins its two sides in one coupling; a batch
dimension pairs its entries (heads with heads, or the heads a shared key or value
serves); a matrix parameter multiplied directly is a layer's weight.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .. import layouts as L
from ..spec import AxisSpec, UnsupportedModelError
from . import function_rule_for, method_rule_for
from .tensor_ops import _where, unify


def _batched(tracer, a, b, size: int, where: str):
    """One batch dimension of a batched product: pairing entry i with entry i ties the
    two sides' couplings, or, for heads of different groups, their head matching (heads
    repeated for grouped-query attention and the query heads they meet are one)."""
    if isinstance(a, AxisSpec) and isinstance(b, AxisSpec) and a.part == b.part == "block" \
            and tracer.find(a.group) != tracer.find(b.group) \
            and tracer.repeated(a.group) == tracer.repeated(b.group):
        tracer.constrain_blocks(b.group, size, where, source=a.group)
        return b
    return unify(tracer, [a, b], where)


def _contract(tracer, a, b, where: str) -> None:
    """The summed-over dimension of a product: its two sides share one coupling. Units
    summed against unaligned data, entry by entry (a parameter's own axis in ``x @
    self.W`` on the input; MMoE's gates, one per expert, in ``einsum("be,beh->bh", g,
    torch.stack(experts, 1))``), keep their places, as when multiplied elementwise."""
    for own, other in ((a, b), (b, a)):
        if other is None and own is not None and (
                own.part is None or tracer.passive_only(tracer.find(own.group))):
            tracer.fix(own.group)
            return
    if (a is None) != (b is None):
        raise UnsupportedModelError(f"{where} multiplies aligned units with unaligned ones")
    if a is not None:
        if a.part == "block" or b.part == "block" or (a.outer, a.inner, a.part) != (
                b.outer, b.inner, b.part):
            raise UnsupportedModelError(f"{where} multiplies units laid out differently")
        tracer.union(a.group, b.group)


def _batch_dims(tracer, call, left, right, keep, operands=((0, "input"), (1, "other"))):
    """Right-aligned batch dimensions of a product's ``operands`` (position, keyword),
    of layouts ``left`` and ``right`` (all but the last two dimensions); an unaligned
    one of size > 1 facing aligned units is data that pairs with them."""
    shape = call.shape
    sizes = [L.shape_of(call.value(i, name)) for i, name in operands]
    out = []
    for offset in range(3, len(shape) + 1):
        a, b = (_batch_spec(layout, size, offset)
                for layout, size in zip((left, right), sizes, strict=True))
        if keep is not None:
            out.insert(0, keep(*(None if s == "data" else s for s in (a, b))))
        elif "data" in (a, b):
            out.insert(0, unify(tracer, [a, b], _where(call)))
        else:
            out.insert(0, _batched(tracer, a, b, shape[-offset], _where(call)))
    return out


def _shared_heads(tracer, call, left, right, operands=((0, "input"), (1, "other"))):
    """The layouts of a product's two ``operands``, where one holds attention heads on a
    batch dimension that the other broadcasts or fills with unaligned data: that other's
    units serve every head, one head shared by all (multi-query attention's keys and
    values, :meth:`~..tracer.Tracer.share_head`). Attention heads: queries, whose units
    are summed over, or scores, which hold no units."""
    shapes = [L.shape_of(call.value(i, name)) for i, name in operands]
    layouts = [left, right]
    for own, other in ((0, 1), (1, 0)):
        summed = layouts[own][-1 if own == 0 else -2]
        has_units = any(s is not None and s.part == "unit" for s in layouts[own])
        queries = summed is not None and summed.part == "unit"
        if shapes[own] is None or has_units and not queries:
            continue  # neither queries nor scores
        for offset in range(3, min(len(left), len(right)) + 1):
            spec = layouts[own][-offset]
            if spec is not None and spec.part == "block":
                layouts[other] = tracer.share_head(layouts[other], len(layouts[other]) - offset,
                                                   shapes[own][-offset], _where(call))
    return tuple(layouts)


def _batch_spec(layout, shape, offset: int):
    """An operand's spec at batch dimension ``-offset``: None where it has none or
    broadcasts it, ``"data"`` for an unaligned dimension of size > 1."""
    if offset > len(layout):
        return None
    if layout[-offset] is None and shape is not None and shape[-offset] > 1:
        return "data"
    return layout[-offset]


@function_rule_for(operator.matmul, torch.matmul, torch.bmm)
@method_rule_for("matmul", "bmm")
def matmul(tracer, call):
    """A batched matrix product ``(..., n, k) @ (..., k, m)``."""
    left, right = call.layout(0), call.layout(1)
    if not (L.is_layout(left) and L.is_layout(right)) or min(len(left), len(right)) < 2:
        if L.has_groups([left, right]):
            raise UnsupportedModelError(f"{_where(call)}: a product of vectors with aligned "
                                        "units is not supported")
        return L.plain(call.node)
    left, right = _shared_heads(tracer, call, left, right)
    _contract(tracer, left[-1], right[-2], _where(call))
    for index, neuron in ((0, 0), (1, 1)):
        _weight_operand(tracer, call, index, neuron)
    return (*_batch_dims(tracer, call, left, right, None), left[-2], right[-1])


@function_rule_for(torch.outer, torch.ger)
@method_rule_for("outer", "ger")
def outer(tracer, call):
    """``torch.outer(a, b)`` (a table of frequencies times positions): entry ``(i, j)``
    is ``a[i] * b[j]``, so each vector's units stay on their own dimension."""
    return (call.layout(0)[0], call.layout(1, "vec2")[0])


def _weight_node(tracer, call, index: int) -> tuple[str, bool] | None:
    """The product's operand ``index`` as ``(name, transposed)`` when it is a matrix
    parameter read directly or transposed (``self.W``, ``self.W.T``, ``self.W.t()``,
    ``self.fc.weight.transpose(0, 1)``), else None."""
    node, transposed = call.node.args[index], False
    if isinstance(node, fx.Node) and (
            node.op == "call_function" and node.target is getattr
            and node.args[1] in ("T", "mT")
            or node.op == "call_method" and node.target == "t"
            or node.op == "call_method" and node.target == "transpose"
            and len(node.args) == 3 and all(isinstance(d, int) for d in node.args[1:])
            and node.args[1] % 2 != node.args[2] % 2):
        node, transposed = node.args[0], True
    name = _state_matrix(tracer, node)
    return None if name is None else (name, transposed)


def _weight_operand(tracer, call, index: int, neuron: int) -> None:
    """A matrix parameter multiplied directly (``h @ self.W``, ``self.W @ h``, or
    transposed: ``h @ self.fc.weight.T``) is a layer's weight: its axis ``neuron`` (of
    the operand) defines new units (activations, aligned like any layer's outputs), the
    other is its input axis."""
    found = _weight_node(tracer, call, index)
    axes = call.layout(index)
    if found is None or not isinstance(axes[neuron], AxisSpec):
        return
    name, transposed = found
    _as_layer_weight(tracer, call.node.name, name, axes[::-1] if transposed else axes,
                     1 - neuron if transposed else neuron)


def _as_layer_weight(tracer, label: str, name: str, stored, unit: int) -> None:
    """The state tensor ``name``, read with the axes ``stored``, is a layer's weight:
    its axis ``unit`` defines new units (aligned like any layer's outputs), the next
    one (of a matrix: the other) is its input axis, and any after it (a convolution's
    kernel) are positions, never permuted."""
    tracer.union(tracer.new_group(label), stored[unit].group)
    for position in stored[2:]:
        if position is not None:
            tracer.fix(position.group)
    uses = tracer.uses[id(tracer.state[name])]
    at = next((i for i, use in enumerate(uses)
               if all(a is b for a, b in zip(use[1], stored, strict=True))), None)
    if at is None:  # read before through another node: no weight to describe
        return
    weight = [L.as_input(a) for a in stored]
    weight[unit] = stored[unit]
    uses[at] = (uses[at][0], tuple(weight), True)


def _state_matrix(tracer, node) -> str | None:
    """The name of the state matrix that ``node`` reads directly, if it does."""
    if (isinstance(node, fx.Node) and node.op == "get_attr" and node.target in tracer.state
            and tracer.state[node.target].dim() == 2):
        return node.target
    return None


def _as_layer_weight_source(tracer, call, weight) -> None:
    """The weight of ``F.linear`` or ``F.conv*d`` (argument 1, of layout ``weight``) is
    a layer's weight: the state tensor read directly, or, if the weight's output units
    are so far a parameter's own axis, the one it is computed from unit by unit in
    ``forward`` (weight standardization, a mask or a gain multiplied in, a weight norm
    written by hand; :func:`_computed_from`), read with the weight's first two axes.
    Ops on the way that mixed its units are refused when the graph is finished."""
    node = call.node.args[1] if len(call.node.args) > 1 else call.node.kwargs.get("weight")
    if not isinstance(node, fx.Node) or not L.is_layout(weight) \
            or not isinstance(weight[0], AxisSpec):
        return
    if node.op == "get_attr" and node.target in tracer.state:
        _as_layer_weight(tracer, call.node.name, node.target, weight, 0)
        return
    if not tracer.passive_only(tracer.find(weight[0].group)):
        return
    name = _computed_from(tracer, node)
    stored = None if name is None else _read_with(tracer, name, weight[:2])
    if stored is not None:
        _as_layer_weight(tracer, call.node.name, name, stored, 0)


def _computed_from(tracer, node: fx.Node) -> str | None:
    """The state tensor of ``node``'s shape that ``node`` is computed from: the only
    one, or the only parameter among them (a mask buffer beside it). Another read of
    such a tensor on the way, even of its shape alone (``zeros_like``), leaves none."""
    shape, found, seen, todo = L.shape_of(node), set(), set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            if n.op == "get_attr" and n.target in tracer.state \
                    and tuple(tracer.state[n.target].shape) == shape:
                found.add(n.target)
            todo.extend(n.all_input_nodes)
    parameters = {name for name in found if isinstance(tracer.state[name], torch.nn.Parameter)}
    candidates = parameters if len(parameters) == 1 else found
    return next(iter(candidates)) if len(candidates) == 1 else None


def _read_with(tracer, name: str, axes) -> tuple | None:
    """The axes of a read of ``name`` (not yet a layer's weight) whose first ones are in
    the groups of ``axes``, if there is one."""
    def roots(specs):
        return [None if a is None else tracer.find(a.group) for a in specs]

    wanted = roots(axes)
    return next((stored for _, stored, cost in tracer.uses.get(id(tracer.state[name]), [])
                 if not cost and roots(stored[:len(wanted)]) == wanted), None)


@function_rule_for(F.linear)
def functional_linear(tracer, call):
    """``F.linear(h, self.weight, self.bias)``, i.e. ``h @ weight.T + bias``: a weight
    read directly is a layer's weight, whose rows are new units."""
    source, weight, where = call.layout(0, "input"), call.layout(1, "weight"), _where(call)
    if not L.is_layout(weight) or len(weight) != 2:
        raise UnsupportedModelError(f"{where}: F.linear with a weight that is not a matrix "
                                    "is not supported")
    _as_layer_weight_source(tracer, call, weight)
    _contract(tracer, source[-1], weight[1], where)
    out = weight[0]
    bias = call.layout(2, "bias")
    if L.is_layout(bias) and bias:
        out = unify(tracer, [out, bias[-1]], where)
    return (*source[:-1], out)


@function_rule_for(F.conv1d, F.conv2d, F.conv3d)
def functional_convolution(tracer, call):
    """``F.conv2d(x, self.weight, self.bias, ...)``: what a convolution's subclass with
    its own ``forward`` (timm's ``Conv2dSame``, a masked convolution) or a custom layer
    calls. A weight read directly is a layer's weight, whose output channels are new
    units, as in ``nn.Conv2d``; grouped convolutions are refused."""
    source, weight, where = call.layout(0, "input"), call.layout(1, "weight"), _where(call)
    if not L.is_layout(weight) or len(weight) < 3:
        raise UnsupportedModelError(f"{where}: a convolution whose weight is not a tensor "
                                    "of three dimensions or more is not supported")
    k = len(weight) - 2
    if call.value(6, "groups", 1) != 1:
        raise UnsupportedModelError(f"{where}: a grouped convolution called as a function "
                                    "is not supported")
    L.require_unaligned(tracer, source, range(-k, 0), where, "convolves over aligned units")
    _as_layer_weight_source(tracer, call, weight)
    for position in weight[2:]:  # the kernel's, never permuted
        if position is not None:
            tracer.fix(position.group)
    _contract(tracer, source[-k - 1], weight[1], where)
    out = weight[0]
    bias = call.layout(2, "bias")
    if L.is_layout(bias) and bias:
        out = unify(tracer, [out, bias[-1]], where)
    return (*source[:-k - 1], out, *source[-k:])


@function_rule_for(F.embedding)
def functional_embedding(tracer, call):
    """``F.embedding(ids, self.weight)``: one row of the table per token id, its columns
    new units; the rows are picked by id, so they stay unaligned."""
    ids, table = call.layout(0, "input"), call.layout(1, "weight")
    name = _state_matrix(tracer, call.value(1, "weight"))
    if name is None or not isinstance(table[1], AxisSpec) or L.has_groups(ids):
        raise UnsupportedModelError(f"{_where(call)}: only a table read directly from the "
                                    "state, indexed by token ids, is supported")
    if table[0] is not None:
        tracer.fix(table[0].group)
    _as_layer_weight(tracer, call.node.name, name, table, 1)
    return (*ids, table[1])


@function_rule_for(torch.einsum)
def einsum(tracer, call):
    """``torch.einsum``: the dimensions of one letter meet, as a product's do. A letter
    kept in the output pairs its entries (batch or heads); a letter summed over in two
    operands contracts them (one coupling); a letter of one operand alone that is summed
    over is a reduction."""
    where = _where(call)
    operands = list(call.node.args[1:])
    layouts = list(call.args[1:])
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands, layouts = list(operands[0]), list(layouts[0])
    inputs, output = _einsum_letters(call.node.args[0], [L.shape_of(o) for o in operands],
                                     where)
    for letters, layout, node in zip(inputs, layouts, operands, strict=True):
        own = [d for d, c in enumerate(letters) if c in output
               and sum(c in term for term in inputs) == 1]
        if _state_matrix(tracer, node) is not None and len(own) == 1 \
                and isinstance(layout[own[0]], AxisSpec):  # torch.einsum("bi,oi->bo", h, W)
            _as_layer_weight(tracer, call.node.name, node.target, layout, own[0])
    seen: dict[str, list] = {}
    for letters, layout, node in zip(inputs, layouts, operands, strict=True):
        shape = L.shape_of(node)
        for d, letter in enumerate(letters):
            seen.setdefault(letter, []).append((layout[d], shape[d]))
    result = {}
    # contractions first (queries and keys share one coupling), then the kept letters
    for letter, found in sorted(seen.items(), key=lambda item: item[0] in output):
        size = max(n for _, n in found)
        specs = [spec for spec, n in found if n == size or spec is not None]
        if letter in output:
            out = specs[0]
            for other in specs[1:]:
                out = _batched(tracer, out if out is not None else "data",
                               other if other is not None else "data", size, where)
            result[letter] = out
        elif len(specs) > 1:
            for other in specs[1:]:
                _contract(tracer, specs[0], other, where)
        elif specs and specs[0] is not None and specs[0].part == "block":
            raise UnsupportedModelError(f"{where} reduces over heads, whose units are "
                                        "aligned differently")
    return tuple(result[letter] for letter in output)


def _einsum_letters(equation: str, shapes, where: str) -> tuple[list[str], str]:
    """Each operand's letters, one per dimension (``...`` spelled out as fresh
    letters), and the output's."""
    if not isinstance(equation, str) or any(shape is None for shape in shapes):
        raise UnsupportedModelError(f"{where}: unknown einsum equation or shapes")
    equation = equation.replace(" ", "")
    left, arrow, right = equation.partition("->")
    terms = left.split(",")
    spare = "".join(sorted(set("ABCDEFGHIJKLMNOPQRSTUVWXYZ") - set(equation)))
    ellipsis = max((len(shape) - len(term.replace("...", ""))
                    for term, shape in zip(terms, shapes, strict=True) if "..." in term),
                   default=0)
    inputs = [term.replace("...", spare[ellipsis - (len(shape) - len(term) + 3):ellipsis])
              if "..." in term else term for term, shape in zip(terms, shapes, strict=True)]
    if not arrow:
        counts = {c: "".join(inputs).count(c) for c in "".join(inputs)}
        right = spare[:ellipsis] * ("..." in equation) + "".join(
            sorted(c for c, n in counts.items() if n == 1 and c not in spare))
    return inputs, right.replace("...", spare[:ellipsis])


@function_rule_for(torch.nn.functional.scaled_dot_product_attention)
def scaled_dot_product_attention(tracer, call):
    """Queries and keys are multiplied (one coupling), each query head reads the value
    head of its index (value heads follow query-key heads); with ``enable_gqa``, fewer
    key and value heads are repeated for the query heads they serve."""
    query, key, value = call.layout(0, "query"), call.layout(1, "key"), call.layout(2, "value")
    where = _where(call)
    for layout in (query, key, value):
        L.require_unaligned(tracer, layout, (-2,), where, "attends over a dimension that holds "
                            "aligned units")
    _mask_per_head(tracer, call, query, where)
    if call.value(7, "enable_gqa", False) and len(query) > 2 and key[-3] is not None:
        heads, shape = L.shape_of(call.value(0, "query")), L.shape_of(call.value(1, "key"))
        count = heads[-3] // shape[-3]
        if count > 1:  # grouped-query attention: every key and value head serves count
            key = tracer.repeat_heads(key, len(key) - 3, shape[-3], count, where)
            value = tracer.repeat_heads(value, len(value) - 3, shape[-3], count, where)
    _, key = _shared_heads(tracer, call, query, key, ((0, "query"), (1, "key")))
    _, value = _shared_heads(tracer, call, query, value, ((0, "query"), (2, "value")))
    _contract(tracer, query[-1], key[-1], where)
    _batch_dims(tracer, call, query, key, lambda a, b: unify(tracer, [a, b], where),
                ((0, "query"), (1, "key")))
    batch = _batch_dims(tracer, call, query, value, None, ((0, "query"), (2, "value")))
    return (*batch, query[-2], value[-1])


def _mask_per_head(tracer, call, query, where: str) -> None:
    """An attention mask that differs between heads (ALiBi's biases, one matrix per
    head) holds one value per head, which moves with its head: it must be made from the
    model's own tensors (slopes or a bias table in the state_dict); one made from data
    alone could not move, and is refused."""
    mask = call.value(3, "attn_mask", None)
    shape = L.shape_of(mask) or ()
    layout = call.layout(3, "attn_mask") if shape else None
    for d in range(len(query) - 2):
        m = d - len(query) + len(shape)
        if m < 0 or query[d] is None or shape[m] == 1:
            continue
        if layout[m] is None:
            raise UnsupportedModelError(f"{where}: an attention mask per head ({shape}) made "
                                        "from data alone is not supported; heads move")
        unify(tracer, [query[d], layout[m]], where)
