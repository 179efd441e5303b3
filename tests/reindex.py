"""Index helpers of the hand-written permutations (torch only, nothing from the engine)."""

from __future__ import annotations

import torch


def random_perm(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    """In place: ``tensor`` reindexed along ``dim`` (same storage, so a Parameter and any
    tie to it are kept)."""
    tensor.copy_(tensor.index_select(dim, index))


def blocks(perm: torch.Tensor, outer: int = 1, inner: int = 1) -> torch.Tensor:
    """Index of an axis laid out as ``outer`` blocks of ``len(perm)`` units (the gate
    blocks of a recurrent layer), each unit repeated ``inner`` times contiguously
    (flattened positions), with the units reordered by ``perm``."""
    width = perm.numel()
    units = perm[None, :, None] * inner + torch.arange(inner)[None, None, :]
    return (torch.arange(outer)[:, None, None] * width * inner + units).reshape(-1)
