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


_CONTAINERS = (dict, list, set)
_OWN_CONTAINERS = {"_parameters", "_buffers", "_modules"}
"""The containers of torch's own that a forward may change (by assigning a tensor or a
module to an attribute); its hook tables are not (registering a hook is no run)."""


@contextmanager
def left_as_it_was(model: nn.Module) -> Iterator[None]:
    """On exit, every module of ``model`` gets back the attributes it had, and the
    contents of its parameters, buffers and submodules and of its own attributes that
    are dicts, lists or sets (``forward`` may assign ``self.features = h`` or fill
    ``self.cache["h"]``, and tracing it with torch.fx leaves proxies there), and its
    buffers and other tensor attributes their values (``forward`` may count calls or
    keep an average in place). Parameters are not copied: a forward that changes its
    weights in place is not a model to fuse. A TorchScript module is left to itself (its
    attributes are fixed; its buffers are restored). A lazy module must be initialised
    before (:func:`~.validation.check_initialised`): a run initialises it, which would
    then be undone by halves."""
    modules = list(model.modules())
    attributes = [(m, dict(vars(m))) for m in modules
                  if not isinstance(m, torch.jit.ScriptModule)]
    contents = [(value, list(value.items()) if isinstance(value, dict) else list(value))
                for _, saved in attributes for name, value in saved.items()
                if (name in _OWN_CONTAINERS or name[0] != "_")
                and isinstance(value, _CONTAINERS)]
    tensors = {id(t): t for m in modules  # parameters live in _parameters, not in vars
               for t in (*m._buffers.values(), *(v for k, v in vars(m).items() if k[0] != "_"))
               if isinstance(t, torch.Tensor) and not t.is_inference()}
    values = [(t, t.detach().clone()) for t in tensors.values()]
    try:
        yield
    finally:
        for container, old in contents:
            container.clear()
            if isinstance(container, list):
                container.extend(old)
            else:  # a dict from its items, a set from its members
                container.update(old)
        for module, saved in attributes:
            vars(module).clear()
            vars(module).update(saved)
        with torch.no_grad():
            for tensor, value in values:
                tensor.copy_(value)


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
