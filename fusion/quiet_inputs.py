"""Quiet inputs (``FusionConfig.robust.quiet_inputs``, off by default): input features
that most clients' data hardly varies, such as the corner pixels of centred digits. A
first layer's weights on them serve little but inputs unlike that data: a backdoor's
trigger stamped there. After the fusion, those weights are folded into the layer's bias
at the median of the clients' means, so that a trigger there reaches nothing.

The cost: on a client whose data does vary a folded feature (an honest minority, under
non-IID data, whose classes use pixels the others leave blank), the model loses what
that feature told it; more than half of the clients must find a feature quiet for it to
be folded, so a minority of clients cannot have one folded, but they cannot keep one
either."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .graph.tracer import input_linear
from .moments import InputMoments


def fold_quiet_inputs(model: nn.Module, moments: Sequence[InputMoments], ratio: float
                      ) -> int:
    """Fold the weights of ``model``'s first ``nn.Linear`` on quiet input features into
    its bias (in place); the number of features folded.

    A feature is quiet when more than half of the clients' variances of it are at most
    ``ratio`` times the median over features of those variances (the upper median of
    the clients'); ``w x`` becomes ``w m``, ``m`` the median of the clients' means of
    the feature. Nothing is folded (0) without three clients' moments, or when no
    ``nn.Linear`` with a bias reads the input flattened first
    (:func:`~.graph.tracer.input_linear`: a convolution's weights are not per feature).
    """
    if len(moments) < 3:
        return 0
    name = input_linear(model, moments[0].var.numel())
    layer = None if name is None else model.get_submodule(name)
    if layer is None or layer.bias is None:
        return 0
    variances = torch.stack([m.var.flatten() for m in moments]).sort(dim=0).values
    var = variances[len(moments) // 2]  # the upper median: quiet for more than half
    mean = torch.stack([m.mean.flatten() for m in moments]).median(dim=0).values
    quiet = var <= ratio * var.median()
    with torch.no_grad():
        layer.bias += layer.weight[:, quiet] @ mean[quiet].to(layer.weight)
        layer.weight[:, quiet] = 0
    return int(quiet.sum())
