"""Idioms of users' own models that once fused into a different function without a
word, crashed, or were refused: channels concatenated then normalised in groups, a
matrix parameter multiplied directly, a buffer read through a method (fx used to bake
it into a constant), a traced graph reused for a model whose weights are tied
differently, operands by keyword, NumPy's ``axis=``, hooks, parameters on an untraced
path or defining units alone, U-Nets, GLUs, einsum, parametrizations. Each must now be
aligned exactly or refused clearly.

The permutations here are written by hand for each model, independently of the engine.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from model_checks import assert_same_function as _same_function
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import PackedSequence

from otfusion.fusion import (
    FusionConfig,
    UnsupportedModelError,
    align,
    build_alignment_graph,
    fuse,
)
from otfusion.fusion.graph import tracer
from otfusion.zoo.llama import rotate_half

EXACT = FusionConfig.from_options(distill_steps=0)


def _perm(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def _within_blocks(blocks: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``blocks * size`` channels that moves whole blocks of ``size``
    and channels within each block."""
    order = _perm(blocks, generator)
    return torch.cat([int(b) * size + _perm(size, generator) for b in order])


def _rows(layer: nn.Module, index: torch.Tensor) -> None:
    """Reorder a layer's output units (weight rows, bias, affine parameters)."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                tensor.copy_(tensor[index])


def _columns(layer: nn.Module, index: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(layer.weight[:, index])


def _aligns_and_fuses_exactly(model: nn.Module, other: nn.Module, permute, x: torch.Tensor,
                              seed: int) -> None:
    """``align(other, model)`` computes ``other``'s function, and ``model`` fused with a
    copy that ``permute`` (written here, not by the engine) permuted computes ``model``'s."""
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)
    copies = [model, permute(model, torch.Generator().manual_seed(seed))]
    _same_function(fuse(copies, config=EXACT, inputs=x), model, x)


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape,
                                                          generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


class CatGroupNorm(nn.Module):
    """Two branches concatenated, then GroupNorm in groups of two channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(5, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y = F.relu(self.norm(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.head(y.mean((2, 3)))


def _permute_cat_group_norm(model: CatGroupNorm, generator: torch.Generator) -> CatGroupNorm:
    model = copy.deepcopy(model)
    pa, pb = _within_blocks(2, 2, generator), _within_blocks(3, 2, generator)
    _rows(model.a, pa)
    _rows(model.b, pb)
    joined = torch.cat([pa, 4 + pb])
    _rows(model.norm, joined)
    _columns(model.head, joined)
    return model


class DenseGroupNorm(nn.Module):
    """DenseNet-style: each layer's output is concatenated to its input, and the
    concatenation of concatenations is normalised in groups of two channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.grow1 = nn.Conv2d(4, 2, 3, padding=1)
        self.norm1 = nn.GroupNorm(3, 6)
        self.grow2 = nn.Conv2d(6, 4, 3, padding=1)
        self.norm2 = nn.GroupNorm(5, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y = self.stem(x)
        y = torch.cat([y, self.grow1(F.relu(y))], dim=1)
        y = F.relu(self.norm1(y))
        y = torch.cat([y, self.grow2(y)], dim=1)
        return self.head(F.relu(self.norm2(y)).mean((2, 3)))


class Straddling(nn.Module):
    """A grouped convolution whose groups straddle the concatenated branches (2 + 6
    channels in groups of 4): no coupling of the branches can keep them whole."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.mix(F.relu(torch.cat([self.a(x), self.b(x)], dim=1))))
        return self.head(y.mean((2, 3)))


class RawWeight(nn.Module):
    """Hidden units made by a matrix parameter multiplied directly: ``h @ W + b``."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.weight = nn.Parameter(0.3 * torch.randn(8, 7))
        self.bias = nn.Parameter(0.1 * torch.randn(7))
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(F.relu(F.relu(self.first(x)) @ self.weight + self.bias))


def _permute_raw_weight(model: RawWeight, generator: torch.Generator) -> RawWeight:
    model = copy.deepcopy(model)
    p, q = _perm(8, generator), _perm(7, generator)
    _rows(model.first, p)
    with torch.no_grad():
        model.weight.copy_(model.weight[p][:, q])
        model.bias.copy_(model.bias[q])
    _columns(model.head, q)
    return model


class BufferScale(nn.Module):
    """A per-channel buffer read through ``view``, as real code scales channels (fx
    bakes buffers into the graph as constants by default; the engine's tracer reads
    them as nodes, so that the channels of the view are aligned)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.register_buffer("scale", torch.rand(6) + 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = F.relu(self.conv(x)) * self.scale.view(1, -1, 1, 1)
        return self.head(y.mean((2, 3)))


class DirectBufferScale(BufferScale):
    """The same, with the buffer stored in the shape it is used in and read directly."""

    def __init__(self):
        super().__init__()
        self.scale = self.scale.view(6, 1, 1).clone()

    def forward(self, x):
        return self.head((F.relu(self.conv(x)) * self.scale).mean((2, 3)))


class AttributeScale(BufferScale):
    """The same, with the scale a plain tensor attribute, outside the state_dict: fx
    bakes it into the graph as a constant, which nothing can permute."""

    def __init__(self):
        super().__init__()
        scale = self.scale
        del self.scale
        self.scale = scale


def _permute_buffer_scale(model: BufferScale, generator: torch.Generator) -> BufferScale:
    model = copy.deepcopy(model)
    p = _perm(6, generator)
    _rows(model.conv, p)
    model.scale.copy_(model.scale[p])
    _columns(model.head, p)
    return model


class ComparisonGate(nn.Module):
    """A ReLU written with a comparison and a logical not, ``h * ~(h <= 0)``, and unary
    operators (``-h``, ``h ** 2``)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.head(h * (~(h <= 0)).float() - h ** 2 + torch.exp(-h))


def _between(first: str, width: int):
    """A permutation helper for models with one hidden layer: ``first``'s output units
    and the head's input columns, ``width`` of them."""
    def permute(model: nn.Module, generator: torch.Generator) -> nn.Module:
        model = copy.deepcopy(model)
        p = _perm(width, generator)
        _rows(getattr(model, first), p)
        _columns(model.head, p)
        return model
    return permute


class TokenScale(nn.Module):
    """(B, T, 6) -> per-token hidden units scaled by a parameter -> pooled over tokens,
    in one of the spellings torch accepts (``variant``)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.s = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        h = F.relu(self.fc(x))
        if self.variant == "other-keyword":
            return self.head(torch.mul(h, other=self.s).mean(1))
        if self.variant == "all-keywords":
            return self.head(torch.add(input=h, other=self.s).mean(1))
        if self.variant == "method-keyword":
            return self.head(h.add(other=self.s).mean(1))
        if self.variant == "axis":
            return self.head((h * self.s).amax(axis=1, keepdim=True).squeeze(1))
        if self.variant in ("chunk-function", "split-function"):
            first, second = (torch.chunk(h * self.s, 2, dim=1) if self.variant == "chunk-function"
                             else torch.split(h * self.s, [2, 3], dim=1))
            return self.head(first.mean(1) - second.mean(1))
        return self.head((h * self.s)[:, [0, -1]].mean(1))  # "list-index"


def _permute_token_scale(model: TokenScale, generator: torch.Generator) -> TokenScale:
    model = copy.deepcopy(model)
    p = _perm(8, generator)
    _rows(model.fc, p)
    with torch.no_grad():
        model.s.copy_(model.s[p])
    _columns(model.head, p)
    return model


class ChannelsMoved(nn.Module):
    """Channels moved last by ``movedim`` with tuples, or flattened by keyword."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        if self.variant == "movedim":
            return self.head(torch.movedim(h, (1, 2), (3, 1)).mean((1, 2)))
        return self.head(torch.flatten(input=h.mean((2, 3), keepdim=True), start_dim=1))


class FunctionalLayers(nn.Module):
    """Layers written with ``F.embedding`` and ``F.linear`` on parameters of the model's
    own: a table whose transpose is also the output layer (tied), and a hidden layer."""

    def __init__(self, variant: str = ""):
        super().__init__()
        self.table = nn.Parameter(torch.randn(11, 8))
        self.weight, self.bias = nn.Parameter(torch.randn(6, 8) / 3), nn.Parameter(torch.randn(6))
        self.back = nn.Linear(6, 8)

    def forward(self, ids):
        h = F.relu(F.linear(F.embedding(ids, self.table), self.weight, self.bias))
        return F.linear(self.back(h), self.table)


def _permute_functional_layers(model: FunctionalLayers, generator: torch.Generator
                               ) -> FunctionalLayers:
    model = copy.deepcopy(model)
    stream, hidden = _perm(8, generator), _perm(6, generator)
    with torch.no_grad():
        model.table.copy_(model.table[:, stream])
        model.weight.copy_(model.weight[hidden][:, stream])
        model.bias.copy_(model.bias[hidden])
    _columns(model.back, hidden)
    _rows(model.back, stream)
    return model


class BagOfWords(nn.Module):
    """A text classifier: an ``nn.EmbeddingBag`` over (batch, tokens) ids, then a head."""

    def __init__(self, variant: str = "mean"):
        super().__init__()
        self.a = nn.EmbeddingBag(20, 8, mode=variant)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(F.relu(self.a(ids)))


def _permute_bag_of_words(model: BagOfWords, generator: torch.Generator) -> BagOfWords:
    model = copy.deepcopy(model)
    p = _perm(8, generator)
    with torch.no_grad():
        model.a.weight.copy_(model.a.weight[:, p])
    _columns(model.head, p)
    return model


class EinsumAttention(nn.Module):
    """Two-head self-attention written with ``torch.einsum`` (letters, or ``...`` over
    batch and heads), and a parameter matrix applied by ``einsum`` and by ``@``."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.q, self.k, self.v, self.proj = (nn.Linear(8, 8) for _ in range(4))
        self.w = nn.Parameter(torch.randn(7, 8) / 3)

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        h = F.relu(self.inp(x))
        q, k, v = (layer(h).view(b, t, 2, 4) for layer in (self.q, self.k, self.v))
        if self.variant == "letters":
            scores = torch.einsum("b t h d, b s h d -> b h t s", q, k).softmax(-1)
            y = torch.einsum("bhts,bshd->bthd", scores, v)
        else:
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))
            scores = torch.einsum("...td,...sd->...ts", q, k).softmax(-1)
            y = torch.einsum("...ts,...sd->...td", scores, v).transpose(1, 2)
        z = h + self.proj(y.reshape(b, t, 8))
        return self.head(F.relu(torch.einsum("btd,od->bto", z, self.w) @ self.w)).mean(1)


def _permute_einsum_attention(model: EinsumAttention, generator: torch.Generator
                              ) -> EinsumAttention:
    model = copy.deepcopy(model)
    stream, heads, outer = _perm(8, generator), _perm(2, generator), _perm(7, generator)
    qk, vo = _perm(4, generator), _perm(4, generator)
    qk = torch.cat([int(h) * 4 + qk for h in heads])  # heads move whole, Q and K alike
    vo = torch.cat([int(h) * 4 + vo for h in heads])
    _rows(model.inp, stream)
    for layer, units in ((model.q, qk), (model.k, qk), (model.v, vo)):
        _columns(layer, stream)
        _rows(layer, units)
    _columns(model.proj, vo)
    _rows(model.proj, stream)
    with torch.no_grad():
        model.w.copy_(model.w[outer][:, stream])
    _columns(model.head, stream)
    return model


class Parametrized(nn.Module):
    """Layers under ``torch.nn.utils.parametrizations``: weight_norm (magnitude and
    direction in the state) or spectral_norm (the weight and power-iteration vectors)
    on a Linear and a Conv1d."""

    def __init__(self, variant: str):
        super().__init__()
        wrap = getattr(nn.utils.parametrizations, variant)
        self.a, self.head = wrap(nn.Linear(6, 8)), nn.Linear(5, 3)
        self.c = wrap(nn.Conv1d(8, 5, 3, padding=1))

    def forward(self, x):
        h = F.relu(self.a(x)).transpose(1, 2)
        return self.head(F.relu(self.c(h)).mean(2))


def _permute_parametrized(model: Parametrized, generator: torch.Generator) -> Parametrized:
    model = copy.deepcopy(model)
    hidden, channels = _perm(8, generator), _perm(5, generator)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.startswith("a.") and not name.endswith("_v"):  # _v: the input's
                tensor.copy_(tensor[hidden])
            elif name.endswith("c.parametrizations.weight.0._v"):  # inputs x kernel
                tensor.copy_(tensor[(3 * hidden[:, None] + torch.arange(3)).flatten()])
            elif name.startswith("c."):
                tensor.copy_(tensor[channels][:, hidden] if tensor.shape[1:2] == (8,) else
                             tensor[channels])
    _columns(model.head, channels)
    return model


class FrequencyFeatures(nn.Module):
    """NeRF's positional encoding: inputs times a buffer of frequencies, through sin,
    then a Linear."""

    def __init__(self, variant: str = ""):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(4))
        self.a, self.head = nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.a(torch.sin((x[..., None] * self.freqs).flatten(-2)))))


class GroupedWeightNorm(nn.Module):
    """weight_norm on a convolution of two groups: its magnitude per output channel
    moves with the channels' blocks."""

    def __init__(self, variant: str = ""):
        super().__init__()
        self.a, self.head = nn.Conv1d(3, 8, 1), nn.Linear(8, 3)
        self.grouped = nn.utils.parametrizations.weight_norm(
            nn.Conv1d(8, 8, 3, padding=1, groups=2))

    def forward(self, x):
        return self.head(F.relu(self.grouped(F.relu(self.a(x)))).mean(2))


def _permute_grouped_weight_norm(model: GroupedWeightNorm, generator: torch.Generator
                                 ) -> GroupedWeightNorm:
    model = copy.deepcopy(model)
    blocks, inner, outer = _perm(2, generator), _perm(4, generator), _perm(4, generator)
    channels = torch.cat([int(b) * 4 + inner for b in blocks])  # the same in both blocks
    out = torch.cat([int(b) * 4 + outer for b in blocks])  # output blocks follow inputs
    _rows(model.a, channels)
    with torch.no_grad():
        for tensor in model.grouped.state_dict().values():
            tensor.copy_(tensor[out][:, inner] if tensor.shape[1:2] == (4,) else tensor[out])
    _columns(model.head, out)
    return model


class BufferMixer(nn.Module):
    """Positions mixed by a matrix built in ``forward`` from a buffer
    (``torch.triu(self.mix) @ h``)."""

    def __init__(self, variant: str = ""):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("mix", torch.randn(5, 5))

    def forward(self, x):
        return self.head(F.relu(torch.triu(self.mix) @ self.a(x)).mean(1))


class GatedLinearUnits(nn.Module):
    """A GLU over a layer's outputs (a gated convolution or MLP), as a function or a
    module."""

    def __init__(self, variant: str):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 2 * 5), nn.Linear(5, 3)
        self.glu = nn.GLU(dim=-1) if variant == "module" else None

    def forward(self, x):
        h = self.fc(x)
        return self.head(self.glu(h) if self.glu is not None else F.glu(h, dim=1))


def _permute_glu(model: GatedLinearUnits, generator: torch.Generator) -> GatedLinearUnits:
    model = copy.deepcopy(model)
    p = _perm(5, generator)
    _rows(model.fc, torch.cat([p, 5 + p]))  # the value and its gate move together
    _columns(model.head, p)
    return model


class TinyUNet(nn.Module):
    """Encoder, decoder and skip connection, upsampled by a transposed convolution or by
    resampling then a 1x1 convolution (``variant``); the decoder's channels are
    L2-normalised."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.enc1, self.enc2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.up = (nn.ConvTranspose2d(8, 5, 2, stride=2) if variant == "transposed"
                   else nn.Conv2d(8, 5, 1))
        self.resample = nn.Upsample(scale_factor=2)
        self.dec, self.out = nn.Conv2d(11, 7, 3, padding=1), nn.Conv2d(7, 2, 1)

    def forward(self, x):
        e1 = F.relu(self.enc1(x))
        e2 = F.relu(self.enc2(F.max_pool2d(e1, 2)))
        if self.variant == "transposed":
            u = self.up(e2)
        elif self.variant == "upsample":
            u = self.up(self.resample(e2))
        else:
            u = self.up(F.interpolate(e2, scale_factor=2.0, mode="bilinear"))
        d = F.relu(self.dec(torch.cat([u, e1], dim=1)))
        return self.out(F.normalize(d, dim=1))


def _permute_unet(model: TinyUNet, generator: torch.Generator) -> TinyUNet:
    model = copy.deepcopy(model)
    p1, p2, p3, p4 = (_perm(n, generator) for n in (6, 8, 5, 7))
    _rows(model.enc1, p1)
    _columns(model.enc2, p1)
    _rows(model.enc2, p2)
    with torch.no_grad():
        if model.variant == "transposed":  # weight (in, out, kh, kw)
            model.up.weight.copy_(model.up.weight[p2][:, p3])
            model.up.bias.copy_(model.up.bias[p3])
        else:
            _columns(model.up, p2)
            _rows(model.up, p3)
    _columns(model.dec, torch.cat([p3, 5 + p1]))
    _rows(model.dec, p4)
    _columns(model.out, p4)
    return model


_TOKEN_SCALES = ("other-keyword", "all-keywords", "method-keyword", "axis", "list-index",
                 "chunk-function", "split-function")


@pytest.mark.parametrize("factory, permute, variant, inputs", [
    *((TokenScale, _permute_token_scale, v, torch.randn(16, 5, 6)) for v in _TOKEN_SCALES),
    *((ChannelsMoved, _between("conv", 6), v, torch.randn(16, 3, 8, 8))
      for v in ("movedim", "flatten")),
    *((TinyUNet, _permute_unet, v, torch.randn(8, 3, 8, 8))
      for v in ("transposed", "upsample", "interpolate")),
    *((GatedLinearUnits, _permute_glu, v, torch.randn(16, 6)) for v in ("function", "module")),
    (BufferMixer, _between("a", 8), "", torch.randn(16, 5, 6)),
    (FunctionalLayers, _permute_functional_layers, "", torch.randint(0, 11, (16, 5))),
    *((BagOfWords, _permute_bag_of_words, v, torch.randint(0, 20, (16, 7)))
      for v in ("mean", "max")),
    *((EinsumAttention, _permute_einsum_attention, v, torch.randn(16, 5, 6))
      for v in ("letters", "ellipsis")),
    *((Parametrized, _permute_parametrized, v, torch.randn(16, 7, 6))
      for v in ("weight_norm", "spectral_norm")),
    (FrequencyFeatures, _between("a", 8), "", torch.randn(16, 3)),
    (GroupedWeightNorm, _permute_grouped_weight_norm, "", torch.randn(16, 3, 5)),
], ids=[*_TOKEN_SCALES, "movedim-tuples", "flatten-by-keyword", "unet-transposed-conv",
        "unet-upsample", "unet-interpolate", "glu-function", "glu-module", "buffer-mixer",
        "functional-layers", "embedding-bag-mean", "embedding-bag-max", "einsum-letters",
        "einsum-ellipsis", "weight-norm", "spectral-norm", "frequency-features",
        "grouped-weight-norm"])
def test_idioms_once_misread_or_refused_are_aligned(factory, permute, variant, inputs):
    """Each was once read wrongly, crashed or was refused: a keyword operand left
    unpermuted, ``axis=`` taken for all dimensions, a list index dropping the dimension
    it keeps, ``movedim`` by tuples and ``flatten(input=...)`` failing with internal
    errors, transposed convolutions, resampling, ``F.normalize``, GLUs, ``F.linear``,
    ``F.embedding``, ``nn.EmbeddingBag``, ``torch.einsum`` and parametrizations
    refused."""
    model = _built(lambda: factory(variant), 0)
    copies = [permute(model, torch.Generator().manual_seed(k)) for k in (1, 2)]
    for copied in copies:
        _same_function(copied, model, inputs)
    _same_function(fuse([model, *copies], [1, 1, 1], config=EXACT, inputs=inputs), model,
                   inputs)
    b = _built(lambda: factory(variant), 1)
    _same_function(align(b, model, config=EXACT, inputs=inputs), b, inputs)


class AttentionPooling(nn.Module):
    """A text classifier's attention pooling: one score per step (a Linear to one unit)
    weighs every hidden unit, then the steps are summed; and a gate of one unit."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.score = nn.Linear(8, 1)
        self.gate = nn.Linear(8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        pooled = (torch.softmax(self.score(h), dim=1) * h).sum(dim=1)
        return self.head(pooled * torch.sigmoid(self.gate(pooled)))


def _permute_attention_pooling(model: AttentionPooling, generator: torch.Generator
                               ) -> AttentionPooling:
    model = copy.deepcopy(model)
    p = _perm(8, generator)
    _rows(model.hidden, p)
    for layer in (model.score, model.gate, model.head):
        _columns(layer, p)
    return model


class RawFirstLayer(nn.Module):
    """The first layer written by hand on the input: ``x @ W + b``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(6, 8))
        self.bias = nn.Parameter(0.1 * torch.randn(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(x @ self.weight + self.bias))


def _permute_raw_first_layer(model: RawFirstLayer, generator: torch.Generator
                             ) -> RawFirstLayer:
    model = copy.deepcopy(model)
    p = _perm(8, generator)
    with torch.no_grad():
        model.weight.copy_(model.weight[:, p])
        model.bias.copy_(model.bias[p])
    _columns(model.head, p)
    return model


class StackedBranches(nn.Module):
    """Two branches stacked on a new last axis, mixed by a Linear(2, 1), squeezed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)
        self.mix = nn.Linear(2, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        both = torch.stack([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1)
        return self.head(self.mix(both).squeeze(-1))


def _permute_stacked_branches(model: StackedBranches, generator: torch.Generator
                              ) -> StackedBranches:
    model = copy.deepcopy(model)
    p = _perm(5, generator)
    _rows(model.a, p)
    _rows(model.b, p)
    _columns(model.head, p)
    return model


class TransposedWeights(nn.Module):
    """Weights used by hand, transposed: a raw parameter and a Linear's own weight."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.weight = nn.Parameter(0.3 * torch.randn(7, 8))
        self.second = nn.Linear(7, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(F.relu(self.first(x)) @ self.weight.T)
        return self.head(torch.tanh(h @ self.second.weight.t() + self.second.bias))


def _permute_transposed_weights(model: TransposedWeights, generator: torch.Generator
                                ) -> TransposedWeights:
    model = copy.deepcopy(model)
    p, q, r = _perm(8, generator), _perm(7, generator), _perm(5, generator)
    _rows(model.first, p)
    with torch.no_grad():
        model.weight.copy_(model.weight[q][:, p])
    _columns(model.second, q)
    _rows(model.second, r)
    _columns(model.head, r)
    return model


class ChannelProduct(nn.Module):
    """Hidden channels multiplied with the input by a batched product over the channel
    axis (channel i of one with channel i of the other): they cannot be permuted."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head((F.relu(self.conv(x)) @ x).mean((2, 3)))


class LanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, tokens):
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def _language_model(seed: int, tied: bool) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel()
    if tied:
        model.head.weight = model.embed.weight  # tied by assignment, as users do
    return model.eval()


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _built(factory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_norms(factory(), seed)


@pytest.mark.parametrize("factory, permute, inputs", [
    (CatGroupNorm, _permute_cat_group_norm, _images()),
    (RawWeight, _permute_raw_weight, torch.randn(16, 6)),
    (DirectBufferScale, _permute_buffer_scale, _images()),
    (BufferScale, _permute_buffer_scale, _images()),
    (ComparisonGate, _between("a", 8), torch.randn(16, 6)),
    (AttentionPooling, _permute_attention_pooling, torch.randn(16, 5, 6)),
    (RawFirstLayer, _permute_raw_first_layer, torch.randn(16, 6)),
    (StackedBranches, _permute_stacked_branches, torch.randn(16, 6)),
    (TransposedWeights, _permute_transposed_weights, torch.randn(16, 6)),
], ids=["cat-groupnorm", "raw-weight", "buffer", "buffer-view", "comparison-gate",
        "attention-pooling", "raw-first-layer", "stacked-branches", "transposed-weights"])
def test_fused_permuted_copies_keep_the_function(factory, permute, inputs):
    model = _built(factory, 0)
    generator = torch.Generator().manual_seed(1)
    copies = [permute(model, generator).eval() for _ in range(2)]
    for copied in copies:
        _same_function(copied, model, inputs)  # the hand-written permutation is exact
    fused = fuse([model, *copies], [1, 1, 1], config=EXACT, inputs=inputs)
    _same_function(fused, model, inputs)


@pytest.mark.parametrize("factory, inputs", [
    (CatGroupNorm, _images()), (DenseGroupNorm, _images()), (RawWeight, torch.randn(16, 6)),
    (DirectBufferScale, _images()), (BufferScale, _images()),
    (ComparisonGate, torch.randn(16, 6)),
    (AttentionPooling, torch.randn(16, 5, 6)), (RawFirstLayer, torch.randn(16, 6)),
    (TransposedWeights, torch.randn(16, 6)), (ChannelProduct, torch.randn(16, 3, 8, 8)),
], ids=["cat-groupnorm", "dense-groupnorm", "raw-weight", "buffer", "buffer-view",
        "comparison-gate", "attention-pooling", "raw-first-layer", "transposed-weights",
        "channel-product"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_align_keeps_the_function(factory, inputs, seed):
    a, b = _built(factory, 0), _built(factory, seed)
    _same_function(align(b, a, config=EXACT, inputs=inputs), b, inputs)


def test_aligning_concatenated_channels_keeps_group_norm_groups_whole():
    """GroupNorm's groups after the concatenation map onto groups: each branch's
    coupling moves pairs of channels, never one channel across two groups."""
    a, b = _built(CatGroupNorm, 0), _built(CatGroupNorm, 5)
    aligned = align(b, a, config=EXACT, inputs=_images())
    order = [int(torch.nonzero(aligned.norm.weight == w).flatten()[0])
             for w in b.norm.weight.detach()]
    pairs = {frozenset(order[i:i + 2]) for i in range(0, 10, 2)}
    assert pairs == {frozenset((i, i + 1)) for i in range(0, 10, 2)}


def test_a_tensor_baked_into_the_graph_is_refused():
    """A plain tensor attribute is a constant of the fx graph: fusing it as data would
    average the clients' channels unaligned (permuted copies fused into another
    function)."""
    model = _built(AttributeScale, 0)
    copies = [_permute_buffer_scale(model, torch.Generator().manual_seed(k)) for k in (1, 2)]
    with pytest.raises(UnsupportedModelError, match="plain tensor attribute"):
        fuse([model, *copies], [1, 1, 1], config=EXACT, inputs=_images())


def test_groups_straddling_concatenated_branches_are_refused():
    a, b = _built(Straddling, 0), _built(Straddling, 1)
    with pytest.raises(UnsupportedModelError, match="concatenation"):
        align(b, a, config=EXACT, inputs=_images())


@pytest.mark.parametrize("first", [True, False], ids=["tied-first", "untied-first"])
def test_graph_cache_tells_tied_weights_from_untied_ones(first):
    tokens = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(0))
    tracer._GRAPHS.clear()
    for tied in (first, not first):
        a, b = _language_model(0, tied), _language_model(1, tied)
        _same_function(align(b, a, config=EXACT, inputs=tokens), b, tokens)


class InPlaceTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x)
        h.transpose_(1, 2)  # (B, 8, T): the variable now holds the transposed tensor
        return self.head(h).mean((1, 2))


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("gain", torch.rand(8) + 0.5)
        self.fc.register_forward_hook(lambda module, inputs, out: out * self.gain)

    def forward(self, x):
        return self.head(F.relu(self.fc(x)))


class AuxiliaryHead(nn.Module):
    """GoogLeNet-style: a second head read only in training mode."""

    def __init__(self):
        super().__init__()
        self.fc, self.head, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


@pytest.mark.parametrize("factory, inputs, match", [
    (InPlaceTranspose, torch.randn(8, 5, 6), "transpose_"),
    (Hooked, torch.randn(8, 6), "module 'fc' has a forward hook"),
    (AuxiliaryHead, torch.randn(8, 6), r"does not use aux\.weight, aux\.bias \(traced in eval"),
], ids=["in-place-transpose", "forward-hook", "auxiliary-head-in-eval-mode"])
def test_what_the_trace_cannot_see_is_refused(factory, inputs, match):
    """An in-place reshape leaves the old variable's layout stale; fx leaves hooks out of
    the graph; parameters on an untraced path would be averaged unaligned."""
    a, b = _built(factory, 0), _built(factory, 1)
    with pytest.raises(UnsupportedModelError, match=match):
        align(b, a, config=EXACT, inputs=inputs)


def test_an_auxiliary_head_is_aligned_when_fused_in_training_mode():
    x = torch.randn(8, 6)
    a, b = _built(AuxiliaryHead, 0).train(), _built(AuxiliaryHead, 1).train()
    aligned = align(b, a, config=EXACT, inputs=x).train()
    with torch.no_grad():
        for got, expected in zip(aligned(x), b(x), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_legacy_weight_norm_is_refused_by_name():
    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        model[0] = nn.utils.weight_norm(model[0])
        return model.eval()

    with pytest.raises(UnsupportedModelError, match="module '0' has a forward hook or pre-hook "
                       r"\(the legacy torch.nn.utils.weight_norm"):
        fuse([build(0), build(1)], [1, 1], config=EXACT, inputs=torch.randn(4, 6))


def test_a_model_of_two_inputs_is_refused_by_name():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 5), nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x, extra):
            return self.head(F.relu(self.a(x) + self.b(extra)))

    with pytest.raises(UnsupportedModelError, match=r"more than one input \(also extra\)"):
        fuse([TwoInputs(), TwoInputs()], [1, 1], config=EXACT, inputs=torch.randn(4, 6))


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(6, 4) for _ in range(4))
        self.low = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 3)


class CatPlusCat(_Pair):
    def forward(self, x):
        left = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(F.relu(left + torch.cat([self.c(x), self.d(x)], dim=1)))


class ClampByParameter(_Pair):
    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1).clamp(min=self.low))


class SlicedScale(_Pair):
    """A per-unit scale cut from a longer parameter: its entries are picked by position,
    so they cannot follow the units. (Its parameter was once as long as the cut, which
    a cut that keeps every entry now fuses.)"""

    def __init__(self):
        super().__init__()
        self.low = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1) * self.low[:x.size(1) + 2])


class SlicedTable(nn.Module):
    """A table outside the state_dict (a non-persistent buffer) cut to the input's
    length and added to hidden units."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("table", torch.randn(12, 8), persistent=False)

    def forward(self, x):
        return self.head(F.relu(self.a(x) + self.table[:x.size(0)]))


class NonStateScale(nn.Module):
    """A per-unit scale outside the state_dict, reached in ways that once slipped past
    the check: through ``type_as``, ``expand_as`` or a product with a parameter."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.w = nn.Parameter(torch.rand(8))
        self.register_buffer("s", torch.rand(8) + 0.5, persistent=False)

    def forward(self, x):
        h = F.relu(self.a(x))
        if self.variant == "type_as":
            return self.head(h * self.s.type_as(h))
        if self.variant == "expand_as":
            return self.head(h * self.s.expand_as(h))
        return self.head(h * (self.s * self.w))


class Latents(nn.Module):
    """Perceiver-style learned latents fed straight into a Linear."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(4, 6))
        self.a, self.q, self.head = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.a(x)) * F.relu(self.q(self.latents)).mean(0))


class Orthogonal(nn.Module):
    """An orthogonal parametrization: the weight is computed from its original through a
    matrix exponential, which mixes units."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.mix = nn.utils.parametrizations.orthogonal(nn.Linear(8, 8))

    def forward(self, x):
        return self.head(self.mix(F.relu(self.a(x))))


class SpectralNormTransposed(nn.Module):
    """spectral_norm on a transposed convolution runs along its output channels
    (``dim=1``)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 5), nn.Linear(5, 3)
        self.up = nn.utils.parametrizations.spectral_norm(nn.ConvTranspose1d(5, 5, 2))

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.a(x)).unsqueeze(2))).mean(2))


class ConcatenatedAndSplit(nn.Module):
    """A layer's outputs concatenated with others and also split in halves."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(6, 4), nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x)
        first, second = h.chunk(2, dim=1)
        return self.head(torch.cat([torch.cat([h, self.b(x)], 1), first * second], 1))


class VectorWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.w = nn.Linear(6, 8), nn.Parameter(torch.randn(8))

    def forward(self, x):
        return F.linear(F.relu(self.a(x)), self.w)[:, None]


class ComputedWeight(nn.Module):
    """Layers that compute their weight in ``forward`` from one parameter of its shape,
    unit by unit (once refused: units that only parameters define): ``"gain"``,
    StyleGAN's equalised learning rate, ``F.linear(x, self.w * self.scale)``;
    ``"weight-norm"``, a weight norm by hand; ``"standardized"``, a weight-standardized
    convolution (with GroupNorm, a recipe for non-IID federated learning); ``"masked"``,
    a convolution masked by a buffer of its shape (PixelCNN's); ``"direct"``,
    ``F.conv2d`` on a parameter; ``"subclass"``, an ``nn.Conv2d`` subclass whose own
    ``forward`` calls its parent's (fx traces it down to ``F.conv2d``)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind in ("gain", "weight-norm"):
            self.w, self.scale = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.rand(8, 1))
        else:
            self.w = nn.Parameter(torch.randn(8, 3, 3, 3) / 3)
            self.register_buffer("mask", (torch.rand(8, 3, 3, 3) > 0.3).float())
            self.conv = _SubclassConv(8, 5, 3, padding=1)
            self.norm = nn.GroupNorm(4, 8)
        self.head = nn.Linear(8 if kind in ("gain", "weight-norm") else 5, 3)

    def forward(self, x):
        if self.kind == "gain":
            return self.head(F.relu(F.linear(x, self.w * self.scale)))
        if self.kind == "weight-norm":
            w = self.scale * self.w / self.w.norm(dim=1, keepdim=True)
            return self.head(F.relu(F.linear(x, w)))
        w = {"standardized": lambda w: (w - w.mean((1, 2, 3), keepdim=True))
             / (w.std((1, 2, 3), keepdim=True) + 1e-5),
             "masked": lambda w: w * self.mask, "direct": lambda w: w,
             "subclass": lambda w: w}[self.kind](self.w)
        h = F.relu(self.norm(F.conv2d(x, w, None, 1, 1)))
        return self.head(F.relu(self.conv(h)).mean((2, 3)))


class _SubclassConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def _permute_computed_weight(model: ComputedWeight, generator: torch.Generator):
    model = copy.deepcopy(model)
    with torch.no_grad():
        if model.kind in ("gain", "weight-norm"):
            p = _perm(8, generator)
            model.w.copy_(model.w[p])
            model.scale.copy_(model.scale[p])
            _columns(model.head, p)
            return model
        p = _within_blocks(4, 2, generator)  # GroupNorm(4, 8) moves groups of two
        model.w.copy_(model.w[p])
        model.mask.copy_(model.mask[p])
        _rows(model.norm, p)
        _columns(model.conv, p)
        q = _perm(5, generator)
        _rows(model.conv, q)
        _columns(model.head, q)
    return model


@pytest.mark.parametrize("kind", ["gain", "weight-norm", "standardized", "masked", "direct",
                                  "subclass"])
def test_weights_computed_in_forward_keep_the_function(kind):
    x = torch.randn(16, 6) if kind in ("gain", "weight-norm") else _images()
    model, other = (_built(lambda: ComputedWeight(kind), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_computed_weight, x, 6)


class StandardizedGrayscale(nn.Module):
    """A weight-standardized first convolution on one input channel (once refused: the
    input axis of size one was taken for a computed axis)."""

    def __init__(self):
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(8, 1, 3, 3)), nn.Linear(8, 3)

    def forward(self, x):
        w = (self.w - self.w.mean((1, 2, 3), keepdim=True)) / (
            self.w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self.head(F.relu(F.conv2d(x, w, padding=1)).mean((2, 3)))


class KernelAxisElsewhere(nn.Module):
    """A convolution's weight computed from ``v`` with its kernel axis reduced away,
    while that axis of ``v`` meets hidden units elsewhere (once a wrong function: the
    axis was dropped from ``v``'s description, so it was not permuted)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(16, 3)
        self.v = nn.Parameter(torch.randn(8, 8, 8, 1) / 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        w = self.v.amax(2, keepdim=True).expand_as(self.v)
        y = torch.relu(F.conv2d(h, w, None, padding=(4, 0))).mean((2, 3))
        return self.head(torch.cat([y, h.mean((2, 3)) + self.v.sum((0, 1, 3))], 1))


@pytest.mark.parametrize("factory, x", [
    (StandardizedGrayscale, torch.randn(16, 1, 8, 8)), (KernelAxisElsewhere, _images())],
    ids=["grayscale", "kernel-axis-elsewhere"])
def test_odd_computed_weights_keep_the_function(factory, x):
    model, other = (_built(factory, seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class BooleanMask(nn.Module):
    """A buffer of booleans on hidden units: a mask of them, or of a weight computed
    from a parameter (once a wrong function: the mask was neither averaged nor
    permuted, the template's was kept)."""

    def __init__(self, on_weight: bool):
        super().__init__()
        self.on_weight = on_weight
        self.fc1, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        if on_weight:
            self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.register_buffer("m", torch.rand((8, 8) if on_weight else (8,)) > 0.5)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.on_weight:
            return self.head(F.relu(F.linear(h, self.w.masked_fill(self.m, 0.0))))
        return self.head(h.masked_fill(self.m, 0.0))


@pytest.mark.parametrize("on_weight", [False, True], ids=["units", "weight"])
def test_a_boolean_buffer_on_aligned_units_is_refused(on_weight):
    model, other = (_built(lambda: BooleanMask(on_weight), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="'m' .*bool.* meets aligned units"):
        align(other, model, config=EXACT, inputs=torch.randn(16, 6))


class MixedWeight(nn.Module):
    """A weight computed from two parameters of its shape, or with its units reordered:
    refused."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.w, self.v = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8, 6))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        w = self.w + self.v if self.kind == "sum" else self.w.flip(0)
        return self.head(F.relu(F.linear(x, w)))


@pytest.mark.parametrize("kind, match", [("sum", "units that only parameters define"),
                                         ("flip", "would flip the units themselves")])
def test_weights_computed_otherwise_are_refused(kind, match):
    model = _built(lambda: MixedWeight(kind), 0)
    with pytest.raises(UnsupportedModelError, match=match):
        fuse([model, model], config=EXACT, inputs=torch.randn(16, 6))


def test_a_grouped_convolution_called_as_a_function_is_refused():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.head = nn.Parameter(torch.randn(8, 1, 3, 3)), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(F.conv2d(x, self.w, groups=2).mean((2, 3)))

    model = _built(Grouped, 0)
    with pytest.raises(UnsupportedModelError, match="grouped convolution called as a function"):
        fuse([model, model], config=EXACT, inputs=torch.randn(16, 2, 8, 8))


class LearnedMemory(nn.Module):
    """Learned memory tokens as the keys and values of an attention."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.memory = nn.Parameter(torch.randn(1, 4, 8))
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.a(x).unsqueeze(1)  # one query per example
        memory = self.memory.expand(x.shape[0], -1, -1)
        return self.head(self.attention(h, memory, memory, need_weights=False)[0].mean(1))


class GateAndWhole(nn.Module):
    """A GLU's input also used whole afterwards."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.head(torch.cat([F.glu(h), F.glu(h)], dim=1) + h)


@pytest.mark.parametrize("factory, match", [
    *((lambda v=v: NonStateScale(v), "outside the model's state_dict")
      for v in ("type_as", "expand_as", "times-parameter")),
    (Latents, "units that only parameters define"),
    (LearnedMemory, "units that only parameters define"),
    (GateAndWhole, "split into pieces .* and also used whole"),
    (Orthogonal, "type ParametrizedLinear is not supported"),
    (SpectralNormTransposed, "parametrized along another axis than its first"),
    (ConcatenatedAndSplit, "split into pieces .* and also used whole"),
    (VectorWeight, "F.linear with a weight that is not a matrix"),
    (CatPlusCat, "two concatenations are added"),
    (ClampByParameter, "takes a second tensor"),
    (SlicedScale, "picks entries of a parameter or buffer by position"),
    (SlicedTable, "outside the model's state_dict"),
], ids=["non-state-type-as", "non-state-expand-as", "non-state-times-parameter", "latents",
        "learned-memory", "gate-and-whole", "orthogonal",
        "spectral-norm-transposed", "concatenated-and-split", "vector-weight", "cat-plus-cat",
        "clamp-by-parameter", "sliced-scale", "sliced-table"])
def test_ops_that_would_leave_units_unaligned_are_refused(factory, match):
    a, b = _built(factory, 0), _built(factory, 1)
    with pytest.raises(UnsupportedModelError, match=match):
        align(b, a, config=EXACT, inputs=torch.randn(8, 6))


class ScaledByAttribute(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width), persistent=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.hidden(x)) * self.scale)


def test_graph_cache_tells_tensors_outside_the_state_apart():
    """A per-unit non-persistent buffer cannot be permuted (refused); a graph traced
    for one of width 1 (a scalar: fine) must not be reused for it."""
    x = torch.randn(8, 6)
    tracer._GRAPHS.clear()
    a, b = _built(lambda: ScaledByAttribute(1), 0), _built(lambda: ScaledByAttribute(1), 1)
    _same_function(align(b, a, config=EXACT, inputs=x), b, x)
    a, b = _built(lambda: ScaledByAttribute(8), 0), _built(lambda: ScaledByAttribute(8), 1)
    with pytest.raises(UnsupportedModelError, match="outside the model's state_dict"):
        align(b, a, config=EXACT, inputs=x)


class PerHeadMask(nn.Module):
    """Attention with a mask per batch entry and head (ALiBi-style, ``(B * H, T, T)``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.register_buffer("mask", torch.randn(2 * 2, 5, 5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        out, _ = self.attention(h, h, h, attn_mask=self.mask)
        return self.head(out.mean(1))


class PerHeadWeights(nn.Module):
    """Attention whose per-head weights are used downstream: unpacked, read as ``r[-1]``
    (the heads came back in another order, d = 0.16), or returned with the whole result
    (``read`` names which); or left unused (``"unused"``)."""

    def __init__(self, read: str = "unpacked"):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8 if read in ("unused", "whole") else 5, 3)
        self.read = read

    def forward(self, x):
        h = self.embed(x)
        result = self.attention(h, h, h, average_attn_weights=False)
        if self.read == "unused":
            out, _ = result
            return self.head(out.mean(1))
        if self.read == "whole":
            return self.head(result[0].mean(1)), result
        weights = result[1] if self.read == "unpacked" else result[-1]
        return self.head(weights[:, 0].mean(1))


class StackedStatesJoined(nn.Module):
    """A two-layer LSTM's stacked h_n and c_n concatenated before one layer is picked
    (crashed with a TypeError)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        _, (h, c) = self.rnn(x)
        return self.head(torch.cat([h, c], dim=2)[-1])


class ReshapedStates(nn.Module):
    """A two-layer GRU whose stacked final states are reshaped, not indexed."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        _, states = self.rnn(x)
        return self.head(states.permute(1, 0, 2).flatten(1))


@pytest.mark.parametrize("factory, match", [
    (PerHeadMask, "mask per head"), (PerHeadWeights, "per-head attention weights"),
    (lambda: PerHeadWeights("last"), "per-head attention weights"),
    (lambda: PerHeadWeights("whole"), "per-head attention weights"),
    (ReshapedStates, "stacked hidden states"), (StackedStatesJoined, "stacked hidden states"),
], ids=["per-head-mask", "per-head-weights", "per-head-weights-last", "per-head-weights-whole",
        "reshaped-states", "stacked-states-joined"])
def test_heads_and_stacked_states_that_would_not_move_are_refused(factory, match):
    x = torch.randn(2, 5, 4)
    a, b = _built(factory, 0), _built(factory, 1)
    with pytest.raises(UnsupportedModelError, match=match):
        align(b, a, config=EXACT, inputs=x)


_NORMALISERS = {
    "softmax-method": lambda h, dim: h.softmax(dim),
    "F.softmax": lambda h, dim: F.softmax(h, dim=dim),
    "log-softmax": lambda h, dim: torch.log_softmax(h, dim),
    "softmax-module": None,  # an nn.Softmax the model holds
    "F.normalize": lambda h, dim: F.normalize(h, dim=dim),
}


class HeadsNormalised(nn.Module):
    """A layer's 8 outputs viewed as 2 heads of 4 units, normalised along the units of
    each head (``dim=2``) or across the heads (``dim=1``: ResNeSt's radix softmax,
    talking heads), then read whole."""

    def __init__(self, how: str = "softmax-method", dim: int = 2):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.how, self.dim = how, dim
        self.softmax = nn.Softmax(dim) if _NORMALISERS[how] is None else None

    def forward(self, x):
        h = self.a(x).view(x.shape[0], 2, 4)
        h = self.softmax(h) if self.softmax is not None else _NORMALISERS[self.how](h, self.dim)
        return self.head(h.flatten(1))


def _permute_heads_normalised(model: HeadsNormalised, generator: torch.Generator):
    """Whole heads moved, and the units within each head by a permutation of its own."""
    model = copy.deepcopy(model)
    p = _within_blocks(2, 4, generator)
    _rows(model.a, p)
    _columns(model.head, p)
    return model


@pytest.mark.parametrize("how", list(_NORMALISERS))
def test_normalising_within_heads_keeps_the_function(how):
    x = torch.randn(16, 6)
    model = _built(lambda: HeadsNormalised(how, dim=2), 0)
    other = _built(lambda: HeadsNormalised(how, dim=2), 1)
    _aligns_and_fuses_exactly(model, other, _permute_heads_normalised, x, 3)


@pytest.mark.parametrize("how", list(_NORMALISERS))
def test_normalising_across_heads_is_refused(how):
    """Across heads, unit u of every head is combined, but each head's units are
    coupled on their own: aligned, the model computed another function (relative
    difference 0.19-0.42)."""
    a, b = (_built(lambda: HeadsNormalised(how, dim=1), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="normalises across heads"):
        align(b, a, config=EXACT, inputs=torch.randn(8, 6))


def test_per_head_attention_weights_left_unused_are_aligned():
    x = torch.randn(8, 5, 4)
    a, b = (_built(lambda: PerHeadWeights("unused"), seed) for seed in (0, 1))
    _same_function(align(b, a, config=EXACT, inputs=x), b, x)


class NormalisedByComputedDim(nn.Module):
    """A softmax along a dimension computed in ``forward`` (a traced value, not a
    number), and one of a 0-dimensional tensor; both crashed the rule once."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.head(h.softmax(h.dim() - 1)) * torch.softmax(h.sum(), 0)


def test_a_softmax_along_a_computed_dimension_keeps_the_function():
    x = torch.randn(16, 6)
    model = _built(NormalisedByComputedDim, 0)
    _same_function(fuse([model, _between("a", 8)(model, torch.Generator().manual_seed(2))],
                        config=EXACT, inputs=x), model, x)


class ComputedDimensions(nn.Module):
    """Dimensions computed in ``forward`` from shapes, in every op that takes one: a
    reduction over one crashed the tracer once (a sum over ``h.dim() - 1``)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv(x))  # (N, 8, T): channels on dimension 1
        last = h.dim() - 1
        pooled = h.sum(last) + h.amax(dim=h.ndim - 1, keepdim=True).squeeze(last)
        tokens = h.permute(0, last, 1).unsqueeze(x.dim()).flatten(x.dim() - 1)  # (N, T, 8)
        gate = torch.cat([pooled.unsqueeze(1), tokens], dim=tokens.dim() - 2)
        return self.head(gate.transpose(1, tokens.dim() - 1).mean(-1))


def _permute_computed_dimensions(model: ComputedDimensions, generator: torch.Generator):
    model = copy.deepcopy(model)
    p = _perm(8, generator)
    _rows(model.conv, p)
    _columns(model.head, p)
    return model


def test_dimensions_computed_from_shapes_keep_the_function():
    x = torch.randn(16, 3, 7)
    model, other = _built(ComputedDimensions, 0), _built(ComputedDimensions, 1)
    _aligns_and_fuses_exactly(model, other, _permute_computed_dimensions, x, 2)


def test_a_computed_dimension_across_heads_is_refused():
    """The number a dimension was computed to is the one checked for heads: along the
    units of each head it fuses, across the heads it is refused."""
    class ComputedHeads(HeadsNormalised):
        def forward(self, x):
            h = self.a(x).view(x.shape[0], 2, 4)
            return self.head(h.softmax(h.dim() - self.dim).flatten(1))

    x = torch.randn(16, 6)
    model = _built(lambda: ComputedHeads(dim=1), 0)
    copies = [model, _permute_heads_normalised(model, torch.Generator().manual_seed(3))]
    _same_function(fuse(copies, config=EXACT, inputs=x), model, x)
    across = _built(lambda: ComputedHeads(dim=2), 0)
    with pytest.raises(UnsupportedModelError, match="normalises across heads"):
        fuse([across, across], config=EXACT, inputs=x)


def test_a_dimension_read_from_values_is_not_taken_for_a_number():
    """A dimension read from a buffer's values (``.item()``) may differ between the
    models one traced graph serves: where heads are, it is refused whatever it was in
    the model traced (it fused the model normalising across heads, d = 0.43)."""
    class ValueDimension(HeadsNormalised):
        def __init__(self, dim: int):
            super().__init__(dim=dim)
            self.register_buffer("axis", torch.tensor(dim))

        def forward(self, x):
            h = self.a(x).view(x.shape[0], 2, 4)
            return self.head(h.softmax(self.axis.item()).flatten(1))

    x = torch.randn(16, 6)
    within, across = _built(lambda: ValueDimension(2), 0), _built(lambda: ValueDimension(1), 1)
    with pytest.raises(UnsupportedModelError, match="normalises across heads"):
        align(across, within, config=EXACT, inputs=x)


_T = 5
_SDPA_MASKS = {
    "none": lambda: None,
    "shared": lambda: torch.randn(_T, _T),
    "padding": lambda: None,  # computed from the input, one row per batch entry
    "none, every argument by keyword": lambda: None,
    "per head": lambda: torch.stack([torch.zeros(_T, _T), torch.randn(_T, _T)]),
    "per head, 4-D": lambda: torch.randn(1, 2, _T, _T),
    "per head, from data": lambda: None,
}


class MaskedAttention(nn.Module):
    """``F.scaled_dot_product_attention`` over two heads of four units, with a mask from
    ``_SDPA_MASKS`` (a buffer); a mask per head (ALiBi's) moves with the heads (it once
    stayed where it was while the alignment moved the heads, d = 0.43 of the output);
    ``"per head, from data"`` is made in ``forward`` from positions alone."""

    def __init__(self, mask: str = "none"):
        super().__init__()
        self.inp, self.qkv = nn.Linear(6, 8), nn.Linear(8, 24)
        self.proj, self.head = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("mask", _SDPA_MASKS[mask]())
        self.kind = mask

    def forward(self, x):
        h = self.inp(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (t.view(x.shape[0], _T, 2, 4).transpose(1, 2) for t in (q, k, v))
        mask = self.mask if self.kind != "padding" else (x[:, None, None, :, 0] > -1)
        if self.kind == "per head, from data":
            distance = torch.arange(_T, device=x.device).float()
            mask = -torch.arange(1, 3, device=x.device)[:, None, None] * distance.abs()
        if self.kind.endswith("keyword"):  # crashed once
            o = F.scaled_dot_product_attention(query=q, key=k, value=v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.head((h + self.proj(o.transpose(1, 2).flatten(2))).mean(1))


def _permute_masked_attention(model: MaskedAttention, generator: torch.Generator):
    """The residual stream by one permutation; the heads, whole and within, by another
    (the same for queries, keys and values)."""
    model = copy.deepcopy(model)
    r, p = _perm(8, generator), _within_blocks(2, 4, generator)
    _rows(model.inp, r)
    _columns(model.qkv, r)
    _rows(model.qkv, torch.cat([p, p + 8, p + 16]))
    _columns(model.proj, p)
    _rows(model.proj, r)
    _columns(model.head, r)
    if model.mask is not None and model.mask.dim() >= 3:  # a mask per head moves with it
        with torch.no_grad():
            model.mask.copy_(model.mask.index_select(-3, p.view(2, 4)[:, 0] // 4))
    return model


@pytest.mark.parametrize("mask", ["none", "shared", "padding",
                                  "none, every argument by keyword", "per head",
                                  "per head, 4-D"])
def test_an_attention_mask_keeps_the_function(mask):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: MaskedAttention(mask), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_masked_attention, x, 4)


class SharedSlopes(nn.Module):
    """Two attention layers that read one table of ALiBi slopes, a buffer of the model
    (BLOOM computes its biases once for every layer): both layers' heads move alike."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.qkv = nn.ModuleList(nn.Linear(8, 24) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.register_buffer("slopes", 0.5 + torch.rand(2))

    def forward(self, x):
        h = self.inp(x)
        position = torch.arange(_T, device=x.device).float()
        bias = -self.slopes[:, None, None] * (position[None, :] - position[:, None]).abs()
        for qkv, proj in zip(self.qkv, self.proj, strict=True):
            q, k, v = qkv(h).chunk(3, dim=-1)
            q, k, v = (t.view(x.shape[0], _T, 2, 4).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            h = h + proj(o.transpose(1, 2).flatten(2))
        return self.head(h.mean(1))


def _permute_shared_slopes(model: SharedSlopes, generator: torch.Generator):
    """The residual stream by one permutation; the heads of both layers swapped, with
    the slopes; the units within each head by a permutation per layer."""
    model = copy.deepcopy(model)
    r, order = _perm(8, generator), torch.tensor([1, 0])
    _rows(model.inp, r)
    _columns(model.head, r)
    for qkv, proj in zip(model.qkv, model.proj, strict=True):
        p = torch.cat([int(b) * 4 + _perm(4, generator) for b in order])
        _columns(qkv, r)
        _rows(qkv, torch.cat([p, p + 8, p + 16]))
        _columns(proj, p)
        _rows(proj, r)
    with torch.no_grad():
        model.slopes.copy_(model.slopes[order])
    return model


def test_values_per_head_shared_by_two_layers_move_both_layers_heads_alike():
    x = torch.randn(16, _T, 6)
    model, other = (_built(SharedSlopes, seed) for seed in (0, 1))
    graph = build_alignment_graph(model, x)
    second = next(g for g in graph.groups if g.label.startswith("qkv.1"))
    assert graph.groups_by_id[second.block_source].label.startswith("qkv.0")
    _aligns_and_fuses_exactly(model, other, _permute_shared_slopes, x, 4)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class RotaryQueries(nn.Module):
    """Rotary embeddings on two heads of four units: ``"packed"``, on queries and keys
    of one Linear viewed ``(B, T, 2, H, D)`` and rotated before ``unbind`` (flash-attn's
    style; their units were once left free to move); ``"concatenated"``, on queries
    made by concatenating two Linears (the concatenation's parts once moved freely)."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.inp, self.head = how, nn.Linear(6, 8), nn.Linear(8, 3)
        if how == "packed":
            self.qk = nn.Linear(8, 16)
        else:
            self.q1, self.q2, self.k = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 8)
        self.v, self.proj = nn.Linear(8, 8), nn.Linear(8, 8)
        angles = torch.outer(torch.arange(_T).float(), torch.tensor([1.0, 0.1])).repeat(1, 2)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, x):
        h, B = self.inp(x), x.shape[0]
        if self.how == "packed":
            qk = self.qk(h).view(B, _T, 2, 2, 4)
            qk = _rotated(qk, self.cos[:, None, None], self.sin[:, None, None])
            q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = torch.cat([self.q1(h), self.q2(h)], -1).view(B, _T, 2, 4).transpose(1, 2)
            k = self.k(h).view(B, _T, 2, 4).transpose(1, 2)
            q, k = _rotated(q, self.cos, self.sin), _rotated(k, self.cos, self.sin)
        v = self.v(h).view(B, _T, 2, 4).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.head(self.proj(o.transpose(1, 2).reshape(B, _T, 8)).mean(1))


def _permute_rotary_queries(model: RotaryQueries, generator: torch.Generator):
    """The heads swapped (queries' and keys' units in place, the values' permuted within
    each head) and the residual stream permuted."""
    model = copy.deepcopy(model)
    r, heads = _perm(8, generator), torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    values = torch.cat([4 + _perm(4, generator), _perm(4, generator)])
    _rows(model.inp, r)
    _columns(model.head, r)
    _columns(model.qk, r)
    _rows(model.qk, torch.cat([heads, heads + 8]))
    _columns(model.v, r)
    _rows(model.v, values)
    _columns(model.proj, values)
    _rows(model.proj, r)
    return model


def test_rotary_embeddings_on_packed_queries_and_keys_keep_the_function():
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: RotaryQueries("packed"), seed) for seed in (0, 1))
    assert [g.rigid for g in build_alignment_graph(model, x).groups if g.blocks > 1] == [
        True, False]
    _aligns_and_fuses_exactly(model, other, _permute_rotary_queries, x, 4)


def test_rotary_embeddings_on_concatenated_queries_are_refused():
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: RotaryQueries("concatenated"), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="keeps its units in place .* concatenation"):
        align(other, model, config=EXACT, inputs=x)


class ReturnsHeads(nn.Module):
    """Attention written out (``q @ k.T``, four heads of two units), with or without
    rotary embeddings, that also returns its probabilities, its keys or its values (a
    KV cache): the returned heads stay where they are, and so must the heads that move
    with them (the queries', whose own group under rotary embeddings only follows the
    keys' heads; the values' follow the queries'; once a wrong function, d = 0.05)."""

    def __init__(self, returns: str, rotary: bool):
        super().__init__()
        self.returns, self.rotary = returns, rotary
        self.inp, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.q, self.k, self.v, self.proj = (nn.Linear(8, 8) for _ in range(4))
        angles = torch.arange(_T).float()[:, None].repeat(1, 2)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, x):
        h, B = self.inp(x), x.shape[0]
        q, k, v = (layer(h).view(B, _T, 4, 2).transpose(1, 2)
                   for layer in (self.q, self.k, self.v))
        if self.rotary:
            q, k = _rotated(q, self.cos, self.sin), _rotated(k, self.cos, self.sin)
        probs = (q @ k.transpose(-2, -1) / 2).softmax(-1)
        out = self.head(self.proj((probs @ v).transpose(1, 2).reshape(B, _T, 8)).mean(1))
        return out, {"probs": probs, "keys": k, "values": v}[self.returns]


@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "plain"])
@pytest.mark.parametrize("returns", ["probs", "keys", "values"])
def test_heads_the_model_returns_keep_the_heads_that_move_with_them(returns, rotary):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: ReturnsHeads(returns, rotary), seed) for seed in (0, 1))
    aligned = align(other, model, config=EXACT, inputs=x)
    with torch.no_grad():
        for got, expected in zip(aligned(x), other(x), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class GroupedQuery(nn.Module):
    """Grouped-query attention, four query heads of two units over two key and value
    heads (Hugging Face's ``repeat_kv``), in the ways that once failed: ``"gate"``, a
    gate per query head also read by a Linear of its own (solved before its heads: once
    refused); ``"data bias"``, a bias per query head made from positions alone (its
    repeated value heads held no tensor: once a KeyError); ``"bare"``, no residual
    stream and an output projection without bias (once refused); ``"twice"``, key and
    value heads repeated by ``repeat_kv`` and again by ``enable_gqa`` (refused)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant, self.inp, self.head = variant, nn.Linear(6, 8), nn.Linear(8, 3)
        heads = 8 if variant == "twice" else 4
        self.q, self.k, self.v = nn.Linear(8, 2 * heads), nn.Linear(8, 4), nn.Linear(8, 4)
        self.proj = nn.Linear(2 * heads, 8, bias=variant != "bare")
        if variant == "gate":
            self.gate, self.mix = nn.Linear(8, 4), nn.Linear(4, 8, bias=False)

    def forward(self, x):
        h, B = self.inp(x), x.shape[0]
        heads = 8 if self.variant == "twice" else 4
        q = self.q(h).view(B, _T, heads, 2).transpose(1, 2)
        k, v = (layer(h).view(B, _T, 2, 2).transpose(1, 2) for layer in (self.k, self.v))
        k, v = (t[:, :, None].expand(B, 2, 2, _T, 2).reshape(B, 4, _T, 2) for t in (k, v))
        if self.variant == "twice":
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            scores = q @ k.transpose(-2, -1)
            if self.variant == "data bias":
                position = torch.arange(_T, device=x.device).float()
                distance = (position[None, :] - position[:, None]).abs()
                scores = scores - torch.arange(1, 5, device=x.device)[:, None, None] * distance
            y = scores.softmax(-1) @ v
        if self.variant == "gate":
            gate = torch.sigmoid(self.gate(h))
            y = y * gate.transpose(1, 2).unsqueeze(-1)
        out = self.proj(y.transpose(1, 2).reshape(B, _T, 2 * heads))
        if self.variant == "gate":
            out = out + self.mix(gate)
        h = torch.tanh(out) if self.variant == "bare" else h + out
        return self.head(h.mean(1))


@pytest.mark.parametrize("variant", ["gate", "data bias", "bare"])
def test_grouped_query_attention_idioms_keep_the_function(variant):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: GroupedQuery(variant), seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class MultiQuery(nn.Module):
    """Multi-query attention, four query heads of two units over one key and one value
    head, in idioms the Llama-style test models do not write: ``"sdpa"``,
    ``F.scaled_dot_product_attention`` broadcasting the key and value head without
    ``enable_gqa``; ``"gate"``, a gate per query head on the output heads; ``"keys"``,
    the keys also returned (a KV cache: they, and the query heads with them, stay
    where they are); ``"key norm"`` and ``"value norm"``, a GroupNorm of two groups
    over the key's or the value's units (their blocks are not heads: once a wrong
    function, d = 0.04 and 0.31); ``"rotary"``, rotary embeddings on the queries and
    keys (refused: the one key head's units would have to stay in place); ``"einsum"``,
    the scores by ``torch.einsum`` with the key head dropped (refused)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant, self.inp, self.head = variant, nn.Linear(6, 8), nn.Linear(8, 3)
        self.size = 4 if variant.endswith("norm") else 2
        self.q, self.k, self.v = (nn.Linear(8, n) for n in (4 * self.size, self.size,
                                                            self.size))
        self.proj = nn.Linear(4 * self.size, 8)
        if variant == "gate":
            self.gate = nn.Linear(8, 4)
        if variant.endswith("norm"):
            self.norm = nn.GroupNorm(2, self.size)
        angles = torch.arange(_T).float()[:, None]
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, x):
        h, B = self.inp(x), x.shape[0]
        q = self.q(h).view(B, _T, 4, self.size).transpose(1, 2)
        k, v = self.k(h), self.v(h)
        if self.variant == "key norm":
            k = self.norm(k.transpose(1, 2)).transpose(1, 2)
        elif self.variant == "value norm":
            v = self.norm(v.transpose(1, 2)).transpose(1, 2)
        k, v = (t.view(B, _T, 1, self.size).transpose(1, 2) for t in (k, v))
        if self.variant == "rotary":
            q, k = _rotated(q, self.cos, self.sin), _rotated(k, self.cos, self.sin)
        if self.variant == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        elif self.variant == "einsum":
            y = torch.einsum("bhts,bsd->bhtd", torch.einsum("bhtd,bsd->bhts", q, k[:, 0])
                             .softmax(-1), v[:, 0])
        else:
            y = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        if self.variant == "gate":
            y = y * torch.sigmoid(self.gate(h)).transpose(1, 2).unsqueeze(-1)
        out = self.proj(y.transpose(1, 2).reshape(B, _T, 4 * self.size))
        out = self.head((h + out).mean(1))
        return (out, k) if self.variant == "keys" else out


@pytest.mark.parametrize("variant", ["sdpa", "gate", "keys", "key norm", "value norm"])
def test_multi_query_attention_idioms_keep_the_function(variant):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: MultiQuery(variant), seed) for seed in (0, 1))
    aligned = align(other, model, config=EXACT, inputs=x)
    with torch.no_grad():
        for got, expected in zip(*(m(x) if variant == "keys" else (m(x),)
                                   for m in (aligned, other)), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(aligned.v.weight, other.v.weight)  # the value head moved


@pytest.mark.parametrize("variant, match", [
    ("rotary", "indexes into aligned units"), ("einsum", "laid out differently")])
def test_multi_query_attention_with_rotary_embeddings_or_einsum_is_refused(variant, match):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: MultiQuery(variant), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match=match):
        align(other, model, config=EXACT, inputs=x)


class BlocksTimesData(nn.Module):
    """Channels viewed as two blocks of four, ``(B, 2, 4, N)``, times a matrix made from
    the input, ``(B, 1, N, E)``, broadcast over the blocks: not attention, so the
    matrix's units are no head shared by the blocks (once refused, or a RuntimeError
    with ``E = 3``, since multi-query attention was recognised)."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.inp, self.mix = width, nn.Linear(6, 8), nn.Linear(6, width)
        self.fc, self.head = nn.Linear(width, 3), nn.Linear(3, 3)

    def forward(self, x):
        B = x.shape[0]
        blocks = self.inp(x).transpose(1, 2).reshape(B, 2, 4, _T)
        y = (blocks @ self.mix(x).unsqueeze(1)).reshape(B, 8, self.width)
        return self.head(self.fc(y).mean(1))


@pytest.mark.parametrize("width", [3, 4])
def test_blocks_times_a_broadcast_matrix_keep_the_function(width):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: BlocksTimesData(width), seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class SteppedGatedCell(nn.Module):
    """A gated recurrence written out (a GRU without a reset gate, gates from ``chunk``)
    stepped twice from zeros: every group is fixed, so nothing moves (once a KeyError
    on a group that no tensor uses)."""

    def __init__(self):
        super().__init__()
        self.wx, self.wh = nn.Linear(6, 16), nn.Linear(8, 16, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x.new_zeros((x.shape[0], 8))
        for t in range(2):
            xz, xn = self.wx(x[:, t]).chunk(2, -1)
            hz, hn = self.wh(h).chunk(2, -1)
            z = torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + hn) + z * h
        return self.head(h)


def test_a_gated_cell_stepped_from_zeros_keeps_the_function():
    x = torch.randn(16, _T, 6)
    model, other = (_built(SteppedGatedCell, seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class OffsetCodes(nn.Module):
    """Category codes moved into one shared table by offsets kept as a frozen integer
    Parameter, the model's first (tabular code), beside numeric columns: the example
    input keeps the float dtype of the model's floating parameters (it was once cast to
    int64, and the model refused)."""

    def __init__(self):
        super().__init__()
        self.offsets = nn.Parameter(torch.tensor([0, 5, 12]), requires_grad=False)
        self.table, self.norm = nn.Embedding(20, 4), nn.LayerNorm(2)
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        codes = self.table(x[:, :3].long() + self.offsets).mean(1)
        return self.head(torch.relu(self.fc(torch.cat([codes, self.norm(x[:, 3:])], 1))))


def test_an_integer_parameter_first_leaves_float_inputs_float():
    x = torch.cat([torch.randint(0, 5, (16, 3)).float(), torch.randn(16, 2)], 1)
    model, other = (_built(OffsetCodes, seed) for seed in (0, 1))
    aligned = align(other, model, config=EXACT, inputs=x)
    _same_function(aligned, other, x)
    assert not torch.allclose(aligned.fc.weight, other.fc.weight)


class PaddedResidual(nn.Module):
    """CycleGAN's residual block: a padding module, then a convolution without padding,
    twice, with instance norms (once refused: no rule for the padding modules)."""

    def __init__(self, pad):
        super().__init__()
        self.stem, self.pad = nn.Conv2d(3, 6, 3, padding=1), pad
        self.conv1, self.conv2 = nn.Conv2d(6, 6, 3), nn.Conv2d(6, 6, 3)
        self.norm1 = nn.InstanceNorm2d(6, affine=True)
        self.norm2 = nn.InstanceNorm2d(6, affine=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.stem(x)
        y = torch.relu(self.norm1(self.conv1(self.pad(h))))
        h = h + self.norm2(self.conv2(self.pad(y)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("pad", [nn.ReflectionPad2d(1), nn.ReplicationPad2d(1),
                                 nn.ZeroPad2d(1), nn.ConstantPad2d(1, 0.5),
                                 nn.CircularPad2d(1)], ids=lambda pad: type(pad).__name__)
def test_padding_modules_keep_the_function(pad):
    model, other = (_built(lambda: PaddedResidual(pad), seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=_images()), other, _images())


class CausalTimePadding(nn.Module):
    """Features ``(B, T, C)`` padded before in time only by a padding module (a causal
    window): the units' dimension is not padded (once refused: the module's rule looked
    at every dimension it could pad)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.pad, self.fc2 = nn.Linear(6, 8), nn.ZeroPad2d((0, 0, 2, 0)), nn.Linear(8, 3)

    def forward(self, x):
        h = self.pad(torch.relu(self.fc1(x)))
        return self.fc2((h[:, :-2] + h[:, 1:-1] + h[:, 2:]).mean(1))


def test_a_padding_module_along_time_only_keeps_the_function():
    x = torch.randn(16, _T, 6)
    model, other = (_built(CausalTimePadding, seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class _Lambda(nn.Module):
    """The ``LambdaLayer`` of CIFAR ResNet code, which wraps the option-A shortcut."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class OptionABlock(nn.Module):
    def __init__(self, width: int, planes: int, stride: int, shortcut_first: bool):
        super().__init__()
        self.shortcut_first = shortcut_first
        self.conv1 = nn.Conv2d(width, planes, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or width != planes:
            pad = (planes - width) // 2
            self.shortcut = _Lambda(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad),
                                                    "constant", 0))

    def forward(self, x):
        if self.shortcut_first:  # the pad's new channels made before the block's own
            shortcut = self.shortcut(x)
            return F.relu(shortcut + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class OptionAResNet(nn.Module):
    """The CIFAR ResNet-20 family as its widely copied code writes it (He et al.'s
    option A): a stage's first block halves the resolution, and its shortcut pads the
    channels it adds with zeros, half before and half after (once refused: padding the
    units)."""

    def __init__(self, blocks: int = 2, shortcut_first: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        layers, width = [], 4
        for planes, stride in ((4, 1), (8, 2), (16, 2)):
            for i in range(blocks):
                layers.append(OptionABlock(width, planes, stride if i == 0 else 1,
                                           shortcut_first))
                width = planes
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.avg_pool2d(out, out.size()[3]).view(out.size(0), -1))


def _option_a_resnet(seed: int, shortcut_first: bool = False) -> OptionAResNet:
    torch.manual_seed(seed)
    model = OptionAResNet(shortcut_first=shortcut_first)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.weight, module.running_var):
                    tensor.uniform_(0.5, 2)
                for tensor in (module.bias, module.running_mean):
                    tensor.uniform_(-1, 1)
    return model.eval()


def _permute_option_a(model: OptionAResNet, generator: torch.Generator) -> OptionAResNet:
    """The residual stream's channels: a stage's are the zero channels padded before,
    the previous stage's (as they were permuted) and those padded after, each padded
    side permuted on its own; every block's hidden channels freely."""
    model = copy.deepcopy(model)

    def rows(conv, bn, p):
        _rows(conv, p)
        with torch.no_grad():
            for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                tensor.copy_(tensor[p])

    stream = _perm(4, generator)
    rows(model.conv1, model.bn1, stream)
    for block in model.layers:
        _columns(block.conv1, stream)
        planes = block.conv2.out_channels
        if planes != len(stream):
            pad = (planes - len(stream)) // 2
            stream = torch.cat([_perm(pad, generator), pad + stream,
                                pad + len(stream) + _perm(pad, generator)])
        hidden = _perm(planes, generator)
        rows(block.conv1, block.bn1, hidden)
        _columns(block.conv2, hidden)
        rows(block.conv2, block.bn2, stream)
    _columns(model.linear, stream)
    return model


@pytest.mark.parametrize("shortcut_first", [False, True], ids=["residual-first",
                                                          "shortcut-first"])
def test_option_a_resnet_keeps_the_function(shortcut_first):
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model, other = (_option_a_resnet(seed, shortcut_first) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_option_a, x, 5)
    graph = build_alignment_graph(model, x)
    padded = [g for g in graph.groups if "[before]" in g.label or "[after]" in g.label]
    assert len(padded) == 4 and not any(g.fixed for g in padded)  # aligned, not left


class PadsUnits(nn.Module):
    """Hidden units padded by ``pad`` before the head reads them."""

    def __init__(self, pad):
        super().__init__()
        self.fc1, self.pad, self.head = nn.Linear(6, 8), pad, nn.Linear(8 + 3, 3)

    def forward(self, x):
        return self.head(self.pad(torch.relu(self.fc1(x))))


def _permute_padded_units(model: PadsUnits, generator: torch.Generator) -> PadsUnits:
    model = copy.deepcopy(model)
    p = _perm(8, generator)
    _rows(model.fc1, p)
    _columns(model.head, torch.cat([torch.arange(2), 2 + p, torch.arange(10, 11)]))
    return model


@pytest.mark.parametrize("pad", [nn.ZeroPad1d((2, 1)), nn.ConstantPad1d((2, 1), 0.5),
                                 _Lambda(lambda h: F.pad(h, (2, 1), value=-1.0))],
                         ids=["ZeroPad1d", "ConstantPad1d", "F.pad"])
def test_units_padded_with_a_constant_keep_the_function(pad):
    """The new units only a constant fills stay in place."""
    model, other = (_built(lambda: PadsUnits(pad), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_padded_units, torch.randn(16, 6), 2)


@pytest.mark.parametrize("pad", [nn.ReplicationPad1d((2, 1)), nn.ReflectionPad1d((2, 1)),
                                 _Lambda(lambda h: F.pad(h, (4, -1)))],
                         ids=["replicate", "reflect", "cropped"])
def test_units_padded_with_copies_of_units_or_cropped_are_refused(pad):
    model = _built(lambda: PadsUnits(pad), 0)
    with pytest.raises(UnsupportedModelError, match="would pad the units themselves"):
        fuse([model, model], config=EXACT, inputs=torch.randn(16, 6))


class ScaledPad(nn.Module):
    """A per-unit scale read before the units it scales are padded (once a KeyError:
    the concatenation was solved before its parts)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 4), nn.Linear(7, 3)
        self.gamma = nn.Parameter(torch.rand(7) + 0.5)

    def forward(self, x):
        return self.head(self.gamma * F.pad(torch.relu(self.a(x)), (1, 2)))


def _permute_scaled_pad(model: ScaledPad, generator: torch.Generator) -> ScaledPad:
    model = copy.deepcopy(model)
    p = _perm(4, generator)
    padded = torch.cat([torch.arange(1), 1 + p, torch.arange(5, 7)])
    _rows(model.a, p)
    _columns(model.head, padded)
    with torch.no_grad():
        model.gamma.copy_(model.gamma[padded])
    return model


def test_a_scale_read_before_a_padding_keeps_the_function():
    model, other = (_built(ScaledPad, seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_scaled_pad, torch.randn(16, 6), 4)


class PadPlusChunkedLayer(nn.Module):
    """A layer added to a padding as wide on each side, and also split in halves: one
    split, in equal proportions (once refused as two different splits)."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(6, 4), nn.Linear(6, 8)
        self.head, self.head2 = nn.Linear(4, 3), nn.Linear(8, 3)

    def forward(self, x):
        f = self.fc(x)
        s = F.pad(torch.relu(self.a(x)), (4, 0)) + f
        u, v = f.chunk(2, 1)
        return self.head(torch.relu(u) * v) + self.head2(torch.relu(s))


def test_a_padding_and_a_chunk_of_one_layer_keep_the_function():
    x = torch.randn(16, 6)
    model, other = (_built(PadPlusChunkedLayer, seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class CatPlusLayer(nn.Module):
    """Two branches concatenated, plus a third layer's output as wide as both (once
    refused: a concatenation added to a layer)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(6, 3), nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1) + self.c(x)))


def _permute_cat_plus_layer(model: CatPlusLayer, generator: torch.Generator):
    model = copy.deepcopy(model)
    pa, pb = _perm(5, generator), _perm(3, generator)
    _rows(model.a, pa)
    _rows(model.b, pb)
    both = torch.cat([pa, 5 + pb])
    _rows(model.c, both)
    _columns(model.head, both)
    return model


class SplitThenCalledAgain(nn.Module):
    """A layer split into pieces (added to a concatenation, or into query, key and value),
    then called again and added whole to another layer (once a wrong function, d =
    0.3-0.5: the second call's units were not tied to the pieces)."""

    def __init__(self, split: str):
        super().__init__()
        self.split = split
        if split == "concatenation":
            self.a, self.b = nn.Linear(5, 4), nn.Linear(5, 8)
        self.sc, self.other = nn.Linear(5, 12), nn.Linear(5, 12)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        if self.split == "concatenation":
            y = torch.cat([self.a(x), self.b(x)], 1) + self.sc(x)
        else:
            q, k, v = self.sc(x).split(4, -1)
            y = torch.cat([torch.tanh(q) * torch.sigmoid(k) + v] * 3, 1)
        z = self.sc(x.flip(-1)) + self.other(x)
        return self.head(torch.cat([torch.relu(y), torch.relu(z)], 1))


@pytest.mark.parametrize("split", ["concatenation", "qkv"])
def test_a_layer_split_then_used_whole_is_refused(split):
    model, other = (_built(lambda: SplitThenCalledAgain(split), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="'sc.weight' is split into pieces at "
                                                    "one use and used whole at another"):
        align(other, model, config=EXACT, inputs=torch.randn(16, 5))


class UnrolledLSTMCell(nn.Module):
    """An LSTM cell written out and stepped three times: the input's and the state's
    projections chunked into four gates at every step (once a wrong function, d = 0.014:
    each step's split replaced the one before); the hidden size read from a split weight
    afterwards (once refused as a whole use)."""

    def __init__(self):
        super().__init__()
        self.init, self.x2h = nn.Linear(4, 6), nn.Linear(4, 24)
        self.h2h, self.out = nn.Linear(6, 24), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.init(x[:, 0]))
        c = torch.zeros_like(h)
        for t in range(3):
            a, b = self.x2h(x[:, t]).chunk(4, 1), self.h2h(h).chunk(4, 1)
            i, f, g, o = a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.out(h.view(-1, self.x2h.weight.shape[0] // 4))


def _permute_unrolled_cell(model: UnrolledLSTMCell, generator: torch.Generator):
    model = copy.deepcopy(model)
    p = _perm(6, generator)
    gates = torch.cat([k * 6 + p for k in range(4)])
    _rows(model.init, p)
    _rows(model.x2h, gates)
    _rows(model.h2h, gates)
    _columns(model.h2h, p)
    _columns(model.out, p)
    return model


def test_a_layer_split_again_at_every_step_keeps_the_function():
    x = torch.randn(16, 3, 4)
    model, other = (_built(UnrolledLSTMCell, seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_unrolled_cell, x, 7)


def test_a_weight_split_under_two_names_is_refused():
    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(4, 3)
            self.fc2.weight = self.fc1.weight  # tied by assignment

        def forward(self, x):
            a, b = self.fc1(x).chunk(2, 1)
            c, d = self.fc2(x.flip(-1)).chunk(2, 1)
            return self.head(torch.relu(a) * b + torch.tanh(c) + d)

    model, other = (_built(TwoNames, seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="another name of a packed tensor"):
        align(other, model, config=EXACT, inputs=torch.randn(16, 5))


def test_a_layer_added_to_a_concatenation_keeps_the_function():
    model, other = (_built(CatPlusLayer, seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_cat_plus_layer, torch.randn(16, 6), 3)


class StatisticsPooling(nn.Module):
    """Statistics over time or space, as reductions: ``"x-vector"``, the mean and the
    standard deviation of frame features over time side by side (speaker embeddings);
    ``"adain"``, features whitened by their mean and standard deviation over space
    (style transfer); ``"var_mean"``, ``torch.var_mean`` over space, both kept. Once
    refused: ``std`` and ``var`` had no rule."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.frames = nn.Conv1d(6, 8, 3) if kind == "x-vector" else nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(16 if kind != "adain" else 8, 3)

    def forward(self, x):
        h = torch.relu(self.frames(x))
        if self.kind == "x-vector":
            return self.head(torch.cat([h.mean(-1), h.std(-1)], 1))
        if self.kind == "adain":
            h = (h - h.mean((2, 3), keepdim=True)) / (h.std((2, 3), keepdim=True) + 1e-5)
            return self.head(h.amax((2, 3)))
        var, mean = torch.var_mean(h, (2, 3), correction=0)
        return self.head(torch.cat([mean, var.sqrt()], 1))


@pytest.mark.parametrize("kind", ["x-vector", "adain", "var_mean"])
def test_statistics_over_time_or_space_keep_the_function(kind):
    x = torch.randn(16, 6, 9) if kind == "x-vector" else _images()
    model, other = (_built(lambda: StatisticsPooling(kind), seed) for seed in (0, 1))
    aligned = align(other, model, config=EXACT, inputs=x)
    _same_function(aligned, other, x)
    assert not torch.allclose(aligned.frames.weight, other.frames.weight)


class Seq2Seq(nn.Module):
    """An encoder-decoder of recurrent layers (forecasting, translation): the decoder
    starts from the encoder's final state, ``(h_n, c_n)`` or ``h_n``, stacked over
    layers and directions, or one layer's state repeated for every decoder layer, or
    detached, or a GRU's with a cell state of zeros (once refused: an initial state with
    aligned units)."""

    def __init__(self, kind: str = "lstm", layers: int = 2, bidirectional: bool = False,
                 proj: int = 0, repeated: bool = False, detached: bool = False):
        super().__init__()
        self.kind, self.repeated, self.detached = kind, repeated, detached
        layer = nn.LSTM if kind == "lstm" else nn.GRU
        extra = {"proj_size": proj} if proj else {}
        self.encoder = (nn.GRU if kind == "gru-lstm" else layer)(
            6, 8, 1 if repeated else layers, batch_first=True, bidirectional=bidirectional,
            **extra)
        self.decoder = (nn.LSTM if kind == "gru-lstm" else layer)(
            6, 8, layers * (2 if bidirectional else 1), batch_first=True, **extra)
        self.head = nn.Linear(proj or 8, 3)

    def forward(self, x):
        _, state = self.encoder(x)
        if self.detached:  # truncated backpropagation through time
            state = state.detach()
        if self.kind == "gru-lstm":  # a GRU's h_n, and a cell state of zeros
            state = (state, torch.zeros_like(state))
        elif self.repeated and self.kind == "lstm":
            h, c = state
            state = (h.repeat(2, 1, 1), c.repeat(2, 1, 1))
        elif self.repeated:
            state = state.repeat(2, 1, 1)
        out, _ = self.decoder(x.flip(1), state)
        return self.head(out.mean(1))


@pytest.mark.parametrize("options", [
    {}, {"kind": "gru"}, {"layers": 1}, {"bidirectional": True}, {"proj": 4},
    {"repeated": True}, {"kind": "gru", "repeated": True}, {"kind": "gru", "detached": True},
    {"kind": "gru-lstm"}], ids=str)
def test_a_decoder_started_from_its_encoders_state_keeps_the_function(options):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: Seq2Seq(**options), seed) for seed in (0, 1))
    aligned = align(other, model, config=EXACT, inputs=x)
    _same_function(aligned, other, x)
    assert not torch.allclose(aligned.decoder.weight_hh_l0, other.decoder.weight_hh_l0)


class PickedByTensors(nn.Module):
    """Entries picked by tensors along dimensions without aligned units: ``"last"``, the
    last real token of each sequence, ``h[torch.arange(B), last]`` (a GRU classifier's
    or CLIP's pooling); ``"table"``, a positional table indexed by positions,
    ``self.pos[torch.arange(T)]``; ``"mask"``, the tokens a boolean mask keeps,
    ``h[mask]``, also ``h[mask, ...]`` (``"mask first"``); ``"integer"``, entries picked
    by an integer computed in ``forward`` (a 0-d tensor, ``.item()``) beside a tensor
    index, ``g[n, :, idx]``, which torch applies as an integer first; ``"0-d mask"``,
    ``h[..., flag]`` with a 0-d boolean flag; ``"units"`` and ``"unit mask"``, units
    picked by a tensor or a mask (refused). All were refused before tensor indices were
    supported; the review of that found the integer (d = 0.62), the mask first (an
    IndexError) and the 0-d mask (d = 0.67) wrong, and a unit mask after an ellipsis
    accepted (d = 5.5)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.embed = kind, nn.Linear(6, 8)
        self.pos = nn.Parameter(torch.randn(_T, 8)) if kind == "table" else None
        self.rnn, self.head = nn.GRU(8, 8, batch_first=True), nn.Linear(8, 3)
        self.side = nn.Linear(8, 3) if kind == "integer" else None

    def forward(self, x):
        B, T = x.shape[0], x.shape[1]
        h = self.embed(x)
        if self.kind == "table":
            h = h + self.pos[torch.arange(T, device=x.device)]
        h, _ = self.rnn(h)
        if self.kind == "mask":
            return self.head(h[x[..., 0] > 0].sum(0, keepdim=True) + h.mean(1))
        if self.kind == "mask first":
            return self.head(h[x[..., 0] > 0, ...].sum(0, keepdim=True) + h.mean(1))
        if self.kind == "integer":
            n, g = (x[0, 0, 0] > 100).long(), h.transpose(1, 2)
            picked = g[n, :, torch.tensor([0, 4, 2])] + g[n.item(), :, torch.tensor([1, 3, 0])]
            return self.head(h.mean(1)) + self.side(picked.T).mean(0)
        if self.kind == "0-d mask":
            return self.head(h[..., x[0, 0, 0] > -100].squeeze(-1).mean(1))
        if self.kind == "units":
            return self.head(h[:, :, torch.arange(8, device=x.device)].mean(1))
        if self.kind == "unit mask":  # (units, 2) picked from h and 2h side by side
            both = torch.stack([h, 2 * h], -1)
            mask = torch.arange(16, device=x.device).view(8, 2) % 3 == 0
            return self.head(h.mean(1)) + both[..., mask].sum((1, 2))[:, None]
        last = (x[..., 0] > 0).long().sum(1).clamp(min=1) - 1
        return self.head(h[torch.arange(B, device=x.device), last])


@pytest.mark.parametrize("kind", ["last", "table", "mask", "mask first", "integer",
                                  "0-d mask"])
def test_entries_picked_by_tensors_keep_the_function(kind):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: PickedByTensors(kind), seed) for seed in (0, 1))
    aligned = align(other, model, config=EXACT, inputs=x)
    _same_function(aligned, other, x)
    assert not torch.allclose(aligned.embed.weight, other.embed.weight)


@pytest.mark.parametrize("kind", ["units", "unit mask"])
def test_units_picked_by_a_tensor_are_refused(kind):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: PickedByTensors(kind), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="indexes aligned units by a tensor"):
        align(other, model, config=EXACT, inputs=x)


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` from queries to a memory of another width (``kdim`` and
    ``vdim``: its projections are kept apart, ``q_proj_weight``...) and with a learned
    key and value more (``add_bias_kv``); both were refused."""

    def __init__(self, memory: int, bias_kv: bool):
        super().__init__()
        self.query, self.memory = nn.Linear(6, 8), nn.Linear(6, memory)
        options = {"kdim": memory, "vdim": memory} if memory != 8 else {}
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True,
                                               add_bias_kv=bias_kv, **options)
        self.head = nn.Linear(8, 3)
        if bias_kv:
            with torch.no_grad():
                self.attention.bias_k.normal_()
                self.attention.bias_v.normal_()

    def forward(self, x):
        h, memory = self.query(x), torch.relu(self.memory(x))
        y, _ = self.attention(h, memory, memory, need_weights=False)
        return self.head((h + y).mean(1))


@pytest.mark.parametrize("memory, bias_kv", [(5, False), (8, True), (5, True)])
def test_multihead_attention_with_kdim_or_bias_kv_keeps_the_function(memory, bias_kv):
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: CrossAttention(memory, bias_kv), seed) for seed in (0, 1))
    aligned = align(other, model, config=EXACT, inputs=x)
    _same_function(aligned, other, x)
    assert not torch.allclose(aligned.memory.weight, other.memory.weight)


class GhostModule(nn.Module):
    """GhostNet's module: a primary convolution and a cheap depthwise one on its output,
    concatenated and cut to ``out`` channels, ``[:, :out]``: a cut that keeps every
    channel fuses (once refused as an index into units), one that drops some is
    refused."""

    def __init__(self, out: int):
        super().__init__()
        self.out, half = out, (out + 1) // 2
        self.primary = nn.Sequential(nn.Conv2d(3, half, 1, bias=False), nn.BatchNorm2d(half),
                                     nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(half, half, 3, padding=1, groups=half,
                                             bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.head = nn.Linear(out, 3)

    def forward(self, x):
        primary = self.primary(x)
        ghost = torch.cat([primary, self.cheap(primary)], dim=1)[:, :self.out, :, :]
        return self.head(ghost.mean((2, 3)))


def test_a_cut_that_keeps_every_channel_keeps_the_function():
    model, other = (_built(lambda: GhostModule(8), seed) for seed in (0, 1))
    aligned = align(other, model, config=EXACT, inputs=_images())
    _same_function(aligned, other, _images())
    assert not torch.allclose(aligned.primary[0].weight, other.primary[0].weight)


def test_a_cut_that_drops_channels_is_refused():
    model, other = (_built(lambda: GhostModule(7), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="indexes into aligned units"):
        align(other, model, config=EXACT, inputs=_images())


class SegmentIds(nn.Module):
    """``torch.repeat_interleave(counts)``, the one-argument form (segment ids from
    data alone), added to the inputs; once refused for a missing argument."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        ids = torch.repeat_interleave(torch.ones(x.shape[1], dtype=torch.long, device=x.device))
        return self.fc2(torch.relu(self.fc1(x + 0.1 * ids[None, :, None].float())))


def test_segment_ids_from_repeat_interleave_keep_the_function():
    x = torch.randn(16, _T, 6)
    model, other = (_built(SegmentIds, seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class HeadsConcatenated(nn.Module):
    """Attention whose output heads are concatenated with the value heads along the
    heads (once a width error at fusion time, not a refusal)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        B = x.shape[0]
        q, k, v = (layer(x).view(B, _T, 4, 2).transpose(1, 2)
                   for layer in (self.q, self.k, self.v))
        y = torch.cat([(q @ k.transpose(-1, -2)).softmax(-1) @ v, v], dim=1)
        return self.head(y.transpose(1, 2).reshape(B, _T, 16).mean(1))


def test_heads_concatenated_along_the_heads_are_refused():
    x = torch.randn(16, _T, 6)
    model, other = (_built(HeadsConcatenated, seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="concatenates reshaped aligned units, or"):
        align(other, model, config=EXACT, inputs=x)


def test_heads_repeated_twice_are_refused():
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: GroupedQuery("twice"), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="repeats heads that are themselves"):
        align(other, model, config=EXACT, inputs=x)


def test_an_attention_mask_per_head_made_from_data_is_refused():
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: MaskedAttention("per head, from data"), seed)
                    for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="mask per head .* from data alone"):
        align(other, model, config=EXACT, inputs=x)


class PiecesJoined(nn.Module):
    """The tuple that ``chunk`` or ``unbind`` returns, passed whole to ``torch.stack``
    (halves of a layer as two heads) or ``torch.cat`` (time steps side by side), or the
    input's pieces from ``tensor_split`` (an op without a rule); all crashed with a
    TypeError."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.fc = how, nn.Linear(6, 8)
        self.head = nn.Linear(4 if how == "stack" else 8 * _T, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.how == "stack":
            return self.head(torch.stack(h.chunk(2, -1), 1).sum(1).mean(1))
        if self.how == "tensor_split":  # pieces of the input, from an op without a rule
            h = torch.relu(self.fc(torch.cat(x.tensor_split(2, 1), 1)))
        return self.head(torch.cat(h.unbind(1), -1))


def _permute_pieces_joined(model: PiecesJoined, generator: torch.Generator):
    model = copy.deepcopy(model)
    if model.how == "stack":  # the halves are added: one permutation for both
        p = _perm(4, generator)
        _rows(model.fc, torch.cat([p, p + 4]))
        _columns(model.head, p)
    else:  # the head reads time step t's units at t * 8
        p = _perm(8, generator)
        _rows(model.fc, p)
        _columns(model.head, torch.cat([t * 8 + p for t in range(_T)]))
    return model


@pytest.mark.parametrize("how", ["stack", "cat", "tensor_split"])
def test_the_pieces_of_a_split_joined_whole_keep_the_function(how):
    x = torch.randn(16, _T, 6)
    model, other = _built(lambda: PiecesJoined(how), 0), _built(lambda: PiecesJoined(how), 1)
    _aligns_and_fuses_exactly(model, other, _permute_pieces_joined, x, 5)


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: ``F.layer_norm`` over the channels of an image,
    moved last and back."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class FunctionalNorms(nn.Module):
    """Normalisations called as functions with the model's own parameters (a user's
    BatchNorm, GroupNorm or RMSNorm, timm's LayerNorm2d); ``F.layer_norm`` and kin were
    refused as unsupported."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)
        self.norm = LayerNorm2d(8) if how == "layer_norm" else None
        if how != "layer_norm":
            self.weight = nn.Parameter(torch.ones(8))
        if how in ("batch_norm", "group_norm"):
            self.bias = nn.Parameter(torch.zeros(8))
        if how == "batch_norm":
            self.register_buffer("mean", torch.zeros(8))
            self.register_buffer("var", torch.ones(8))

    def forward(self, x):
        h = self.conv(x)
        if self.how == "layer_norm":
            h = self.norm(h)
        elif self.how == "batch_norm":
            h = F.batch_norm(h, self.mean, self.var, self.weight, self.bias, False)
        elif self.how == "group_norm":
            h = F.group_norm(h, 2, self.weight, self.bias)
        else:  # rms_norm over the channels, last
            h = F.rms_norm(h.permute(0, 2, 3, 1), (8,), self.weight).permute(0, 3, 1, 2)
        return self.head(torch.relu(h).mean((2, 3)))


def _permute_functional_norms(model: FunctionalNorms, generator: torch.Generator):
    """The channels moved, whole halves and within them (GroupNorm's two groups), with
    every per-channel tensor of the normalisation."""
    model = copy.deepcopy(model)
    p = _within_blocks(2, 4, generator)
    _rows(model.conv, p)
    _columns(model.head, p)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not name.startswith(("conv.", "head.")):
                tensor.copy_(tensor[p])
    return model


def _random_norm_statistics(model: FunctionalNorms, seed: int) -> FunctionalNorms:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not name.startswith(("conv.", "head.")):
                tensor.copy_(1 + 0.4 * torch.rand(tensor.shape, generator=generator))
    return model


@pytest.mark.parametrize("how", ["layer_norm", "batch_norm", "group_norm", "rms_norm"])
def test_functional_normalisations_keep_the_function(how):
    x = _images()
    model, other = (_random_norm_statistics(_built(lambda: FunctionalNorms(how), seed), seed)
                    for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_functional_norms, x, 6)


def test_a_functional_norm_with_one_weight_for_every_head_is_refused():
    """qk-norm by hand: one weight for the units of every head, whose units are coupled
    head by head; refused by name rather than fused."""
    class PerHeadNorm(HeadsNormalised):
        def __init__(self):
            super().__init__()
            self.norm_weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            h = F.layer_norm(self.a(x).view(x.shape[0], 2, 4), (4,), self.norm_weight)
            return self.head(h.flatten(1))

    x = torch.randn(16, 6)
    model = _built(PerHeadNorm, 0)
    with pytest.raises(UnsupportedModelError, match="split into heads with parameters"):
        fuse([model, model], config=EXACT, inputs=x)


_EXTREMA = {
    "torch.max(h, 2)[0]": lambda h: torch.max(h, 2)[0],
    "h.max(dim=2).values": lambda h: h.max(dim=2).values,
    "v, _ = h.max(-1)": lambda h: h.max(-1)[0],
    "min, keepdim": lambda h: torch.min(h, 2, keepdim=True)[0].squeeze(2),
    "torch.max(h, g)": lambda h: torch.max(h, 1 - h).mean(2),
    "h.max(other=g)": lambda h: h.max(other=-h).mean(2),
    "h.max()": lambda h: h.mean(2) * h.max(),
    "over the units": lambda h: h.mean(2) * h.max(1)[0].mean(1, keepdim=True),
    "indices over the units": lambda h: h.mean(2) * h.max(1)[1].float().mean(1, keepdim=True),
    "h / h.norm(dim=1, keepdim=True)": lambda h: (h / h.norm(dim=1, keepdim=True)).mean(2),
    "torch.linalg.vector_norm over time": lambda h: torch.linalg.vector_norm(h, 3, -1),
    "torch.norm(h, 2, 2) * h.norm()": lambda h: torch.norm(h, 2, 2) * h.norm(),
    "k-max pooling, h.topk(3, dim=2)[0]": lambda h: h.topk(3, dim=2)[0].sum(2),
    "torch.sort(h, 2).values": lambda h: torch.sort(h, 2).values[..., -2:].mean(2),
    "sorted units": lambda h: h.mean(2) * h.sort(dim=1, descending=True)[0][:, :1].mean(2),
    "sorted units' order": lambda h: h.mean(2) * h.mean(2).sort(1)[1].float().mean(
        1, keepdim=True),
}


class Extremum(nn.Module):
    """A text CNN's or PointNet's global max pooling written as ``torch.max(h, dim)``,
    its kin and norms from ``_EXTREMA``; all were refused as unsupported."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.conv, self.head = how, nn.Conv1d(3, 8, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(_EXTREMA[self.how](torch.relu(self.conv(x))))


@pytest.mark.parametrize("how", [h for h in _EXTREMA if h not in (
    "indices over the units", "sorted units' order")])
def test_maxima_and_minima_keep_the_function(how):
    x = torch.randn(16, 3, 10)
    model, other = (_built(lambda: Extremum(how), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _between("conv", 8), x, 7)


def test_the_predicted_class_is_returned_with_the_logits():
    """``logits.max(1)[1]``: the index is over the classes, which the model returns, so no
    alignment moves them."""
    class Predicts(Extremum):
        def forward(self, x):
            logits = self.head(torch.relu(self.conv(x)).mean(2))
            return logits, logits.max(1)[1]

    x = torch.randn(16, 3, 10)
    model = _built(lambda: Predicts("h.max()"), 0)
    fused = fuse([model, _between("conv", 8)(model, torch.Generator().manual_seed(7))],
                 config=EXACT, inputs=x)
    with torch.no_grad():
        (logits, predicted), (expected, expected_predicted) = fused(x), model(x)
    torch.testing.assert_close(logits, expected)
    assert torch.equal(predicted, expected_predicted)


@pytest.mark.parametrize("how", ["indices over the units", "sorted units' order"])
def test_the_index_of_the_largest_unit_is_refused(how):
    x = torch.randn(16, 3, 10)
    model = _built(lambda: Extremum(how), 0)
    with pytest.raises(UnsupportedModelError, match="indices of the largest"):
        fuse([model, model], config=EXACT, inputs=x)


_ALONG = {
    "h + h.flip(2)": lambda h: h + h.flip(2),
    "torch.flip(h, [2])": lambda h: torch.flip(h, [2]),
    "torch.roll(h, 1, 2)": lambda h: torch.roll(h, 1, 2),
    "h.roll(shifts=2, dims=-1)": lambda h: h.roll(shifts=2, dims=-1),
    "h.cumsum(2)": lambda h: h.cumsum(2),
    "torch.cumprod(h, dim=-1)": lambda h: torch.cumprod(h, dim=-1),
    "F.pad(h, (2, 0))": lambda h: F.pad(h, (2, 0)),
    "reflect": lambda h: F.pad(h, (1, 1), mode="reflect"),
    "F.pad(h, (1, 1, 0, 0))": lambda h: F.pad(h, (1, 1, 0, 0)),  # nothing on the units
}
_ALONG_THE_UNITS = {
    "h.flip(1)": lambda h: h.flip(1),
    "torch.roll(h, 1)": lambda h: torch.roll(h, 1),  # the flattened tensor
    "h.cumsum(1)": lambda h: h.cumsum(1),
    "F.pad(h, (0, 0, 1, 1))": lambda h: F.pad(h, (0, 0, 1, 1), mode="replicate")[:, 1:-1],
}


class AlongTime(nn.Module):
    """Flips, rolls, cumulative sums and paddings along time (test-time flips, Swin's
    shifted windows, a causal padding), or along the units; all were refused."""

    def __init__(self, how: str):
        super().__init__()
        self.op = {**_ALONG, **_ALONG_THE_UNITS}[how]
        self.conv, self.head = nn.Conv1d(3, 8, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.op(torch.relu(self.conv(x))).mean(2))


@pytest.mark.parametrize("how", list(_ALONG))
def test_ops_along_time_keep_the_function(how):
    x = torch.randn(16, 3, 10)
    model, other = (_built(lambda: AlongTime(how), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _between("conv", 8), x, 8)


@pytest.mark.parametrize("how", list(_ALONG_THE_UNITS))
def test_ops_along_the_units_are_refused(how):
    x = torch.randn(16, 3, 10)
    model = _built(lambda: AlongTime(how), 0)
    with pytest.raises(UnsupportedModelError, match="the units themselves"):
        fuse([model, model], config=EXACT, inputs=x)


_CELLS = {"LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell, "RNNCell": nn.RNNCell}


class SteppedCell(nn.Module):
    """A recurrent cell stepped in ``forward`` (a seq2seq decoder's, an agent's), its
    state started from zeros (``start="zeros"``), left to the cell's default (``"none"``)
    or read from the input (``"data"``, refused); cells were refused as unsupported."""

    def __init__(self, kind: str, start: str = "zeros"):
        super().__init__()
        self.lstm, self.start = kind == "LSTMCell", start
        self.cell, self.head = _CELLS[kind](4, 6), nn.Linear(6, 3)

    def forward(self, x):
        if self.start == "zeros":
            h = x.new_zeros(x.shape[0], 6)
            state = (h, torch.zeros_like(h)) if self.lstm else h
        else:
            state = None if self.start == "none" else x[:, 0].repeat(1, 2)[:, :6]
        for t in range(5):  # fx unrolls a loop of a fixed length, not range(x.shape[1])
            state = self.cell(x[:, t], state)
        return self.head(state[0] if self.lstm else state)


def _permute_cell(model: SteppedCell, generator: torch.Generator):
    """The hidden units, in every gate's block of the cell's weights and biases."""
    model = copy.deepcopy(model)
    p = _perm(6, generator)
    _permute_recurrent_units(model.cell, p)
    _columns(model.head, p)
    return model


def _permute_recurrent_units(module: nn.Module, p: torch.Tensor, suffix: str = "",
                             inputs: torch.Tensor | None = None) -> None:
    """A recurrent cell's units by ``p`` (or a layer's, ``suffix`` naming the layer and
    direction: ``"_l0_reverse"``), in every gate's block of its weights and biases and
    in the state its recurrent weight reads; its input features by ``inputs``."""
    ih = getattr(module, f"weight_ih{suffix}")
    gates = torch.cat([g * len(p) + p for g in range(ih.shape[0] // len(p))])
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            tensor = getattr(module, f"{name}{suffix}")
            tensor.copy_(tensor[gates])
        hh = getattr(module, f"weight_hh{suffix}")
        hh.copy_(hh[:, p])
        if inputs is not None:
            ih.copy_(ih[:, inputs])


@pytest.mark.parametrize("kind", list(_CELLS))
@pytest.mark.parametrize("start", ["zeros", "none"])
def test_recurrent_cells_stepped_in_forward_keep_the_function(kind, start):
    x = torch.randn(16, 5, 4)
    model, other = (_built(lambda: SteppedCell(kind, start), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_cell, x, 9)


def test_a_cell_state_read_from_data_is_refused():
    x = torch.randn(16, 5, 4)
    model = _built(lambda: SteppedCell("GRUCell", "data"), 0)
    with pytest.raises(UnsupportedModelError, match="a state read from data"):
        fuse([model, model], config=EXACT, inputs=x)


_LAYERS = {"LSTM": nn.LSTM, "GRU": nn.GRU}


class StartedLayer(nn.Module):
    """A two-layer recurrent layer given its initial state as tutorials write it,
    ``torch.zeros(layers, batch, hidden).to(x.device)`` (``start="zeros-to"``), or read
    from the input (``"data"``: the state would stay as it is while the units move, and
    the function change; it was fused without a word)."""

    def __init__(self, kind: str, start: str):
        super().__init__()
        self.lstm, self.start = kind == "LSTM", start
        self.rnn = _LAYERS[kind](4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        if self.start == "zeros-to":
            h = torch.zeros(2, x.size(0), 6).to(x.device)
        else:
            h = x[:, :2, :].repeat(1, 1, 2)[:, :, :6].transpose(0, 1).contiguous()
        state = (h, torch.zeros(2, x.size(0), 6).to(x)) if self.lstm else h
        out, _ = self.rnn(x, state)
        return self.head(out[:, -1])


def _permute_layers(model: StartedLayer, generator: torch.Generator):
    """The hidden units of both layers, in every gate's block."""
    model = copy.deepcopy(model)
    previous = None
    for layer in range(2):
        p = _perm(6, generator)
        _permute_recurrent_units(model.rnn, p, f"_l{layer}", previous)
        previous = p
    _columns(model.head, previous)
    return model


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_a_layer_started_from_zeros_moved_to_the_device_keeps_the_function(kind):
    x = torch.randn(16, 5, 4)
    model, other = (_built(lambda: StartedLayer(kind, "zeros-to"), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_layers, x, 5)


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_a_layer_state_read_from_data_is_refused(kind):
    x = torch.randn(16, 5, 4)
    model = _built(lambda: StartedLayer(kind, "data"), 0)
    with pytest.raises(UnsupportedModelError, match="a state read from data"):
        fuse([model, model], config=EXACT, inputs=x)


class FilledFromUnits(nn.Module):
    """An LSTM cell started from an encoder's state and zero memory shaped as it,
    ``torch.zeros_like(h)``; a zero column from ``h.new_zeros``; a clamp whose input is
    passed by keyword. Each was refused (as acting on aligned units, or as taking a second
    tensor)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.cell, self.head = nn.Linear(4, 6), nn.LSTMCell(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.encoder(x[:, 0]))
        state = (h, torch.zeros_like(h))
        for t in range(5):
            state = self.cell(x[:, t], state)
        return self.head(torch.clamp(min=-0.5, max=0.5, input=state[0])
                         + h.new_zeros(h.shape[0], 1))


def _permute_filled_from_units(model: FilledFromUnits, generator: torch.Generator):
    model = copy.deepcopy(model)
    p = _perm(6, generator)
    _rows(model.encoder, p)
    _permute_recurrent_units(model.cell, p)
    _columns(model.head, p)
    return model


def test_fills_shaped_as_aligned_units_keep_the_function():
    x = torch.randn(16, 5, 4)
    model, other = (_built(FilledFromUnits, seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_filled_from_units, x, 4)


class PackedText(nn.Module):
    """Variable-length token sequences as NLP code runs them: lengths from the padding,
    ``pack_padded_sequence`` (unsorted, then moved to the inputs' device), a
    bidirectional GRU reading ``h_n`` (``"gru"``)
    or an LSTM whose outputs ``pad_packed_sequence`` unpacks, max-pooled over time
    (``"lstm"``). fx could not trace packing; refused before."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.rnn = (nn.GRU(6, 8, batch_first=True, bidirectional=True) if kind == "gru"
                    else nn.LSTM(6, 8, batch_first=True))
        self.head = nn.Linear(16 if kind == "gru" else 8, 3)

    def forward(self, tokens):
        lengths = (tokens != 0).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths,
                                                   batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed.to(tokens.device))
        if self.kind == "gru":
            return self.head(torch.cat([state[-2], state[-1]], dim=1))
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return self.head(padded.max(dim=1).values)


def _permute_packed_text(model: PackedText, generator: torch.Generator):
    """The embedding's features, and every direction's hidden units in each gate block."""
    model = copy.deepcopy(model)
    e = _perm(6, generator)
    suffixes = ("", "_reverse") if model.kind == "gru" else ("",)
    units = [_perm(8, generator) for _ in suffixes]
    _columns(model.embed, e)
    for suffix, p in zip(suffixes, units, strict=True):
        _permute_recurrent_units(model.rnn, p, f"_l0{suffix}", e)
    _columns(model.head, torch.cat([p + 8 * i for i, p in enumerate(units)]))
    return model


def _padded_tokens() -> torch.Tensor:
    tokens = torch.randint(1, 20, (6, 7), generator=torch.Generator().manual_seed(0))
    for row, length in enumerate((7, 5, 3, 7, 1, 4)):
        tokens[row, length:] = 0
    return tokens


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_packed_sequences_keep_the_function(kind):
    model, other = (_built(lambda: PackedText(kind), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_packed_text, _padded_tokens(), 6)


class PackedDataRead(PackedText):
    """Reads the packed features directly (``packed.data``): refused by name."""

    def forward(self, tokens):
        lengths = (tokens != 0).sum(1).cpu()
        out, _ = self.rnn(nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=False))
        return self.head(out.data).sum(0, keepdim=True).expand(tokens.shape[0], -1)


def test_a_packed_sequence_read_otherwise_is_refused():
    model = _built(lambda: PackedDataRead("lstm"), 0)
    with pytest.raises(UnsupportedModelError, match="uses a PackedSequence"):
        fuse([model, model], config=EXACT, inputs=_padded_tokens())


class PackedOrPadded(nn.Module):
    """Takes a PackedSequence or a tensor, as NLP code does (``isinstance(x,
    PackedSequence)``, the class imported by name): tracing with the packing functions
    recorded as calls once broke the check."""

    def __init__(self):
        super().__init__()
        self.hidden, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        if isinstance(x, PackedSequence):
            x = x.data
        return self.head(torch.relu(self.hidden(x)))


def _permute_packed_or_padded(model: PackedOrPadded, generator: torch.Generator):
    model = copy.deepcopy(model)
    p = _perm(8, generator)
    _rows(model.hidden, p)
    _columns(model.head, p)
    return model


def test_a_type_check_on_packed_sequences_still_traces():
    model, other = (_built(PackedOrPadded, seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_packed_or_padded, torch.randn(8, 4), 2)


class WeightNormedPacked(nn.Module):
    """A GRU under weight_norm given packed sequences (its rule once looked its type up
    exactly, and crashed)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.rnn = weight_norm(nn.GRU(6, 8, batch_first=True), "weight_hh_l0")
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), (tokens != 0).sum(1).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


def _permute_weight_normed_packed(model: WeightNormedPacked, generator: torch.Generator):
    """The embedding's features and the GRU's units, in its weight_norm's magnitude and
    direction."""
    model = copy.deepcopy(model)
    e, p = _perm(6, generator), _perm(8, generator)
    rows = torch.cat([g * 8 + p for g in range(3)])
    hh = model.rnn.parametrizations.weight_hh_l0
    with torch.no_grad():
        model.embed.weight.copy_(model.embed.weight[:, e])
        model.rnn.weight_ih_l0.copy_(model.rnn.weight_ih_l0[rows][:, e])
        for name in ("bias_ih_l0", "bias_hh_l0"):
            getattr(model.rnn, name).copy_(getattr(model.rnn, name)[rows])
        hh.original0.copy_(hh.original0[rows])
        hh.original1.copy_(hh.original1[rows][:, p])
    _columns(model.head, p)
    return model


def test_a_weight_normed_recurrent_layer_given_packed_sequences_keeps_the_function():
    model, other = (_built(WeightNormedPacked, seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_weight_normed_packed, _padded_tokens(), 8)


class PackedOtherwise(nn.Module):
    """A PackedSequence made by pack_sequence: refused by name (it crashed)."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        packed = nn.utils.rnn.pack_sequence([x[0], x[1, :3]], enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


def test_a_packed_sequence_made_otherwise_is_refused():
    model = _built(PackedOtherwise, 0)
    with pytest.raises(UnsupportedModelError, match="made otherwise than by pack_padded"):
        align(model, model, config=EXACT, inputs=torch.randn(2, 5, 4))


class RewiredLayer(nn.TransformerEncoderLayer):
    """torch's encoder layer with its own forward: ``norm2`` normalises the
    feed-forward's hidden units (as wide as the stream here), not the stream."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src + self.self_attn(src, src, src, need_weights=False)[0]
        return self.norm1(x + self.linear2(self.norm2(torch.relu(self.linear1(x)))))


class RewiredStack(nn.Module):
    """Rewired layers in an ``nn.TransformerEncoder``: its rule described them as torch's
    own, and align() computed another function (off by 0.32 of 0.89); refused now."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(
            RewiredLayer(8, 2, dim_feedforward=8, dropout=0.0, batch_first=True), 2,
            enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def test_a_subclass_of_a_transformer_layer_in_torchs_stack_is_refused():
    model, other = (_built(RewiredStack, seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="not torch's TransformerEncoderLayer itself"):
        align(other, model, config=EXACT, inputs=torch.randn(4, 5, 8))


class ClassicBiLSTM(nn.Module):
    """The tutorials' two-layer bidirectional LSTM, its last layer's two final states
    read as ``torch.cat((h[-2, :, :], h[-1, :, :]), dim=1)``: refused before (a stacked
    state could only be indexed by one integer)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.head(torch.cat((h[-2, :, :], h[-1, ...]), dim=1))


def _permute_classic_bilstm(model: ClassicBiLSTM, generator: torch.Generator):
    """Every layer's and direction's units, in each of the four gate blocks; the second
    layer reads both directions of the first."""
    model = copy.deepcopy(model)
    units = [[_perm(6, generator) for _ in range(2)] for _ in range(2)]
    first = torch.cat([units[0][0], 6 + units[0][1]])  # the second layer's inputs
    for layer, directions in enumerate(units):
        for suffix, p in zip(("", "_reverse"), directions, strict=True):
            _permute_recurrent_units(model.lstm, p, f"_l{layer}{suffix}",
                                     first if layer == 1 else None)
    _columns(model.head, torch.cat([units[1][0], 6 + units[1][1]]))
    return model


def test_the_last_layers_states_indexed_with_slices_keep_the_function():
    model, other = (_built(ClassicBiLSTM, seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_classic_bilstm, torch.randn(8, 5, 4), 3)


class SplitAfterTies(nn.Module):
    """Units joined with others before they are split into halves by a GLU or added to
    a concatenation: a per-unit scale, a second layer added, a weight read by
    ``F.linear`` (each once refused: "splits units that are tied to others")."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        if variant == "functional":
            self.w, self.b = nn.Parameter(torch.randn(10, 6)), nn.Parameter(torch.randn(10))
        else:
            self.fc = nn.Linear(6, 10)
        if variant in ("scale", "concatenation"):
            self.scale = nn.Parameter(torch.rand(10) + 0.5)
        if variant == "sum":
            self.other = nn.Linear(6, 10)
        if variant == "concatenation":
            self.a, self.c = nn.Linear(6, 4), nn.Linear(6, 6)
        self.head = nn.Linear(10 if variant == "concatenation" else 5, 3)

    def forward(self, x):
        if self.variant == "concatenation":
            h = torch.cat([self.a(x), self.c(x)], 1) + self.fc(x) * self.scale
            return self.head(torch.relu(h))
        if self.variant == "functional":
            h = F.linear(x, self.w, self.b)
        elif self.variant == "scale":
            h = self.fc(x) * self.scale
        else:
            h = self.fc(x) + self.other(x)
        return self.head(F.glu(h, -1))


def _permute_split_after_ties(model: SplitAfterTies, generator: torch.Generator):
    model = copy.deepcopy(model)
    if model.variant == "concatenation":
        pa, pc = _perm(4, generator), _perm(6, generator)
        _rows(model.a, pa)
        _rows(model.c, pc)
        units = torch.cat([pa, 4 + pc])
        head = units
    else:
        p = _perm(5, generator)
        units, head = torch.cat([p, 5 + p]), p  # a value and its gate move together
    with torch.no_grad():
        if model.variant == "functional":
            model.w.copy_(model.w[units])
            model.b.copy_(model.b[units])
        else:
            _rows(model.fc, units)
        if model.variant in ("scale", "concatenation"):
            model.scale.copy_(model.scale[units])
        if model.variant == "sum":
            _rows(model.other, units)
    _columns(model.head, head)
    return model


@pytest.mark.parametrize("variant", ["functional", "scale", "sum", "concatenation"])
def test_units_joined_with_others_then_split_keep_the_function(variant):
    x = torch.randn(16, 6)
    model, other = (_built(lambda: SplitAfterTies(variant), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_split_after_ties, x, 3)


class ScaleSplitThenReused(nn.Module):
    """A per-unit scale whose units are split by a GLU, and which also scales another
    layer's units whole."""

    def __init__(self):
        super().__init__()
        self.fc, self.other = nn.Linear(6, 10), nn.Linear(6, 10)
        self.scale = nn.Parameter(torch.rand(10) + 0.5)
        self.head, self.head2 = nn.Linear(5, 3), nn.Linear(10, 3)

    def forward(self, x):
        gated = F.glu(self.fc(x) * self.scale, -1)
        return self.head(gated) + self.head2(self.other(x) * self.scale)


def test_a_scale_split_with_its_units_and_used_whole_is_refused():
    model, other = (_built(ScaleSplitThenReused, seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="split into pieces .* and also used"):
        align(other, model, config=EXACT, inputs=torch.randn(16, 6))


class TokenMixer(nn.Module):
    """MLP-Mixer's token mixing: a Linear over the tokens of a (batch, channels, tokens)
    tensor whose channels are hidden units too."""

    def __init__(self):
        super().__init__()
        self.channels, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.tokens, self.back = nn.Linear(6, 5), nn.Linear(5, 6)

    def forward(self, x):
        h = F.relu(self.channels(x))
        mixed = self.back(F.relu(self.tokens(h.transpose(1, 2)))).transpose(1, 2)
        return self.head((h + mixed).mean(1))


def _permute_token_mixer(model: TokenMixer, generator: torch.Generator) -> TokenMixer:
    model = copy.deepcopy(model)
    channels, hidden = _perm(8, generator), _perm(5, generator)
    _rows(model.channels, channels)
    _columns(model.head, channels)
    _rows(model.tokens, hidden)
    _columns(model.back, hidden)
    return model


def test_activations_of_units_carried_beside_other_units_are_not_their_cost():
    """The token mixer's activations come with the channels in each client's own order:
    their rows are not the same samples in two clients (a wrong function once, d = 0.17,
    with ``cost="activations"``), so the weights define those units."""
    x = torch.randn(32, 6, 4)
    model = _built(TokenMixer, 0)
    config = FusionConfig.from_options(distill_steps=0, cost="activations")
    copies = [model, _permute_token_mixer(model, torch.Generator().manual_seed(1))]
    _same_function(copies[1], model, x)
    _same_function(fuse(copies, config=config, inputs=x), model, x)
    other = _built(TokenMixer, 1)
    _same_function(align(other, model, config=config, inputs=x), other, x)


class PairedEncoder(nn.Module):
    """One encoder applied to two inputs, compared by a cosine similarity or a pairwise
    distance (a siamese network), or its features compared with learned prototypes by
    ``torch.cdist`` (FedProto); each once refused as acting on aligned units."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.first, self.second = nn.Linear(6, 10), nn.Linear(10, 8)
        if variant == "prototypes":
            self.prototypes = nn.Parameter(torch.randn(4, 8))
        self.compare = (nn.CosineSimilarity(dim=1) if variant == "cosine-module" else
                        nn.PairwiseDistance(keepdim=True) if variant == "distance-module"
                        else None)

    def encode(self, x):
        return self.second(F.relu(self.first(x)))

    def forward(self, x):
        a = self.encode(x[:, 0])
        if self.variant == "prototypes":
            return -torch.cdist(a, self.prototypes)
        b = self.encode(x[:, 1])
        if self.compare is not None:
            return self.compare(a, b)
        if self.variant == "cosine":
            return F.cosine_similarity(a, b, dim=-1)
        return F.pairwise_distance(a, b, keepdim=True)


def _permute_paired_encoder(model: PairedEncoder, generator: torch.Generator):
    model = copy.deepcopy(model)
    hidden, features = _perm(10, generator), _perm(8, generator)
    _rows(model.first, hidden)
    _columns(model.second, hidden)
    _rows(model.second, features)
    if model.variant == "prototypes":
        with torch.no_grad():
            model.prototypes.copy_(model.prototypes[:, features])
    return model


@pytest.mark.parametrize("variant", ["cosine", "cosine-module", "distance",
                                     "distance-module", "prototypes"])
def test_similarities_and_distances_of_aligned_features_keep_the_function(variant):
    x = torch.randn(16, 2, 6)
    model, other = (_built(lambda: PairedEncoder(variant), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_paired_encoder, x, 5)


def test_distances_between_aligned_units_themselves_are_refused():
    class UnitDistances(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 8)

        def forward(self, x):
            h = self.fc(x)
            return torch.cdist(h.T, h.T).sum(1)

    model, other = (_built(UnitDistances, seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="pairs rows that hold aligned units"):
        align(other, model, config=EXACT, inputs=torch.randn(16, 6))


class SplitThenConstrained(nn.Module):
    """Units split into pieces, then used whole where a constraint ties them: a
    GroupNorm's groups, a grouped convolution's blocks, heads of one temperature each
    (wrong functions once, d = 0.04-0.87, or a KeyError; the GroupNorm case predates
    the split of units joined with others)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Linear(4, 3)
        if variant == "heads":
            self.scale = nn.Parameter(torch.rand(8) + 0.5)
            self.q, self.k, self.v = (nn.Linear(3, 16) for _ in range(3))
            self.out = nn.Linear(16, 3)
        else:
            self.other = nn.Conv2d(3, 8, 1)
        if variant == "grouped-convolution":
            self.grouped = nn.Conv2d(8, 4, 1, groups=2)

    def forward(self, x):
        if self.variant == "heads":
            a, b = (self.conv(x) * self.scale.view(1, 8, 1, 1)).chunk(2, 1)
        else:
            other = self.other(x)
            a, b = (self.conv(x) + other).chunk(2, 1)
        gated = self.head((a * b).mean((2, 3)))
        if self.variant == "group-norm":
            return gated + F.group_norm(other, 2).mean((1, 2, 3))[:, None]
        if self.variant == "grouped-convolution":
            return gated + self.grouped(other).mean((1, 2, 3))[:, None]
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = (f(tokens).unflatten(-1, (8, 2)).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2)) * self.scale.view(1, 8, 1, 1)
        attended = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        return gated + self.out(attended).mean(1)


@pytest.mark.parametrize("variant", ["group-norm", "grouped-convolution", "heads"])
def test_pieces_whose_units_are_constrained_after_the_split_are_refused(variant):
    model, other = (_built(lambda: SplitThenConstrained(variant), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="split into pieces|tied to others"):
        align(other, model, config=EXACT, inputs=torch.randn(4, 3, 5, 5))


class Generator(nn.Module):
    """A DCGAN-style generator: a Linear's units viewed as channels of an image
    (``fc(z).view(-1, C, H, W)``, ``nn.Unflatten``, or ``(C, L)`` for a signal), then
    BatchNorm and transposed convolutions (once refused: "'bn.weight' is used on units
    split into heads", or "splits aligned units across dimensions")."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        shape = (8, 6) if variant == "signal" else (8, 2, 2)
        self.shape = shape
        self.fc = nn.Linear(5, math.prod(shape))
        self.unflatten = nn.Unflatten(1, shape) if variant == "unflatten" else None
        norm, up = ((nn.BatchNorm1d, nn.ConvTranspose1d) if variant == "signal"
                    else (nn.BatchNorm2d, nn.ConvTranspose2d))
        self.bn, self.up, self.bn2 = norm(8), up(8, 6, 4, 2, 1), norm(6)
        self.out = up(6, 1, 4, 2, 1)

    def forward(self, z):
        h = self.fc(z)
        h = self.unflatten(h) if self.unflatten is not None else h.view(-1, *self.shape)
        h = F.relu(self.bn2(self.up(F.relu(self.bn(h)))))
        return torch.tanh(self.out(h)).flatten(1)


def _permute_generator(model: Generator, generator: torch.Generator) -> Generator:
    """Whole channels of the Linear's units (their positions kept), then the channels of
    the transposed convolution."""
    model = copy.deepcopy(model)
    channels, hidden = _perm(8, generator), _perm(6, generator)
    size = math.prod(model.shape[1:])
    _rows(model.fc, torch.cat([int(c) * size + torch.arange(size) for c in channels]))
    with torch.no_grad():  # transposed convolutions: weight (in, out, kernel)
        model.up.weight.copy_(model.up.weight[channels][:, hidden])
        model.up.bias.copy_(model.up.bias[hidden])
        model.out.weight.copy_(model.out.weight[hidden])
        for norm, order in ((model.bn, channels), (model.bn2, hidden)):
            for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                tensor.copy_(tensor[order])
    return model


def _random_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for tensor in (module.weight, module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape,
                                                          generator=generator))
    return model


@pytest.mark.parametrize("variant", ["view", "unflatten", "signal"])
def test_a_layer_viewed_as_channels_of_an_image_keeps_the_function(variant):
    x = torch.randn(16, 5)
    model, other = (_random_batch_norms(_built(lambda: Generator(variant), seed), seed)
                    for seed in (0, 1))
    graph = build_alignment_graph(model, x)
    assert next(g for g in graph.groups if g.label == "fc").rigid
    _aligns_and_fuses_exactly(model, other, _permute_generator, x, 6)


class KimTextCNN(nn.Module):
    """Kim's text CNN: ``Conv2d(1, n, (h, embedding_dim))`` over the embeddings as one
    image channel, so each kernel spans the embedding's units whole (once refused:
    "convolves over aligned units")."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(30, 8)
        self.convs = nn.ModuleList(nn.Conv2d(1, 4, (h, 8)) for h in (2, 3))
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        e = self.embedding(ids).unsqueeze(1)
        pooled = [F.relu(conv(e)).amax((2, 3)) for conv in self.convs]
        return self.head(torch.cat(pooled, 1))


def _permute_kim_text_cnn(model: KimTextCNN, generator: torch.Generator) -> KimTextCNN:
    model = copy.deepcopy(model)
    units, filters = _perm(8, generator), [_perm(4, generator) for _ in model.convs]
    with torch.no_grad():
        model.embedding.weight.copy_(model.embedding.weight[:, units])
        for conv, order in zip(model.convs, filters, strict=True):
            conv.weight.copy_(conv.weight[order][..., units])
            conv.bias.copy_(conv.bias[order])
    _columns(model.head, torch.cat([filters[0], 4 + filters[1]]))
    return model


def test_a_kernel_spanning_the_embedding_whole_keeps_the_function():
    ids = torch.randint(0, 30, (16, 7))
    model, other = (_built(KimTextCNN, seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_kim_text_cnn, ids, 7)


def test_a_kernel_spanning_units_with_padding_is_refused():
    model, other = (_built(KimTextCNN, seed) for seed in (0, 1))
    for m in (model, other):
        m.convs[0].padding = (0, 1)
    with pytest.raises(UnsupportedModelError, match="convolves over aligned units"):
        align(other, model, config=EXACT, inputs=torch.randint(0, 30, (16, 7)))


class SpatialGatingMLP(nn.Module):
    """gMLP: the spatial gating unit mixes the tokens with ``Conv1d(T, T, 1)`` over
    ``(B, T, D)``, a kernel of one over the units (once refused: "convolves over aligned
    units")."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)
        self.up, self.gate_norm = nn.Linear(8, 24), nn.LayerNorm(12)
        self.spatial, self.down = nn.Conv1d(_T, _T, 1), nn.Linear(12, 8)

    def forward(self, x):
        h = self.inp(x)
        u, v = F.gelu(self.up(self.norm(h))).chunk(2, -1)
        return self.head((h + self.down(u * self.spatial(self.gate_norm(v)))).mean(1))


def _permute_spatial_gating(model: SpatialGatingMLP, generator: torch.Generator):
    model = copy.deepcopy(model)
    stream, hidden = _perm(8, generator), _perm(12, generator)
    for layer in (model.inp, model.norm, model.down):
        _rows(layer, stream)
    _columns(model.head, stream)
    _columns(model.up, stream)
    _rows(model.up, torch.cat([hidden, 12 + hidden]))
    _rows(model.gate_norm, hidden)
    _columns(model.down, hidden)
    return model


def test_a_kernel_of_one_over_units_keeps_the_function():
    x = torch.randn(16, _T, 6)
    model, other = (_built(SpatialGatingMLP, seed) for seed in (0, 1))
    for m in (model, other):
        with torch.no_grad():
            for norm in (m.norm, m.gate_norm):
                norm.weight.normal_()
                norm.bias.normal_()
    _aligns_and_fuses_exactly(model, other, _permute_spatial_gating, x, 8)


class ImageViewThen(nn.Module):
    """A Linear's units viewed as channels of an image, then a norm without parameters
    (a ValueError once: a group of one value per channel with no tensor) or a depthwise
    convolution (a ValueError once: its channels taken for the Linear's units)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.fc, self.out = nn.Linear(5, 8 * 2 * 2), nn.Conv2d(8, 3, 3, padding=1)
        self.after = (nn.InstanceNorm2d(8) if variant == "instance-norm"
                      else nn.Conv2d(8, 8, 3, padding=1, groups=8))

    def forward(self, z):
        return self.out(F.relu(self.after(self.fc(z).view(-1, 8, 2, 2)))).flatten(1)


def test_a_norm_without_parameters_over_image_channels_keeps_the_function():
    x = torch.randn(16, 5)
    model, other = (_built(lambda: ImageViewThen("instance-norm"), seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


def test_a_depthwise_convolution_over_image_channels_of_a_layer_is_refused():
    model, other = (_built(lambda: ImageViewThen("depthwise"), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="depthwise convolution on channels that "
                                                    "are heads|convolves over aligned units"):
        align(other, model, config=EXACT, inputs=torch.randn(16, 5))


class KernelOverFlattenedPositions(nn.Module):
    """A kernel as long as channels x positions flattened, at the traced length only: at
    another length it slides across the units (a wrong function once, d = 0.41, at a
    longer input)."""

    def __init__(self):
        super().__init__()
        self.channels, self.conv = nn.Conv1d(3, 4, 1), nn.Conv1d(1, 5, 4 * 6)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.channels(x)).flatten(1).unsqueeze(1)
        return self.head(F.relu(self.conv(h)).amax(-1))


def test_a_kernel_spanning_units_merged_with_positions_is_refused():
    model, other = (_built(KernelOverFlattenedPositions, seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="convolves over aligned units"):
        align(other, model, config=EXACT, inputs=torch.randn(16, 3, 6))


class UnsortedTopK(nn.Module):
    """``topk(..., sorted=False)``: over hidden units its values come in an order that
    moves with them (a wrong function once, d = 0.13); over time they do not."""

    def __init__(self, over_units: bool):
        super().__init__()
        self.over_units = over_units
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(3 if over_units else 8, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.over_units:
            return self.head(h.mean(1).topk(3, dim=1, sorted=False).values)
        return self.head(torch.topk(h, 2, 1, True, False)[0].mean(1))


def test_unsorted_topk_over_units_is_refused_and_over_time_keeps_the_function():
    x = torch.randn(16, _T, 6)
    model, other = (_built(lambda: UnsortedTopK(True), seed) for seed in (0, 1))
    with pytest.raises(UnsupportedModelError, match="unsorted"):
        align(other, model, config=EXACT, inputs=x)
    model, other = (_built(lambda: UnsortedTopK(False), seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class SlicedUnits(nn.Module):
    """A layer's units split by slices: a GLU written ``h[:, :n] * sigmoid(h[:, n:])``,
    an LSTM cell's four gates sliced out, two uneven slices read by two layers (each
    once refused: "indexes into aligned units"), or by ``split([3, 7])`` (once refused:
    "splits aligned units apart unevenly")."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.fc = nn.Linear(6, 10 if variant in ("uneven", "split") else 16)
        if variant in ("uneven", "split"):
            self.a, self.b = nn.Linear(3, 3), nn.Linear(7, 3)
        else:
            self.head = nn.Linear(4 if variant == "gates" else 8, 3)
        if variant == "traced-bounds":
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(8, 3), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        if self.variant == "glu":
            return self.head(h[:, :8] * torch.sigmoid(h[:, 8:]))
        if self.variant == "traced-bounds":  # a window at an offset computed from the shape
            h, q = torch.relu(h), h.size(1) // 8
            return (self.a(h[:, :4]) + self.b(h[:, 4:12]) + self.c(h[:, 12:])
                    + self.head(h[:, q:q + 8]))
        if self.variant == "uneven":
            h = torch.relu(h)
            return self.a(h[..., :3]) + self.b(h[..., 3:])
        if self.variant == "split":  # torch.split into uneven sizes
            first, second = torch.relu(h).split([3, 7], -1)
            return self.a(first) + self.b(second)
        i, f, o = (torch.sigmoid(h[:, 4 * k:4 * (k + 1)]) for k in range(3))
        return self.head(o * torch.tanh(f * torch.tanh(h[:, 12:]) + i))


def _permute_sliced_units(model: SlicedUnits, generator: torch.Generator) -> SlicedUnits:
    model = copy.deepcopy(model)
    if model.variant in ("uneven", "split"):
        first, second = _perm(3, generator), _perm(7, generator)
        _rows(model.fc, torch.cat([first, 3 + second]))
        _columns(model.a, first)
        _columns(model.b, second)
        return model
    width = 8 if model.variant == "glu" else 4
    p = _perm(width, generator)
    _rows(model.fc, torch.cat([k * width + p for k in range(16 // width)]))  # gates alike
    _columns(model.head, p)
    return model


@pytest.mark.parametrize("variant", ["glu", "gates", "uneven", "split"])
def test_units_split_by_slices_keep_the_function(variant):
    x = torch.randn(16, 6)
    model, other = (_built(lambda: SlicedUnits(variant), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_sliced_units, x, 9)


def test_slices_with_bounds_computed_from_the_shape_keep_the_function():
    """Every slice's bounds count, those computed from the shape too (a wrong function
    once, d = 0.75, when a window at a computed offset was split as its neighbour)."""
    x = torch.randn(16, 6)
    model, other = (_built(lambda: SlicedUnits("traced-bounds"), seed) for seed in (0, 1))
    _same_function(align(other, model, config=EXACT, inputs=x), other, x)


class MixtureOfExperts(nn.Module):
    """MMoE: experts stacked, mixed by a softmax gate of one unit per expert, summed in a
    product, ``einsum("be,beh->bh")`` or ``bmm`` (once refused: "multiplies aligned units
    with unaligned ones"); the gate's units keep their places, as in the elementwise
    ``(g.unsqueeze(-1) * e).sum(1)``."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.experts = nn.ModuleList(nn.Linear(6, 8) for _ in range(3))
        self.gate, self.tower = nn.Linear(6, 3), nn.Linear(8, 2)

    def forward(self, x):
        experts = torch.stack([F.relu(expert(x)) for expert in self.experts], 1)
        gates = F.softmax(self.gate(x), -1)
        if self.variant == "einsum":
            return self.tower(torch.einsum("be,beh->bh", gates, experts))
        return self.tower(torch.bmm(gates.unsqueeze(1), experts).squeeze(1))


def _permute_mixture_of_experts(model: MixtureOfExperts, generator: torch.Generator):
    """The experts' units alike (they are mixed unit by unit); the gate's in place."""
    model = copy.deepcopy(model)
    p = _perm(8, generator)
    for expert in model.experts:
        _rows(expert, p)
    _columns(model.tower, p)
    return model


@pytest.mark.parametrize("variant", ["einsum", "bmm"])
def test_experts_mixed_by_a_gate_in_a_product_keep_the_function(variant):
    x = torch.randn(16, 6)
    model, other = (_built(lambda: MixtureOfExperts(variant), seed) for seed in (0, 1))
    _aligns_and_fuses_exactly(model, other, _permute_mixture_of_experts, x, 10)
