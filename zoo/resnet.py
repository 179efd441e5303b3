"""CIFAR-style residual networks (ResNet-20, ResNet-18), with BatchNorm or GroupNorm.

GroupNorm keeps no running statistics, so it does not depend on the batch statistics
of a client's (possibly non-IID) data: the usual normalisation in federated learning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._common import positive_float, positive_int, positive_ints, scaled


def norm_layer(channels: int, num_groups: int | None) -> nn.Module:
    """``BatchNorm2d(channels)``, or ``GroupNorm(num_groups, channels)``."""
    if num_groups is None:
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(num_groups, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each followed by a norm (``bn1``, ``bn2``: BatchNorm, or
    GroupNorm with ``num_groups``), and a residual connection; ReLU after the first norm
    and after the addition.

    Input shape: ``(batch, in_channels, H, W)``; output ``(batch, out_channels, H', W')``
    with ``H' = ceil(H / stride)``. The shortcut is a 1x1 convolution + norm when the
    shape changes, else ``nn.Identity``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 num_groups: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = norm_layer(out_channels, num_groups)
        self.conv2 = nn.Conv2d(
            out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.bn2 = norm_layer(out_channels, num_groups)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                norm_layer(out_channels, num_groups),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem convolution + norm + ReLU (no max-pool), stages of
    ``BasicBlock`` (the first block of every stage after the first has stride 2), then
    global average pooling, flatten and one output ``Linear``. Every norm is a
    BatchNorm, or with ``num_groups`` a ``GroupNorm(num_groups, channels)`` (which must
    divide every scaled stage width).

    Input shape: ``(batch, in_channels, image_size, image_size)`` (the network itself
    accepts any spatial size; ``image_size`` only sets ``input_shape``).
    Output: ``(batch, num_classes)`` logits.

    Layers: ``conv1``/``bn1`` (stem), ``layer1`` .. ``layerN`` (stages), ``pool``, ``head``.
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        blocks_per_stage: Sequence[int],
        width_multiplier: float = 1.0,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        num_groups: int | None = None,
    ) -> None:
        super().__init__()
        stage_channels = positive_ints(stage_channels, "stage_channels")
        blocks_per_stage = positive_ints(blocks_per_stage, "blocks_per_stage")
        if len(stage_channels) != len(blocks_per_stage):
            raise ValueError("stage_channels and blocks_per_stage must have the same length")
        width_multiplier = positive_float(width_multiplier, "width_multiplier")
        in_channels = positive_int(in_channels, "in_channels")
        image_size = positive_int(image_size, "image_size")
        num_classes = positive_int(num_classes, "num_classes")
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        widths = [scaled(c, width_multiplier) for c in stage_channels]
        if num_groups is not None:
            num_groups = positive_int(num_groups, "num_groups")
            if any(width % num_groups for width in widths):
                raise ValueError(f"num_groups={num_groups} must divide every stage width, "
                                 f"got widths {widths}")
        self.conv1 = nn.Conv2d(
            in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False
        )
        self.bn1 = norm_layer(widths[0], num_groups)
        previous = widths[0]
        for index, (width, blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(BasicBlock(previous, width, stride if block == 0 else 1,
                                        num_groups))
                previous = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.head(x)


def resnet20(
    width_multiplier: float = 1.0,
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    num_groups: int | None = None,
) -> ResNet:
    """ResNet-20: 3 stages of 3 BasicBlocks, 16/32/64 channels x ``width_multiplier``
    (BatchNorm, or GroupNorm with ``num_groups``)."""
    return ResNet(
        (16, 32, 64),
        (3, 3, 3),
        width_multiplier=width_multiplier,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        num_groups=num_groups,
    )


def resnet18(
    width_multiplier: float = 0.25,
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
) -> ResNet:
    """CIFAR ResNet-18: 4 stages of 2 BasicBlocks, 64/128/256/512 channels x
    ``width_multiplier`` (default 0.25, so 16/32/64/128)."""
    return ResNet(
        (64, 128, 256, 512),
        (2, 2, 2, 2),
        width_multiplier=width_multiplier,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
    )


def resnet20_gn(
    width_multiplier: float = 1.0,
    num_groups: int = 2,
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
) -> ResNet:
    """ResNet-20 with ``num_groups`` groups in every GroupNorm (the zoo's ``resnet_gn``)."""
    return resnet20(width_multiplier, in_channels, image_size, num_classes, num_groups)
