"""Free-support Wasserstein barycenter of the clients' neurons of one group.

Each client offers, per member tensor of the group, one row per neuron (its incoming
weights in the fused model's coordinates, or its activations). The barycenter support
``B`` has the fused width as its number of rows. Iterate: solve OT from ``B`` to every
client, then move ``B`` to the clients' barycentric projections, weighted by the client
weights, until ``B`` stops moving.

Two couplings are known without solving, with exact transport between equal widths of
plain Euclidean points (see :func:`free_support_barycenter`): the anchor's first one
(``B`` starts as the anchor's own neurons: the identity), and, with two clients, the
second iteration's (the first one's again).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import BarycenterConfig, TransportConfig
from .graph import AxisSpec
from .projection import Coupling, apply_axis
from .robust import Combine, weighted_mean
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

    @property
    def is_euclidean(self) -> bool:
        """Whether the cost is the plain squared distance to ``rows`` (every input
        coordinate fully covered, as after permutations, and no scale)."""
        return self.scale == 1.0 and bool((self.support_weights == 1).all())


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
    rigid: bool = False,
    combine: Combine = weighted_mean,
    anchor: int | None = None,
    static: bool = False,
) -> BarycenterResult:
    """Couple every client to the fused neurons; ``support`` is the initial ``B``.

    With more clients than ``config.support_clients``, ``B`` is moved by the clients of
    largest weight only (weights renormalised over them), and every client is then
    coupled once to the final ``B``; in that pass a client outside the sample has no
    previous coupling, so its recurrent (Gromov-Wasserstein) members are omitted.

    ``blocks > 1`` restricts the couplings to moving whole blocks of neurons
    (:func:`~.transport.block_plan`); ``block_couplings[k]``, when given, is how client
    ``k``'s blocks must be matched, and ``rigid`` keeps every unit at its place within
    its block. Every plan is solved with ``transport``, and the
    support moves to ``combine(mapped rows, weights)`` of the clients (default: their
    weighted mean; a robust estimator keeps hostile clients from dragging it).

    ``anchor`` is the client whose points are the initial support, if any; ``static``
    says that ``points_fn`` ignores the plan (no recurrent members). With exact transport,
    one block, and plain Euclidean points (:attr:`Points.is_euclidean`), two couplings are
    known without solving:

    - the anchor's first one is the identity (its cost to its own points is zero);
    - with two clients ``a`` (the anchor) and ``b``, static points and the weighted mean,
      the first iteration already converged. ``b``'s coupling ``s`` maximises
      ``sum_i a_i . b_s(i)``, and the new support ``w a + (1 - w) b_s`` is coupled
      optimally to ``a`` by the identity and to ``b`` by ``s`` again, since
      ``sum_i a_t(i) . a_i <= sum_i |a_i|^2`` for every permutation ``t``.
    """
    n = next(iter(support.values())).shape[0]
    like = next(iter(support.values()))  # dtype and device of the marginals
    uniform_n = torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)
    marginals = [torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
                 for m in widths]
    damped: list[torch.Tensor | None] = [None] * len(widths)
    warm: list[object] = [None] * len(widths)
    exact = transport.solver == "exact" and blocks == 1

    def couple(k: int, known: bool = False):
        """Client ``k``'s coupling to the current support, its cost and its neurons'
        rows; ``known``: the support is client ``k``'s own points."""
        points = points_fn(k, damped[k])
        euclidean = all(p.is_euclidean for p in points.values())
        rows = {name: p.rows for name, p in points.items()}
        if known and exact and widths[k] == n and euclidean:
            return _Solved(Coupling.identity(n, like), 0.0, rows, euclidean)
        cost = ground_cost(support, points)
        if blocks > 1:
            plan = block_plan(cost, uniform_n, marginals[k], transport, blocks,
                              None if block_couplings is None else block_couplings[k], rigid)
        else:
            plan, warm[k] = transport_plan(cost, uniform_n, marginals[k], transport, warm[k])
        return _Solved(Coupling.from_plan(plan), float((cost * plan).sum()), rows, euclidean)

    sample = support_sample(weights, config.support_clients)
    sample_total = sum(weights[k] for k in sample)
    sample_weights = [weights[k] / sample_total for k in sample]
    iterations = 0
    workers = config.workers or os.cpu_count() or 1
    single = 1 if workers > 1 else None  # torch threads per concurrent solve
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while iterations < config.max_iter:
            iterations += 1
            first = iterations == 1
            solved = _solve_all(pool, couple, sample, anchor if first else None, single)
            fixed_point = (first and exact and static and combine is weighted_mean
                           and anchor in sample and len(sample) == 2
                           and all(s.matched for s in solved))
            if not fixed_point or len(sample) < len(widths):  # the support is used again
                updated = {name: combine([s.mapped(name) for s in solved], sample_weights)
                           for name in solved[0].rows}
                shift = _relative_shift(support, updated)
                support = updated
            if fixed_point:
                solved = _two_client_costs(solved, sample_weights)
                break
            for k, s in zip(sample, solved, strict=True):
                plan, previous = s.coupling.plan, damped[k]
                damped[k] = plan if previous is None else (
                    config.gw_damping * plan + (1 - config.gw_damping) * previous
                )
            if shift <= config.tol:
                break
        if len(sample) < len(widths):
            solved = _solve_all(pool, couple, list(range(len(widths))), None, single)
    mean_cost = sum(w * s.cost for w, s in zip(weights, solved, strict=True))
    return BarycenterResult([s.coupling for s in solved], mean_cost, iterations)


class _Solved(NamedTuple):
    """One client's coupling to the support, its transport cost, its neurons' rows per
    member, and whether its points are plain Euclidean ones."""

    coupling: Coupling
    cost: float
    rows: dict[str, torch.Tensor]
    euclidean: bool

    def mapped(self, name: str) -> torch.Tensor:
        """Member ``name``'s rows mapped onto the support's rows."""
        return apply_axis(self.rows[name], 0, _NEURON_ROWS, self.coupling)

    @property
    def matched(self) -> bool:
        """Whether the coupling is a permutation of plain Euclidean points."""
        return self.euclidean and self.coupling.permutation is not None


def _solve_all(pool: ThreadPoolExecutor, couple, clients: list[int], known: int | None,
               threads: int | None) -> list[_Solved]:
    """``couple`` for every client in order; the ``known`` client inline, the others on
    the pool (the solvers release the GIL) with ``threads`` torch threads, or inline with
    all of torch's threads when only one is left."""
    todo = [k for k in clients if k != known]
    if len(todo) > 1:
        with _torch_threads(threads):
            results = dict(zip(todo, pool.map(couple, todo), strict=True))
    else:
        results = {k: couple(k) for k in todo}
    if known in clients:
        results[known] = couple(known, known=True)
    return [results[k] for k in clients]


def _two_client_costs(solved: list[_Solved], weights: list[float]) -> list[_Solved]:
    """The costs of two clients' first couplings to the support they move it to: the
    support is ``w_a a + w_b b_s``, so the anchor is ``w_b`` and the other ``w_a`` of the
    way from it, and their squared distances are those fractions squared of the first
    solve's cost (``b``'s to ``a``)."""
    distance = max(s.cost for s in solved)  # the anchor's own cost is zero
    return [s._replace(cost=(1 - w) ** 2 * distance)
            for s, w in zip(solved, weights, strict=True)]


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
