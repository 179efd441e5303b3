"""Running a model in a given train/eval mode and putting every module's mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
