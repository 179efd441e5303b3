"""Normalisation layers and their functional forms (``F.layer_norm`` and kin, with the
model's own parameters): their parameters and statistics follow their channels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..layouts import as_neuron, is_layout
from ..spec import UnsupportedModelError
from . import function_rule_for, register_rule
from .tensor_ops import unify


def follow(tracer, name: str, module: nn.Module, axes) -> None:
    """Record every own parameter/buffer of ``module``: a scalar has no axes, the rest
    have ``axes`` (their channels' specs, as neurons). Channels that are whole heads of
    a layer's units (a generator's ``fc(z).view(-1, C, H, W)``) hold one value per
    head, which moves with its head."""
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    if any(tensor.dim() > 0 for _, tensor in tensors):
        axes = tuple(_per_head(tracer, name, spec) for spec in axes)
    for param, tensor in tensors:
        tracer.record(name, param, () if tensor.dim() == 0 else axes, cost=False)


def _per_head(tracer, name: str, spec):
    """``spec`` as the neurons of a norm's parameters; along whole heads, a group of one
    value per head (:meth:`~..tracer.Tracer.per_head_axis`): its statistics over the
    units within a head, or over every unit, do not depend on their order."""
    if spec is None or spec.part != "block":
        return as_neuron(spec)
    return tracer.per_head_axis(name, as_neuron(spec))


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d)
def batch_norm(tracer, call, name, module):
    """Per-channel statistics over every other dimension (channels: dimension 1)."""
    source = call.layout()
    channel = 1 if len(source) > 1 else 0
    follow(tracer, name, module, (as_neuron(source[channel]),))
    return source


@register_rule(nn.LayerNorm, nn.RMSNorm)
def layer_norm(tracer, call, name, module):
    """Statistics over the last dimensions (invariant to permuting their units); the
    elementwise affine parameters follow them."""
    source = call.layout()
    count = len(module.normalized_shape)
    follow(tracer, name, module, tuple(as_neuron(s) for s in source[-count:]))
    return source


@register_rule(nn.GroupNorm)
def group_norm(tracer, call, name, module):
    """Statistics per group of channels: a coupling may move whole groups and channels
    within a group (one group or one channel per group leave it free)."""
    source = call.layout()
    _channel_groups(tracer, source[1], module.num_groups, module.num_channels,
                    f"module '{name}'")
    follow(tracer, name, module, (as_neuron(source[1]),))
    return source


def _channel_groups(tracer, channel, groups: int, channels: int, where: str) -> None:
    """Constrain the coupling of ``channel`` to ``groups`` blocks (see
    :func:`group_norm`)."""
    if 1 < groups < channels and channel is not None:
        if (channel.outer, channel.inner) != (1, 1):
            raise UnsupportedModelError(f"{where}: GroupNorm over reshaped channels is not "
                                        "supported")
        tracer.constrain_blocks(channel.group, groups, where)


@function_rule_for(F.layer_norm, F.rms_norm)
def functional_layer_norm(tracer, call):
    """``F.layer_norm(h, shape, weight, bias)`` or ``F.rms_norm(h, shape, weight)``:
    statistics over the last ``len(shape)`` dimensions; the parameters follow them."""
    count = len(call.value(1, "normalized_shape"))
    source = call.layout()
    params = [call.layout(2, "weight")]
    if call.node.target is F.layer_norm:
        params.append(call.layout(3, "bias"))
    return _with_parameters(tracer, call, source, params, range(len(source) - count,
                                                                len(source)))


@function_rule_for(F.batch_norm, F.instance_norm)
def functional_batch_norm(tracer, call):
    """``F.batch_norm(h, running_mean, running_var, weight, bias, ...)`` (and
    ``F.instance_norm``): per-channel statistics (channels: dimension 1); the statistics
    and parameters follow the channels."""
    source = call.layout()
    params = [call.layout(i, n) for i, n in enumerate(
        ("running_mean", "running_var", "weight", "bias"), start=1)]
    return _with_parameters(tracer, call, source, params, [1])


@function_rule_for(F.group_norm)
def functional_group_norm(tracer, call):
    """``F.group_norm(h, groups, weight, bias)``: statistics per group of channels
    (dimension 1); the parameters follow the channels."""
    source = call.layout()
    _channel_groups(tracer, source[1], call.value(1, "num_groups"), call.input_shape[1],
                    f"node '{call.node.name}'")
    params = [call.layout(2, "weight"), call.layout(3, "bias")]
    return _with_parameters(tracer, call, source, params, [1])


def _with_parameters(tracer, call, source, params, dims):
    """``source``'s layout, its dimensions ``dims`` joined with the 1-per-unit
    ``params`` (their dimensions in the same order; None or non-tensor ones skipped): an
    unaligned dimension keeps its parameters unaligned. Parameters of units reshaped or
    split into heads (a per-head norm, one weight for every head) are refused."""
    params = [p for p in params if is_layout(p) and p]
    where = f"node '{call.node.name}'"
    result = list(source)
    for i, d in enumerate(dims):
        specs = [p[i - len(dims)] for p in params]
        if source[d] is not None and any(
                s is not None and (s.outer, s.inner, s.part)
                != (source[d].outer, source[d].inner, source[d].part) for s in specs):
            raise UnsupportedModelError(f"{where} normalises units reshaped or split into "
                                        "heads with parameters of its own; not supported")
        result[d] = unify(tracer, [source[d] if source[d] is not None else "data", *specs],
                          where)
    return tuple(result)
