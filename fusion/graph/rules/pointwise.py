"""Ops that act on every unit alone (activations, dropout), ops that normalise along one
dimension (softmax, a norm), which are permutation-equivariant unless that dimension
holds heads, and pooling and resampling, which mix neighbouring positions and so must
not run over aligned units."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layouts import plain, refuse_heads, require_unaligned
from ..spec import AxisSpec, UnsupportedModelError
from . import function_rule_for, function_rule_named, method_rule_for, register_rule

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.LogSigmoid,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)
ELEMENTWISE_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.tanh, F.sigmoid, torch.relu,
    torch.tanh, torch.sigmoid, torch.exp, torch.log, torch.abs, torch.sqrt, torch.rsqrt,
    torch.square, torch.neg, torch.clamp, torch.erf, torch.sin, torch.cos, operator.invert,
    torch.logical_not, operator.neg, operator.pos, operator.pow, torch.pow,
)
ELEMENTWISE_METHODS = (
    "relu", "relu_", "tanh", "sigmoid", "exp", "log", "abs", "sqrt", "rsqrt", "square",
    "neg", "clamp", "clamp_min", "clamp_max", "pow", "erf", "contiguous", "clone", "detach",
    "float", "double", "half", "bfloat16", "to", "type_as", "type", "requires_grad_",
    "logical_not", "bool", "int", "long", "sin", "cos",
)


@register_rule(*ELEMENTWISE_MODULES)
def elementwise_module(tracer, call, name, module):
    if isinstance(module, nn.PReLU) and module.num_parameters > 1:
        source = call.layout()
        tracer.record(name, "weight", (source[1 if len(source) > 1 else 0],), cost=False)
    elif isinstance(module, nn.PReLU):
        tracer.record(name, "weight", (None,), cost=False)
    return call.layout()


_TENSOR_ARGUMENTS_ALLOWED = {"to", "type_as", "type"}
"""Methods whose tensor argument only gives a dtype or a device."""


@function_rule_for(*ELEMENTWISE_FUNCTIONS)
@method_rule_for(*ELEMENTWISE_METHODS)
def elementwise(tracer, call):
    """The input's layout; a second tensor (``h.clamp(min=self.low)``, ``h.pow(self.p)``)
    is refused, since it would be left unaligned while the units move. A number raised
    to a tensor's power (``10.0 ** (torch.arange(0, d, 2) / d)``) takes its layout."""
    if call.node.target in (operator.pow, torch.pow) and call.node.args \
            and not isinstance(call.node.args[0], fx.Node):
        return call.layout(1, "exponent")
    if call.node.target not in _TENSOR_ARGUMENTS_ALLOWED and any(
            size > 1 for shape in call.argument_shapes(1, skip=("input",)) for size in shape):
        raise UnsupportedModelError(
            f"node '{call.node.name}' ({call.node.target}) takes a second tensor, which is "
            "not supported; write it with torch.minimum, torch.maximum or arithmetic")
    return call.layout()


@function_rule_for(torch.zeros_like, torch.ones_like, torch.full_like)
@method_rule_for("zero_", "fill_")
def filled(tracer, call):
    """A tensor of one value shaped as its input (``torch.zeros_like(h)``, an LSTM cell's
    first memory): every permutation of the input's units keeps it, so it takes the
    input's layout."""
    return call.layout()


@method_rule_for("new_zeros", "new_ones", "new_full", "new_empty")
def new_tensor(tracer, call):
    """A tensor of the size given (``h.new_zeros(b, n)``): it takes only its dtype and
    device from the tensor it is called on, none of its units."""
    return plain(call.node)


@function_rule_for(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
@method_rule_for("softmax", "log_softmax")
def softmax(tracer, call):
    return _normalised(call.layout(), call.value(1, "dim", None), f"node '{call.node.name}'")


@function_rule_for(F.normalize)
def normalize(tracer, call):
    return _normalised(call.layout(), call.value(2, "dim", 1), f"node '{call.node.name}'")


@register_rule(nn.Softmax, nn.LogSoftmax)
def softmax_module(tracer, call, name, module):
    return _normalised(call.layout(), module.dim, f"module '{name}'")


def _normalised(layout, dim, where: str):
    """A softmax or norm along ``dim`` (None: softmax's implicit choice, the first
    dimension of a 1- or 3-dimensional input, else the second; one read from a tensor's
    values, ``.item()``, may be any) keeps the layout; it combines the units of one
    dimension, which any permutation of them keeps, but along heads it combines one
    unit of every head, whose units are aligned differently."""
    if not layout:
        return layout
    if dim is None:
        dim = 0 if len(layout) in (1, 3) else 1
    dims = [dim % len(layout)] if isinstance(dim, int) else range(len(layout))
    refuse_heads(layout, dims, where, "normalises across heads")
    return layout


@function_rule_named("stochastic_depth")
def stochastic_depth(tracer, call):
    """torchvision's ``stochastic_depth`` (wrapped as one fx call): drops whole samples
    or the whole batch of a residual branch, which no unit permutation changes."""
    return call.layout()

_POOLS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}


@register_rule(*_POOLS)
def pool_module(tracer, call, name, module):
    return _pooled(tracer, call.layout(), _POOLS[type(module)], f"module '{name}'")


@function_rule_for(*_POOL_FUNCTIONS)
def pool_function(tracer, call):
    return _pooled(tracer, call.layout(), _POOL_FUNCTIONS[call.node.target],
                   f"node '{call.node.name}'")


_PADS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
         nn.ReplicationPad2d, nn.ReplicationPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
         nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.CircularPad1d,
         nn.CircularPad2d, nn.CircularPad3d)
_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)  # ZeroPad's bases


@register_rule(*_PADS)
def pad_module(tracer, call, name, module):
    """Padding modules (CycleGAN's and style transfer's ``nn.ReflectionPad2d``) pad some
    of the last one to three dimensions, as ``F.pad`` does with their amounts."""
    return padded(tracer, call, module.padding, isinstance(module, _CONSTANT_PADS),
                  f"module '{name}'")


def padded(tracer, call, amounts, constant: bool, where: str):
    """``call``'s input padded by ``amounts`` (before, after) from the last dimension
    backwards, as ``F.pad`` takes them. Time and space may be padded in any mode. Units
    padded with a constant (a CIFAR ResNet's option-A shortcut, ``F.pad(x[:, :, ::2,
    ::2], (0, 0, 0, 0, p, p))``, puts channels of zeros around them) are concatenated
    with new units, which layers that add to them define and align (or, if none does,
    stay in place); units padded otherwise, or cropped, are refused."""
    layout, shape = call.layout(), call.input_shape
    result, refused = list(layout), []
    for i in range(len(amounts) // 2):
        d, before, after = len(layout) - 1 - i, amounts[2 * i], amounts[2 * i + 1]
        spec = layout[d]
        if spec is None or not before and not after:
            continue
        if not constant or min(before, after) < 0 or (spec.outer, spec.inner,
                                                      spec.part) != (1, 1, None):
            refused.append(d)
            continue
        parts = [(AxisSpec(tracer.new_group(f"{call.node.name}[{side}]", passive=True),
                           "neuron"), size) for side, size in (("before", before),
                                                               ("after", after)) if size]
        parts.insert(1 if before else 0, (spec, shape[d]))
        result[d] = tracer.direct_sum(call.node.name, parts)
    require_unaligned(tracer, layout, refused, where, "would pad the units themselves")
    return tuple(result)


_RESAMPLERS = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)


@register_rule(*_RESAMPLERS)
def resample_module(tracer, call, name, module):
    layout = call.layout()
    return _pooled(tracer, layout, len(layout) - 2, f"module '{name}'")


@function_rule_for(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
def resample_function(tracer, call):
    """Resampling (a U-Net's upsampling) mixes neighbouring positions of every dimension
    after the batch and the channels, like pooling."""
    layout = call.layout()
    return _pooled(tracer, layout, len(layout) - 2, f"node '{call.node.name}'")


def _pooled(tracer, layout, dims: int, where: str):
    require_unaligned(tracer, layout, range(-dims, 0), where,
                      "pools neighbouring units of an aligned dimension together")
    return layout
