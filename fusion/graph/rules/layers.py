"""Linear, convolution (dense, depthwise and transposed) and embedding layers."""

from __future__ import annotations

from torch import nn

from ..layouts import as_input, require_unaligned
from ..spec import AxisSpec, UnsupportedModelError
from . import register_rule


@register_rule(nn.Linear)
def linear(tracer, call, name, module):
    """New neurons on the last dimension, fed by the input's last dimension."""
    source = call.layout()
    return (*source[:-1], dense_layer(tracer, name, module, source[-1], source[:-1]))


def dense_layer(tracer, name: str, module: nn.Linear, features: AxisSpec | None,
                batch: tuple) -> AxisSpec:
    """Records the Linear ``name`` applied to ``features`` (the last dimension, after
    dimensions of layout ``batch``); returns the spec of its output features."""
    group = tracer.new_group(name)
    out = AxisSpec(group, "neuron")
    tracer.record(name, "weight", (out, as_input(features)), cost=True)
    if module.bias is not None:
        tracer.record(name, "bias", (out,), cost=True)
    tracer.add_site(group, name, None, len(batch), (*batch, out))
    return out


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def convolution(tracer, call, name, module):
    """New channels from the input channels; a depthwise convolution (one group per
    input channel) keeps its input's channels, each repeated ``out/in`` times. A dense
    convolution whose kernel spans aligned units whole, without padding (Kim's text
    CNN: ``Conv2d(1, n, (h, embedding_dim))`` over ``embedding(x).unsqueeze(1)``), reads
    them as input features of its kernel's axis, which leaves one position; along a
    dimension of kernel size and stride one without padding (gMLP's ``Conv1d(T, T, 1)``
    over ``(B, T, D)``) it treats every unit alone, and they stay where they are."""
    source = call.layout()
    k = module.weight.dim() - 2
    where = f"module '{name}'"
    spanned = _spanned(call, module, source) if module.groups == 1 else set()
    free = spanned | _pointwise(module)
    require_unaligned(tracer, source, [d for d in range(-k, 0) if d not in free], where,
                      "convolves over aligned units")
    channel = source[-k - 1]
    kernel = (None,) * k
    if module.groups == 1:
        group = tracer.new_group(name)
        out = AxisSpec(group, "neuron")
        kernel = tuple(as_input(source[d]) if d in spanned else None for d in range(-k, 0))
        tracer.record(name, "weight", (out, as_input(channel), *kernel), cost=True)
        if module.bias is not None:
            tracer.record(name, "bias", (out,), cost=True)
        positions = tuple(None if d in spanned else source[d] for d in range(-k, 0))
        output = (*source[:-k - 1], out, *positions)
        tracer.add_site(group, name, None, len(source) - k - 1, output)
        return output
    elif module.groups == module.in_channels:
        multiplier = module.out_channels // module.in_channels
        if channel is None and multiplier == 1:
            out = None
        elif channel is None or (channel.outer, channel.inner, channel.part) != (1, 1, None):
            raise UnsupportedModelError(f"{where}: a depthwise convolution on channels that "
                                        "are heads, or with a channel multiplier on "
                                        "unaligned or reshaped channels, is not supported")
        else:
            out = AxisSpec(channel.group, "neuron", inner=multiplier)
        tracer.record(name, "weight", (out, None, *kernel), cost=False)
        if module.bias is not None:
            tracer.record(name, "bias", (out,), cost=False)
    else:
        if channel is None or (channel.outer, channel.inner) != (1, 1):
            raise UnsupportedModelError(f"{where}: a grouped convolution on unaligned or "
                                        "reshaped channels is not supported")
        tracer.constrain_blocks(channel.group, module.groups, where)
        group = tracer.new_group(name)
        tracer.constrain_blocks(group, module.groups, where, source=channel.group)
        out = AxisSpec(group, "neuron")
        tracer.record(name, "weight", (out, as_input(channel), *kernel), cost=True,
                      groups=module.groups)
        if module.bias is not None:
            tracer.record(name, "bias", (out,), cost=True)
        tracer.add_site(group, name, None, len(source) - k - 1,
                        (*source[:-k - 1], out, *source[-k:]))
    return (*source[:-k - 1], out, *source[-k:])


def _spanned(call, module: nn.Module, source) -> set[int]:
    """The spatial dimensions (negative) of aligned units alone (not units merged with
    positions, whose number changes with the input's length) that ``module``'s kernel
    covers whole, without padding or dilation: each position of the kernel meets one
    unit."""
    k, shape, padding = module.weight.dim() - 2, call.input_shape, _padding(module)
    if shape is None or padding is None:
        return set()
    return {d for i, d in enumerate(range(-k, 0))
            if source[d] is not None and (source[d].outer, source[d].inner) == (1, 1)
            and module.kernel_size[i] == shape[d] and padding[i] == 0
            and module.dilation[i] == 1}


def _padding(module: nn.Module) -> tuple[int, ...] | None:
    """A convolution's padding per spatial dimension, or None for ``"same"`` (sizes
    that depend on the kernel)."""
    if module.padding == "valid":
        return (0,) * (module.weight.dim() - 2)
    return None if isinstance(module.padding, str) else module.padding


def _pointwise(module: nn.Module) -> set[int]:
    """The spatial dimensions (negative) along which ``module`` treats every position
    alone: kernel size and stride one, no padding."""
    k, padding = module.weight.dim() - 2, _padding(module)
    if padding is None:
        return set()
    return {d for i, d in enumerate(range(-k, 0))
            if module.kernel_size[i] == 1 and module.stride[i] == 1 and padding[i] == 0}


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def transposed_convolution(tracer, call, name, module):
    """New channels from the input channels, the weight laid out ``(in, out, kernel)``;
    grouped ones are refused."""
    source = call.layout()
    k = module.weight.dim() - 2
    where = f"module '{name}'"
    require_unaligned(tracer, source, range(-k, 0), where, "convolves over aligned units")
    if module.groups != 1:
        raise UnsupportedModelError(f"{where}: a grouped transposed convolution is not "
                                    "supported")
    group = tracer.new_group(name)
    out = AxisSpec(group, "neuron")
    tracer.record(name, "weight", (as_input(source[-k - 1]), out, *(None,) * k), cost=True)
    if module.bias is not None:
        tracer.record(name, "bias", (out,), cost=True)
    output = (*source[:-k - 1], out, *source[-k:])
    tracer.add_site(group, name, None, len(source) - k - 1, output)
    return output


@register_rule(nn.EmbeddingBag)
def embedding_bag(tracer, call, name, module):
    """One vector per bag of token ids (their sum, mean or max, which treat every unit
    alone): new neurons on the last dimension of the output."""
    shape = call.shape
    group = tracer.new_group(name)
    out = AxisSpec(group, "neuron")
    tracer.record(name, "weight", (None, out), cost=True)
    output = (*(None,) * (len(shape) - 1), out)
    tracer.add_site(group, name, None, len(shape) - 1, output)
    return output


@register_rule(nn.Embedding)
def embedding(tracer, call, name, module):
    """One vector per token id: new neurons on a new last dimension."""
    source = call.layout()
    group = tracer.new_group(name)
    out = AxisSpec(group, "neuron")
    tracer.record(name, "weight", (None, out), cost=True)
    tracer.add_site(group, name, None, len(source), (*source, out))
    return (*source, out)
