"""The mask cache: static shapes, functional updates, traced slots."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfsattn_jax.cache import MaskCache, cache_layout, cache_update, init_mask_cache
from dfsattn_jax.layout import BlockLayout, select_blocks


def scores(seed, shape=(2, 3, 4, 7)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_init_mask_cache():
    cache = init_mask_cache(3, 2, 4, 5, 6)
    assert isinstance(cache, MaskCache)
    assert cache.kv_indices.shape == (3, 2, 4, 5, 6) and cache.kv_indices.dtype == jnp.int32
    assert cache.kv_counts.shape == (3, 2, 4, 5) and cache.kv_counts.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(cache.kv_counts), 6)
    np.testing.assert_array_equal(np.asarray(cache.kv_indices[1, 1, 2, 3]), np.arange(6))
    assert int(cache.refreshes) == 0
    assert len(jax.tree.leaves(cache)) == 3


def test_update_and_read_back_with_python_slot():
    cache = init_mask_cache(3, 2, 3, 4, 5)
    layout = select_blocks(scores(0), 2, max_blocks=5)
    updated = cache_update(cache, 1, layout)
    read = cache_layout(updated, 1, 7)
    assert isinstance(read, BlockLayout) and read.num_key_blocks == 7
    chex.assert_trees_all_equal(read, layout)
    # Other slots and the input cache are untouched (functional update).
    np.testing.assert_array_equal(np.asarray(updated.kv_indices[0]), np.asarray(cache.kv_indices[0]))
    np.testing.assert_array_equal(np.asarray(updated.kv_indices[2]), np.asarray(cache.kv_indices[2]))
    assert int(updated.refreshes) == 1 and int(cache.refreshes) == 0
    np.testing.assert_array_equal(np.asarray(cache.kv_counts), 5)


def test_traced_slot_under_jit_and_scan():
    num_layers = 3
    layouts = [select_blocks(scores(seed), seed + 1, max_blocks=4) for seed in range(num_layers)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layouts)

    @jax.jit
    def write_all(cache, stacked):
        def body(cache, slot_and_layout):
            slot, layout = slot_and_layout
            return cache_update(cache, slot, layout), None

        cache, _ = jax.lax.scan(body, cache, (jnp.arange(num_layers, dtype=jnp.int32), stacked))
        return cache

    cache = write_all(init_mask_cache(num_layers, 2, 3, 4, 4), stacked)
    assert int(cache.refreshes) == num_layers
    read = jax.jit(lambda c, s: cache_layout(c, s, 7))
    for slot in range(num_layers):
        chex.assert_trees_all_equal(read(cache, jnp.int32(slot)), layouts[slot])
        chex.assert_trees_all_equal(cache_layout(cache, slot, 7), layouts[slot])


def test_bad_cache_arguments():
    cache = init_mask_cache(2, 1, 2, 3, 4)
    layout = select_blocks(scores(1, (1, 2, 3, 5)), 2, max_blocks=4)
    with pytest.raises(ValueError, match="slot"):
        cache_update(cache, 2, layout)
    with pytest.raises(ValueError, match="slot"):
        cache_layout(cache, -1, 5)
    with pytest.raises(ValueError, match="slot"):
        cache_layout(cache, jnp.float32(0.0), 5)
    with pytest.raises(ValueError, match="layout"):
        cache_update(cache, 0, select_blocks(scores(2, (1, 2, 3, 5)), 2, max_blocks=3))
    with pytest.raises(ValueError, match="layout"):
        cache_update(cache, 0, select_blocks(scores(3, (2, 2, 3, 5)), 2, max_blocks=4))
    with pytest.raises(ValueError, match="num_key_blocks"):
        cache_layout(cache, 0, 3)
    with pytest.raises(ValueError, match="max_blocks"):
        init_mask_cache(2, 1, 2, 3, 0)
    with pytest.raises(ValueError, match="num_sparse_layers"):
        init_mask_cache(0, 1, 2, 3, 4)
