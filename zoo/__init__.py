"""The torch model zoo shared by the server and the clients.

Every model builds from its name alone, with defaults that fit the embedded default
data (scikit-learn's digits: 10 classes, 8x8 pixels), has an ``input_shape`` attribute
(the input shape without the batch dimension) and a ``num_classes`` attribute, ends in
an output ``Linear`` named ``head``, and traces with ``torch.fx.symbolic_trace``.
Width keyword arguments (``widths``, ``channels``/``hidden``, ``width_multiplier``,
``hidden_size``) make clients of different widths.

>>> from otfusion.zoo import build_model
>>> model = build_model("mlp", in_features=784, widths=(400, 200, 100), seed=0)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from .cnn import CNN
from .mlp import MLP
from .mobilenet import InvertedResidual, MobileNetV2
from .recurrent import GRUClassifier, LSTMClassifier, RNNClassifier
from .resnet import BasicBlock, ResNet, resnet18, resnet20, resnet20_gn
from .transformer import TransformerClassifier, ViT
from .vgg import VGG, vgg11

__all__ = [
    "CNN",
    "MLP",
    "VGG",
    "BasicBlock",
    "GRUClassifier",
    "InvertedResidual",
    "LSTMClassifier",
    "MobileNetV2",
    "RNNClassifier",
    "ResNet",
    "TransformerClassifier",
    "ViT",
    "available_models",
    "build_model",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "vgg11": vgg11,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet_gn": resnet20_gn,
    "mobilenet": MobileNetV2,
    "rnn": RNNClassifier,
    "lstm": LSTMClassifier,
    "gru": GRUClassifier,
    "vit": ViT,
    "transformer": TransformerClassifier,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, seed: int | None = 0, **kwargs: object) -> nn.Module:
    """Build the zoo model ``name`` with its parameters initialised from ``seed``.

    The same name, kwargs and seed give identical parameters. The global torch RNG state
    is left untouched unless ``seed`` is ``None``, in which case the model is initialised
    from (and advances) the global RNG.

    Raises ``ValueError`` for an unknown name (the message lists the available ones) or
    an invalid argument value, and ``TypeError`` naming the model for keyword arguments
    the model does not take.
    """
    try:
        builder = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        ) from None
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(builder).parameters)
        raise TypeError(
            f"invalid arguments for model {name!r}: {error}; accepted: {accepted}"
        ) from None
    if seed is None:
        return builder(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(**kwargs)
