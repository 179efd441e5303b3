"""The exact assignment against brute force and POT, with the offsets it subtracts."""

from __future__ import annotations

import itertools

import numpy as np
import ot
import pytest

from otfusion.fusion.transport import assignment


def _total(cost: np.ndarray, cols: np.ndarray) -> float:
    return float(cost[np.arange(len(cost)), cols].sum())


@pytest.mark.parametrize("seed", range(5))
def test_the_assignment_is_optimal_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    cost = rng.random((6, 6)) + 5 * rng.random((6, 1)) + 5 * rng.random((1, 6))
    cols = assignment(cost)
    assert sorted(cols.tolist()) == list(range(6))
    best = min(_total(cost, np.array(p)) for p in itertools.permutations(range(6)))
    assert _total(cost, cols) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_assignment_matches_pot_on_squared_distances(dtype):
    """Squared distances between points of different norms: rows and columns with
    offsets of their own, which the assignment subtracts first."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 8)) * 3, rng.normal(size=(60, 8)) + 2
    cost = ot.dist(a, b).astype(dtype)
    uniform = np.full(60, 1 / 60)
    plan = ot.emd(uniform, uniform, cost.astype(np.float64))
    assert _total(cost.astype(np.float64), assignment(cost)) == pytest.approx(
        60 * float((plan * cost).sum()), rel=1e-9)


def test_a_forbidden_pair_is_avoided():
    """An infinite cost is left as SciPy reads it (forbidden), not reduced."""
    cost = np.array([[np.inf, 1.0], [1.0, 0.5]])
    assert assignment(cost).tolist() == [1, 0]


def test_costs_near_the_float64_limit_and_an_empty_cost():
    """Subtracting the minima would overflow here (inf - inf): the raw cost is solved."""
    cost = np.array([[-1e308, -1e308], [1e308, 1e308]])
    assert sorted(assignment(cost).tolist()) == [0, 1]
    assert assignment(np.zeros((0, 0))).tolist() == []


@pytest.mark.parametrize("seed", range(3))
def test_blocks_whose_units_keep_their_places_are_matched_by_brute_force(seed):
    """``block_plan(rigid=True)``: every unit goes to the unit at its own place in the
    matched block, and the blocks are matched to minimise the sum of those pairs' costs
    (brute force over every order of 3 blocks of 2 units)."""
    import torch

    from otfusion.fusion.config import TransportConfig
    from otfusion.fusion.transport import block_plan

    blocks, size = 3, 2
    n = blocks * size
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    plan = block_plan(cost, uniform, uniform, TransportConfig(), blocks, rigid=True)

    def total(order):
        return sum(float(cost[i * size + u, order[i] * size + u])
                   for i in range(blocks) for u in range(size))

    best = min(itertools.permutations(range(blocks)), key=total)
    expected = torch.zeros(n, n, dtype=torch.float64)
    for i, j in enumerate(best):
        for u in range(size):
            expected[i * size + u, j * size + u] = 1.0 / n
    assert torch.equal(plan, expected)


def test_blocks_whose_units_keep_their_places_need_one_size():
    import torch

    from otfusion.fusion.config import TransportConfig
    from otfusion.fusion.transport import block_plan

    cost = torch.zeros(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="blocks of 2 and 3 units"):
        block_plan(cost, torch.full((4,), 0.25, dtype=torch.float64),
                   torch.full((6,), 1 / 6, dtype=torch.float64), TransportConfig(), 2,
                   rigid=True)
