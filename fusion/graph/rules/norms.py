"""Normalisation layers: their parameters and statistics follow their channels."""

from __future__ import annotations

from torch import nn

from ..layouts import as_neuron
from ..spec import UnsupportedModelError
from . import register_rule


def follow(tracer, name: str, module: nn.Module, axes) -> None:
    """Record every own parameter/buffer of ``module``: a scalar has no axes, the rest
    have ``axes`` (their channels' specs, as neurons)."""
    for param, tensor in [*module.named_parameters(recurse=False),
                          *module.named_buffers(recurse=False)]:
        tracer.record(name, param, () if tensor.dim() == 0 else axes, cost=False)


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
    channel = source[1]
    if 1 < module.num_groups < module.num_channels and channel is not None:
        if (channel.outer, channel.inner) != (1, 1):
            raise UnsupportedModelError(f"module '{name}': GroupNorm over reshaped channels "
                                        "is not supported")
        tracer.constrain_blocks(channel.group, module.num_groups, f"module '{name}'")
    follow(tracer, name, module, (as_neuron(channel),))
    return source
