"""The block-sparse attention oracle (docs/spec.md §5)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfsattn_jax.layout import BlockLayout, full_layout, sorted_layout
from dfsattn_jax.reference import reference_block_sparse_attention


def random_qkv(seed, shape, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))


def random_layout(seed, batch, heads, nb, kmax):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.permutation(nb)[:kmax] for _ in range(batch * heads * nb)]).reshape(batch, heads, nb, kmax)
    counts = rng.integers(1, kmax + 1, size=(batch, heads, nb))
    return sorted_layout(BlockLayout(jnp.asarray(indices, jnp.int32), jnp.asarray(counts, jnp.int32), nb))


def numpy_masked_attention(q, k, v, layout, block, scale=None, kv_lengths=None):
    """Float64 oracle; keys at or past ``kv_lengths[b]`` are masked and a query that sees no key
    gives zeros."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    indices, counts = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
    out = np.zeros_like(q)
    for b in range(batch):
        visible = length if kv_lengths is None else int(kv_lengths[b])
        for n in range(heads):
            logits = q[b, :, n] @ k[b, :, n].T * scale
            allowed = np.zeros((length, length), dtype=bool)
            for u in range((length + block - 1) // block):
                for vb in indices[b, n, u, : counts[b, n, u]]:
                    allowed[u * block : (u + 1) * block, vb * block : (vb + 1) * block] = True
            allowed[:, visible:] = False
            for i in range(length):
                if allowed[i].any():
                    row = logits[i, allowed[i]]
                    probs = np.exp(row - row.max())
                    out[b, i, n] = probs @ v[b, allowed[i], n] / probs.sum()
    return out


def test_full_layout_equals_dense_attention():
    q, k, v = random_qkv(0, (2, 200, 3, 16))
    layout = full_layout(2, 3, 4, 4)
    got = reference_block_sparse_attention(q, k, v, layout, block_size=64)
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length,block,kmax", [(150, 32, 3), (200, 64, 2), (97, 16, 5)])
def test_sparse_layout_equals_float64_masked_softmax(length, block, kmax):
    q, k, v = random_qkv(length, (2, length, 3, 16))
    nb = -(-length // block)
    layout = random_layout(length, 2, 3, nb, kmax)
    got = reference_block_sparse_attention(q, k, v, layout, block_size=block)
    assert got.dtype == jnp.float32 and got.shape == q.shape
    # float32 logits/softmax of O(1) values against float64: a few ulps.
    np.testing.assert_allclose(np.asarray(got), numpy_masked_attention(q, k, v, layout, block), rtol=1e-5, atol=1e-5)


def test_scale_and_padding_keys():
    q, k, v = random_qkv(1, (1, 70, 2, 8))
    # Every query block keeps only the last, partial block (tokens 64..69): padding keys
    # 70..95 must not be attended, so rows equal softmax over those 6 keys.
    layout = BlockLayout(jnp.full((1, 2, 3, 1), 2, jnp.int32), jnp.ones((1, 2, 3), jnp.int32), 3)
    got = reference_block_sparse_attention(q, k, v, layout, block_size=32, scale=0.3)
    np.testing.assert_allclose(
        np.asarray(got), numpy_masked_attention(q, k, v, layout, 32, scale=0.3), rtol=1e-5, atol=1e-5
    )


def test_bf16_in_bf16_out_and_jit():
    q, k, v = random_qkv(2, (1, 64, 2, 16), jnp.bfloat16)
    layout = random_layout(2, 1, 2, 4, 2)
    fn = jax.jit(lambda q, k, v, lay: reference_block_sparse_attention(q, k, v, lay, block_size=16))
    got = fn(q, k, v, layout)
    assert got.dtype == jnp.bfloat16
    want = numpy_masked_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), layout, 16)
    # bf16 output rounding (8 bits of mantissa) on values of size ~1.
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)


def test_bad_inputs():
    q, k, v = random_qkv(3, (1, 64, 2, 8))
    layout = full_layout(1, 2, 2, 2)
    with pytest.raises(ValueError, match="v"):
        reference_block_sparse_attention(q, k, v[:, :32], layout, block_size=32)
    with pytest.raises(ValueError, match="k"):
        reference_block_sparse_attention(q, k[..., :4], v, layout, block_size=32)
    with pytest.raises(TypeError, match="dtype"):
        reference_block_sparse_attention(q, k, v.astype(jnp.int32), layout, block_size=32)
    with pytest.raises(TypeError, match="dtype"):
        reference_block_sparse_attention(q.astype(jnp.int8), k.astype(jnp.int8), v.astype(jnp.int8), layout, block_size=32)
    with pytest.raises(TypeError, match="dtype"):
        reference_block_sparse_attention(q, k.astype(jnp.bfloat16), v, layout, block_size=32)
    with pytest.raises(ValueError, match="layout"):
        reference_block_sparse_attention(q, k, v, layout, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        reference_block_sparse_attention(q, k, v, layout, block_size=0)
    with pytest.raises(ValueError, match="q"):
        reference_block_sparse_attention(q[0], k[0], v[0], layout, block_size=32)


@pytest.mark.parametrize("length,block,kmax", [(150, 32, 5), (128, 32, 4)])
def test_kv_lengths_equal_float64_masked_softmax(length, block, kmax):
    # Per batch: inside a block, at a block boundary, 0 (every query sees nothing), L, one key.
    lengths = [length - 13, 2 * block, 0, length, 1]
    q, k, v = random_qkv(100 + length, (len(lengths), length, 2, 16))
    nb = -(-length // block)
    layout = random_layout(100 + length, len(lengths), 2, nb, kmax)
    counts = np.asarray(layout.kv_counts).copy()
    counts[:, 0, 0] = 0  # rows with count 0 ...
    counts[:, 1, 1] = kmax  # ... and with every listed block
    layout = sorted_layout(BlockLayout(layout.kv_indices, jnp.asarray(counts, jnp.int32), nb))
    out_init = reference_block_sparse_attention(q, k, v, layout, block_size=block)
    got = reference_block_sparse_attention(q, k, v, layout, block_size=block, kv_lengths=jnp.asarray(lengths, jnp.int32))
    want = numpy_masked_attention(q, k, v, layout, block, kv_lengths=lengths)
    assert got.dtype == jnp.float32 and got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[2]), 0.0)  # kv_lengths 0
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(out_init[3]))  # kv_lengths L
    assert not np.allclose(np.asarray(got[0]), np.asarray(out_init[0]))  # the lengths matter


def test_kv_lengths_traced_under_jit():
    q, k, v = random_qkv(5, (2, 96, 2, 16))
    layout = random_layout(5, 2, 2, 3, 3)
    traces = []

    @jax.jit
    def fn(kv_lengths):
        traces.append(1)
        return reference_block_sparse_attention(q, k, v, layout, block_size=32, kv_lengths=kv_lengths)

    for lengths in ([40, 96], [0, 33]):
        np.testing.assert_allclose(
            np.asarray(fn(jnp.asarray(lengths, jnp.int32))),
            numpy_masked_attention(q, k, v, layout, 32, kv_lengths=lengths), rtol=1e-5, atol=1e-5,
        )
    assert len(traces) == 1


@pytest.mark.parametrize(
    "kv_lengths, error, match",
    [
        (np.array([64], np.int32), ValueError, r"kv_lengths must have shape \[B=2\]"),
        (np.array([[64, 64]], np.int32), ValueError, r"kv_lengths must have shape \[B=2\]"),
        (np.array([64.0, 64.0], np.float32), TypeError, "kv_lengths must be an integer array"),
        ([64, 64], TypeError, "kv_lengths must be an integer array"),
        (np.array([65, 3], np.int32), ValueError, r"kv_lengths must lie in \[0, L=64\]"),
        (jnp.array([3, -1], jnp.int32), ValueError, r"kv_lengths must lie in \[0, L=64\]"),
    ],
)
def test_bad_kv_lengths(kv_lengths, error, match):
    q, k, v = random_qkv(6, (2, 64, 2, 8))
    layout = full_layout(2, 2, 2, 2)
    with pytest.raises(error, match=match):
        reference_block_sparse_attention(q, k, v, layout, block_size=32, kv_lengths=kv_lengths)
