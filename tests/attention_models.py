"""Tiny attention models and hand-written, function-preserving permutations of them.

Only ``torch`` and two building blocks of the zoo's Llama (``SwiGLU``, ``rotate_half``)
are imported, nothing from the engine (``otfusion.fusion``), so the symmetries written
down here are a second, independent description against which the fusion engine's
alignment graph is checked.

Symmetries of a Transformer, all drawn at random by :func:`permute`:

* the residual stream (width ``D``) is ONE permutation through the whole model: the
  embeddings' output units, positional embedding and class token, every LayerNorm, the
  input columns of Q/K/V and of MLP ``fc1``, the output rows (and bias) of the attention
  output projection and of MLP ``fc2``, the final norm and the head's input columns;
* heads are permuted as whole heads (one ``sigma`` for Q, K, V and the output
  projection's input columns);
* within a head, Q and K share one permutation of the head dimension (``q . k`` and so
  the softmax are unchanged) and V and the output projection's input columns share
  another one;
* the MLP hidden units have their own permutation (the gate and the up projection of a
  SwiGLU share it);
* under rotary position embeddings (the Llama models), Q and K keep their units in place
  within each head: the rotation pairs units by their place, so only whole heads move.

Every permutation is an index: position ``i`` of the copy takes unit ``index[i]`` of the
original (``index_select``).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from reindex import random_perm as _perm
from reindex import take as _take
from torch import nn

from otfusion.zoo.llama import SwiGLU, rotate_half

DIM = 8
HEADS = 2
HEAD_DIM = DIM // HEADS
HIDDEN = 16
TOKENS = 5
FEATURES = 6
CLASSES = 5
VOCAB = 12
DEPTH = 2
IMAGE = 8
PATCH = 4


# ------------------------------------------------------------------------------- models


class MHABlock(nn.Module):
    """Pre-norm block around ``nn.MultiheadAttention`` (packed Q/K/V); ``causal``: a
    causal float mask (-inf above the diagonal) for ``tokens`` positions, kept as a
    buffer in the state_dict and passed as ``attn_mask``; ``keywords``: query, key and
    value passed by keyword."""

    def __init__(self, dim: int, heads: int, hidden: int, causal: bool = False,
                 tokens: int = TOKENS, keywords: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(tokens) if causal else None)
        self.keywords = keywords

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.keywords:
            x = x + self.attn(query=h, key=h, value=h, attn_mask=self.mask,
                              need_weights=False)[0]
        else:
            x = x + self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MHAClassifier(nn.Module):
    """(B, T, 6) floats -> embedding + positions -> class token -> 2 blocks -> (B, 5).
    ``causal``: the blocks mask attention causally, and the class token comes last (so
    that it sees every position)."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, hidden: int = HIDDEN,
                 tokens: int = TOKENS, features: int = FEATURES, classes: int = CLASSES,
                 depth: int = DEPTH, causal: bool = False, keywords: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, tokens, dim))
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(MHABlock(dim, heads, hidden, causal, tokens + 1, keywords)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos_embed
        cls = self.cls.expand(x.shape[0], -1, -1)
        x = torch.cat([x, cls] if self.causal else [cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, -1 if self.causal else 0])


def _own_weights(encoder: nn.TransformerEncoder) -> nn.TransformerEncoder:
    """The encoder deep-copies its layer: give every layer its own weights."""
    for clone in encoder.layers:
        clone.self_attn._reset_parameters()
        clone.linear1.reset_parameters()
        clone.linear2.reset_parameters()
    return encoder


class TutorialLM(nn.Module):
    """The PyTorch tutorial's language model: (T, B) token ids, sequence first -> scaled
    embedding + a sinusoidal positional table (a persistent buffer, cut to the input's
    length) -> ``nn.TransformerEncoder`` with a causal mask made in ``forward`` -> (T, B,
    V) logits."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, heads: int = HEADS,
                 hidden: int = HIDDEN, depth: int = DEPTH, max_len: int = 4 * TOKENS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        position = torch.arange(max_len).unsqueeze(1)
        frequencies = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, 1, dim)
        table[:, 0, 0::2] = torch.sin(position * frequencies)
        table[:, 0, 1::2] = torch.cos(position * frequencies)
        self.register_buffer("pe", table)
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.0)
        self.encoder = _own_weights(nn.TransformerEncoder(layer, depth,
                                                          enable_nested_tensor=False))
        self.head = nn.Linear(dim, vocab)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        x = self.embed(src) * math.sqrt(self.embed.embedding_dim) + self.pe[:src.size(0)]
        mask = nn.Transformer.generate_square_subsequent_mask(src.size(0))
        return self.head(self.encoder(x, mask=mask, is_causal=True))


class EncoderClassifier(nn.Module):
    """(B, T, 6) floats -> embedding + positions -> ``nn.TransformerEncoder`` -> mean over
    tokens -> (B, 5)."""

    def __init__(self, nested: bool = False, norm_first: bool = False, dim: int = DIM,
                 heads: int = HEADS, hidden: int = HIDDEN, tokens: int = TOKENS,
                 features: int = FEATURES, classes: int = CLASSES, depth: int = DEPTH) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, hidden, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = _own_weights(nn.TransformerEncoder(
            layer, num_layers=depth, norm=nn.LayerNorm(dim) if norm_first else None,
            enable_nested_tensor=nested))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(x) + self.pos_embed)
        return self.head(x.mean(dim=1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmAttention(nn.Module):
    """Decomposed attention with one packed ``qkv`` Linear, as in timm's ViT."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmStyleViT(nn.Module):
    """(B, 1, 8, 8) images -> 4 patches of 4x4 -> class token + positions -> blocks ->
    class token -> (B, 5). ``tokens`` > 1: as many learned tokens (DeiT's class and
    distillation tokens, register tokens), whose outputs are averaged."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, hidden: int = HIDDEN,
                 classes: int = CLASSES, depth: int = DEPTH, tokens: int = 1) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim, PATCH)
        patches = (IMAGE // PATCH) ** 2
        self.tokens = tokens
        self.cls_token = nn.Parameter(0.5 * torch.randn(1, tokens, dim))
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, patches + tokens, dim))
        self.blocks = nn.Sequential(*(TimmBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0] if self.tokens == 1 else x[:, :self.tokens].mean(1))


class CausalSelfAttention(nn.Module):
    """Separate Q/K/V projections without bias and a causal scaled dot product."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.n_head = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q, K and V, each ``(B, heads, T, head_dim)``."""
        B, T, C = x.shape
        return tuple(layer(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                     for layer in (self.q, self.k, self.v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        y = self.attend(*self.split_heads(x), T)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class MaskedCausalSelfAttention(CausalSelfAttention):
    """The attention written out, with a causal float mask (-inf above the diagonal)
    kept as a persistent buffer and added to the scores."""

    def __init__(self, dim: int, heads: int, tokens: int = TOKENS) -> None:
        super().__init__(dim, heads)
        self.register_buffer("mask", torch.full((tokens, tokens), float("-inf")).triu(1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T) -> torch.Tensor:
        scores = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5 + self.mask[:T, :T]
        return scores.softmax(dim=-1) @ v


class TrilCausalSelfAttention(CausalSelfAttention):
    """nanoGPT's slow path: a persistent buffer of ones below the diagonal, cut to the
    input's length, and the scores above it filled with -inf."""

    def __init__(self, dim: int, heads: int, tokens: int = 2 * TOKENS) -> None:
        super().__init__(dim, heads)
        self.register_buffer("bias", torch.tril(torch.ones(tokens, tokens))
                             .view(1, 1, tokens, tokens))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T) -> torch.Tensor:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


class PackedCausalSelfAttention(nn.Module):
    """nanoGPT's own style: one ``c_attn`` Linear whose output is split into Q, K, V."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.n_head = heads
        self.n_embd = dim
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class HeadValuedAttention(CausalSelfAttention):
    """The attention written out with one learned value per head (``kind``):

    * ``"logit-scale"``: Swin V2's cosine attention with a per-head temperature, a
      Parameter of shape ``(H, 1, 1)``;
    * ``"t5-bias"``: T5's relative position bias, an ``nn.Embedding(positions, H)`` read
      at the distance between positions and added to the scores;
    * ``"alibi"``: ALiBi's per-head slopes (a persistent buffer) times the distance;
    * ``"head-gate"``: a sigmoid gate per head computed from the input
      (``nn.Linear(dim, H)``), scaling each head's output.

    A causal mask buffer is added to the scores."""

    def __init__(self, dim: int, heads: int, kind: str, tokens: int = TOKENS) -> None:
        super().__init__(dim, heads)
        self.kind = kind
        if kind == "logit-scale":
            self.logit_scale = nn.Parameter(torch.log(1 + 10 * torch.rand(heads, 1, 1)))
        elif kind == "t5-bias":
            self.relative = nn.Embedding(2 * tokens - 1, heads)
        elif kind == "alibi":
            slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
            self.register_buffer("slopes", slopes * (1 + torch.rand(heads)))
        else:
            self.gate = nn.Linear(dim, heads)
        self.register_buffer("mask", torch.full((tokens, tokens), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.split_heads(x)
        positions = torch.arange(T, device=x.device)
        distance = positions[None, :] - positions[:, None]
        if self.kind == "logit-scale":
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            scores = scores * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if self.kind == "t5-bias":
            scores = scores + self.relative(distance + self.mask.shape[0] - 1).permute(2, 0, 1)
        elif self.kind == "alibi":
            scores = scores + self.slopes.view(-1, 1, 1) * -distance.abs()
        y = (scores + self.mask[:T, :T]).softmax(dim=-1) @ v
        if self.kind == "head-gate":
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


_ATTENTION = {"separate": CausalSelfAttention, "packed": PackedCausalSelfAttention,
              "mask-buffer": MaskedCausalSelfAttention, "tril": TrilCausalSelfAttention,
              **{kind: functools.partial(HeadValuedAttention, kind=kind)
                 for kind in ("logit-scale", "t5-bias", "alibi", "head-gate")}}


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, attention: str = "separate"
                 ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _ATTENTION[attention](dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    """(B, T) token ids -> (B, T, V) next-token logits; ``lm_head`` tied to ``tok``;
    ``attention``: the self-attention module of every block (:data:`_ATTENTION`);
    ``sliced``: the positions are a table of ``2 * tokens`` rows, a Parameter cut to
    the input's length (minGPT's ``pos_emb[:, :t]``), not an ``nn.Embedding``."""

    def __init__(self, vocab: int = VOCAB, tokens: int = TOKENS, dim: int = DIM,
                 heads: int = HEADS, hidden: int = HIDDEN, depth: int = DEPTH,
                 attention: str = "separate", sliced: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        if sliced:
            self.pos_table = nn.Parameter(0.5 * torch.randn(1, 2 * tokens, dim))
        else:
            self.pos = nn.Embedding(tokens, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, hidden, attention)
                                    for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pos_table"):
            x = self.tok(idx) + self.pos_table[:, :idx.size(1)]
        else:
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's interleaved rotation: unit ``2i`` of a head pairs with unit ``2i + 1``."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class RotaryAttention(nn.Module):
    """Llama-style causal self-attention: Q/K/V Linears without bias and rotary position
    embeddings on Q and K. ``style`` is how the rotation is written:

    * ``"half"``: ``rotate_half``, cos and sin computed in ``forward`` from a
      non-persistent ``inv_freq`` buffer (Hugging Face's Llama);
    * ``"cached"``: cos and sin tables kept as persistent buffers cut to the length, and
      the attention written out (``q @ k.T`` plus a causal mask buffer);
    * ``"complex"``: pairs of units as complex numbers (Meta's Llama,
      ``torch.view_as_complex``);
    * ``"gptj"``: interleaved pairs, rotating only the first half of each head (partial
      rotary, GPT-J and GPT-NeoX);
    * ``None``: no rotation.

    ``qk_norm``: an RMSNorm over each head's units of Q and K, one weight shared by every
    head (Qwen3, OLMo 2). ``kv_heads`` fewer than ``heads``: grouped-query attention,
    each key and value head serving ``heads // kv_heads`` query heads, repeated by
    ``repeat``: ``"expand"`` (Hugging Face's ``repeat_kv``), ``"interleave"``
    (``repeat_interleave``), ``"sdpa"`` (``enable_gqa=True``) or ``"broadcast"`` (not
    repeated: one key and value head broadcast over the query heads in ``q @ k.T``,
    multi-query attention as GPT-BigCode writes it)."""

    def __init__(self, dim: int, heads: int, style: str | None = "half",
                 qk_norm: bool = False, tokens: int = TOKENS, kv_heads: int | None = None,
                 repeat: str = "expand") -> None:
        super().__init__()
        self.n_head, self.head_dim, self.style = heads, dim // heads, style
        self.n_kv, self.repeat = kv_heads or heads, repeat
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, self.n_kv * self.head_dim, bias=False)
        self.v = nn.Linear(dim, self.n_kv * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        rotated = self.head_dim // 2 if style == "gptj" else self.head_dim
        inv_freq = 1.0 / 10.0 ** (torch.arange(0, rotated, 2).float() / rotated)
        if style == "cached":
            angles = torch.outer(torch.arange(2 * tokens).float(), inv_freq).repeat(1, 2)
            self.register_buffer("cos_cached", angles.cos())
            self.register_buffer("sin_cached", angles.sin())
            self.register_buffer("mask", torch.full((tokens, tokens), float("-inf")).triu(1))
        else:
            self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotate(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        if self.style is None:
            return x
        if self.style == "cached":
            return x * self.cos_cached[:T] + rotate_half(x) * self.sin_cached[:T]
        angles = torch.outer(torch.arange(T, device=x.device).float(), self.inv_freq)
        if self.style == "complex":
            turns = torch.polar(torch.ones_like(angles), angles)
            pairs = torch.view_as_complex(x.float().reshape(B, self.n_head, T, -1, 2))
            return torch.view_as_real(pairs * turns).flatten(3).type_as(x)
        if self.style == "gptj":
            cos = angles.cos().repeat_interleave(2, dim=-1)
            sin = angles.sin().repeat_interleave(2, dim=-1)
            rotated = self.head_dim // 2
            part, rest = x[..., :rotated], x[..., rotated:]
            return torch.cat((part * cos + _rotate_pairs(part) * sin, rest), dim=-1)
        emb = torch.cat((angles, angles), dim=-1)
        return x * emb.cos() + rotate_half(x) * emb.sin()

    def repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Each key or value head repeated for the query heads it serves."""
        times = self.n_head // self.n_kv
        if self.repeat == "interleave":
            return x.repeat_interleave(times, dim=1)
        B, _, T, D = x.shape
        return x[:, :, None, :, :].expand(B, self.n_kv, times, T, D).reshape(
            B, self.n_head, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, B, T), self.rotate(k, B, T)
        grouped = self.n_kv < self.n_head
        if grouped and self.repeat not in ("sdpa", "broadcast"):
            k, v = self.repeat_kv(k), self.repeat_kv(v)
        if self.style == "cached" or self.repeat == "broadcast":
            mask = (self.mask[:T, :T] if self.style == "cached"
                    else torch.full((T, T), float("-inf"), device=x.device).triu(1))
            scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5 + mask
            y = scores.softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=grouped and self.repeat == "sdpa")
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, **attention) -> None:
        super().__init__()
        self.ln1 = nn.RMSNorm(dim)
        self.attn = RotaryAttention(dim, heads, **attention)
        self.ln2 = nn.RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Llama(nn.Module):
    """(B, T) token ids -> (B, T, V) next-token logits: RMSNorm, rotary attention
    (:class:`RotaryAttention`, keyword arguments ``attention``) and SwiGLU blocks, no
    positional table."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, heads: int = HEADS,
                 hidden: int = HIDDEN, depth: int = DEPTH, **attention) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(LlamaBlock(dim, heads, hidden, **attention)
                                    for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


_BUILDERS = {
    "mha": MHAClassifier,
    "encoder": lambda: EncoderClassifier(nested=False),
    "encoder-nested": lambda: EncoderClassifier(nested=True),
    "encoder-norm-first": lambda: EncoderClassifier(nested=False, norm_first=True),
    "timm-vit": TimmStyleViT,
    "deit-tokens": lambda: TimmStyleViT(tokens=2),
    "nanogpt": NanoGPT,
    "nanogpt-packed": lambda: NanoGPT(attention="packed"),
    "nanogpt-sliced": lambda: NanoGPT(attention="mask-buffer", sliced=True),
    "nanogpt-tril": lambda: NanoGPT(attention="tril"),
    **{f"nanogpt-{kind}": functools.partial(NanoGPT, attention=kind, heads=4)
       for kind in ("logit-scale", "t5-bias", "alibi", "head-gate")},
    "mha-causal-buffer": lambda: MHAClassifier(causal=True),
    "mha-keywords": lambda: MHAClassifier(keywords=True),
    "tutorial-lm": TutorialLM,
    "llama": Llama,
    "llama-cached": lambda: Llama(style="cached"),
    "llama-complex": lambda: Llama(style="complex"),
    "llama-gptj": lambda: Llama(style="gptj"),
    "llama-qk-norm": lambda: Llama(qk_norm=True),
    "llama-gqa": lambda: Llama(heads=4, kv_heads=2),
    "llama-gqa-interleave": lambda: Llama(heads=4, kv_heads=2, repeat="interleave"),
    "llama-gqa-sdpa": lambda: Llama(heads=4, kv_heads=2, repeat="sdpa"),
    "llama-gqa-cached": lambda: Llama(heads=4, kv_heads=2, style="cached"),
    "llama-gqa-no-rotary": lambda: Llama(heads=4, kv_heads=2, style=None),
    **{f"llama-mqa-no-rotary-{repeat}": functools.partial(
        Llama, heads=4, kv_heads=1, style=None, repeat=repeat)
       for repeat in ("expand", "interleave", "sdpa", "broadcast")},
}
MODEL_NAMES = tuple(_BUILDERS)


def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random biases (of Linear, Conv, MultiheadAttention's packed ``in_proj_bias``,
    LayerNorm) and LayerNorm weights, in place; returns ``model``.

    Fresh LayerNorms (weight 1, bias 0) and attention biases (0) are left unchanged by a
    wrong permutation; random values make every entry matter.
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("bias"):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.LayerNorm | nn.RMSNorm):
                shape = module.weight.shape
                module.weight.copy_(1.0 + 0.5 * torch.randn(shape, generator=generator))
    return model


def build(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` initialised from ``seed`` (global RNG untouched), with random
    biases and LayerNorm parameters, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _BUILDERS[name]()
    return randomize_(model, torch.Generator().manual_seed(10_000 + seed)).eval()


def make_inputs(name: str, generator: torch.Generator, batch: int = 16) -> torch.Tensor:
    """A batch of inputs for the model ``name``."""
    if name in ("timm-vit", "deit-tokens"):
        return torch.randn(batch, 1, IMAGE, IMAGE, generator=generator)
    if name.startswith(("nanogpt", "llama")):
        return torch.randint(0, VOCAB, (batch, TOKENS), generator=generator)
    if name == "tutorial-lm":  # sequence first
        return torch.randint(0, VOCAB, (TOKENS, batch), generator=generator)
    return torch.randn(batch, TOKENS, FEATURES, generator=generator)


# ------------------------------------------------------------------------- permutations

BROKEN = ("qk", "layernorm", "heads")
"""Deliberately wrong variants of :func:`permute`, to show that the checks have teeth:
``qk``: K gets a within-head permutation different from Q's; ``layernorm``: LayerNorm
parameters are left unpermuted; ``heads``: V and the output projection's columns use a
head order different from Q/K's. Two more for some models only: ``"rotary"`` (rotary
position embeddings): Q and K share a within-head permutation, which would keep the
function without the rotation; ``"per-head"`` (one value per head): the values move in
another head order than their heads."""




def _rows(layer: nn.Module, index: torch.Tensor) -> None:
    """Output units of a Linear/Conv: weight rows and bias."""
    _take(layer.weight, 0, index)
    if layer.bias is not None:
        _take(layer.bias, 0, index)


def _columns(layer: nn.Linear, index: torch.Tensor) -> None:
    _take(layer.weight, 1, index)


class Plan:
    """The random permutations of one copy, drawn in a fixed order from ``generator``."""

    def __init__(self, generator: torch.Generator, broken: str | None = None, dim: int = DIM,
                 heads: int = HEADS) -> None:
        if broken not in (None, *BROKEN, "rotary", "per-head"):
            raise ValueError(f"unknown broken variant {broken!r}")
        self.generator = generator
        self.broken = broken
        self.dim, self.heads = dim, heads
        self.stream = _perm(dim, generator)

    def norm(self, norm: nn.LayerNorm | nn.RMSNorm) -> None:
        if self.broken == "layernorm":
            return
        _take(norm.weight, 0, self.stream)
        if getattr(norm, "bias", None) is not None:
            _take(norm.bias, 0, self.stream)

    def attention(self, rotary: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices (each of length ``D``) of the Q, K and V rows and of the output
        projection's input columns: head ``sigma[j]`` moves to head ``j``; inside it, Q/K
        share one permutation of the head dimension (none when ``rotary``: rotary
        position embeddings pair units by their place in the head, unless the plan is
        broken on purpose) and V/out share another."""
        count, size = self.heads, self.dim // self.heads
        sigma = _perm(count, self.generator)
        if torch.equal(sigma, torch.arange(count)):
            sigma = sigma.roll(1)  # the heads always move, so that a wrong order shows
        self.sigma = sigma.roll(1) if self.broken == "per-head" else sigma
        within_qk = [_perm(size, self.generator) for _ in range(count)]
        if rotary and self.broken != "rotary":
            within_qk = [torch.arange(size)] * count
        within_v = [_perm(size, self.generator) for _ in range(count)]

        def index(heads: torch.Tensor, within: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([heads[j] * size + within[j] for j in range(count)])

        q = index(sigma, within_qk)
        k = q
        if self.broken == "qk":
            k = index(sigma, [w.roll(1) for w in within_qk])
        v = index(sigma, within_v)
        out = v
        if self.broken == "heads":
            v = index(sigma.roll(1), within_v)
            out = index(sigma, within_v)
        return q, k, v, out

    def grouped_attention(self, attn: nn.Module, rotary: bool) -> None:
        """Grouped-query attention: the key/value heads move whole (``sigma``); each
        query head moves with the key/value head it reads, keeping its place among that
        head's query heads (their order is a symmetry the fusion does not use); the
        units of a key head and of its query heads share one permutation (none under
        rotary embeddings), those of a value head and of its query heads' output
        columns another. With one key and value head (multi-query), no head moves; the
        broken ``heads`` variant then gives the output columns another head order."""
        kv, size = attn.n_kv, attn.head_dim
        times = attn.n_head // kv
        sigma = _perm(kv, self.generator)
        if torch.equal(sigma, torch.arange(kv)):
            sigma = sigma.roll(1)
        within_qk = [torch.arange(size) if rotary and self.broken != "rotary"
                     else _perm(size, self.generator) for _ in range(kv)]
        within_v = [_perm(size, self.generator) for _ in range(kv)]
        within_k = [w.roll(1) for w in within_qk] if self.broken == "qk" else within_qk
        order_v = sigma.roll(1) if self.broken == "heads" else sigma
        # one key and value head (multi-query): the output columns' heads are rolled
        shift = 1 if self.broken == "heads" and kv == 1 else 0

        def heads(order, within, repeat=1, shift=0):
            return torch.cat([(order[j] * repeat + (r + shift) % repeat) * size + within[j]
                              for j in range(kv) for r in range(repeat)])

        for layer, rows in ((attn.q, heads(sigma, within_qk, times)),
                            (attn.k, heads(sigma, within_k)), (attn.v, heads(order_v, within_v))):
            _rows(layer, rows)
            _columns(layer, self.stream)
        _columns(attn.proj, heads(sigma, within_v, times, shift))
        _rows(attn.proj, self.stream)

    def packed_attention(self, in_weight: torch.Tensor, in_bias: torch.Tensor | None,
                         out_proj: nn.Linear) -> None:
        """Q/K/V packed as the rows [Q; K; V] of one (3D, D) weight."""
        q, k, v, out = self.attention()
        rows = torch.cat([q, self.dim + k, 2 * self.dim + v])
        _take(in_weight, 0, rows)
        _take(in_weight, 1, self.stream)
        if in_bias is not None:
            _take(in_bias, 0, rows)
        _columns(out_proj, out)
        _rows(out_proj, self.stream)

    def separate_attention(self, q_layer: nn.Linear, k_layer: nn.Linear, v_layer: nn.Linear,
                           out_proj: nn.Linear, rotary: bool = False) -> None:
        q, k, v, out = self.attention(rotary)
        for layer, rows in ((q_layer, q), (k_layer, k), (v_layer, v)):
            _rows(layer, rows)
            _columns(layer, self.stream)
        _columns(out_proj, out)
        _rows(out_proj, self.stream)

    def mlp(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        hidden = _perm(fc1.out_features, self.generator)
        _columns(fc1, self.stream)
        _rows(fc1, hidden)
        _columns(fc2, hidden)
        _rows(fc2, self.stream)

    def swiglu(self, mlp: SwiGLU) -> None:
        """The gate's and the up projection's outputs share one permutation."""
        hidden = _perm(mlp.gate.out_features, self.generator)
        for layer in (mlp.gate, mlp.up):
            _columns(layer, self.stream)
            _rows(layer, hidden)
        _columns(mlp.down, hidden)
        _rows(mlp.down, self.stream)


def _mha_classifier(model: MHAClassifier, plan: Plan) -> None:
    _rows(model.embed, plan.stream)
    _take(model.pos_embed, 2, plan.stream)
    _take(model.cls, 2, plan.stream)
    for block in model.blocks:
        plan.norm(block.norm1)
        attn = block.attn
        plan.packed_attention(attn.in_proj_weight, attn.in_proj_bias, attn.out_proj)
        plan.norm(block.norm2)
        plan.mlp(block.mlp[0], block.mlp[2])
    plan.norm(model.norm)
    _columns(model.head, plan.stream)


def permute_encoder(encoder: nn.TransformerEncoder, plan: Plan) -> None:
    """Every layer of an ``nn.TransformerEncoder`` (and its final norm) in ``plan``'s
    residual stream, with heads, within-head units and MLP units permuted."""
    for layer in encoder.layers:
        attn = layer.self_attn
        plan.packed_attention(attn.in_proj_weight, attn.in_proj_bias, attn.out_proj)
        plan.mlp(layer.linear1, layer.linear2)
        plan.norm(layer.norm1)
        plan.norm(layer.norm2)
    if encoder.norm is not None:
        plan.norm(encoder.norm)


def _tutorial_lm(model: TutorialLM, plan: Plan) -> None:
    _take(model.embed.weight, 1, plan.stream)
    _take(model.pe, 2, plan.stream)
    permute_encoder(model.encoder, plan)
    _columns(model.head, plan.stream)


def _encoder_classifier(model: EncoderClassifier, plan: Plan) -> None:
    _rows(model.embed, plan.stream)
    _take(model.pos_embed, 2, plan.stream)
    permute_encoder(model.encoder, plan)
    _columns(model.head, plan.stream)


def _timm_vit(model: TimmStyleViT, plan: Plan) -> None:
    _rows(model.patch_embed.proj, plan.stream)  # conv output channels
    _take(model.cls_token, 2, plan.stream)
    _take(model.pos_embed, 2, plan.stream)
    for block in model.blocks:
        plan.norm(block.norm1)
        plan.packed_attention(block.attn.qkv.weight, block.attn.qkv.bias, block.attn.proj)
        plan.norm(block.norm2)
        plan.mlp(block.mlp.fc1, block.mlp.fc2)
    plan.norm(model.norm)
    _columns(model.head, plan.stream)


def _nanogpt(model: NanoGPT, plan: Plan) -> None:
    # lm_head.weight IS tok.weight (V, D): permuting its columns once covers both uses
    assert model.lm_head.weight is model.tok.weight
    _take(model.tok.weight, 1, plan.stream)
    if hasattr(model, "pos_table"):
        _take(model.pos_table, 2, plan.stream)
    else:
        _take(model.pos.weight, 1, plan.stream)
    for block in model.blocks:
        plan.norm(block.ln1)
        attn = block.attn
        if isinstance(attn, PackedCausalSelfAttention):
            plan.packed_attention(attn.c_attn.weight, attn.c_attn.bias, attn.proj)
        else:
            plan.separate_attention(attn.q, attn.k, attn.v, attn.proj)
        if isinstance(attn, HeadValuedAttention):
            _per_head_values(attn, plan)
        plan.norm(block.ln2)
        plan.mlp(block.mlp.fc1, block.mlp.fc2)
    plan.norm(model.ln_f)


def _per_head_values(attn: HeadValuedAttention, plan: Plan) -> None:
    """One value per head moves with its head (the gate reads the residual stream)."""
    if attn.kind == "logit-scale":
        _take(attn.logit_scale, 0, plan.sigma)
    elif attn.kind == "t5-bias":
        _take(attn.relative.weight, 1, plan.sigma)
    elif attn.kind == "alibi":
        _take(attn.slopes, 0, plan.sigma)
    else:
        _rows(attn.gate, plan.sigma)
        _columns(attn.gate, plan.stream)


def _llama(model: Llama, plan: Plan) -> None:
    _take(model.tok.weight, 1, plan.stream)
    for block in model.blocks:
        plan.norm(block.ln1)
        attn = block.attn
        if attn.n_kv < attn.n_head:
            plan.grouped_attention(attn, rotary=attn.style is not None)
        else:
            plan.separate_attention(attn.q, attn.k, attn.v, attn.proj, rotary=True)
        plan.norm(block.ln2)
        plan.swiglu(block.mlp)
    plan.norm(model.norm)
    _columns(model.head, plan.stream)


_RULES = (
    (MHAClassifier, _mha_classifier),
    (EncoderClassifier, _encoder_classifier),
    (TutorialLM, _tutorial_lm),
    (TimmStyleViT, _timm_vit),
    (NanoGPT, _nanogpt),
    (Llama, _llama),
)


def permute(model: nn.Module, generator: torch.Generator, broken: str | None = None
            ) -> nn.Module:
    """A deep copy of ``model`` with the residual stream, the heads, the within-head
    dimensions and the MLP hidden units randomly permuted: it computes the same function
    (up to floating point summation order). ``broken`` (one of :data:`BROKEN`) makes a
    deliberately wrong copy instead."""
    permuted = copy.deepcopy(model)
    heads = next((m.n_head for m in model.modules() if isinstance(m, CausalSelfAttention)),
                 HEADS)
    plan = Plan(generator, broken, heads=heads)
    with torch.no_grad():
        for family, rule in _RULES:
            if isinstance(permuted, family):
                rule(permuted, plan)
                break
        else:
            raise TypeError(f"no permutation rule for {type(model).__name__}")
    return permuted


def relative_difference(model: nn.Module, reference: nn.Module, inputs: torch.Tensor
                        ) -> float:
    """Relative L2 distance of the two models' outputs on ``inputs`` (eval mode)."""
    model.eval()
    reference.eval()
    with torch.no_grad():
        expected = reference(inputs)
        got = model(inputs)
    return float((got - expected).norm() / expected.norm())


def position_buffers(model: nn.Module) -> set[str]:
    """The buffers over positions, which no permutation moves: causal masks and rotary
    tables."""
    return {name for name, _ in model.named_buffers()
            if name.endswith(("mask", "attn.bias", "cos_cached", "sin_cached"))}


def shared_by_heads(model: nn.Module) -> set[str]:
    """The per-head norms of Q and K: one weight for every head, over the units that
    rotary embeddings keep in place, so no permutation moves them."""
    return {name for name, _ in model.named_parameters()
            if name.endswith(("q_norm.weight", "k_norm.weight"))}


__all__ = [
    "BROKEN",
    "MODEL_NAMES",
    "EncoderClassifier",
    "Llama",
    "MHAClassifier",
    "NanoGPT",
    "TimmStyleViT",
    "build",
    "make_inputs",
    "permute",
    "position_buffers",
    "randomize_",
    "relative_difference",
    "shared_by_heads",
]
