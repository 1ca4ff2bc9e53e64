"""The Pallas block-sparse attention kernel against float64 NumPy and XLA references.

Every test runs the kernel in the Pallas interpreter (``interpret=True``, any backend); on a GPU
(``JAX_PLATFORMS=cuda pytest tests/test_block_sparse_kernel.py``) the same tests also run the
compiled Triton kernel. Inputs come from fixed PRNG seeds: a failure replays exactly.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import poisoned, rel_l2

from dfsattn_jax import attention
from dfsattn_jax.layout import BlockLayout, full_layout, sorted_layout
from pallas_kernels.block_sparse_triton import BlockSizes, block_sparse_attention

BLOCK = 128
# The interpreter everywhere, plus the compiled kernel where a GPU exists.
INTERPRET = [True] + ([False] if jax.default_backend() == "gpu" else [])


def keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """Two PRNG keys (inputs, layout) from a fixed seed."""
    k_inputs, k_layout = jax.random.split(jax.random.key(seed))
    return k_inputs, k_layout


def random_qkv(key, b, seq_len, n, d, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    shape = (b, seq_len, n, d)
    q = jax.random.normal(kq, shape, jnp.float32)
    k = jax.random.normal(kk, shape, jnp.float32)
    v = jax.random.normal(kv, shape, jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def random_layout(key, b, n, nq, *, min_count=1, max_count=None) -> BlockLayout:
    """Distinct random key blocks per row, counts varying per (batch, head, query block)."""
    max_count = nq if max_count is None else max_count
    k_order, k_count = jax.random.split(key)
    u = jax.random.uniform(k_order, (b, n, nq, nq))
    # The last query block always visits the last (possibly ragged) key block first.
    u = u.at[:, :, -1, -1].set(-1.0)
    order = jnp.argsort(u, axis=-1).astype(jnp.int32)
    counts = jax.random.randint(k_count, (b, n, nq), min_count, max_count + 1, dtype=jnp.int32)
    return sorted_layout(BlockLayout(kv_indices=order[..., :max_count], kv_counts=counts, num_key_blocks=nq))


def numpy_block_sparse(q, k, v, layout: BlockLayout, scale=None) -> np.ndarray:
    """Float64 masked softmax attention (docs/spec.md §5), the independent oracle."""
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    b, seq_len, n, d = qn.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    mask = np.asarray(layout.to_dense_mask())
    tok = np.repeat(np.repeat(mask, BLOCK, axis=2), BLOCK, axis=3)[:, :, :seq_len, :seq_len]
    s = np.einsum("blnd,bmnd->bnlm", qn, kn) * scale
    s = np.where(tok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnlm,bmnd->blnd", p, vn)


def xla_block_sparse(q, k, v, layout: BlockLayout) -> jax.Array:
    """XLA attention in the input dtype with the layout as a token mask (the dtype baseline)."""
    seq_len = q.shape[1]
    mask = layout.to_dense_mask()
    tok = jnp.repeat(jnp.repeat(mask, BLOCK, axis=2), BLOCK, axis=3)[:, :, :seq_len, :seq_len]
    return jax.nn.dot_product_attention(q, k, v, mask=tok, implementation="xla")


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("seq_len", [128, 200, 1000, 4103])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_matches_references(interpret, seq_len, head_dim, dtype):
    b, n = 2, 3
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(seq_len * 1000 + head_dim)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, head_dim, dtype)
    # Long sequences keep at most 6 blocks a row so that the interpreter stays fast; shorter
    # ones cover 1..all blocks. The last query block always includes the ragged key block.
    layout = random_layout(k_layout, b, n, nq, max_count=min(nq, 6))
    out = block_sparse_attention(
        q, k, v, layout, interpret=interpret, initial_output=poisoned(q)
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out))), "kernel left elements unwritten (NaN poison survived)"
    ref = numpy_block_sparse(q, k, v, layout)
    err = rel_l2(out, ref)
    if dtype == jnp.float32:
        # float32 operands, float32 accumulation: rounding only (tf32 would be ~3e-4).
        assert err < 2e-5, err
    else:
        # 16-bit operands: no worse than twice XLA's own 16-bit attention on the same mask.
        baseline = rel_l2(xla_block_sparse(q, k, v, layout), ref)
        assert err <= 2.0 * baseline, (err, baseline)


@pytest.mark.parametrize("interpret", INTERPRET)
@pytest.mark.parametrize("seq_len", [200, 1000])
def test_full_layout_equals_dense_attention(interpret, seq_len):
    b, n, d = 2, 3, 64
    k_inputs, k_layout = keys(seq_len)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    nq = -(-seq_len // BLOCK)
    # Every block listed, in a shuffled order per row: the order of visits must not matter.
    layout = random_layout(k_layout, b, n, nq, min_count=nq)
    out = block_sparse_attention(q, k, v, layout, interpret=interpret)
    with jax.default_matmul_precision("highest"):  # no TF32 in the GPU reference
        dense = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    chex.assert_trees_all_close(out, dense, rtol=1e-5, atol=1e-5)
    out_full = block_sparse_attention(q, k, v, full_layout(b, n, nq, nq), interpret=interpret)
    chex.assert_trees_all_close(out_full, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_counts_differ_per_head_and_batch(interpret):
    """Rows with one block, all blocks, and in between, each checked on its own."""
    b, n, seq_len, d = 2, 3, 1000, 64
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(1)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    base = random_layout(k_layout, b, n, nq)
    counts = np.asarray(base.kv_counts).copy()
    counts[0, 0] = 1
    counts[1, 2] = nq
    counts[0, 1, ::2] = 1
    layout = sorted_layout(BlockLayout(base.kv_indices, jnp.asarray(counts), nq))
    out = block_sparse_attention(q, k, v, layout, interpret=interpret, initial_output=poisoned(q))
    ref = numpy_block_sparse(q, k, v, layout)
    for bi, ni in [(0, 0), (1, 2), (0, 1), (1, 0)]:
        err = rel_l2(out[bi, :, ni], ref[bi, :, ni])
        assert err < 2e-5, (bi, ni, err)


@pytest.mark.parametrize("interpret", INTERPRET)
def test_entries_beyond_count_are_ignored(interpret):
    b, n, seq_len, d = 1, 2, 640, 64
    nq = seq_len // BLOCK
    k_inputs, k_layout = keys(2)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    layout = random_layout(k_layout, b, n, nq, min_count=2, max_count=3)
    scrambled = layout.kv_indices.at[..., 2].set(jnp.flip(layout.kv_indices[..., 2], axis=-1))
    counts2 = jnp.full_like(layout.kv_counts, 2)
    a = block_sparse_attention(q, k, v, sorted_layout(BlockLayout(layout.kv_indices, counts2, nq)), interpret=interpret)
    c = block_sparse_attention(q, k, v, sorted_layout(BlockLayout(scrambled, counts2, nq)), interpret=interpret)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("interpret", INTERPRET)
# float32 at D=128: larger tiles exceed the GPU's shared memory.
@pytest.mark.parametrize("tiles", [BlockSizes(128, 32, 8, 2), BlockSizes(64, 64, 4, 2)])
def test_block_sizes_and_scale(interpret, tiles):
    b, n, seq_len, d = 1, 2, 300, 128
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(3)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    layout = random_layout(k_layout, b, n, nq)
    out = block_sparse_attention(
        q, k, v, layout, scale=0.05, block_sizes=tiles, interpret=interpret, initial_output=poisoned(q)
    )
    assert rel_l2(out, numpy_block_sparse(q, k, v, layout, scale=0.05)) < 2e-5


@pytest.mark.parametrize("interpret", INTERPRET)
def test_bitwise_deterministic(interpret):
    b, n, seq_len, d = 2, 3, 1000, 128
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(4)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.bfloat16)
    layout = random_layout(k_layout, b, n, nq)
    first = block_sparse_attention(q, k, v, layout, interpret=interpret)
    second = block_sparse_attention(q, k, v, layout, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(second, np.float32))


@pytest.mark.parametrize("interpret", INTERPRET)
def test_traced_counts_share_one_compilation(interpret):
    """Counts are run-time data: new densities reuse the compiled kernel."""
    b, n, seq_len, d = 1, 2, 256, 64
    nq = 2
    k_inputs, k_layout = keys(5)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    layout = random_layout(k_layout, b, n, nq)
    traces = []

    @jax.jit
    def run(counts):
        traces.append(1)
        return block_sparse_attention(q, k, v, sorted_layout(BlockLayout(layout.kv_indices, counts, nq)), interpret=interpret)

    for c in (1, 2):
        lay = sorted_layout(BlockLayout(layout.kv_indices, jnp.full((b, n, nq), c, jnp.int32), nq))
        out = run(lay.kv_counts)
        assert rel_l2(out, numpy_block_sparse(q, k, v, lay)) < 2e-5
    assert len(traces) == 1


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k_shape=(1, 256, 2, 32)), "same shape"),
        (dict(dtype=jnp.int32), "dtype"),
        (dict(head_dim=48), "head_dim"),
        (dict(num_key_blocks=3), "num_key_blocks"),
        (dict(block_size=96), "block_size"),
        (dict(block_sizes=BlockSizes(block_q=256)), "block_q"),
    ],
)
def test_bad_input_raises(change, match):
    head_dim = change.get("head_dim", 64)
    dtype = change.get("dtype", jnp.float32)
    q = jnp.ones((1, 256, 2, head_dim), dtype)
    k = jnp.ones(change.get("k_shape", q.shape), dtype)
    nk = change.get("num_key_blocks", 2)
    layout = BlockLayout(jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.ones((1, 2, 2), jnp.int32), nk)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(
            q, k, q if "k_shape" not in change else k, layout,
            block_size=change.get("block_size", 128), block_sizes=change.get("block_sizes"),
        )


# dfsattn_jax.attention's registry: the Triton kernel is one implementation among others.


@pytest.mark.parametrize("seed", [0, 1])
def test_registry_triton_interpret_equals_xla(seed):
    b, n, seq_len, d = 1, 2, 300, 64
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(100 + seed)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    layout = random_layout(k_layout, b, n, nq)
    got = attention.block_sparse_attention(q, k, v, layout, block_size=BLOCK, implementation="triton", interpret=True)
    with jax.default_matmul_precision("highest"):  # no TF32 in the XLA reference on GPU
        want = attention.block_sparse_attention(q, k, v, layout, block_size=BLOCK, implementation="xla")
    assert got.shape == q.shape and got.dtype == q.dtype
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    assert rel_l2(got, numpy_block_sparse(q, k, v, layout)) < 2e-5


def test_resolve_implementation():
    q = jnp.zeros((1, 256, 2, 64), jnp.float32)
    name, reason = attention.resolve_implementation(q)
    if jax.default_backend() == "gpu":
        assert name in ("triton", "mosaic_gpu"), (name, reason)
    else:
        assert name == "xla", (name, reason)
        assert attention.default_implementation() == "xla"
    assert isinstance(reason, str) and reason
    for asked in attention.IMPLEMENTATIONS:
        assert attention.resolve_implementation(q, implementation=asked)[0] == asked
    assert set(attention.IMPLEMENTATIONS) == {"triton", "mosaic_gpu", "xla"}


@pytest.mark.parametrize("name", ["pallas", "pallas_interpret", "reference", "cudnn", "Triton"])
def test_unknown_implementation_raises_naming_the_allowed_ones(name):
    q = jnp.zeros((1, 256, 2, 64), jnp.float32)
    layout = BlockLayout(jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.ones((1, 2, 2), jnp.int32), 2)
    for call in (
        lambda: attention.resolve_implementation(q, implementation=name),
        lambda: attention.block_sparse_attention(q, q, q, layout, implementation=name),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert repr(name) in message
        assert all(allowed in message for allowed in ("triton", "mosaic_gpu", "xla")), message
