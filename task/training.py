"""Local training and evaluation of zoo (or user) models on :class:`TensorData`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .data import TensorData, as_input


@dataclass(frozen=True)
class Recipe:
    """Local training settings, the keyword arguments of :func:`train`."""

    epochs: int = 30
    lr: float = 0.05
    batch_size: int = 32
    optimizer: Literal["adam", "sgd"] = "sgd"


# Clients trained to convergence with SGD (momentum 0.9) from their own initialisation,
# the one-shot setting; learning rates picked on the digits data (see benchmarks/).
RECIPES = {
    "mlp": Recipe(lr=0.1),
    "cnn": Recipe(lr=0.02),
    "mobilenet": Recipe(lr=0.02),
    "vit": Recipe(lr=1e-3, optimizer="adam"),
    "transformer": Recipe(lr=1e-3, optimizer="adam"),
    "llama": Recipe(lr=1e-3, optimizer="adam"),
}


def recipe_for(model: str) -> Recipe:
    """The training recipe for a zoo model name (a default for the others)."""
    return RECIPES.get(model, Recipe())


def model_inputs(
    model: nn.Module, data: TensorData, input_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """``data``'s features reshaped to ``input_shape``, by default ``model.input_shape``
    (features are passed unchanged when neither is available)."""
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    return data.x if shape is None else as_input(data, shape)


def _batches(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` bounds of consecutive batches; a trailing batch of a single sample
    is merged into the previous one (BatchNorm cannot train on one sample)."""
    starts = list(range(0, num_samples, batch_size))
    if len(starts) > 1 and num_samples - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [num_samples]
    return list(zip(starts, ends, strict=True))


def train(
    model: nn.Module,
    data: TensorData,
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
    *,
    optimizer: Literal["adam", "sgd"] = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    input_shape: Sequence[int] | None = None,
) -> float:
    """Train ``model`` in place with cross-entropy and return the mean loss of the last
    epoch (per sample).

    Mini-batches are reshuffled every epoch by a local ``torch.Generator`` seeded with
    ``seed``, so a run is deterministic given the model's initial parameters and
    ``seed``; the global RNG is not used. ``optimizer`` is ``"adam"`` or ``"sgd"`` (with
    ``momentum``). The model is left in training mode.

    The defaults fit the digits: an MLP, CNN or GRU reaches ~95% test accuracy in
    a few seconds on CPU. The zoo's models are small, so under CPU contention
    ``torch.set_num_threads(1)`` is often faster than more threads.
    """
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'sgd'")
    device = next(model.parameters()).device
    x = model_inputs(model, data, input_shape).to(device)
    y = data.y.to(device)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    last_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        total = 0.0
        for start, end in _batches(len(data), batch_size):
            index = order[start:end]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[index]), y[index])
            loss.backward()
            opt.step()
            total += loss.item() * (end - start)
        last_loss = total / len(data)
    return last_loss


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    data: TensorData,
    batch_size: int = 512,
    input_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax class probabilities ``(N, num_classes)`` of ``model`` in eval mode (the
    model's previous train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = model_inputs(model, data, input_shape)
        chunks = [
            F.softmax(model(x[s : s + batch_size].to(device)), dim=1).cpu()
            for s in range(0, len(data), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TensorData,
    batch_size: int = 512,
    input_shape: Sequence[int] | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` (in eval mode) on ``data``."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = model_inputs(model, data, input_shape)
        total_loss, correct = 0.0, 0
        for s in range(0, len(data), batch_size):
            logits = model(x[s : s + batch_size].to(device))
            target = data.y[s : s + batch_size].to(device)
            total_loss += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return total_loss / len(data), correct / len(data)


def ensemble_accuracy(
    models: Sequence[nn.Module],
    data: TensorData,
    weights: Sequence[float] | None = None,
    batch_size: int = 512,
) -> float:
    """Accuracy of the ensemble that predicts the ``weights``-weighted mean (default
    uniform; normalised to sum 1) of the models' softmax probabilities. Each model gets
    the features reshaped to its own ``input_shape``."""
    if not models:
        raise ValueError("need at least one model")
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    w = torch.ones(len(models)) if weights is None else torch.as_tensor(weights, dtype=torch.float)
    if w.shape != (len(models),) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError("weights must be one non-negative number per model, not all zero")
    w = w / w.sum()
    mean = sum(wk * predict_proba(m, data, batch_size) for wk, m in zip(w, models, strict=True))
    return float((mean.argmax(dim=1) == data.y).float().mean())
