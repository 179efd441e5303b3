"""Argument checks shared by the zoo's model families."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def positive_int(value: object, name: str) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_ints(values: object, name: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Return ``values`` as a tuple of positive integers, else raise ``ValueError``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of positive integers, got {values!r}")
    out = tuple(positive_int(v, f"{name}[{i}]") for i, v in enumerate(values))
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return out


def scaled(channels: int, width_multiplier: float) -> int:
    """Scale a nominal channel count by ``width_multiplier``; never below one channel."""
    return max(1, int(round(channels * width_multiplier)))


def positive_float(value: object, name: str) -> float:
    """Return ``value`` as a ``float`` if it is a positive number, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)
