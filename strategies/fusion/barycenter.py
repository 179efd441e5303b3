"""Free-support Wasserstein barycenter of the clients' neurons of one group.

Each client offers, per member tensor of the group, one row per neuron (its incoming
weights in the fused model's coordinates, or its activations). The barycenter support
``B`` has the fused width as its number of rows. Iterate: solve OT from ``B`` to every
client, then move ``B`` to the clients' barycentric projections, weighted by the client
weights, until ``B`` stops moving.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .config import FusionConfig
from .graph import AxisSpec
from .projection import Coupling, apply_axis
from .transport import transport_plan


@dataclass(frozen=True)
class Points:
    """A client's neurons as points for one member tensor.

    The ground cost to a support row ``s`` is ``sum_J s_J^2 support_weights_J +
    sq_norms[b] - 2 s . rows[b]``: the squared distance integrated over the coupling
    of the input coordinates, never materialised (``rows`` is already mapped to the
    fused coordinates, ``sq_norms`` is taken in the client's own coordinates), times
    ``scale``.
    """

    rows: torch.Tensor
    sq_norms: torch.Tensor
    support_weights: torch.Tensor
    scale: float = 1.0

    @classmethod
    def euclidean(cls, rows: torch.Tensor) -> Points:
        return cls(rows, rows.square().sum(dim=1), torch.ones_like(rows[0]))


_NEURON_ROWS = AxisSpec(group=-1, kind="neuron")

PointsFn = Callable[[int, torch.Tensor | None], dict[str, Points]]
"""``(client, previous plan or None) -> member -> Points``; the plan enters the
recurrent (Gromov-Wasserstein) members, which are omitted while it is None."""


@dataclass(frozen=True)
class BarycenterResult:
    couplings: list[Coupling]
    cost: float
    iterations: int


def ground_cost(support: dict[str, torch.Tensor], points: dict[str, Points]) -> torch.Tensor:
    """Cost (support rows x client neurons) summed over the members both sides have."""
    total = None
    for name, p in points.items():
        if name not in support:
            continue
        s = support[name]
        cost = (s.square() @ p.support_weights)[:, None] + p.sq_norms[None, :] - 2 * s @ p.rows.T
        if p.scale != 1.0:
            cost = p.scale * cost
        total = cost if total is None else total + cost
    return total.clamp_min(0)


def free_support_barycenter(
    points_fn: PointsFn,
    weights: torch.Tensor,
    widths: list[int],
    support: dict[str, torch.Tensor],
    config: FusionConfig,
) -> BarycenterResult:
    """Couple every client to the fused neurons; ``support`` is the initial ``B``."""
    n = next(iter(support.values())).shape[0]
    reference = next(iter(support.values()))
    uniform_n = torch.full((n,), 1.0 / n, dtype=reference.dtype, device=reference.device)
    marginals = [torch.full((m,), 1.0 / m, dtype=reference.dtype, device=reference.device)
                 for m in widths]
    damped: list[torch.Tensor | None] = [None] * len(widths)
    warm: list[object] = [None] * len(widths)

    def couple(k: int):
        """Client ``k``'s plan to the current support, and its neurons mapped onto it."""
        points = points_fn(k, damped[k])
        cost = ground_cost(support, points)
        plan, warm[k] = transport_plan(cost, uniform_n, marginals[k], config, warm[k])
        coupling = Coupling.from_plan(plan)
        mapped = {name: apply_axis(p.rows, 0, _NEURON_ROWS, coupling)
                  for name, p in points.items()}
        return coupling, (cost * plan).sum(), mapped

    iterations = 0
    with ThreadPoolExecutor(max_workers=config.workers or os.cpu_count()) as pool:
        while iterations < config.max_iter:
            iterations += 1
            solved = list(pool.map(couple, range(len(widths))))  # solvers release the GIL
            couplings = [coupling for coupling, _, _ in solved]
            costs = [cost for _, cost, _ in solved]
            updated: dict[str, torch.Tensor] = {}
            for lam, (_, _, mapped) in zip(weights, solved, strict=True):
                for name, rows in mapped.items():
                    updated[name] = updated.get(name, 0) + lam * rows
            shift = _relative_shift(support, updated)
            support = updated
            for k, coupling in enumerate(couplings):
                plan, previous = coupling.plan, damped[k]
                damped[k] = plan if previous is None else (
                    config.gw_damping * plan + (1 - config.gw_damping) * previous
                )
            if shift <= config.tol:
                break
    mean_cost = float(sum(lam * c for lam, c in zip(weights, costs, strict=True)))
    return BarycenterResult(couplings, mean_cost, iterations)


def _relative_shift(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    if old.keys() != new.keys():
        return float("inf")
    moved = sum(float((new[k] - old[k]).square().sum()) for k in new)
    size = sum(float(old[k].square().sum()) for k in new)
    return (moved / max(size, 1e-300)) ** 0.5
