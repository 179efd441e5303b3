"""Running a model: in a given train/eval mode (every module's mode put back after), left
as it was found, and on its own device and dtype for class logits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


@contextmanager
def temporary_mode(model: nn.Module, training: bool = False) -> Iterator[None]:
    """``model`` in train (``training``) or eval mode, its normalisation layers in eval
    mode either way (their running statistics are not updated); on exit every module
    gets back the mode it had. In eval mode the model is also :func:`left_as_it_was`:
    a run for its outputs changes nothing in it."""
    with ExitStack() as stack:
        if not training:
            stack.enter_context(left_as_it_was(model))
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


@contextmanager
def left_as_it_was(model: nn.Module) -> Iterator[None]:
    """On exit, every module of ``model`` gets back the attributes, submodules,
    parameters and buffers it had (``forward`` may assign ``self.features = h``, and
    tracing it with torch.fx leaves proxies there), and every buffer the values it had
    (``forward`` may count calls or keep an average in place). Parameters are not
    copied: a forward that changes its weights in place is not a model to fuse."""
    saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
             for m in model.modules()]
    buffers = [(b, _version(b), b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for module, attributes, own_parameters, own_buffers, submodules in saved:
            for live, old in ((module._parameters, own_parameters),
                              (module._buffers, own_buffers), (module._modules, submodules)):
                live.clear()
                live.update(old)
            vars(module).clear()
            vars(module).update(attributes)
        with torch.no_grad():
            for buffer, version, value in buffers:
                if _version(buffer) != version:
                    buffer.copy_(value)


def _version(tensor: torch.Tensor) -> int | None:
    """How often ``tensor`` was changed in place (None for an inference tensor, which
    keeps no count and cannot be changed outside inference mode)."""
    return None if tensor.is_inference() else tensor._version


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
