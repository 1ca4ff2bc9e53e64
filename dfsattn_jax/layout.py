"""Block selection (docs/spec.md §3.5): which key blocks each (batch, head, query block) keeps.

The layout type and its contract (:class:`BlockLayout`, :func:`validate_layout`, ...) are the
kernels' (:mod:`pallas_kernels.contract`) and are re-exported here under their public names. This
module selects layouts: :func:`select_blocks` (top-k of block scores, rows sorted ascending),
:func:`full_layout`, :func:`sorted_layout`, and the block budget of a density
(:func:`blocks_for_density`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dfsattn_jax.checks import check_density, check_positive_int, concrete_count
from pallas_kernels.contract import (
    BlockLayout,
    check_layout,
    checkify_layout,
    layout_is_valid,
    validate_layout,
)

__all__ = [
    "BlockLayout",
    "blocks_for_density",
    "check_layout",
    "checkify_layout",
    "full_layout",
    "layout_is_valid",
    "select_blocks",
    "sorted_layout",
    "validate_layout",
]


def blocks_for_density(density: float, num_key_blocks: int) -> int:
    """Number of key blocks kept per query block: ``max(1, int(density * num_key_blocks))``.

    Python float semantics, the reference's rule (docs/spec.md §3.5): density 0.3, 0.2, 0.1 of 591
    key blocks keep 177, 118, 59.
    """
    density = check_density(density)
    num_key_blocks = check_positive_int(num_key_blocks, "num_key_blocks")
    return max(1, int(density * num_key_blocks))


def select_blocks(
    scores: Float[Array, "b n nq nk"],
    num_blocks: int | Int[Array, ""],
    *,
    max_blocks: int | None = None,
) -> BlockLayout:
    """Keeps the ``num_blocks`` highest-scoring key blocks of every row (docs/spec.md §3.5).

    Args:
      scores: float[B, N, nq, nk] block scores (e.g. from :func:`~dfsattn_jax.scoring.block_scores`).
      num_blocks: how many key blocks each row keeps. May be a traced int32 scalar so that one
        compiled program serves every density; a traced value is clipped to ``[1, max_blocks]``
        at run time (it cannot raise), a value known at trace time must lie in that range.
      max_blocks: static row capacity ``K_max``; defaults to ``num_blocks`` when that is a
        Python int, and must be given when ``num_blocks`` is traced.

    Returns:
      A :class:`BlockLayout` whose rows list the top-``num_blocks`` key blocks (ties broken
      towards the lower index) sorted ascending, as docs/spec.md §4 requires, followed by the
      next-best blocks as padding up to ``K_max``. A NaN score is never selected: a row keeps
      at most as many blocks as it has non-NaN scores (0 if all are NaN).

    Raises:
      ValueError: for scores that are not a floating ``[B, N, nq, nk]`` array, or counts out of range.
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 4:
        raise ValueError(f"scores must have shape [B, N, nq, nk], got shape {scores.shape}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    nk = scores.shape[-1]
    count = concrete_count(num_blocks)
    if count is not None and count < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {count}")
    if max_blocks is None:
        if count is None:
            raise ValueError("max_blocks must be given when num_blocks is a traced value")
        max_blocks = count
    max_blocks = check_positive_int(max_blocks, "max_blocks")
    if max_blocks > nk:
        raise ValueError(f"max_blocks must be in [1, {nk}] (the number of key blocks), got {max_blocks}")
    if count is not None and count > max_blocks:
        raise ValueError(f"num_blocks must be in [1, max_blocks={max_blocks}], got {count}")
    return top_blocks(scores, num_blocks, max_blocks)


def top_blocks(
    scores: Float[Array, "b n nq nk"], num_blocks: int | Int[Array, ""], max_blocks: int
) -> BlockLayout:
    """:func:`select_blocks` without its checks, for callers that made them (``num_blocks`` is
    clipped to ``[1, max_blocks]``; ``1 <= max_blocks <= nk``)."""
    count = jnp.clip(jnp.asarray(num_blocks, jnp.int32), 1, max_blocks)
    counts = jnp.broadcast_to(count, scores.shape[:-1]).astype(jnp.int32)
    scores = scores.astype(jnp.float32)
    nan = jnp.isnan(scores)
    counts = jnp.minimum(counts, jnp.sum(~nan, axis=-1, dtype=jnp.int32))
    _, indices = jax.lax.top_k(jnp.where(nan, -jnp.inf, scores), max_blocks)
    layout = BlockLayout(kv_indices=indices.astype(jnp.int32), kv_counts=counts, num_key_blocks=scores.shape[-1])
    return sorted_layout(layout)


def sorted_layout(layout: BlockLayout) -> BlockLayout:
    """``layout`` with the first ``count`` entries of every row sorted ascending (docs/spec.md §4)
    and the padding after them; jit-able. Rows keep their sets of visited blocks."""
    nk = layout.num_key_blocks
    idx = jnp.asarray(layout.kv_indices)
    visited = jnp.arange(idx.shape[-1], dtype=jnp.int32) < jnp.asarray(layout.kv_counts)[..., None]
    keys = jnp.sort(jnp.where(visited, idx, idx + nk), axis=-1)  # an offset of nk sorts padding last
    return dataclasses.replace(layout, kv_indices=jnp.where(keys >= nk, keys - nk, keys).astype(idx.dtype))


def full_layout(batch: int, heads: int, num_query_blocks: int, num_key_blocks: int) -> BlockLayout:
    """The layout that visits every key block (dense attention through the sparse path)."""
    idx = jnp.broadcast_to(
        jnp.arange(num_key_blocks, dtype=jnp.int32), (batch, heads, num_query_blocks, num_key_blocks)
    )
    counts = jnp.full((batch, heads, num_query_blocks), num_key_blocks, dtype=jnp.int32)
    return BlockLayout(kv_indices=idx, kv_counts=counts, num_key_blocks=num_key_blocks)
