"""Checks on the fusion inputs, each failing with an error that names what is wrong."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parameter import is_lazy


def check_models(models: Sequence[nn.Module]) -> list[nn.Module]:
    """A non-empty list of torch modules whose floating tensors are all finite, except
    constants: a tensor without NaN that is the same in every model may hold
    infinities (a causal attention mask's -inf, kept as it is by the fusion)."""
    models = list(models)
    if not models:
        raise ValueError("fuse() needs at least one model, got an empty sequence")
    for k, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model {k} is a {type(model).__name__}, not a torch.nn.Module")
        check_initialised(model, f"model {k}")
    first = models[0].state_dict()
    constants = {name for name, t in first.items() if t.is_floating_point() and not all_finite(t)}
    for k, model in enumerate(models):
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or (name not in constants and all_finite(tensor)):
                continue
            if bool(tensor.isnan().any()):
                raise ValueError(f"model {k}: '{name}' contains NaN values")
            if name not in constants or not is_same_constant(tensor, first[name]):
                raise ValueError(
                    f"model {k}: '{name}' differs from model 0's, and one of them contains "
                    "Inf values: only a tensor that is the same in every model (a constant "
                    "such as a causal attention mask) may hold infinities")
    return models


def check_inputs(inputs: object) -> None:
    """A ValueError unless ``inputs`` is None or one batch tensor: the fusion runs the
    models on one input tensor (a tuple, list or dict of several is not a batch)."""
    if inputs is not None and not isinstance(inputs, torch.Tensor):
        raise ValueError(f"inputs must be one batch tensor, got a {type(inputs).__name__}: "
                         "the fusion runs models on one input tensor (a model whose "
                         "forward takes several can be wrapped in one that takes them "
                         "stacked or concatenated)")


def check_initialised(model: nn.Module, label: str) -> None:
    """A ValueError naming the first parameter or buffer of ``model`` that a lazy module
    (``nn.LazyLinear``) has not initialised yet: it has no weights to fuse."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if is_lazy(tensor):
            raise ValueError(f"{label}: '{name}' is not initialised yet (a lazy module); run "
                             "the model once on an input before fusing it")


def is_same_constant(tensor: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``other`` has the shape and values (infinities included) of ``tensor``."""
    return other.shape == tensor.shape and torch.equal(
        other.to(tensor.device, tensor.dtype), tensor)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or infinite, from the extremes alone (NaN propagates to
    them), without a boolean copy of the tensor."""
    if tensor.numel() == 0:
        return True
    low, high = tensor.aminmax()
    return math.isfinite(low.item()) and math.isfinite(high.item())


def normalize_weights(weights: Sequence[float] | torch.Tensor | None, count: int) -> list[float]:
    """Client weights scaled to sum to one; uniform when ``weights`` is None."""
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"got {len(values)} weights for {count} models")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got sum {total}")
    return [w / total for w in values]


def architecture_signature(model: nn.Module) -> tuple:
    """Layer names and types, and the name and rank of every tensor: what must match."""
    layers = tuple((name, type(m).__name__) for name, m in model.named_modules())
    tensors = tuple((name, t.dim()) for name, t in model.state_dict().items())
    return layers, tensors


def check_same_architecture(models: Sequence[nn.Module], names: Sequence[str]) -> None:
    """All models share layers and tensor names; widths may differ."""
    expected = architecture_signature(models[0])
    for model, name in zip(models[1:], names[1:], strict=True):
        layers, tensors = architecture_signature(model)
        for kind, mine, theirs in (("layers", layers, expected[0]),
                                   ("tensors", tensors, expected[1])):
            if mine != theirs:
                diff = sorted(set(mine) ^ set(theirs))[:3] or "their order"
                raise ValueError(
                    f"{name} has a different architecture from {names[0]}: the {kind} differ "
                    f"({diff})"
                )


def check_same_shapes(states: Sequence[dict[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Every tensor has the same shape in all models (needed by plain averaging)."""
    for state, name in zip(states[1:], names[1:], strict=True):
        for key, tensor in state.items():
            if tensor.shape != states[0][key].shape:
                raise ValueError(
                    f"method='average' needs identical shapes: '{key}' is "
                    f"{tuple(states[0][key].shape)} in {names[0]} and {tuple(tensor.shape)} "
                    f"in {name}"
                )
