"""Attention: ``nn.MultiheadAttention`` and the Transformer encoder/decoder layers.

Within one attention layer, the query and key features share one coupling (their
products are summed within each head), the value features and the output projection's
inputs another; both move whole heads, and the same way (a head's query, key and value
stay together): the value group's blocks follow the query-key group's. The output
projection's features join the residual stream they are added to.
"""

from __future__ import annotations

from torch import nn

from ..layouts import as_input, as_neuron, require_unaligned, second_read
from ..spec import AxisSpec, UnsupportedModelError
from . import register_rule
from .layers import dense_layer
from .norms import follow
from .tensor_ops import unify


def attention(tracer, name: str, module: nn.MultiheadAttention, query, key, value,
              ndim: int) -> AxisSpec:
    """Records ``module`` attending from ``query`` to ``key``/``value`` features (specs of
    the last dimension); returns the spec of its output features."""
    where = f"module '{name}'"
    heads = module.num_heads
    qk = tracer.new_group(f"{name}.qk")
    tracer.constrain_blocks(qk, heads, where)
    vo = tracer.new_group(f"{name}.vo")
    tracer.constrain_blocks(vo, heads, where, source=qk)
    q_rows, v_rows = AxisSpec(qk, "neuron"), AxisSpec(vo, "neuron")
    projections = [(q_rows, as_input(query)), (q_rows, as_input(key)),
                   (v_rows, as_input(value))]
    if module._qkv_same_embed_dim:
        tracer.record_packed(name, "in_proj_weight", 0, projections, cost=True)
    else:  # kdim or vdim: the projections are kept apart
        for part, axes in zip(("q", "k", "v"), projections, strict=True):
            tracer.record(name, f"{part}_proj_weight", axes, cost=True)
    if module.bias_k is not None:  # add_bias_kv: one learned key and value more
        tracer.record(name, "bias_k", (None, None, q_rows), cost=False)
        tracer.record(name, "bias_v", (None, None, v_rows), cost=False)
    if module.in_proj_bias is not None:
        tracer.record_packed(name, "in_proj_bias", 0, [(q_rows,), (q_rows,), (v_rows,)],
                             cost=True)
    return dense_layer(tracer, f"{name}.out_proj", module.out_proj, AxisSpec(vo, "input"),
                       (None,) * (ndim - 1))


def _masks_shared_by_heads(call, features: tuple[str, ...], where: str) -> None:
    """Refuse a 3-D attention mask (one per batch entry and head) among the arguments
    after the ``features`` (query, key, value...): the alignment moves whole heads, and
    the mask's rows would not move with them."""
    for shape in call.argument_shapes(len(features), skip=features):
        if len(shape) == 3:
            raise UnsupportedModelError(f"{where}: an attention mask per head (3-D, "
                                        f"{shape}) is not supported; heads move")


def _features(tracer, call, index: int, name: str, where: str):
    layout = call.layout(index, name)
    require_unaligned(tracer, layout, range(len(layout) - 1), where,
                      "attends over a dimension that holds aligned units")
    return layout


@register_rule(nn.MultiheadAttention)
def multihead_attention(tracer, call, name, module):
    where = f"module '{name}'"
    query = _features(tracer, call, 0, "query", where)
    key = _features(tracer, call, 1, "key", where)
    value = _features(tracer, call, 2, "value", where)
    _masks_shared_by_heads(call, ("query", "key", "value"), where)
    out = attention(tracer, name, module, query[-1], key[-1], value[-1], len(query))
    weights = call.node.meta.get("tensor_meta")
    weights = weights[1] if isinstance(weights, tuple) and len(weights) > 1 else None
    if weights is not None and len(weights.shape) == 4 and second_read(call.node):
        raise UnsupportedModelError(f"{where}: per-head attention weights "
                                    "(average_attn_weights=False) are used, and their "
                                    "heads move with the alignment; not supported")
    return ((*query[:-1], out), None if weights is None else (None,) * len(weights.shape))


def _residual(tracer, stream, update, where: str) -> AxisSpec | None:
    return unify(tracer, [stream if stream is not None else "data", update], where)


def _norm(tracer, name: str, module: nn.Module, spec) -> None:
    follow(tracer, name, module, (as_neuron(spec),))


def _feed_forward(tracer, name: str, layer, spec, ndim: int) -> AxisSpec:
    batch = (None,) * (ndim - 1)  # tokens, required unaligned by the attention
    hidden = dense_layer(tracer, f"{name}.linear1", layer.linear1, spec, batch)
    return dense_layer(tracer, f"{name}.linear2", layer.linear2, hidden, batch)


_PARTS = {"self_attn": nn.MultiheadAttention, "multihead_attn": nn.MultiheadAttention,
          "linear1": nn.Linear, "linear2": nn.Linear}
"""The parts of torch's Transformer layers whose types the rules below assume."""


def _check_standard(layer: nn.Module, kind: type, where: str) -> None:
    """The rules describe torch's own layers: another layer in a stack (a subclass
    whose forward may wire the same parts otherwise) or a part replaced (an adapter
    around ``linear1``, another attention) is refused."""
    if type(layer) is not kind:
        raise UnsupportedModelError(
            f"{where} is a {type(layer).__name__}, not torch's {kind.__name__} itself, and "
            "the rule for torch's stack cannot see its forward; keep such layers in an "
            "nn.ModuleList and call them in forward, so that they are traced")
    for part, expected in _PARTS.items():
        module = getattr(layer, part, None)
        if module is not None and type(module) is not expected:
            raise UnsupportedModelError(f"{where}: its {part} is a {type(module).__name__}, "
                                        f"not the {expected.__name__} the rule describes")


def encoder_layer(tracer, name: str, layer: nn.TransformerEncoderLayer, x, ndim: int):
    """Self-attention and feed-forward blocks, each added into the stream ``x`` (their
    norms, before or after, follow the stream)."""
    where = f"module '{name}'"
    _check_standard(layer, nn.TransformerEncoderLayer, where)
    x = _residual(tracer, x, attention(tracer, f"{name}.self_attn", layer.self_attn,
                                       x, x, x, ndim), where)
    x = _residual(tracer, x, _feed_forward(tracer, name, layer, x, ndim), where)
    for norm in ("norm1", "norm2"):
        _norm(tracer, f"{name}.{norm}", getattr(layer, norm), x)
    return x


def decoder_layer(tracer, name: str, layer: nn.TransformerDecoderLayer, x, memory,
                  ndim: int):
    """Self-attention, attention to ``memory`` and feed-forward, added into ``x``."""
    where = f"module '{name}'"
    _check_standard(layer, nn.TransformerDecoderLayer, where)
    x = _residual(tracer, x, attention(tracer, f"{name}.self_attn", layer.self_attn,
                                       x, x, x, ndim), where)
    x = _residual(tracer, x, attention(tracer, f"{name}.multihead_attn", layer.multihead_attn,
                                       x, memory, memory, ndim), where)
    x = _residual(tracer, x, _feed_forward(tracer, name, layer, x, ndim), where)
    for norm in ("norm1", "norm2", "norm3"):
        _norm(tracer, f"{name}.{norm}", getattr(layer, norm), x)
    return x


def _stack(tracer, name, module, x, ndim, layer_fn):
    for i, layer in enumerate(module.layers):
        x = layer_fn(f"{name}.layers.{i}", layer, x)
    if module.norm is not None:
        _norm(tracer, f"{name}.norm", module.norm, x)
    return x


@register_rule(nn.TransformerEncoderLayer, nn.TransformerEncoder)
def transformer_encoder(tracer, call, name, module):
    where = f"module '{name}'"
    src = _features(tracer, call, 0, "src", where)
    _masks_shared_by_heads(call, ("src",), where)
    ndim = len(src)
    if isinstance(module, nn.TransformerEncoderLayer):
        x = encoder_layer(tracer, name, module, src[-1], ndim)
    else:
        x = _stack(tracer, name, module, src[-1], ndim, lambda n, layer, h: encoder_layer(
            tracer, n, layer, h, ndim))
    return (*src[:-1], x)


@register_rule(nn.TransformerDecoderLayer, nn.TransformerDecoder)
def transformer_decoder(tracer, call, name, module):
    where = f"module '{name}'"
    tgt = _features(tracer, call, 0, "tgt", where)
    memory = _features(tracer, call, 1, "memory", where)[-1]
    _masks_shared_by_heads(call, ("tgt", "memory"), where)
    ndim = len(tgt)
    if isinstance(module, nn.TransformerDecoderLayer):
        x = decoder_layer(tracer, name, module, tgt[-1], memory, ndim)
    else:
        x = _stack(tracer, name, module, tgt[-1], ndim, lambda n, layer, h: decoder_layer(
            tracer, n, layer, h, memory, ndim))
    return (*tgt[:-1], x)
