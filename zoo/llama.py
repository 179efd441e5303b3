"""A Llama-style sequence classifier: RMSNorm, rotary position embeddings, grouped-query
attention and SwiGLU feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import positive_int


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``rotate_half``: unit ``i`` of a head pairs with unit ``i + D/2``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotarySelfAttention(nn.Module):
    """Self-attention over all steps with rotary position embeddings on the queries and
    keys, and ``kv_heads`` key and value heads, each serving ``heads // kv_heads`` query
    heads (grouped-query attention). Layers: ``q``, ``k``, ``v``, ``proj``."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        steps = torch.arange(0, self.head_dim, 2).float() / self.head_dim
        self.register_buffer("inv_freq", 1.0 / 10000.0 ** steps, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        angles = torch.outer(torch.arange(T, device=x.device).float(), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = RotarySelfAttention(dim, heads, kv_heads)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaClassifier(nn.Module):
    """Sequence classifier built as Llama's decoder blocks (without the causal mask):
    each step's features embedded by a ``Linear``, ``depth`` pre-norm blocks (RMSNorm,
    rotary grouped-query attention, SwiGLU), mean over the steps, an RMSNorm and the
    output ``Linear`` (for digits, the 8 image rows are the 8 steps).

    Input shape: ``(batch, seq_len, input_size)``. Output: logits.
    """

    def __init__(self, input_size: int = 8, seq_len: int = 8, num_classes: int = 10,
                 dim: int = 32, heads: int = 4, kv_heads: int = 2, hidden: int = 64,
                 depth: int = 2) -> None:
        super().__init__()
        input_size, seq_len = positive_int(input_size, "input_size"), positive_int(
            seq_len, "seq_len")
        dim, heads = positive_int(dim, "dim"), positive_int(heads, "heads")
        kv_heads, hidden = positive_int(kv_heads, "kv_heads"), positive_int(hidden, "hidden")
        depth = positive_int(depth, "depth")
        if dim % heads or (dim // heads) % 2 or heads % kv_heads:
            raise ValueError(f"dim ({dim}) must split into heads ({heads}) of an even size, "
                             f"and heads into kv_heads ({kv_heads}) groups")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.input_shape: tuple[int, ...] = (seq_len, input_size)
        self.embed = nn.Linear(input_size, dim)
        self.blocks = nn.ModuleList(LlamaBlock(dim, heads, kv_heads, hidden)
                                    for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(1)))
