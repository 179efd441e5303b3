"""Comparisons of two models' state_dicts shared by the architecture tests."""

from __future__ import annotations

import torch
from torch import nn


def changed_keys(a: nn.Module, b: nn.Module) -> list[str]:
    """The state_dict entries whose values differ between ``a`` and ``b``."""
    state, other = a.state_dict(), b.state_dict()
    return [key for key in state if not torch.equal(state[key], other[key])]


def assert_same_layout(got: nn.Module, expected: nn.Module) -> None:
    """Same state_dict keys in the same order, with the same shapes and dtypes."""
    state, other = expected.state_dict(), got.state_dict()
    assert list(other) == list(state)
    for key, tensor in state.items():
        assert other[key].shape == tensor.shape, key
        assert other[key].dtype == tensor.dtype, key


def assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """``a`` computes ``b``'s outputs on ``x`` (relative 1e-4, absolute 1e-5 of their
    largest)."""
    with torch.no_grad():
        expected = b(x)
        torch.testing.assert_close(a(x), expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))
