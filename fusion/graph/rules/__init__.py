"""The rule registry: what each module, function and method does to the alignment.

A module rule is ``rule(tracer, call, name, module) -> layout``: it records the axes of
the module's own parameters and buffers (``tracer.record``), creates or joins groups
(``tracer.new_group``, ``tracer.union``, ``tracer.fix``) and returns the layout of the
module's output. A module whose type has a rule is traced as one leaf. Function and
method rules are ``rule(tracer, call) -> layout``. One module per layer family:

- :mod:`.layers`: Linear, convolutions (incl. depthwise and transposed), embeddings;
- :mod:`.norms`: BatchNorm, LayerNorm, GroupNorm, RMSNorm, InstanceNorm;
- :mod:`.recurrent`: RNN, LSTM, GRU (stacked, bidirectional, projected);
- :mod:`.attention`: MultiheadAttention and the Transformer layers;
- :mod:`.pointwise`: activations, dropout, pooling, resampling;
- :mod:`.tensor_ops`: arithmetic, comparisons, concatenation, reshapes, transposes,
  indexing, reductions, GLUs;
- :mod:`.products`: ``@``, ``einsum``, ``F.linear``, ``F.conv*d`` and ``F.embedding``
  on state tensors, ``F.scaled_dot_product_attention``.

A module under ``torch.nn.utils.parametrizations`` has its layer's rule; its weight is
recorded through the tensors it is computed from (``Tracer.record``). Users add a rule
for their own module type with :func:`register_rule`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.utils import parametrizations, parametrize

ModuleRule = Callable[..., object]
FunctionRule = Callable[..., object]

_MODULES: dict[type, ModuleRule] = {}
_FUNCTIONS: dict[object, FunctionRule] = {}
_METHODS: dict[str, FunctionRule] = {}
_FUNCTIONS_BY_NAME: dict[str, FunctionRule] = {}
"""Rules for functions of other libraries, by name (torchvision's fx-wrapped ops)."""


def _registering(table: dict, keys):
    """Decorator putting its rule into ``table`` under every one of ``keys``."""

    def decorator(rule):
        for key in keys:
            table[key] = rule
        return rule

    return decorator


def register_rule(*module_types: type[nn.Module]):
    """Decorator registering ``rule(tracer, call, name, module) -> layout`` for the
    given module types (exact types: a subclass needs its own rule). Modules of these
    types are then traced as leaves. See :mod:`otfusion.fusion.graph.rules.layers` for
    examples, and the README for a worked one."""
    return _registering(_MODULES, module_types)


def function_rule_for(*targets):
    """Decorator registering a rule for torch functions / operators (``call_function``)."""
    return _registering(_FUNCTIONS, targets)


def method_rule_for(*names: str):
    """Decorator registering a rule for tensor methods (``call_method``)."""
    return _registering(_METHODS, names)


def function_rule_named(*names: str):
    """Decorator registering a rule for functions of other libraries by their name."""
    return _registering(_FUNCTIONS_BY_NAME, names)


_UNIT_WISE_PARAMETRIZATIONS = (parametrizations._WeightNorm, parametrizations._SpectralNorm)
"""Parametrizations whose tensors follow the weight's units (a magnitude per unit, a
direction or weight of the weight's shape, power-iteration vectors); others (orthogonal,
a user's own) may mix units and are refused."""


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of ``module``'s type; a module under weight_norm or spectral_norm
    (``torch.nn.utils.parametrizations``, whose type derives from the layer's) has its
    layer's rule."""
    found = _MODULES.get(type(module))
    if found is None and parametrize.is_parametrized(module) and all(
            isinstance(p, _UNIT_WISE_PARAMETRIZATIONS)
            for chain in module.parametrizations.values() for p in chain):
        found = _MODULES.get(type(module).__bases__[0])
    return found


def function_rule(target) -> FunctionRule | None:
    try:
        found = _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None
    return found or _FUNCTIONS_BY_NAME.get(getattr(target, "__name__", None))


def method_rule(name: str) -> FunctionRule | None:
    return _METHODS.get(name)


from . import attention, layers, norms, pointwise, products, recurrent, tensor_ops  # noqa: E402, F401
