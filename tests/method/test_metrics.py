"""Recall of a layout and relative attention error (docs/spec.md §9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfsattn_jax.layout import BlockLayout, full_layout, select_blocks
from dfsattn_jax.metrics import attention_error, block_attention_mass, layout_recall
from dfsattn_jax.scoring import block_scores


def random_qk(seed, shape):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(1.5 * rng.normal(size=shape), jnp.float32) for _ in range(2))


def random_layout(seed, batch, heads, nb, kmax):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.permutation(nb)[:kmax] for _ in range(batch * heads * nb)]).reshape(batch, heads, nb, kmax)
    counts = rng.integers(1, kmax + 1, size=(batch, heads, nb))
    return BlockLayout(jnp.asarray(indices, jnp.int32), jnp.asarray(counts, jnp.int32), nb)


def numpy_recall(q, k, layout, block, rows=None):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, length, heads, dim = q.shape
    rows = np.arange(length) if rows is None else rows
    mask = np.asarray(layout.to_dense_mask())
    out = np.zeros((batch, heads))
    for b in range(batch):
        for n in range(heads):
            logits = q[b, rows, n] @ k[b, :, n].T / np.sqrt(dim)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            allowed = mask[b, n][rows // block][:, np.arange(length) // block]
            out[b, n] = (probs * allowed).sum() / probs.sum()
    return out


@pytest.mark.parametrize("length,block,kmax", [(150, 32, 2), (128, 16, 3)])
def test_recall_matches_float64_brute_force(length, block, kmax):
    q, k = random_qk(length, (2, length, 3, 16))
    layout = random_layout(length, 2, 3, -(-length // block), kmax)
    got = layout_recall(q, k, layout, block_size=block, num_query_samples=length)
    assert got.shape == (2, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), numpy_recall(q, k, layout, block), rtol=1e-5, atol=1e-6)


def test_full_layout_has_recall_one():
    q, k = random_qk(1, (1, 100, 2, 8))
    got = layout_recall(q, k, full_layout(1, 2, 4, 4), block_size=32)
    np.testing.assert_allclose(np.asarray(got), 1.0, atol=1e-6)


def test_sampled_recall_on_block_constant_rows():
    # Every query row is the same vector and every query block keeps the same key blocks, so
    # every row has the same recall: any sample of rows gives the full-row value.
    length, block = 160, 32
    q, k = random_qk(2, (2, length, 3, 8))
    q = jnp.broadcast_to(q[:, :1], q.shape)
    one_row = random_layout(3, 2, 3, 5, 3)
    layout = BlockLayout(
        jnp.repeat(one_row.kv_indices[:, :, :1], 5, axis=2), jnp.repeat(one_row.kv_counts[:, :, :1], 5, axis=2), 5
    )
    want = numpy_recall(q, k, layout, block)
    for seed in (0, 1):
        got = layout_recall(q, k, layout, block_size=block, num_query_samples=17, key=jax.random.key(seed))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert np.all((want > 0) & (want < 1))


def test_attention_error():
    a, b = random_qk(4, (2, 10, 3, 4))
    want = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(np.asarray(b, np.float64))
    got = attention_error(a, b)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(attention_error(b.astype(jnp.bfloat16), b)), 0.0, atol=4e-3)
    assert float(attention_error(b, b)) == 0.0


def test_bad_metric_arguments():
    q, k = random_qk(6, (1, 64, 2, 8))
    layout = full_layout(1, 2, 2, 2)
    with pytest.raises(ValueError, match="layout"):
        layout_recall(q, k, layout, block_size=16)
    with pytest.raises(ValueError, match="num_query_samples"):
        layout_recall(q, k, layout, block_size=32, num_query_samples=0)
    with pytest.raises(ValueError, match="k"):
        layout_recall(q, k[:, :32], layout, block_size=32)
    with pytest.raises(TypeError, match="dtype"):
        layout_recall(q.astype(jnp.int32), k.astype(jnp.int32), layout, block_size=32)
    with pytest.raises(ValueError, match="out"):
        attention_error(q, k[:, :32])
    with pytest.raises(TypeError, match="dtype"):
        attention_error(q.astype(jnp.int32), k)


def numpy_block_mass(q, k, block):
    """float64 brute force: mean over each query block's valid rows of the softmax mass per key block."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, length, heads, dim = q.shape
    nb = -(-length // block)
    out = np.zeros((batch, heads, nb, nb))
    for b in range(batch):
        for n in range(heads):
            logits = q[b, :, n] @ k[b, :, n].T / np.sqrt(dim)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            for i in range(nb):
                for j in range(nb):
                    out[b, n, i, j] = probs[i * block:(i + 1) * block, j * block:(j + 1) * block].sum(axis=1).mean()
    return out


@pytest.mark.parametrize("length,block", [(150, 32), (128, 16), (40, 64)])
def test_block_attention_mass_matches_float64_brute_force(length, block):
    q, k = random_qk(length + 1, (2, length, 3, 16))
    got = block_attention_mass(q, k, block_size=block)
    nb = -(-length // block)
    assert got.shape == (2, 3, nb, nb) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), numpy_block_mass(q, k, block), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(axis=-1), 1.0, atol=1e-5)  # each row's mass


def test_block_attention_mass_top_k_is_the_recall_optimal_layout():
    """Top-k of the exact block mass keeps at least as much mass as any layout of the same count:
    the DFS scoring's and 20 random ones (all rows measured, last block partial)."""
    length, block, keep = 150, 16, 3
    q, k = random_qk(7, (2, length, 2, 16))
    nb = -(-length // block)
    oracle = layout_recall(q, k, select_blocks(block_attention_mass(q, k, block_size=block), keep),
                           block_size=block, num_query_samples=length)  # fmt: skip
    dfs = select_blocks(block_scores(q, k, tile_size=4, block_size=block), keep)
    others = [layout_recall(q, k, dfs, block_size=block, num_query_samples=length)]
    rng = np.random.default_rng(11)
    for _ in range(20):
        idx = np.stack([rng.permutation(nb)[:keep] for _ in range(2 * 2 * nb)]).reshape(2, 2, nb, keep)
        layout = BlockLayout(jnp.asarray(np.sort(idx, axis=-1), jnp.int32), jnp.full((2, 2, nb), keep, jnp.int32), nb)
        others.append(layout_recall(q, k, layout, block_size=block, num_query_samples=length))
    others = np.stack([np.asarray(o) for o in others])
    assert (np.asarray(oracle)[None] >= others - 1e-6).all()
    assert (np.asarray(oracle) > others[1:].mean(axis=0) + 0.01).all()  # strictly better than chance here
