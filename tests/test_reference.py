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


def numpy_masked_attention(q, k, v, layout, block, scale=None):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, length, heads, dim = q.shape
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    indices, counts = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
    out = np.zeros_like(q)
    for b in range(batch):
        for n in range(heads):
            logits = q[b, :, n] @ k[b, :, n].T * scale
            allowed = np.zeros((length, length), dtype=bool)
            for u in range((length + block - 1) // block):
                for vb in indices[b, n, u, : counts[b, n, u]]:
                    allowed[u * block : (u + 1) * block, vb * block : (vb + 1) * block] = True
            logits = np.where(allowed, logits, -np.inf)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            out[b, :, n] = probs @ v[b, :, n]
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
    with pytest.raises(ValueError, match="dtype"):
        reference_block_sparse_attention(q, k, v.astype(jnp.int32), layout, block_size=32)
    with pytest.raises(ValueError, match="dtype"):
        reference_block_sparse_attention(q.astype(jnp.int8), k.astype(jnp.int8), v.astype(jnp.int8), layout, block_size=32)
    with pytest.raises(ValueError, match="dtype"):
        reference_block_sparse_attention(q, k.astype(jnp.bfloat16), v, layout, block_size=32)
    with pytest.raises(ValueError, match="layout"):
        reference_block_sparse_attention(q, k, v, layout, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        reference_block_sparse_attention(q, k, v, layout, block_size=0)
    with pytest.raises(ValueError, match="q"):
        reference_block_sparse_attention(q[0], k[0], v[0], layout, block_size=32)
