"""Transformer classifiers: a small ViT on image patches, and a sequence classifier."""

from __future__ import annotations

import torch
from torch import nn

from ._common import positive_int


def _encoder(dim: int, heads: int, hidden: int, depth: int) -> nn.TransformerEncoder:
    """Pre-norm encoder blocks (self-attention and a GELU MLP), without dropout."""
    layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def _check_heads(dim: int, heads: int) -> None:
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")


class ViT(nn.Module):
    """Vision Transformer: ``patch``-pixel square patches embedded by a strided
    convolution, a class token, learned positions, ``depth`` pre-norm encoder blocks,
    a final LayerNorm and the output ``Linear`` on the class token.

    Input shape: ``(batch, in_channels, image_size, image_size)``. Output: logits.
    Layers: ``patch_embed``, ``cls_token``, ``pos_embed``, ``encoder``, ``norm``, ``head``.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10,
                 patch: int = 2, dim: int = 32, heads: int = 4, hidden: int = 64,
                 depth: int = 2) -> None:
        super().__init__()
        in_channels, image_size = positive_int(in_channels, "in_channels"), positive_int(
            image_size, "image_size")
        patch, dim = positive_int(patch, "patch"), positive_int(dim, "dim")
        heads, depth = positive_int(heads, "heads"), positive_int(depth, "depth")
        hidden = positive_int(hidden, "hidden")
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch ({patch})")
        _check_heads(dim, heads)
        self.num_classes = positive_int(num_classes, "num_classes")
        self.input_shape: tuple[int, ...] = (in_channels, image_size, image_size)
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.encoder = _encoder(dim, heads, hidden, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


class TransformerClassifier(nn.Module):
    """Sequence classifier: each step's features embedded by a ``Linear``, learned
    positions, ``depth`` pre-norm encoder blocks, mean over the steps, a LayerNorm and
    the output ``Linear`` (for digits, the 8 image rows are the 8 steps).

    Input shape: ``(batch, seq_len, input_size)``. Output: logits.
    """

    def __init__(self, input_size: int = 8, seq_len: int = 8, num_classes: int = 10,
                 dim: int = 32, heads: int = 4, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        input_size, seq_len = positive_int(input_size, "input_size"), positive_int(
            seq_len, "seq_len")
        dim, heads = positive_int(dim, "dim"), positive_int(heads, "heads")
        hidden, depth = positive_int(hidden, "hidden"), positive_int(depth, "depth")
        _check_heads(dim, heads)
        self.num_classes = positive_int(num_classes, "num_classes")
        self.input_shape: tuple[int, ...] = (seq_len, input_size)
        self.embed = nn.Linear(input_size, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, seq_len, dim))
        self.encoder = _encoder(dim, heads, hidden, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(x) + self.pos_embed)
        return self.head(self.norm(x.mean(1)))
