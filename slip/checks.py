"""Argument checks the library's public functions share, each defined once, each failing with one line naming the
argument."""
from __future__ import annotations

import math
from typing import Any

__all__ = ["is_positive_int", "non_negative_int", "positive_fraction", "positive_int", "positive_number", "unit_interval"]


def is_positive_int(value: Any) -> bool:
    """Whether `value` is an int >= 1 (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_int(name: str, value: Any) -> int:
    """`value` if it is an int >= 1; else a one-line ValueError naming `name`."""
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(name: str, value: Any) -> int:
    """`value` if it is an int >= 0; else a one-line ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def positive_number(name: str, value: Any) -> float:
    """`value` as a float if it is a finite number > 0 (a bool is not); else a one-line ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def unit_interval(name: str, value: Any) -> float:
    """`value` as a float if it is a number in [0, 1] (a bool is not); else a one-line ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def positive_fraction(name: str, value: Any) -> float:
    """`value` as a float if it is a number in (0, 1] (a bool is not); else a one-line ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)
