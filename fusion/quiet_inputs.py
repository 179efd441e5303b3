"""Quiet inputs (``FusionConfig.robust.quiet_inputs``): input features that the clients'
data hardly varies, such as the corner pixels of centred digits, carry no information on
that data, so a first layer's weights on them serve nothing but inputs unlike it: a
backdoor's trigger stamped there. After the fusion, those weights are folded into the
layer's bias at the features' mean, which changes the model on the clients' data by no
more than the features' small variance allows, and leaves a trigger there nothing to
reach. The statistics are the median client's, so that a minority cannot make a feature
look quiet or loud."""

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

    A feature is quiet when the median client's variance of it is at most ``ratio``
    times the median over features of that variance; ``w x`` becomes ``w m``, ``m`` the
    median client's mean of the feature. Nothing is folded (0) without three clients'
    moments, or when no ``nn.Linear`` with a bias reads the input flattened first
    (:func:`~.graph.tracer.input_linear`: a convolution's weights are not per feature).
    """
    features = moments[0].var.numel() if len(moments) >= 3 else None
    name = input_linear(model) if any(  # tracing only models that may have such a layer
        type(m) is nn.Linear and m.in_features == features for m in model.modules()) else None
    layer = None if name is None else model.get_submodule(name)
    if layer is None or layer.bias is None or layer.in_features != features:
        return 0
    var = torch.stack([m.var.flatten() for m in moments]).median(dim=0).values
    mean = torch.stack([m.mean.flatten() for m in moments]).median(dim=0).values
    quiet = var <= ratio * var.median()
    with torch.no_grad():
        layer.bias += layer.weight[:, quiet] @ mean[quiet].to(layer.weight)
        layer.weight[:, quiet] = 0
    return int(quiet.sum())
