"""Quiet inputs (``FusionConfig.robust.quiet_inputs``, off by default): input features
that most clients' data hardly varies, such as the corner pixels of centred digits. A
model's weights on them serve little but inputs unlike that data: a backdoor's trigger
stamped there. Two defences use them:

- the distillation teaches the fused model to ignore them (any architecture): about
  half of the quiet features of every input the student sees are replaced by values
  drawn across the data's range, while its targets are the teachers' predictions on
  the input as drawn (:func:`scramble_quiet`);
- after the fusion, a first ``nn.Linear``'s weights on them are folded into its bias at
  the median of the clients' means, so that a trigger there reaches nothing
  (:func:`fold_quiet_inputs`; a convolution's weights are shared by every position).

The cost: on a client whose data does vary a quiet feature (an honest minority, under
non-IID data, whose classes use pixels the others leave blank), the model loses what
that feature told it; more than half of the clients must find a feature quiet, so a
minority of clients cannot have one made quiet, but they cannot keep one either."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .graph.tracer import input_linear
from .moments import InputMoments


@dataclass(frozen=True)
class QuietInputs:
    """The quiet input features of a fusion's clients (``mask``, the input's shape), the
    median of the clients' means of every feature, and the range of the inputs: the
    lowest and highest of those medians -/+ 3 times the square root of the feature's
    upper-median variance over the clients."""

    mask: torch.Tensor
    mean: torch.Tensor
    low: float
    high: float

    @property
    def count(self) -> int:
        return int(self.mask.sum())


def quiet_inputs(moments: Sequence[InputMoments], ratio: float) -> QuietInputs | None:
    """The features that more than half of the clients vary at most ``ratio`` times the
    median feature's variance (their variance's upper median over the clients, compared
    with its median over the features); None without three clients' moments or without
    a quiet feature. Both are order statistics over the clients: a minority can move
    them only within what honest clients report."""
    if len(moments) < 3:
        return None
    variances = torch.stack([m.var for m in moments]).sort(dim=0).values
    var = variances[len(moments) // 2]  # the upper median: quiet for more than half
    mean = torch.stack([m.mean for m in moments]).median(dim=0).values
    mask = var <= ratio * var.median()
    if not bool(mask.any()):
        return None
    spread = 3 * var.sqrt()
    return QuietInputs(mask, mean, float((mean - spread).min()), float((mean + spread).max()))


def scramble_quiet(inputs: torch.Tensor, quiet: QuietInputs, generator: torch.Generator
                   ) -> torch.Tensor:
    """``inputs`` (a batch) with each quiet feature of each input replaced, with
    probability one half, by a value drawn uniformly from the inputs' range."""
    shape = (len(inputs), *quiet.mask.shape)
    chosen = (torch.rand(shape, generator=generator) < 0.5) & quiet.mask
    values = quiet.low + (quiet.high - quiet.low) * torch.rand(shape, generator=generator)
    return torch.where(chosen.to(inputs.device), values.to(inputs), inputs)


def fold_quiet_inputs(model: nn.Module, quiet: QuietInputs) -> bool:
    """Fold the weights of ``model``'s first ``nn.Linear`` on the ``quiet`` features into
    its bias (in place): ``w x`` becomes ``w m``, ``m`` the median of the clients' means
    of the feature. Whether it was folded: not when no ``nn.Linear`` with a bias reads
    the input flattened first (:func:`~.graph.tracer.input_linear`)."""
    name = input_linear(model, quiet.mask.numel())
    layer = None if name is None else model.get_submodule(name)
    if layer is None or layer.bias is None:
        return False
    mask, mean = quiet.mask.flatten(), quiet.mean.flatten()
    with torch.no_grad():
        layer.bias += layer.weight[:, mask] @ mean[mask].to(layer.weight)
        layer.weight[:, mask] = 0
    return True
