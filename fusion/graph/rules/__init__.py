"""The rule registry: what each module, function and method does to the alignment.

A module rule is ``rule(tracer, call, name, module) -> layout``: it records the axes of
the module's own parameters and buffers (``tracer.record``), creates or joins groups
(``tracer.new_group``, ``tracer.union``, ``tracer.fix``) and returns the layout of the
module's output. A module whose type has a rule is traced as one leaf. Function and
method rules are ``rule(tracer, call) -> layout``. One module per layer family:

- :mod:`.layers`: Linear, convolutions (incl. depthwise), Embedding;
- :mod:`.norms`: BatchNorm, LayerNorm, GroupNorm, RMSNorm, InstanceNorm;
- :mod:`.recurrent`: RNN, LSTM, GRU (stacked, bidirectional, projected);
- :mod:`.attention`: MultiheadAttention and the Transformer layers;
- :mod:`.pointwise`: activations, dropout, pooling;
- :mod:`.tensor_ops`: arithmetic, concatenation, reshapes, transposes, indexing,
  reductions.

Users add a rule for their own module type with :func:`register_rule`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModuleRule = Callable[..., object]
FunctionRule = Callable[..., object]

_MODULES: dict[type, ModuleRule] = {}
_FUNCTIONS: dict[object, FunctionRule] = {}
_METHODS: dict[str, FunctionRule] = {}


def register_rule(*module_types: type[nn.Module]):
    """Decorator registering ``rule(tracer, call, name, module) -> layout`` for the
    given module types (exact types: a subclass needs its own rule). Modules of these
    types are then traced as leaves. See :mod:`otfusion.fusion.graph.rules.layers` for
    examples, and the README for a worked one."""

    def decorator(rule: ModuleRule) -> ModuleRule:
        for module_type in module_types:
            _MODULES[module_type] = rule
        return rule

    return decorator


def function_rule_for(*targets):
    """Decorator registering a rule for torch functions / operators (``call_function``)."""

    def decorator(rule: FunctionRule) -> FunctionRule:
        for target in targets:
            _FUNCTIONS[target] = rule
        return rule

    return decorator


def method_rule_for(*names: str):
    """Decorator registering a rule for tensor methods (``call_method``)."""

    def decorator(rule: FunctionRule) -> FunctionRule:
        for name in names:
            _METHODS[name] = rule
        return rule

    return decorator


def module_rule(module: nn.Module) -> ModuleRule | None:
    return _MODULES.get(type(module))


_FUNCTIONS_BY_NAME: dict[str, FunctionRule] = {}
"""Rules for functions of other libraries, by name (torchvision's fx-wrapped ops)."""


def function_rule_named(*names: str):
    """Decorator registering a rule for functions of other libraries by their name."""

    def decorator(rule: FunctionRule) -> FunctionRule:
        for name in names:
            _FUNCTIONS_BY_NAME[name] = rule
        return rule

    return decorator


def function_rule(target) -> FunctionRule | None:
    try:
        found = _FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None
    return found or _FUNCTIONS_BY_NAME.get(getattr(target, "__name__", None))


def method_rule(name: str) -> FunctionRule | None:
    return _METHODS.get(name)


from . import attention, layers, norms, pointwise, recurrent, tensor_ops  # noqa: E402, F401
