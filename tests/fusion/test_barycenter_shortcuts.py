"""The couplings the barycenter knows without solving (the anchor's first one, and the
second iteration with two clients) are the ones it would have solved: the same
barycenter run with the shortcuts off (no anchor named, points declared non-static)
must give the same couplings, support cost and function."""

from __future__ import annotations

import pytest
import torch

from otfusion.fusion.barycenter import Points, free_support_barycenter
from otfusion.fusion.config import BarycenterConfig, TransportConfig
from otfusion.fusion.robust import weighted_mean


def clients(count: int, width: int, dim: int, seed: int) -> list[torch.Tensor]:
    """Each client: the same cluster centres, shuffled and perturbed, so that matching
    is non-trivial but well defined."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(width, dim, generator=generator, dtype=torch.float64)
    return [(centres + 0.3 * torch.randn(width, dim, generator=generator,
                                         dtype=torch.float64))[torch.randperm(
                                             width, generator=generator)]
            for _ in range(count)]


def run(rows: list[torch.Tensor], weights: list[float], shortcuts: bool, max_iter: int = 20):
    anchor = max(range(len(rows)), key=lambda k: (weights[k], -k))
    points = [{"w": Points.euclidean(r)} for r in rows]
    return free_support_barycenter(
        lambda k, _plan: points[k], weights, [len(r) for r in rows], {"w": rows[anchor]},
        BarycenterConfig(max_iter=max_iter, tol=0.0), TransportConfig(),
        combine=weighted_mean, anchor=anchor if shortcuts else None, static=shortcuts)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
def test_two_clients_converge_in_one_iteration_to_the_solved_fixed_point(seed, weights):
    rows = clients(2, 12, 5, seed)
    fast, full = run(rows, weights, True), run(rows, weights, False)
    assert fast.iterations == 1
    assert full.iterations >= 2  # tol=0: it needs the second one to see the fixed point
    for a, b in zip(fast.couplings, full.couplings, strict=True):
        assert torch.equal(a.permutation, b.permutation)
    assert fast.cost == pytest.approx(full.cost, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_the_anchors_first_coupling_is_the_identity_it_would_solve(seed):
    rows = clients(4, 10, 3, seed)
    weights = [0.1, 0.4, 0.3, 0.2]
    fast, full = run(rows, weights, True, max_iter=1), run(rows, weights, False, max_iter=1)
    assert torch.equal(fast.couplings[1].permutation, torch.arange(10))
    for a, b in zip(fast.couplings, full.couplings, strict=True):
        assert torch.equal(a.permutation, b.permutation)


def test_no_shortcut_for_non_euclidean_points():
    """Points whose cost integrates a spread coverage (after a non-permutation coupling
    of their inputs) are always solved."""
    rows = clients(2, 6, 4, 0)
    points = [{"w": Points(r, r.square().sum(dim=1) * 1.5, torch.full_like(r[0], 0.5))}
              for r in rows]
    result = free_support_barycenter(
        lambda k, _plan: points[k], [0.5, 0.5], [6, 6], {"w": rows[0]},
        BarycenterConfig(max_iter=20, tol=0.0), TransportConfig(), anchor=0, static=True)
    assert result.iterations >= 2
