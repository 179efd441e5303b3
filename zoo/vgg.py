"""VGG-11 with a width multiplier."""

from __future__ import annotations

import torch
from torch import nn

from ._common import positive_float, positive_int, scaled

#: Nominal VGG-11 configuration: channel counts, ``"M"`` for a 2x2 max-pool.
VGG11_CONFIG: tuple[int | str, ...] = (
    64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"
)  # fmt: skip


class VGG(nn.Module):
    """VGG network: 3x3 convolutions (padding 1, optional BatchNorm) with ReLU, and 2x2
    max-pools; a pool is applied only while the spatial size is still > 1, so 8x8 inputs
    get three pools and 32x32 inputs all five. Channel counts are the nominal ones times
    ``width_multiplier``. Then flatten and one output ``Linear``.

    Input shape: ``(batch, in_channels, image_size, image_size)``.
    Output: ``(batch, num_classes)`` logits.

    Layers: ``features`` (convolutions, BatchNorm, pools), ``flatten``, ``head``.
    Convolutions have a bias unless ``batch_norm`` is set; they are He-initialised
    (Kaiming normal, fan-in, biases zero): with PyTorch's default initialisation the
    plain (no BatchNorm) network barely trains in a few epochs.
    """

    def __init__(
        self,
        config: tuple[int | str, ...] = VGG11_CONFIG,
        width_multiplier: float = 0.25,
        batch_norm: bool = False,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        width_multiplier = positive_float(width_multiplier, "width_multiplier")
        in_channels = positive_int(in_channels, "in_channels")
        image_size = positive_int(image_size, "image_size")
        num_classes = positive_int(num_classes, "num_classes")
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        previous, side = in_channels, image_size
        for item in config:
            if item == "M":
                if side > 1:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            width = scaled(positive_int(item, "config entry"), width_multiplier)
            layers.append(nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            previous = width
        self.features = nn.Sequential(*layers)
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(previous * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.features(x)))


def vgg11(
    width_multiplier: float = 0.25,
    batch_norm: bool = False,
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
) -> VGG:
    """VGG-11 (64,M,128,M,256,256,M,512,512,M,512,512,M) scaled by ``width_multiplier``."""
    return VGG(
        VGG11_CONFIG,
        width_multiplier=width_multiplier,
        batch_norm=batch_norm,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
    )
