"""Families of zoo models whose members compute the same function: a model with He
init and random normalisation statistics, and copies of it with randomly permuted hidden
units (``permutations.py``); and the relative difference of two models' logits."""

from __future__ import annotations

import torch
from permutations import permute_hidden_units, randomize_batchnorm_stats
from torch import nn

from otfusion.zoo import build_model


def kaiming_init(model: nn.Module, generator: torch.Generator) -> None:
    """He-normal weights and small random biases for every Linear/Conv.

    With PyTorch's default init the logits of a deep ReLU network (VGG-11 here) hardly
    depend on the input (the head bias is 99.99 % of them), so a wrongly fused hidden
    layer could hide below a 1e-5 relative tolerance; He init keeps the signal alive.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1, generator=generator)


def make_family(name: str, kwargs: dict, seed: int = 0, copies: int = 3,
                dtype: torch.dtype = torch.float32):
    """The original model (eval mode, He init, random BN statistics), ``copies``
    independently permuted copies of it, and a batch of inputs."""
    generator = torch.Generator().manual_seed(1000 + seed)
    original = build_model(name, seed=seed, **kwargs)
    kaiming_init(original, generator)
    randomize_batchnorm_stats(original, generator)
    original = original.to(dtype).eval()
    permuted = [permute_hidden_units(original, generator).eval() for _ in range(copies)]
    inputs = torch.randn(16, *original.input_shape, generator=generator).to(dtype)
    return original, permuted, inputs


def relative_difference(model: torch.nn.Module, original: torch.nn.Module,
                        inputs: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        expected = original(inputs)
        got = model(inputs)
    return float((got - expected).norm() / expected.norm())
