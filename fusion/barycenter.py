"""Free-support Wasserstein barycenter of the clients' neurons of one group.

Each client offers, per member tensor of the group, one row per neuron (its incoming
weights in the fused model's coordinates, or its activations). The barycenter support
``B`` has the fused width as its number of rows. Iterate: solve OT from ``B`` to every
client, then move ``B`` to the clients' barycentric projections, weighted by the client
weights, until ``B`` stops moving.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import BarycenterConfig, TransportConfig
from .graph import AxisSpec
from .projection import Coupling, apply_axis
from .robust import Combine, robust_mean
from .transport import block_plan, transport_plan


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
    weights: Sequence[float],
    widths: list[int],
    support: dict[str, torch.Tensor],
    config: BarycenterConfig,
    transport: TransportConfig,
    blocks: int = 1,
    block_couplings: Sequence[torch.Tensor] | None = None,
    combine: Combine = robust_mean,
) -> BarycenterResult:
    """Couple every client to the fused neurons; ``support`` is the initial ``B``.

    With more clients than ``config.support_clients``, ``B`` is moved by the clients of
    largest weight only (weights renormalised over them), and every client is then
    coupled once to the final ``B``; in that pass a client outside the sample has no
    previous coupling, so its recurrent (Gromov-Wasserstein) members are omitted.

    ``blocks > 1`` restricts the couplings to moving whole blocks of neurons
    (:func:`~.transport.block_plan`); ``block_couplings[k]``, when given, is how client
    ``k``'s blocks must be matched. Every plan is solved with ``transport``, and the
    support moves to ``combine(mapped rows, weights)`` of the clients (default: their
    weighted mean; a robust estimator keeps hostile clients from dragging it).
    """
    n = next(iter(support.values())).shape[0]
    like = next(iter(support.values()))  # dtype and device of the marginals
    uniform_n = torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    marginals = [torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
                 for m in widths]
    damped: list[torch.Tensor | None] = [None] * len(widths)
    warm: list[object] = [None] * len(widths)

    def couple(k: int):
        """Client ``k``'s plan to the current support, its cost and its mapped neurons."""
        points = points_fn(k, damped[k])
        cost = ground_cost(support, points)
        if blocks > 1:
            plan = block_plan(cost, uniform_n, marginals[k], transport, blocks,
                              None if block_couplings is None else block_couplings[k])
        else:
            plan, warm[k] = transport_plan(cost, uniform_n, marginals[k], transport, warm[k])
        coupling = Coupling.from_plan(plan)
        mapped = {name: apply_axis(p.rows, 0, _NEURON_ROWS, coupling)
                  for name, p in points.items()}
        return coupling, float((cost * plan).sum()), mapped

    sample = support_sample(weights, config.support_clients)
    sample_total = sum(weights[k] for k in sample)
    sample_weights = [weights[k] / sample_total for k in sample]
    iterations = 0
    workers = config.workers or os.cpu_count() or 1
    single = 1 if workers > 1 else None
    with ThreadPoolExecutor(max_workers=workers) as pool, _torch_threads(single):
        while iterations < config.max_iter:
            iterations += 1
            solved = list(pool.map(couple, sample))  # solvers release the GIL
            updated = {name: combine([mapped[name] for _, _, mapped in solved],
                                     sample_weights)
                       for name in solved[0][2]}
            shift = _relative_shift(support, updated)
            support = updated
            for k, (coupling, _, _) in zip(sample, solved, strict=True):
                plan, previous = coupling.plan, damped[k]
                damped[k] = plan if previous is None else (
                    config.gw_damping * plan + (1 - config.gw_damping) * previous
                )
            if shift <= config.tol:
                break
        if len(sample) < len(widths):
            solved = list(pool.map(couple, range(len(widths))))
    couplings = [coupling for coupling, _, _ in solved]
    mean_cost = sum(w * cost for w, (_, cost, _) in zip(weights, solved, strict=True))
    return BarycenterResult(couplings, mean_cost, iterations)


def support_sample(weights: Sequence[float], size: int | None) -> list[int]:
    """The clients that move the support: all, or the ``size`` of largest weight (the
    first ones on ties), in client order."""
    order = sorted(range(len(weights)), key=lambda k: (-float(weights[k]), k))
    return sorted(order if size is None else order[:size])


@contextmanager
def _torch_threads(count: int | None):
    """Run with ``count`` torch threads (None: unchanged), so that concurrent solver
    threads do not oversubscribe the CPUs with torch's own threads."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _relative_shift(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    if old.keys() != new.keys():
        return float("inf")
    moved = sum(float((new[k] - old[k]).square().sum()) for k in new)
    size = sum(float(old[k].square().sum()) for k in new)
    return (moved / max(size, 1e-300)) ** 0.5
