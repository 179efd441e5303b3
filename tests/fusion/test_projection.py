"""Neuron-row helpers of :mod:`otfusion.fusion.projection` and the finiteness check."""

from __future__ import annotations

import pytest
import torch

from otfusion.fusion.graph import AxisSpec
from otfusion.fusion.projection import Coupling, apply_axis, as_rows, row_sq_norms
from otfusion.fusion.validation import all_finite


@pytest.mark.parametrize(("shape", "axis", "outer", "inner"), [
    ((6, 5), 0, 1, 1),            # a Linear weight, neuron axis
    ((6, 5), 1, 1, 1),            # a Linear weight, input axis
    ((8, 3, 3, 3), 1, 1, 1),      # a convolution's input axis
    ((12, 4), 0, 4, 1),           # LSTM gates: 4 blocks of 3 neurons
    ((5, 18), 1, 1, 6),           # after a flatten: 3 channels x 6 positions
    ((7,), 0, 1, 1),              # a bias
])
def test_row_sq_norms_are_the_squared_norms_of_as_rows(shape, axis, outer, inner):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    spec = AxisSpec(group=0, kind="input", outer=outer, inner=inner)
    expected = as_rows(tensor, axis, spec).double().square().sum(dim=1)
    torch.testing.assert_close(row_sq_norms(tensor, axis, spec).double(), expected,
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_finds_one_bad_entry(bad, dtype):
    tensor = torch.randn(4, 5).to(dtype)
    assert all_finite(tensor)
    tensor[2, 3] = bad
    assert not all_finite(tensor)


def test_an_empty_tensor_is_finite():
    assert all_finite(torch.empty(0, 3))


@pytest.mark.parametrize(("shape", "axis", "outer", "inner"), [
    ((6, 5), 0, 1, 1), ((5, 6), 1, 1, 1), ((12, 3), 0, 2, 1), ((4, 18), 1, 1, 3),
    ((2, 6, 3, 3), 1, 1, 1),
])
def test_a_permutation_maps_by_index_as_its_dense_plan_does(shape, axis, outer, inner):
    generator = torch.Generator().manual_seed(1)
    tensor = torch.randn(shape, generator=generator)
    width = shape[axis] // (outer * inner)
    spec = AxisSpec(group=0, kind="input", outer=outer, inner=inner)
    order = torch.randperm(width, generator=generator)
    plan = torch.zeros(width, width)
    plan[torch.arange(width), order] = 1.0 / width
    by_index = apply_axis(tensor, axis, spec, Coupling.from_plan(plan))
    dense = apply_axis(tensor, axis, spec, Coupling(plan))  # no permutation: the einsum
    torch.testing.assert_close(by_index, dense)
    assert not torch.equal(by_index, tensor)
    identity = Coupling.identity(width, tensor)
    assert identity.is_identity and not Coupling.from_plan(plan).is_identity
    assert apply_axis(tensor, axis, spec, identity) is tensor
