"""Static block layouts to compare DFSAttn against, on the same kernel at equal density.

**Static spatio-temporal window** (in the spirit of Radial Attention, Li et al. 2025): a query
attends densely to keys near it in space and time, and the spatial window shrinks as the temporal
distance grows. At the token level the pair (query q, key k) of a (F, H, W) grid gets the cost

    θ(q, k) = (1 + ‖(Δh, Δw)‖₂) · decay^band(|Δf|),   band(0) = 0, band(d) = ⌊log₂ d⌋ + 1,

so the spatial radius admitted at a threshold θ halves (for ``decay = 2``) with every doubling of
the frame distance: frames at distance 1, 2–3, 4–7, … form the bands of Radial Attention. A token
mask of density ρ keeps the pairs with ``θ ≤ θ_ρ``, ``θ_ρ`` the smallest threshold that keeps at
least a fraction ρ of all pairs (it depends on the grid only, not on the token order).

On a block-sparse kernel the mask must be made of (query block, key block) tiles: the blocks are
the runs of ``block_size`` consecutive tokens *in the given order*. Each query block keeps the
``blocks_for_density(ρ, nk)`` key blocks (exactly DFS's count at that density) that hold the most
token pairs of the window (ties, e.g. between frames of one band, broken by the block pair's
closeness, the mean of ``1 / (1 + ‖(Δf, Δh, Δw)‖₂)``, then towards the lower index). The layout is static: it does not look at q or k, and is shared by every batch
element and head.

Plain block mean pooling (the coarse estimate of other block-sparse methods) needs no code here:
it is ``scoring.block_scores(q, k, tile_size=block_size, block_size=block_size)``.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dfsattn_jax.checks import check_density, check_positive_int
from dfsattn_jax.layout import BlockLayout, blocks_for_density, select_blocks

__all__ = [
    "WindowStats",
    "window_threshold",
    "static_window_stats",
    "static_window_scores",
    "static_window_layout",
]


class WindowStats(NamedTuple):
    """Per block pair statistics of the static window.

    Attributes:
      counts: int32[nq, nk] token pairs of the block pair inside the window (``θ ≤ threshold``,
        with a relative slack of 1e-6 against rounding).
      closeness: float32[nq, nk] mean of ``1 / (1 + ‖(Δf, Δh, Δw)‖₂)`` over the block pair's valid
        token pairs (the tie-break between equal counts).
      threshold: the token-level threshold θ_ρ.
    """

    counts: Int[Array, "nq nk"]
    closeness: Float[Array, "nq nk"]
    threshold: float


def _check_grid(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        dims = tuple(operator.index(d) for d in grid)
    except TypeError:
        raise ValueError(f"grid must be three positive integers (F, H, W), got {grid!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"grid must be three positive integers (F, H, W), got {grid!r}")
    return dims  # type: ignore[return-value]


def _check_perm(perm: np.ndarray, length: int) -> np.ndarray:
    perm = np.asarray(perm)
    if perm.shape != (length,) or not np.issubdtype(perm.dtype, np.integer):
        raise ValueError(f"perm must be an integer array of shape ({length},), got {perm.dtype} {perm.shape}")
    if not np.array_equal(np.sort(perm), np.arange(length)):
        raise ValueError(f"perm must be a permutation of range({length})")
    return perm.astype(np.int32)


def _check_decay(decay: float) -> float:
    decay = float(decay)
    if not decay >= 1.0 or math.isinf(decay):
        raise ValueError(f"decay must be a finite number >= 1, got {decay}")
    return decay


_MAX_BANDS = 32  # frame distances below 2**31


def _band_factor(df, decay: float, xp):
    """``decay ** band(|Δf|)`` (float32) for integer frame distances ``df >= 0``.

    ``band(d)`` is the bit length of d, computed with integer comparisons and the powers looked up
    in a float32 table, so NumPy and XLA give identical bits.
    """
    band = sum((df >= (1 << k)).astype(xp.int32) for k in range(_MAX_BANDS - 1))
    table = xp.asarray(np.array([decay**b for b in range(_MAX_BANDS)], np.float32))
    return table[band]


_SLACK = np.float32(1.0 + 1e-6)  # relative slack of the θ ≤ θ_ρ test against sqrt rounding on devices


def _cost(df, dh, dw, decay: float, xp):
    """Token-pair cost θ (float32) from absolute offsets; the same arithmetic in NumPy and JAX."""
    dist = xp.sqrt((dh * dh + dw * dw).astype(xp.float32))
    return ((xp.float32(1.0) + dist) * _band_factor(df, decay, xp)).astype(xp.float32)


def window_threshold(grid: tuple[int, int, int], density: float, *, decay: float = 2.0) -> float:
    """The token-level threshold θ_ρ: the smallest cost whose window keeps ≥ ``density`` of all pairs.

    Computed exactly from the offset histogram of the grid ((2F-1)(2H-1)(2W-1) offsets).
    """
    f, h, w = _check_grid(grid)
    density = check_density(density)
    decay = _check_decay(decay)
    df = np.abs(np.arange(-(f - 1), f))[:, None, None]
    dh = np.abs(np.arange(-(h - 1), h))[None, :, None]
    dw = np.abs(np.arange(-(w - 1), w))[None, None, :]
    theta = _cost(df, dh, dw, decay, np).ravel()
    pairs = ((f - df) * (h - dh) * (w - dw)).astype(np.float64)
    pairs = np.broadcast_to(pairs, (2 * f - 1, 2 * h - 1, 2 * w - 1)).ravel()
    order = np.argsort(theta, kind="stable")
    theta_sorted = theta[order]
    cumulative = np.cumsum(pairs[order])
    total = float(f * h * w) ** 2
    first = int(np.searchsorted(cumulative, density * total - 1e-9 * total, side="left"))
    first = min(first, theta_sorted.shape[0] - 1)
    return float(theta_sorted[first])


def static_window_stats(
    grid: tuple[int, int, int],
    perm: Int[np.ndarray, " L"],
    *,
    block_size: int = 128,
    density: float,
    decay: float = 2.0,
) -> WindowStats:
    """Window token pairs per (query block, key block) for tokens in the order ``perm``.

    Args:
      grid: (F, H, W) token grid; tokens are numbered in raster order ``f*H*W + h*W + w``.
      perm: int[L] the order: position i of the sequence holds raster token ``perm[i]``.
      block_size: tokens per block (the last block may be partial).
      density: the token-level window's kept fraction ρ (fixes θ_ρ).
      decay: factor by which the spatial window shrinks per temporal band (≥ 1).

    Returns:
      :class:`WindowStats` with ``nq = nk = ceil(L / block_size)``. Costs O(L²) work, done on
      device block row by block row (a second or so for 16k tokens on CPU).
    """
    f, h, w = _check_grid(grid)
    length = f * h * w
    perm = _check_perm(perm, length)
    block_size = check_positive_int(block_size, "block_size")
    decay = _check_decay(decay)
    threshold = window_threshold((f, h, w), density, decay=decay)
    nb = -(-length // block_size)
    padded = nb * block_size
    pos = np.full(padded, -1, np.int64)
    pos[:length] = perm
    valid = pos >= 0
    safe = np.where(valid, pos, 0)
    coords = np.stack([safe // (h * w), (safe // w) % h, safe % w], axis=-1).astype(np.int32)
    coords_j = jnp.asarray(coords.reshape(nb, block_size, 3))
    valid_j = jnp.asarray(valid.reshape(nb, block_size))
    key_coords = jnp.asarray(coords)
    key_valid = jnp.asarray(valid)
    threshold32 = jnp.float32(np.float32(threshold) * _SLACK)

    def row(args):
        q, qv = args  # [b, 3], [b]
        d = jnp.abs(q[:, None, :] - key_coords[None, :, :])  # [b, padded, 3]
        theta = _cost(d[..., 0], d[..., 1], d[..., 2], decay, jnp)
        pair_valid = qv[:, None] & key_valid[None, :]
        inside = (theta <= threshold32) & pair_valid
        counts = jnp.sum(inside.reshape(block_size, nb, block_size), axis=(0, 2), dtype=jnp.int32)
        near = 1.0 / (1.0 + jnp.sqrt(jnp.sum(d * d, axis=-1).astype(jnp.float32)))
        inv = jnp.where(pair_valid, near, 0.0).reshape(block_size, nb, block_size)
        num_pairs = jnp.sum(pair_valid.reshape(block_size, nb, block_size), axis=(0, 2))
        closeness = jnp.sum(inv, axis=(0, 2)) / jnp.maximum(num_pairs, 1).astype(jnp.float32)
        return counts, closeness

    counts, closeness = jax.jit(lambda c, v: jax.lax.map(row, (c, v)))(coords_j, valid_j)
    return WindowStats(counts=counts, closeness=closeness, threshold=threshold)


def static_window_scores(
    grid: tuple[int, int, int],
    perm: Int[np.ndarray, " L"],
    *,
    block_size: int = 128,
    density: float,
    decay: float = 2.0,
) -> Float[Array, "nq nk"]:
    """Static block scores whose row-wise top-k is the window layout: float32[nq, nk].

    Each score is the rank (0 = worst, nk − 1 = best) of the key block in its row by (window pair
    count, closeness, lower index first); ranks are exact in float32 and make ``select_blocks``
    reproduce this module's tie-breaking.
    """
    stats = static_window_stats(grid, perm, block_size=block_size, density=density, decay=decay)
    counts = np.asarray(stats.counts, np.int64)
    closeness = np.asarray(stats.closeness, np.float64)
    nq, nk = counts.shape
    index = np.broadcast_to(np.arange(nk), (nq, nk))
    # lexsort: last key is primary; ascending, so the best block (most pairs, closest, lowest
    # index) comes last and gets the largest rank.
    order = np.lexsort((-index, closeness, counts), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(nk)[None, :].repeat(nq, 0), axis=-1)
    return jnp.asarray(ranks, jnp.float32)


def static_window_layout(
    grid: tuple[int, int, int],
    perm: Int[np.ndarray, " L"],
    *,
    block_size: int = 128,
    density: float,
    batch: int = 1,
    heads: int = 1,
    max_blocks: int | None = None,
    decay: float = 2.0,
) -> BlockLayout:
    """The static spatio-temporal window as a :class:`BlockLayout` at ``density``.

    Every (batch, head, query block) row keeps exactly ``blocks_for_density(density, nk)`` key
    blocks, as DFS does at that density.

    Args:
      grid, perm, block_size, decay: see :func:`static_window_stats`.
      density: kept fraction, both of the token-level window and of key blocks per row.
      batch, heads: the layout is broadcast to ``[batch, heads, nq, K_max]``.
      max_blocks: static row capacity ``K_max`` (default: the count itself); the filler entries
        are the next-best blocks.
    """
    density = check_density(density)
    scores = static_window_scores(grid, perm, block_size=block_size, density=density, decay=decay)
    nq, nk = scores.shape
    count = blocks_for_density(density, nk)
    batch, heads = operator.index(batch), operator.index(heads)
    if batch < 1 or heads < 1:
        raise ValueError(f"batch and heads must be positive integers, got batch={batch}, heads={heads}")
    layout = select_blocks(scores[None, None], count, max_blocks=max_blocks)
    shape = (batch, heads) + layout.kv_counts.shape[2:]
    return BlockLayout(
        kv_indices=jnp.broadcast_to(layout.kv_indices, shape + (layout.max_blocks,)),
        kv_counts=jnp.broadcast_to(layout.kv_counts, shape),
        num_key_blocks=nk,
    )
