"""Argument checks shared across the package (each raises ``ValueError`` naming the argument)."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, Sequence, TypeVar

__all__ = ["check_int_fields", "check_nonnegative_int", "check_positive_int", "lookup"]

T = TypeVar("T")


def _check_int(value: int, name: str, minimum: int, what: str) -> int:
    """``value`` as a Python int when it is an integer (a Python or NumPy int, not a bool, not a
    float even if whole) of at least ``minimum``; else a ``ValueError`` naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def check_positive_int(value: int, name: str) -> int:
    """Returns ``value`` as a Python int if it is an integer ≥ 1 (not a bool), else raises ``ValueError``."""
    return _check_int(value, name, 1, "a positive integer")


def check_nonnegative_int(value: int, name: str) -> int:
    """Returns ``value`` as a Python int if it is an integer ≥ 0 (not a bool), else raises ``ValueError``."""
    return _check_int(value, name, 0, "a non-negative integer")


def check_int_fields(config: Any, names: Sequence[str], *, nonnegative: bool = False, prefix: str = "") -> None:
    """Checks the named fields of a (frozen) dataclass, in ``__post_init__``: each an integer ≥ 1
    (≥ 0 with ``nonnegative``), stored back as a Python int so that a NumPy integer never
    reaches a hash, a JSON file or a static argument. Errors name ``prefix + name``."""
    check = check_nonnegative_int if nonnegative else check_positive_int
    for name in names:
        object.__setattr__(config, name, check(getattr(config, name), prefix + name))


def lookup(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``, or a ``ValueError`` naming ``what`` and listing the known names (sorted)."""
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"{what} must be one of {sorted(registry)}, got {name!r}")
    return registry[name]
