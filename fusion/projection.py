"""Moving a client's tensors into the fused model's coordinates through couplings."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .graph import AlignmentGraph, AxisSpec


@dataclass(frozen=True)
class Coupling:
    """One client's transport plan for one group: ``plan`` is (fused width, client width).

    ``permutation`` is set when the plan is a permutation matrix divided by the width
    (exact OT between equal widths), so it can be applied by indexing.
    """

    plan: torch.Tensor
    permutation: torch.Tensor | None = None

    @classmethod
    def from_plan(cls, plan: torch.Tensor) -> Coupling:
        n, m = plan.shape
        if n == m:
            top, index = plan.max(dim=1)
            if torch.equal(top, torch.full_like(top, 1.0 / n)) and (
                plan.count_nonzero() == n
            ) and index.unique().numel() == n:
                return cls(plan, index)
        return cls(plan)

    @classmethod
    def identity(cls, width: int, like: torch.Tensor) -> Coupling:
        plan = torch.eye(width, dtype=like.dtype, device=like.device) / width
        return cls(plan, torch.arange(width, device=like.device))

    @classmethod
    def direct_sum(cls, parts: list[Coupling]) -> Coupling:
        """The coupling of a concatenation: the parts' plans on the block diagonal, each
        scaled to its share of the fused width (a permutation if every part is one)."""
        n = sum(p.plan.shape[0] for p in parts)
        plan = torch.block_diag(*(p.plan * (p.plan.shape[0] / n) for p in parts))
        if any(p.permutation is None for p in parts):
            return cls(plan)
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + p.plan.shape[1])
        return cls(plan, torch.cat([p.permutation + o for p, o in zip(parts, offsets,
                                                                       strict=True)]))

    @functools.cached_property
    def is_identity(self) -> bool:
        """Whether every client neuron maps to the fused neuron of its own index."""
        index = self.permutation
        return index is not None and torch.equal(
            index, torch.arange(len(index), device=index.device))

    def matrix(self, kind: str) -> torch.Tensor:
        """Map from client to fused coordinates: rows average ("neuron") or columns keep
        their mass ("input"), so that a neuron split in two feeds its consumers once."""
        tiny = torch.finfo(self.plan.dtype).tiny
        if kind == "neuron":
            return self.plan / self.plan.sum(dim=1, keepdim=True).clamp_min(tiny)
        return self.plan / self.plan.sum(dim=0, keepdim=True).clamp_min(tiny)


def apply_axis(tensor: torch.Tensor, axis: int, spec: AxisSpec,
               coupling: Coupling) -> torch.Tensor:
    """Map one axis of ``tensor`` from client to fused coordinates (``tensor`` itself
    when the coupling is the identity; one indexed copy when it is a permutation)."""
    if coupling.is_identity:
        return tensor
    width = coupling.plan.shape[1]
    if coupling.permutation is not None:
        blocks = tensor.unflatten(axis, (spec.outer, width, spec.inner))
        return blocks.index_select(axis + 1, coupling.permutation).flatten(axis, axis + 2)
    moved = tensor.movedim(axis, 0)
    rest = moved.shape[1:]
    blocks = moved.reshape(spec.outer, width, spec.inner, -1)
    matrix = coupling.matrix(spec.kind).to(tensor.dtype)
    mapped = torch.einsum("nm,omir->onir", matrix, blocks)
    return mapped.reshape(-1, *rest).movedim(0, axis)


def project(tensor: torch.Tensor, axes: tuple[AxisSpec | None, ...],
            couplings: dict[int, Coupling], skip: int | None = None) -> torch.Tensor:
    """Map every axis whose group has a coupling (except ``skip``) to fused coordinates."""
    for axis, spec in enumerate(axes):
        if axis != skip and spec is not None and spec.group in couplings:
            tensor = apply_axis(tensor, axis, spec, couplings[spec.group])
    return tensor


def as_rows(tensor: torch.Tensor, axis: int, spec: AxisSpec) -> torch.Tensor:
    """One row per neuron of ``spec.group``: everything the neuron owns, flattened."""
    moved = tensor.movedim(axis, 0)
    width = moved.shape[0] // (spec.outer * spec.inner)
    blocks = moved.reshape(spec.outer, width, spec.inner, -1)
    return blocks.permute(1, 0, 2, 3).reshape(width, -1)


def row_sq_norms(tensor: torch.Tensor, axis: int, spec: AxisSpec) -> torch.Tensor:
    """The squared norm of each row of :func:`as_rows`, without copying the rows out.

    Reduced over contiguous memory: along the rows for ``axis`` 0, else down the columns
    of the (dims before ``axis``) x (the rest) view, several times faster than a norm
    over non-adjacent dimensions."""
    width = tensor.shape[axis]
    if axis == 0:
        squares = torch.linalg.vector_norm(tensor.reshape(width, -1), dim=1).square()
    else:
        squares = tensor.reshape(math.prod(tensor.shape[:axis]), -1).square().sum(dim=0)
        squares = squares.reshape(width, -1).sum(dim=1)
    return squares.reshape(spec.outer, -1, spec.inner).sum(dim=(0, 2))


def dense_state(graph: AlignmentGraph | None, state: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """``state`` in the form the graph describes: a grouped convolution's weight dense
    and block-diagonal (zeros between groups, so its input axis holds every input
    channel), and a packed tensor split into its pieces ``name#i``."""
    if graph is None or not (graph.packed or _grouped(graph)):
        return state
    dense = {}
    for name, tensor in state.items():
        if name in graph.packed:
            axis, shares = graph.packed[name]
            for i, piece in enumerate(tensor.split(_piece_sizes(name, tensor, axis, shares),
                                                   dim=axis)):
                dense[f"{name}#{i}"] = piece
        else:
            dense[name] = tensor
    for name, groups in _grouped(graph).items():
        weight = state[name]
        out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
        full = weight.new_zeros(weight.shape[0], in_per_group * groups, *weight.shape[2:])
        for g in range(groups):
            rows = slice(g * out_per_group, (g + 1) * out_per_group)
            full[rows, g * in_per_group:(g + 1) * in_per_group] = weight[rows]
        dense[name] = full
    return dense


def stored_state(graph: AlignmentGraph | None, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`dense_state`: the diagonal blocks of each grouped weight,
    and packed tensors put back together."""
    if graph is None or not (graph.packed or _grouped(graph)):
        return state
    stored = {name: t for name, t in state.items() if "#" not in name}
    for name, (axis, shares) in graph.packed.items():
        stored[name] = torch.cat([state[f"{name}#{i}"] for i in range(len(shares))], dim=axis)
    for name, groups in _grouped(graph).items():
        full = state[name]
        out_per_group, in_per_group = full.shape[0] // groups, full.shape[1] // groups
        stored[name] = torch.cat([
            full[g * out_per_group:(g + 1) * out_per_group,
                 g * in_per_group:(g + 1) * in_per_group] for g in range(groups)])
    return stored


def _piece_sizes(name: str, tensor: torch.Tensor, axis: int, shares: tuple[int, ...]
                 ) -> list[int]:
    """The sizes of a packed tensor's pieces along ``axis``, in proportion to ``shares``."""
    unit, rest = divmod(tensor.shape[axis], sum(shares))
    if rest:
        raise ValueError(f"'{name}' axis {axis} has size {tensor.shape[axis]}, which does not "
                         f"split into pieces in the proportions {shares}")
    return [unit * share for share in shares]


def _grouped(graph: AlignmentGraph) -> dict[str, int]:
    return {spec.name: spec.groups for spec in graph.tensors.values() if spec.groups > 1}
