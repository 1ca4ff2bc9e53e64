"""Argument checks shared across the package (each raises ``ValueError`` naming the argument)."""

from __future__ import annotations

import operator

__all__ = ["check_positive_int"]


def check_positive_int(value: int, name: str) -> int:
    """Returns ``value`` as a Python int if it is an integer ≥ 1, else raises ``ValueError``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number
