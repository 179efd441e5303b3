"""LeNet-style convolutional network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._common import positive_int, positive_ints


class CNN(nn.Module):
    """LeNet-style CNN: per entry of ``channels`` a 3x3 convolution (padding 1), ReLU and
    2x2 max-pool; then flatten, ``Linear(hidden)``, ReLU and the output ``Linear``.

    Input shape: ``(batch, in_channels, image_size, image_size)``; ``image_size`` must be
    divisible by ``2 ** len(channels)``. Output: ``(batch, num_classes)`` logits.

    Layers: ``features`` (convolutions), ``classifier`` (flatten, hidden linear, ReLU),
    ``head`` (output linear).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
    ) -> None:
        super().__init__()
        in_channels = positive_int(in_channels, "in_channels")
        image_size = positive_int(image_size, "image_size")
        num_classes = positive_int(num_classes, "num_classes")
        channels = positive_ints(channels, "channels")
        hidden = positive_int(hidden, "hidden")
        factor = 2 ** len(channels)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**len(channels)={factor}"
            )
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        side = image_size // factor
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(previous * side * side, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.features(x)))
