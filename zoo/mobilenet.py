"""MobileNetV2-style network of inverted-residual blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import positive_float, positive_int, scaled

#: Nominal stages: (output channels, number of blocks, stride of the first block). The
#: stem has as many channels as the first stage.
MOBILENETV2_CONFIG: tuple[tuple[int, int, int], ...] = ((16, 1, 1), (24, 2, 2), (32, 2, 2))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand convolution + BatchNorm + ReLU6, 3x3 depthwise
    convolution (``groups`` = channels) + BatchNorm + ReLU6, 1x1 project convolution +
    BatchNorm (linear bottleneck), plus the input when ``stride == 1`` and the channel
    count is unchanged (``use_residual``).

    Input shape: ``(batch, in_channels, H, W)``; output ``(batch, out_channels, H', W')``
    with ``H' = ceil(H / stride)``. Convolutions have no bias.

    Layers: ``expand``/``bn1``, ``depthwise``/``bn2``, ``project``/``bn3``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(
            hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False
        )
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2-style CNN for small images: a 3x3 stem convolution (stride 1) +
    BatchNorm + ReLU6, then ``InvertedResidual`` blocks in three stages of 16/24/32
    channels x ``width_multiplier`` (1, 2 and 2 blocks; the first block of the second
    and third stage has stride 2), each expanding its input channels ``expansion``
    times; then global average pooling (``x.mean((2, 3))``) and one output ``Linear``.
    There is no final 1x1 convolution before the pooling.

    Input shape: ``(batch, in_channels, image_size, image_size)`` (the network itself
    accepts any spatial size; ``image_size`` only sets ``input_shape``).
    Output: ``(batch, num_classes)`` logits.

    Layers: ``conv1``/``bn1`` (stem), ``blocks`` (a ``Sequential`` of the blocks),
    ``head``.
    """

    def __init__(
        self,
        width_multiplier: float = 1.0,
        expansion: int = 4,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        width_multiplier = positive_float(width_multiplier, "width_multiplier")
        expansion = positive_int(expansion, "expansion")
        in_channels = positive_int(in_channels, "in_channels")
        image_size = positive_int(image_size, "image_size")
        num_classes = positive_int(num_classes, "num_classes")
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        previous = scaled(MOBILENETV2_CONFIG[0][0], width_multiplier)
        self.conv1 = nn.Conv2d(in_channels, previous, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(previous)
        blocks = []
        for channels, count, stride in MOBILENETV2_CONFIG:
            width = scaled(channels, width_multiplier)
            for index in range(count):
                blocks.append(
                    InvertedResidual(previous, width, stride if index == 0 else 1, expansion)
                )
                previous = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.head(x.mean((2, 3)))
