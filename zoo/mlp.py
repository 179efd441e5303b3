"""Multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import positive_int, positive_ints


class MLP(nn.Module):
    """Fully connected ReLU network.

    Input shape: ``(batch, in_features)``; anything whose trailing dimensions multiply to
    ``in_features`` (for example ``(batch, 1, 8, 8)`` images) is flattened first.
    Output: ``(batch, num_classes)`` logits.

    Layers: ``layers`` is an ``nn.Sequential`` of ``Linear`` + ``ReLU`` per hidden width
    (any number, including none), ``head`` the output ``Linear``. All linears have biases.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        widths: Sequence[int] = (400, 200, 100),
    ) -> None:
        super().__init__()
        in_features = positive_int(in_features, "in_features")
        num_classes = positive_int(num_classes, "num_classes")
        widths = positive_ints(widths, "widths", allow_empty=True)
        self.input_shape: tuple[int, ...] = (in_features,)
        self.num_classes = num_classes
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        previous = in_features
        for width in widths:
            layers += [nn.Linear(previous, width), nn.ReLU()]
            previous = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))
