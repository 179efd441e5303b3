"""Running a model: in a given train/eval mode (every module's mode put back after), and
on its own device and dtype for class logits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def temporary_mode(model: nn.Module, training: bool = False) -> Iterator[None]:
    """``model`` in train (``training``) or eval mode, its normalisation layers in eval
    mode either way (their running statistics are not updated); on exit every module
    gets back the mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def class_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model``'s class logits (batch, classes) on ``inputs``, run on the model's device
    and dtype and returned on the inputs' device; a ValueError when the model returns
    anything else."""
    parameter = next(model.parameters())
    logits = model(inputs.to(parameter.device, parameter.dtype))
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"need a model that returns class logits (batch, classes); got "
                         f"{shape}")
    return logits.to(inputs.device)
