"""Argument checks shared across the package (each raises ``ValueError`` naming the argument)."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["check_positive_int", "lookup"]

T = TypeVar("T")


def check_positive_int(value: int, name: str) -> int:
    """Returns ``value`` as a Python int if it is an integer ≥ 1, else raises ``ValueError``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or a ``ValueError`` naming ``what`` and listing the known names (sorted)."""
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"{what} must be one of {sorted(registry)}, got {name!r}")
    return registry[name]
