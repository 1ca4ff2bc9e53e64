"""Helpers shared by the tests (``from helpers import rel_l2``; pytest puts ``tests/`` on sys.path).

One helper per concept: a test file that needs one of these imports it from here instead of
keeping a private copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["poisoned", "rel_l2"]


def rel_l2(a, b) -> float:
    """Relative L2 error ``||a - b|| / ||b||`` of ``a`` against the reference ``b``, in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def poisoned(like) -> jax.Array:
    """An all-NaN array of the shape and dtype of ``like``: as a kernel's initial output, any
    element the kernel fails to write stays NaN."""
    return jnp.full(like.shape, jnp.nan, like.dtype)
