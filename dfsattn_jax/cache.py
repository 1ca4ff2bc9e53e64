"""The mask cache: one block layout per sparse layer, reused between refreshes (docs/spec.md §6).

A :class:`MaskCache` has static shapes (``K_max`` = the plan's ``max_blocks``) so it can be
carried through ``jax.jit``/``lax.scan`` across steps and layers. Updates are functional: they
return a new cache. ``slot`` (the sparse layer's index in the cache) may be a Python int,
which is range-checked, or a traced int32 scalar, which is clamped into range by JAX's
indexing rules.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from dfsattn_jax.checks import check_positive_int
from dfsattn_jax.layout import BlockLayout

__all__ = ["MaskCache", "init_mask_cache", "cache_layout", "cache_update"]


class MaskCache(NamedTuple):
    """Cached layouts of ``S`` sparse layers (a pytree).

    Attributes:
      kv_indices: int32[S, B, N, nq, K_max].
      kv_counts: int32[S, B, N, nq].
      refreshes: int32[], number of layouts written by :func:`cache_update` (one per layer per
        refresh step), for tests and logging.
    """

    kv_indices: Int[Array, "s b n nq kmax"]
    kv_counts: Int[Array, "s b n nq"]
    refreshes: Int[Array, ""]

    @property
    def num_slots(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.kv_indices.shape[-1]


def init_mask_cache(
    num_sparse_layers: int, batch: int, heads: int, num_query_blocks: int, max_blocks: int
) -> MaskCache:
    """An initial cache: every row lists key blocks ``0 .. max_blocks-1`` with count ``max_blocks``.

    The initial content is valid (indices in range) but meaningless: a refresh must write
    each slot before it is used for attention.
    """
    shape = (
        check_positive_int(num_sparse_layers, "num_sparse_layers"),
        check_positive_int(batch, "batch"),
        check_positive_int(heads, "heads"),
        check_positive_int(num_query_blocks, "num_query_blocks"),
    )
    max_blocks = check_positive_int(max_blocks, "max_blocks")
    indices = jnp.broadcast_to(jnp.arange(max_blocks, dtype=jnp.int32), shape + (max_blocks,))
    counts = jnp.full(shape, max_blocks, dtype=jnp.int32)
    return MaskCache(kv_indices=indices, kv_counts=counts, refreshes=jnp.zeros((), jnp.int32))


def _check_slot(cache: MaskCache, slot: int | Int[Array, ""]) -> int | Int[Array, ""]:
    if isinstance(slot, bool):
        raise ValueError(f"slot must be an integer, got {slot!r}")
    if isinstance(slot, int):
        if not 0 <= slot < cache.num_slots:
            raise ValueError(f"slot must be in [0, {cache.num_slots}), got {slot}")
        return slot
    if getattr(slot, "shape", None) != () or not jnp.issubdtype(slot.dtype, jnp.integer):
        raise ValueError(f"slot must be an int or an integer scalar array, got {slot!r}")
    return slot


def cache_layout(cache: MaskCache, slot: int | Int[Array, ""], num_key_blocks: int) -> BlockLayout:
    """The layout stored in ``slot`` as a :class:`BlockLayout` over ``num_key_blocks`` key blocks."""
    slot = _check_slot(cache, slot)
    num_key_blocks = check_positive_int(num_key_blocks, "num_key_blocks")
    if cache.max_blocks > num_key_blocks:
        raise ValueError(f"num_key_blocks must be >= the cache's max_blocks={cache.max_blocks}, got {num_key_blocks}")
    indices, counts = _read_slot(cache.kv_indices, cache.kv_counts, slot)
    return BlockLayout(kv_indices=indices, kv_counts=counts, num_key_blocks=num_key_blocks)


@jax.jit
def _read_slot(kv_indices, kv_counts, slot):
    indices = jax.lax.dynamic_index_in_dim(kv_indices, slot, axis=0, keepdims=False)
    counts = jax.lax.dynamic_index_in_dim(kv_counts, slot, axis=0, keepdims=False)
    return indices, counts


@jax.jit
def _write_slot(cache: MaskCache, slot, kv_indices, kv_counts) -> MaskCache:
    indices = jax.lax.dynamic_update_index_in_dim(cache.kv_indices, kv_indices.astype(jnp.int32), slot, axis=0)
    counts = jax.lax.dynamic_update_index_in_dim(cache.kv_counts, kv_counts.astype(jnp.int32), slot, axis=0)
    return MaskCache(kv_indices=indices, kv_counts=counts, refreshes=cache.refreshes + 1)


def cache_update(cache: MaskCache, slot: int | Int[Array, ""], layout: BlockLayout) -> MaskCache:
    """A new cache with ``layout`` written into ``slot`` and ``refreshes`` incremented by one."""
    slot = _check_slot(cache, slot)
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    row_shape = cache.kv_indices.shape[1:]
    if tuple(layout.kv_indices.shape) != row_shape:
        raise ValueError(f"layout.kv_indices must have shape {row_shape}, got {layout.kv_indices.shape}")
    if tuple(layout.kv_counts.shape) != row_shape[:-1]:
        raise ValueError(f"layout.kv_counts must have shape {row_shape[:-1]}, got {layout.kv_counts.shape}")
    return _write_slot(cache, slot, layout.kv_indices, layout.kv_counts)
