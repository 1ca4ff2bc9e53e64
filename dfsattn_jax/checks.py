"""Every argument check of the method (each raises ``ValueError`` naming the argument).

The integer rule (:func:`check_positive_int`, :func:`check_nonnegative_int`: Python or NumPy
integers, never a bool or a float, even a whole one) is the kernels' contract's
(:mod:`pallas_kernels.contract`), which also checks the kernels' inputs (q, k, v, the layout, the
key lengths); it is re-exported here so that the method, the models and the tools share one rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.contract import check_nonnegative_int, check_positive_int

__all__ = [
    "check_density",
    "check_int_fields",
    "check_nonnegative_int",
    "check_positive_int",
    "check_tile_size",
    "concrete_count",
    "lookup",
]

T = TypeVar("T")


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


def check_density(density: float, name: str = "density") -> float:
    """Validates a kept fraction in (0, 1] and returns it as a Python float."""
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {density!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, 1], got {density!r}")
    return value


def check_tile_size(tile_size: int, block_size: int) -> tuple[int, int]:
    """Validates ``tile_size`` and ``block_size`` (positive integers, ``block_size % tile_size == 0``)
    and returns them as Python ints."""
    tile_size = check_positive_int(tile_size, "tile_size")
    block_size = check_positive_int(block_size, "block_size")
    if block_size % tile_size:
        raise ValueError(f"tile_size must divide block_size={block_size}, got tile_size={tile_size}")
    return tile_size, block_size


def concrete_count(num_blocks, name: str = "num_blocks") -> int | None:
    """``num_blocks`` as a Python int when its value is known at trace time, else ``None`` (a
    traced integer scalar, clipped where it is used).

    Raises:
      ValueError: if ``num_blocks`` is not an integer scalar.
    """
    if isinstance(num_blocks, bool):
        raise ValueError(f"{name} must be an integer, got {num_blocks!r}")
    if isinstance(num_blocks, (int, np.integer)):
        return int(num_blocks)
    dtype = getattr(num_blocks, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or getattr(num_blocks, "shape", None) != ():
        raise ValueError(f"{name} must be an integer scalar, got {num_blocks!r}")
    try:
        return int(num_blocks)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None
