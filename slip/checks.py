"""Argument checks the library's public functions share, each defined once, each failing with one line naming the
argument."""
from __future__ import annotations

from typing import Any

__all__ = ["is_positive_int", "non_negative_int", "positive_int"]


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
