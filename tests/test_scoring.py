"""Hierarchical block scoring (docs/spec.md §3) against a float64 NumPy brute force."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfsattn_jax.scoring import block_scores, tile_probabilities


def random_qk(seed, shape, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))


def numpy_tile_probs(q, k, tile):
    """float64 brute force: A[b, n, i, j] over the valid tiles, token by token."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    batch, length, heads, dim = q.shape
    num_tiles = math.ceil(length / tile)
    qbar = np.stack([q[:, i * tile : min((i + 1) * tile, length)].mean(axis=1) for i in range(num_tiles)], axis=1)
    kbar = np.stack([k[:, i * tile : min((i + 1) * tile, length)].mean(axis=1) for i in range(num_tiles)], axis=1)
    logits = np.einsum("bind,bjnd->bnij", qbar, kbar) / math.sqrt(dim)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=-1, keepdims=True)


def numpy_block_scores(q, k, tile, block):
    probs = numpy_tile_probs(q, k, tile)
    batch, heads, num_tiles, _ = probs.shape
    nb = math.ceil(q.shape[1] / block)
    per = block // tile
    out = np.zeros((batch, heads, nb, nb))
    for u in range(nb):
        for v in range(nb):
            out[:, :, u, v] = probs[:, :, u * per : (u + 1) * per, v * per : (v + 1) * per].sum(axis=(2, 3))
    return out


@pytest.mark.parametrize(
    "length,tile,block,chunk",
    [(300, 16, 128, None), (300, 16, 128, 1), (203, 8, 32, 2), (203, 8, 32, 3), (97, 4, 16, None)],
)
def test_block_scores_match_float64_brute_force(length, tile, block, chunk):
    q, k = random_qk(length + tile, (2, length, 3, 16))
    got = block_scores(q, k, tile_size=tile, block_size=block, query_blocks_per_chunk=chunk)
    want = numpy_block_scores(q, k, tile, block)
    assert got.dtype == jnp.float32
    assert got.shape == want.shape
    # float32 softmax and sums of <= 64 terms of size <= 1: errors of a few ulps of 8.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)


def test_block_scores_chunk_budget_matches_single_shot():
    q, k = random_qk(1, (2, 203, 3, 16))
    single = block_scores(q, k, tile_size=8, block_size=32)
    chunked = block_scores(q, k, tile_size=8, block_size=32, tile_budget=2 * 3 * 4 * 26)  # 1 block a chunk
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(single), rtol=1e-6, atol=1e-6)


def test_block_scores_bf16_inputs_accumulate_in_float32():
    q, k = random_qk(2, (2, 150, 3, 32), jnp.bfloat16)
    got = block_scores(q, k, tile_size=16, block_size=64)
    assert got.dtype == jnp.float32
    want = numpy_block_scores(np.asarray(q.astype(jnp.float32)), np.asarray(k.astype(jnp.float32)), 16, 64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)


def test_tile_probabilities_rows_sum_to_one():
    q, k = random_qk(3, (2, 300, 3, 16))
    probs = tile_probabilities(q, k, tile_size=16, block_size=128)
    assert probs.shape == (2, 3, 19, 19)
    np.testing.assert_allclose(np.asarray(probs).sum(axis=-1), np.ones((2, 3, 19)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(probs), numpy_tile_probs(q, k, 16), rtol=1e-5, atol=1e-7)
    # Row sums of the block scores count the valid query tiles of each block: 8, 8, 3.
    scores = block_scores(q, k, tile_size=16, block_size=128)
    np.testing.assert_allclose(np.asarray(scores).sum(-1), np.broadcast_to([8.0, 8.0, 3.0], (2, 3, 3)), rtol=1e-6)


def test_block_scores_jit_matches_eager():
    q, k = random_qk(4, (1, 130, 2, 8))
    fn = jax.jit(lambda q, k: block_scores(q, k, tile_size=8, block_size=32, query_blocks_per_chunk=2))
    np.testing.assert_allclose(
        np.asarray(fn(q, k)),
        np.asarray(block_scores(q, k, tile_size=8, block_size=32, query_blocks_per_chunk=2)),
        rtol=1e-6,
        atol=1e-6,
    )


def _max_intermediate_size(jaxpr) -> int:
    """Largest array (elements) any equation of ``jaxpr`` or its sub-jaxprs produces."""
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _max_intermediate_size(inner))
    return best


def test_block_scores_memory_stays_below_the_tile_matrix():
    shape = (1, 8192, 1, 2)  # 512 tiles of 16, 64 blocks of 128
    q, k = random_qk(5, shape)
    full_tiles = 512 * 512
    budget = full_tiles // 32
    fn = lambda q, k: block_scores(q, k, tile_budget=budget)  # noqa: E731
    largest = _max_intermediate_size(jax.make_jaxpr(fn)(q, k).jaxpr)
    # Nothing bigger than the inputs or one chunk of tile probabilities, far below (L/t)**2.
    assert largest <= max(budget, q.size)
    assert largest <= full_tiles // 8
    want = numpy_block_scores(q, k, 16, 128)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k)), want, rtol=1e-5, atol=2e-6)


def test_block_scores_bad_inputs():
    q, k = random_qk(6, (1, 64, 2, 8))
    with pytest.raises(ValueError, match="tile_size"):
        block_scores(q, k, tile_size=24, block_size=64)
    with pytest.raises(ValueError, match="tile_size"):
        block_scores(q, k, tile_size=0, block_size=64)
    with pytest.raises(ValueError, match="block_size"):
        block_scores(q, k, tile_size=16, block_size=-64)
    with pytest.raises(ValueError, match="k"):
        block_scores(q, k[:, :32])
    with pytest.raises(ValueError, match="q"):
        block_scores(q[0], k[0])
    with pytest.raises(ValueError, match="dtype"):
        block_scores(q.astype(jnp.int32), k.astype(jnp.int32))
    with pytest.raises(ValueError, match="dtype"):
        block_scores(q, k.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="query_blocks_per_chunk"):
        block_scores(q, k, query_blocks_per_chunk=0)
