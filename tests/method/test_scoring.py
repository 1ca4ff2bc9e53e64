"""Hierarchical block scoring (docs/spec.md §3) against a float64 NumPy brute force."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_block_scores, numpy_tile_probs

from dfsattn_jax.scoring import block_scores, tile_probabilities


def random_qk(seed, shape, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))


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
    with pytest.raises(TypeError, match="dtype"):
        block_scores(q.astype(jnp.int32), k.astype(jnp.int32))
    with pytest.raises(TypeError, match="dtype"):
        block_scores(q, k.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="query_blocks_per_chunk"):
        block_scores(q, k, query_blocks_per_chunk=0)


@pytest.mark.parametrize(
    "length,tile,block,chunk,kv_lengths",
    [
        (300, 16, 128, None, (300, 137)),  # full, and a partial key tile inside block 1
        (300, 16, 128, 1, (129, 0)),  # one key of block 1; a sample with no key at all
        (203, 8, 32, 2, (64, 203)),  # lengths on a block boundary
        (203, 8, 32, 3, (1, 200)),  # one key; the partial last tile cut further
        (97, 4, 16, None, (97, 50)),
    ],
)
def test_block_scores_kv_lengths_match_float64_brute_force(length, tile, block, chunk, kv_lengths):
    q, k = random_qk(length + 7 * tile, (2, length, 3, 16))
    lengths = jnp.asarray(kv_lengths, jnp.int32)
    got = block_scores(q, k, tile_size=tile, block_size=block, kv_lengths=lengths, query_blocks_per_chunk=chunk)
    want = numpy_block_scores(q, k, tile, block, kv_lengths)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)
    # Key blocks wholly past the length score exactly 0; a row sums to its valid query tiles
    # (0 for a sample without keys).
    nb = -(-length // block)
    for b, n_keys in enumerate(kv_lengths):
        first_empty = -(-n_keys // block)
        assert (np.asarray(got)[b, :, :, first_empty:] == 0.0).all()
        tiles = np.minimum(block // tile, -(-(length - np.arange(nb) * block) // tile))
        want_rows = np.broadcast_to(tiles if n_keys else np.zeros(nb), (3, nb))
        np.testing.assert_allclose(np.asarray(got)[b].sum(-1), want_rows, rtol=1e-5)


def test_tile_probabilities_kv_lengths_match_float64_brute_force():
    q, k = random_qk(11, (2, 150, 2, 8))
    lengths = jnp.asarray([70, 0], jnp.int32)
    got = tile_probabilities(q, k, tile_size=16, block_size=32, kv_lengths=lengths)
    np.testing.assert_allclose(np.asarray(got), numpy_tile_probs(q, k, 16, [70, 0]), rtol=1e-5, atol=1e-7)
    assert (np.asarray(got)[1] == 0.0).all()


def test_block_scores_full_kv_lengths_match_none():
    q, k = random_qk(12, (2, 203, 3, 16))
    plain = block_scores(q, k, tile_size=8, block_size=32)
    full = block_scores(q, k, tile_size=8, block_size=32, kv_lengths=jnp.asarray([203, 203], jnp.int32))
    np.testing.assert_allclose(np.asarray(full), np.asarray(plain), rtol=1e-6, atol=1e-7)
    # None is today's computation: identical bits to a call without the argument.
    none = block_scores(q, k, tile_size=8, block_size=32, kv_lengths=None)
    assert np.array_equal(np.asarray(none), np.asarray(plain))


def test_block_scores_traced_kv_lengths_are_clipped():
    q, k = random_qk(13, (2, 100, 2, 8))
    fn = jax.jit(lambda q, k, n: block_scores(q, k, tile_size=4, block_size=16, kv_lengths=n))
    got = fn(q, k, jnp.asarray([1000, -5], jnp.int32))  # traced: not range-checked, clipped to [0, L]
    want = numpy_block_scores(q, k, 4, 16, [100, 0])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "kv_lengths, error, match",
    [
        (jnp.asarray([64], jnp.int32), ValueError, r"kv_lengths.*\[B=2\]"),
        (jnp.asarray([[64, 64]], jnp.int32), ValueError, r"kv_lengths.*\[B=2\]"),
        (jnp.asarray([64.0, 64.0], jnp.float32), TypeError, "kv_lengths.*integer"),
        (jnp.asarray([65, 10], jnp.int32), ValueError, r"kv_lengths.*\[0, L=64\]"),
        (jnp.asarray([-1, 10], jnp.int32), ValueError, r"kv_lengths.*\[0, L=64\]"),
    ],
)
def test_block_scores_bad_kv_lengths(kv_lengths, error, match):
    q, k = random_qk(14, (2, 64, 2, 8))
    with pytest.raises(error, match=match):
        block_scores(q, k, tile_size=16, block_size=32, kv_lengths=kv_lengths)
    with pytest.raises(error, match=match):
        tile_probabilities(q, k, tile_size=16, block_size=32, kv_lengths=kv_lengths)
