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

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from .cnn import CNN
from .llama import LlamaClassifier
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
    "LlamaClassifier",
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
    "llama": LlamaClassifier,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, seed: int | None = 0, **kwargs: object) -> nn.Module:
    """Build the zoo model ``name``, or a user's own model given by its import path
    ``"package.module:callable"`` (a class or a function returning an ``nn.Module``),
    with its parameters initialised from ``seed``.

    The same name, kwargs and seed give identical parameters. The global torch RNG state
    is left untouched unless ``seed`` is ``None``, in which case the model is initialised
    from (and advances) the global RNG.

    Raises ``ValueError`` for an unknown name (the message lists the available ones), an
    import path that cannot be imported or does not build a module (the message names
    the path), or an invalid argument value, and ``TypeError`` naming the model for
    keyword arguments the model does not take.
    """
    builder = _builder(name)
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(builder).parameters)
        raise TypeError(
            f"invalid arguments for model {name!r}: {error}; accepted: {accepted}"
        ) from None
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if name not in _REGISTRY:
            try:
                model = builder(**kwargs)
            except Exception as error:  # noqa: BLE001 - a user's code: name the path
                raise ValueError(f"building model {name!r} failed: {type(error).__name__}: "
                                 f"{error}") from error
        else:
            model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def _builder(name: str) -> Callable[..., nn.Module]:
    """The zoo's builder of ``name``, or the callable at the import path ``name``."""
    if isinstance(name, str) and ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            builder = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"cannot import model {name!r}: {error}") from None
        if not callable(builder):
            raise ValueError(f"model {name!r} is not callable")
        return builder
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}, "
            "or an import path 'package.module:callable'"
        ) from None
