"""Optimal transport solvers with one signature:
``(cost, a, b, config, warmstart=None) -> (plan, warmstart)``, ``config`` being a
:class:`~.config.TransportConfig`.

``cost`` is an (n, m) tensor, ``a`` and ``b`` the source and target marginals; the plan
is an (n, m) tensor on the cost's device with total mass 1. ``warmstart`` is solver
state from a previous solve of a similar problem (Sinkhorn's dual potentials), or None.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .config import TransportConfig


def exact_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               config: TransportConfig, warmstart=None) -> tuple[torch.Tensor, None]:
    """Exact OT: a linear assignment for uniform square problems, else network simplex."""
    n, m = cost.shape
    if n == m and _is_uniform(a) and _is_uniform(b):
        cols = torch.as_tensor(assignment(cost.detach().cpu().numpy()), device=cost.device)
        plan = torch.zeros_like(cost)
        plan[torch.arange(n, device=cost.device), cols] = 1.0 / n
        return plan, None
    import ot  # POT imports scikit-learn and SciPy's statistics: only where it solves

    return ot.emd(a, b, cost), None


def assignment(cost: np.ndarray) -> np.ndarray:
    """The column assigned to each row by an exact minimum-cost assignment of the square
    ``cost``. Its column minima, then its row minima, are subtracted first (in float64,
    where all stays finite): the same optimum, which SciPy's solver, started from zero
    duals, finds 2-3 times faster on squared distances, whose rows and columns carry
    offsets of their own (the points' norms)."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.size and np.isfinite(cost).all():
        reduced = cost - cost.min(axis=0, keepdims=True)
        reduced -= reduced.min(axis=1, keepdims=True)
        if np.isfinite(reduced).all():  # else overflowed (costs near the float64 limit)
            cost = reduced
    return linear_sum_assignment(cost)[1]


def sinkhorn_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  config: TransportConfig, warmstart=None) -> tuple[torch.Tensor, tuple]:
    """Entropic OT (log-domain Sinkhorn in float64); ``config.reg`` is relative to the
    largest cost. The plan's marginals are only approximate; the engine normalises by
    the plan's own marginals, so a capped solve is still a valid coupling."""
    import ot

    scale = cost.max().clamp_min(torch.finfo(cost.dtype).tiny)
    plan, log = ot.sinkhorn(
        a.double(), b.double(), (cost / scale).double(), config.reg, method="sinkhorn_log",
        numItermax=config.max_iter, stopThr=config.tol * float(b.norm()),
        warn=False, log=True, warmstart=warmstart,
    )
    return plan.to(cost.dtype), (log["log_u"], log["log_v"])


SOLVERS = {"exact": exact_plan, "sinkhorn": sinkhorn_plan}


def transport_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   config: TransportConfig, warmstart=None) -> tuple[torch.Tensor, object]:
    """Solve OT between marginals ``a`` and ``b`` with the solver named in ``config``."""
    return SOLVERS[config.solver](cost, a, b, config, warmstart)


def _is_uniform(weights: torch.Tensor) -> bool:
    return bool(torch.allclose(weights, weights[0].expand_as(weights)))


def block_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, config: TransportConfig,
               blocks: int, block_coupling: torch.Tensor | None = None,
               rigid: bool = False) -> torch.Tensor:
    """OT restricted to plans that move whole blocks of units (``blocks`` contiguous
    blocks on each side) and units within blocks: a two-level problem, solved exactly
    level by level. Every pair of blocks is solved alone (``rigid``: the units keep
    their places, each unit coupled to the one at its place, which needs blocks of one
    size and the same marginals within both); the blocks are then matched on those
    pairs' costs, unless ``block_coupling`` ((blocks, blocks), total mass one)
    prescribes how they are matched."""
    n, m = cost.shape
    rows, cols = n // blocks, m // blocks
    if rigid and rows != cols:
        raise ValueError(f"blocks of {rows} and {cols} units: units that keep their places "
                         "need blocks of one size")
    a_blocks, b_blocks = a.view(blocks, rows), b.view(blocks, cols)
    within: dict[tuple[int, int], torch.Tensor] = {}
    pair_cost = torch.zeros(blocks, blocks, dtype=cost.dtype, device=cost.device)
    for i in range(blocks):
        for j in range(blocks):
            if block_coupling is not None and block_coupling[i, j] <= 0:
                continue
            sub = cost[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]
            if rigid:
                plan = torch.diag(a_blocks[i] / a_blocks[i].sum())
            else:
                plan, _ = transport_plan(sub, a_blocks[i] / a_blocks[i].sum(),
                                         b_blocks[j] / b_blocks[j].sum(), config)
            within[i, j] = plan
            pair_cost[i, j] = (sub * plan).sum()
    if block_coupling is None:
        block_coupling, _ = transport_plan(pair_cost, a_blocks.sum(dim=1), b_blocks.sum(dim=1),
                                           config)
    plan = torch.zeros_like(cost)
    for (i, j), sub_plan in within.items():
        plan[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = block_coupling[i, j] * sub_plan
    return plan


def block_marginal(plan: torch.Tensor, blocks: int) -> torch.Tensor:
    """The (blocks, blocks) mass a plan moves between blocks of units."""
    n, m = plan.shape
    return plan.reshape(blocks, n // blocks, blocks, m // blocks).sum(dim=(1, 3))


def repeated_plan(plan: torch.Tensor, blocks: int, count: int) -> torch.Tensor:
    """The plan of ``plan``'s units with each of its ``blocks`` blocks repeated ``count``
    times in place: repeat ``r`` of block ``i`` is coupled to repeat ``r`` of block ``j``
    as block ``i`` is to block ``j``."""
    n, m = plan.shape
    blocked = plan.reshape(blocks, n // blocks, blocks, m // blocks)
    same = torch.eye(count, dtype=plan.dtype, device=plan.device) / count
    return torch.einsum("xayb,rs->xraysb", blocked, same).reshape(n * count, m * count)
