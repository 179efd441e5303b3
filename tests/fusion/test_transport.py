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
