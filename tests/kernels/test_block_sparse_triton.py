"""The Pallas block-sparse attention kernel against float64 NumPy and XLA references.

Every test runs the kernel in the Pallas interpreter (``interpret=True``, any backend); on a GPU
(``JAX_PLATFORMS=cuda pytest tests/kernels/test_block_sparse_triton.py``) the same tests also run
the compiled Triton kernel. Inputs come from fixed PRNG seeds: a failure replays exactly.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import rel_l2

from dfsattn_jax import attention, dispatch
from dfsattn_jax.layout import BlockLayout, full_layout, sorted_layout
from pallas_kernels import block_sparse_mosaic
from pallas_kernels.block_sparse_triton import TritonTuning, block_sparse_attention

BLOCK = 128
# The interpreter everywhere, plus the compiled kernel where a GPU exists.
INTERPRET = [True] + ([False] if jax.default_backend() == "gpu" else [])
# Test ids say the mode: ``-k compiled`` selects the GPU runs.
MODE_ID = {True: "interpret", False: "compiled"}.get


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


def numpy_token_mask(layout: BlockLayout, seq_len: int, kv_lengths=None) -> np.ndarray:
    """bool[B, N, L, L] from the layout (block loops in NumPy) and the optional key lengths."""
    indices, counts = np.asarray(layout.kv_indices), np.asarray(layout.kv_counts)
    b, n, nq, _ = indices.shape
    block_mask = np.zeros((b, n, nq, layout.num_key_blocks), bool)
    for bi, ni, u in np.ndindex(b, n, nq):
        block_mask[bi, ni, u, indices[bi, ni, u, : counts[bi, ni, u]]] = True
    tok = np.repeat(np.repeat(block_mask, BLOCK, axis=2), BLOCK, axis=3)[:, :, :seq_len, :seq_len]
    if kv_lengths is not None:
        tok = tok & (np.arange(seq_len) < np.asarray(kv_lengths)[:, None])[:, None, None, :]
    return tok


def numpy_block_sparse(q, k, v, layout: BlockLayout, scale=None, kv_lengths=None) -> np.ndarray:
    """Float64 masked softmax attention (docs/spec.md §5), the independent oracle; a query row
    that sees no key gives zeros."""
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    b, seq_len, n, d = qn.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    tok = numpy_token_mask(layout, seq_len, kv_lengths)
    s = np.einsum("blnd,bmnd->bnlm", qn, kn) * scale
    s = np.where(tok, s, -np.inf)
    sees_any = tok.any(-1, keepdims=True)
    s = np.where(sees_any, s, 0.0)
    p = np.where(tok, np.exp(s - s.max(-1, keepdims=True)), 0.0)
    p /= np.where(sees_any, p.sum(-1, keepdims=True), 1.0)
    return np.einsum("bnlm,bmnd->blnd", p, vn)


def xla_block_sparse(q, k, v, layout: BlockLayout, kv_lengths=None) -> jax.Array:
    """XLA attention in the input dtype with the layout as a token mask (the dtype baseline)."""
    tok = jnp.asarray(numpy_token_mask(layout, q.shape[1], kv_lengths))
    out = jax.nn.dot_product_attention(q, k, v, mask=tok, implementation="xla")
    return jnp.where(jnp.any(tok, -1).transpose(0, 2, 1)[..., None], out, 0)


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
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
        q, k, v, layout, interpret=interpret, poison_output=True
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


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
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


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
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
    out = block_sparse_attention(q, k, v, layout, interpret=interpret, poison_output=True)
    ref = numpy_block_sparse(q, k, v, layout)
    for bi, ni in [(0, 0), (1, 2), (0, 1), (1, 0)]:
        err = rel_l2(out[bi, :, ni], ref[bi, :, ni])
        assert err < 2e-5, (bi, ni, err)


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
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


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
# float32 at D=128: larger tiles exceed the GPU's shared memory.
@pytest.mark.parametrize("tiles", [TritonTuning(128, 32, 8, 2), TritonTuning(64, 64, 4, 2)])
def test_tuning_and_scale(interpret, tiles):
    b, n, seq_len, d = 1, 2, 300, 128
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(3)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    layout = random_layout(k_layout, b, n, nq)
    out = block_sparse_attention(
        q, k, v, layout, scale=0.05, tuning=tiles, interpret=interpret, poison_output=True
    )
    assert rel_l2(out, numpy_block_sparse(q, k, v, layout, scale=0.05)) < 2e-5


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
def test_bitwise_deterministic(interpret):
    b, n, seq_len, d = 2, 3, 1000, 128
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(4)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.bfloat16)
    layout = random_layout(k_layout, b, n, nq)
    first = block_sparse_attention(q, k, v, layout, interpret=interpret)
    second = block_sparse_attention(q, k, v, layout, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(second, np.float32))


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
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
    "change, error, match",
    [
        (dict(k_shape=(1, 256, 2, 32)), ValueError, "shape of q"),
        (dict(dtype=jnp.int32), TypeError, "dtype"),
        (dict(dtype=jnp.float8_e4m3fn), NotImplementedError, "dtype float8_e4m3fn not supported"),
        (dict(head_dim=48), NotImplementedError, "head dim 48"),
        (dict(num_key_blocks=3), ValueError, "num_key_blocks"),
        (dict(block_size=96), NotImplementedError, "block_size 96"),
        (dict(tuning=TritonTuning(block_q=256)), ValueError, "tuning.block_q"),
        (dict(layout=np.zeros((1, 2, 2, 1), np.int32)), TypeError, "layout must be a BlockLayout"),
        (dict(interpret=None), TypeError, "interpret must be True or False"),
    ],
)
def test_bad_input_raises(change, error, match):
    """Contract breaches raise ``ValueError`` / ``TypeError``; what the kernel cannot take raises
    ``NotImplementedError``, so that callers choosing by reason can fall back."""
    head_dim = change.get("head_dim", 64)
    dtype = change.get("dtype", jnp.float32)
    q = jnp.ones((1, 256, 2, head_dim), dtype)
    k = jnp.ones(change.get("k_shape", q.shape), dtype)
    nq = -(-256 // change.get("block_size", 128))
    nk = change.get("num_key_blocks", nq)
    layout = change.get("layout", BlockLayout(jnp.zeros((1, 2, nq, 1), jnp.int32), jnp.ones((1, 2, nq), jnp.int32), nk))
    with pytest.raises(error, match=match):
        block_sparse_attention(
            q, k, q if "k_shape" not in change else k, layout, block_size=change.get("block_size", 128),
            tuning=change.get("tuning"), interpret=change.get("interpret", True),
        )


# Per-sample key lengths (docs/spec.md §6.1): keys at or past kv_lengths[b] are never attended.


def layout_with_all_counts(key, b, n, nq) -> BlockLayout:
    """A random sorted layout whose counts take every value 0..nq (cycling over the rows), so
    that rows with no block, one block, all blocks and in between all occur in each batch."""
    base = random_layout(key, b, n, nq, min_count=nq)  # every row lists all blocks, shuffled
    counts = (np.arange(b * n * nq).reshape(b, n, nq) * 7 + np.arange(b)[:, None, None]) % (nq + 1)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), np.asarray(base.kv_indices), axis=-1, independent=True))
    return sorted_layout(BlockLayout(jnp.asarray(order), jnp.asarray(counts, jnp.int32), nq))


# (L, kv_lengths for B=5): inside a block, at a block boundary, 0, L, and one key only.
LENGTH_CASES = [
    (512, [200, 256, 0, 512, 1]),
    (300, [150, 128, 0, 300, 257]),  # ragged L: the last block holds 44 keys
]


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
@pytest.mark.parametrize("seq_len, lengths", LENGTH_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kv_lengths_match_numpy(interpret, seq_len, lengths, dtype):
    b, n, d = len(lengths), 2, 64
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(7000 + seq_len)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, dtype)
    layout = layout_with_all_counts(k_layout, b, n, nq)
    assert set(np.unique(np.asarray(layout.kv_counts))) == set(range(nq + 1))
    kv_lengths = jnp.asarray(lengths, jnp.int32)
    out = block_sparse_attention(
        q, k, v, layout, kv_lengths=kv_lengths, interpret=interpret, poison_output=True
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out))), "kernel left elements unwritten (NaN poison survived)"
    ref = numpy_block_sparse(q, k, v, layout, kv_lengths=lengths)
    tok = numpy_token_mask(layout, seq_len, lengths)
    blind = ~tok.any(-1).transpose(0, 2, 1)  # [B, L, N]: queries that see no key
    assert blind[2].all() and not blind[3].all()
    np.testing.assert_array_equal(np.asarray(out, np.float32)[blind], 0.0)
    baseline = xla_block_sparse(q, k, v, layout, lengths)
    for bi in range(b):
        if not blind[bi].all():
            err = rel_l2(out[bi], ref[bi])
            # 16-bit: no worse than twice XLA's own 16-bit attention on the same mask.
            tol = 2e-5 if dtype == jnp.float32 else max(2.0 * rel_l2(baseline[bi], ref[bi]), 1e-6)
            assert err <= tol, (bi, lengths[bi], err, tol)
    # The same layout without lengths (batch 3 has kv_lengths = L) must agree with them.
    full = block_sparse_attention(q, k, v, layout, interpret=interpret)
    chex.assert_trees_all_close(
        np.asarray(out[3], np.float32), np.asarray(full[3], np.float32), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
def test_kv_lengths_with_small_key_tiles(interpret):
    """block_k = 32: sub-steps of the masked block that hold no visible key at all."""
    b, n, seq_len, d = 3, 2, 384, 64
    nq = seq_len // BLOCK
    k_inputs, k_layout = keys(7100)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    layout = layout_with_all_counts(k_layout, b, n, nq)
    lengths = [129, 383, 224]
    out = block_sparse_attention(
        q, k, v, layout, kv_lengths=jnp.asarray(lengths, jnp.int32), scale=0.07,
        tuning=TritonTuning(64, 32, 4, 2), interpret=interpret, poison_output=True,
    )
    assert rel_l2(out, numpy_block_sparse(q, k, v, layout, scale=0.07, kv_lengths=lengths)) < 2e-5


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_empty_rows_whose_padding_is_the_partial_block(interpret, with_lengths):
    """Count-0 rows whose (unread) first entry is the ragged block nk-1 give zeros: the masked
    block is only the last *visited* one."""
    b, n, seq_len, d = 2, 2, 300, 64
    nq = -(-seq_len // BLOCK)
    k_inputs, _ = keys(7150)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    counts = np.zeros((b, n, nq), np.int32)
    counts[:, 1, 1] = 1
    layout = BlockLayout(jnp.full((b, n, nq, 1), nq - 1, jnp.int32), jnp.asarray(counts), nq)
    lengths = [300, 290] if with_lengths else None
    out = block_sparse_attention(
        q, k, v, layout, kv_lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32),
        interpret=interpret, poison_output=True,
    )
    np.testing.assert_array_equal(np.asarray(out)[:, :, 0], 0.0)
    np.testing.assert_array_equal(np.asarray(out)[:, :BLOCK, 1], 0.0)
    assert rel_l2(out, numpy_block_sparse(q, k, v, layout, kv_lengths=lengths)) < 2e-5


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
def test_traced_kv_lengths_share_one_compilation(interpret):
    """Lengths are run-time data: new lengths reuse the compiled kernel."""
    b, n, seq_len, d = 2, 2, 300, 64
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(7200)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    layout = layout_with_all_counts(k_layout, b, n, nq)
    traces = []

    @jax.jit
    def run(kv_lengths):
        traces.append(1)
        return block_sparse_attention(q, k, v, layout, kv_lengths=kv_lengths, interpret=interpret)

    for lengths in ([300, 17], [128, 256]):
        out = run(jnp.asarray(lengths, jnp.int32))
        assert rel_l2(out, numpy_block_sparse(q, k, v, layout, kv_lengths=lengths)) < 2e-5
    assert len(traces) == 1


@pytest.mark.parametrize(
    "seq_len, with_lengths, dtype",
    [(300, True, jnp.bfloat16), (512, True, jnp.float32), (512, False, jnp.bfloat16), (300, False, jnp.float16)],
)
@pytest.mark.skipif(
    jax.default_backend() != "gpu" and tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11),
    reason="jax >= 0.11 lowers Pallas Triton only with a GPU device present (the compiled GPU tests cover it)",
)
def test_lowers_for_cuda(seq_len, with_lengths, dtype):
    """Ahead-of-time lowering of the compiled (Triton) kernel, with and without lengths (on CPU
    with jax 0.10; jax >= 0.11 needs a GPU device for it)."""
    nq = -(-seq_len // BLOCK)

    def f(q, k, v, idx, cnt, lengths):
        layout = BlockLayout(idx, cnt, nq)
        return block_sparse_attention(
            q, k, v, layout, kv_lengths=lengths if with_lengths else None, interpret=False
        )

    x = jax.ShapeDtypeStruct((2, seq_len, 2, 64), dtype)
    args = (
        x, x, x,
        jax.ShapeDtypeStruct((2, 2, nq, 3), jnp.int32),
        jax.ShapeDtypeStruct((2, 2, nq), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()


@pytest.mark.parametrize(
    "kv_lengths, error, match",
    [
        (jnp.asarray([256], jnp.int32), ValueError, r"kv_lengths.*\[B=2\]"),
        (jnp.asarray([[256, 256]], jnp.int32), ValueError, r"kv_lengths.*\[B=2\]"),
        (jnp.asarray([256.0, 256.0], jnp.float32), TypeError, "kv_lengths.*integer"),
        (jnp.asarray([257, 10], jnp.int32), ValueError, r"kv_lengths.*\[0, L=256\]"),
        (jnp.asarray([-1, 10], jnp.int32), ValueError, r"kv_lengths.*\[0, L=256\]"),
    ],
)
def test_bad_kv_lengths_raise(kv_lengths, error, match):
    q = jnp.ones((2, 256, 2, 64), jnp.float32)
    layout = full_layout(2, 2, 2, 2)
    with pytest.raises(error, match=match):
        block_sparse_attention(q, q, q, layout, kv_lengths=kv_lengths, interpret=True)
    with pytest.raises(error, match="kv_lengths"):
        attention.block_sparse_attention(q, q, q, layout, kv_lengths=kv_lengths, implementation="xla")
    with pytest.raises(error, match="kv_lengths"):
        attention.block_sparse_attention(
            q, q, q, layout, kv_lengths=kv_lengths, implementation="triton", interpret=True
        )


# dfsattn_jax.dispatch: the Triton kernel is one implementation among others.


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


@pytest.mark.parametrize("seq_len, lengths", [(300, [150, 0]), (384, [256, 384])])
def test_registry_passes_kv_lengths(seq_len, lengths):
    b, n, d = 2, 2, 64
    nq = -(-seq_len // BLOCK)
    k_inputs, k_layout = keys(7300 + seq_len)
    q, k, v = random_qkv(k_inputs, b, seq_len, n, d, jnp.float32)
    layout = layout_with_all_counts(k_layout, b, n, nq)
    kv_lengths = jnp.asarray(lengths, jnp.int32)
    want = numpy_block_sparse(q, k, v, layout, kv_lengths=lengths)
    assert rel_l2(want, numpy_block_sparse(q, k, v, layout)) > 1e-2  # the lengths matter here
    with jax.default_matmul_precision("highest"):  # no TF32 in the XLA reference on GPU
        xla = attention.block_sparse_attention(
            q, k, v, layout, block_size=BLOCK, kv_lengths=kv_lengths, implementation="xla"
        )
    triton = attention.block_sparse_attention(
        q, k, v, layout, block_size=BLOCK, kv_lengths=kv_lengths, implementation="triton", interpret=True
    )
    for got in (xla, triton):
        assert got.shape == q.shape and got.dtype == q.dtype
        assert rel_l2(got, want) < 2e-5
    chex.assert_trees_all_close(triton, xla, rtol=1e-5, atol=1e-5)


def test_resolve_attention():
    q = jnp.zeros((1, 256, 2, 64), jnp.float32)
    name, reason = dispatch.resolve("attention", q)
    if jax.default_backend() == "gpu":
        assert name in ("triton", "mosaic_gpu"), (name, reason)
    else:
        assert (name, reason) == ("xla", "default off GPU")
    for asked in ("triton", "xla"):  # mosaic_gpu takes no float32: the next test
        assert dispatch.resolve("attention", q, asked) == (asked, "asked for")
    assert list(dispatch.ATTENTION) == ["mosaic_gpu", "triton", "xla"]  # the default's order


def test_resolve_refuses_a_kernel_asked_for_that_cannot_take_the_input():
    """float32 is no Mosaic GPU input (nor is anything on jax < 0.11.1): asked for by name it raises
    NotImplementedError with the kernel's reason (a default falls back instead: test_dispatch.py)."""
    q = jnp.zeros((1, 256, 2, 64), jnp.float32)
    why = block_sparse_mosaic.unsupported(q, 128)
    assert why is not None
    with pytest.raises(NotImplementedError, match="'mosaic_gpu' cannot take this input: " + re.escape(why)):
        dispatch.resolve("attention", q, "mosaic_gpu")
    layout = full_layout(1, 2, 2, 2)
    with pytest.raises(NotImplementedError, match=re.escape(why)):
        attention.block_sparse_attention(q, q, q, layout, implementation="mosaic_gpu", interpret=True)


@pytest.mark.parametrize("name", ["pallas", "pallas_interpret", "reference", "cudnn", "Triton"])
def test_unknown_implementation_raises_naming_the_allowed_ones(name):
    q = jnp.zeros((1, 256, 2, 64), jnp.float32)
    layout = BlockLayout(jnp.zeros((1, 2, 2, 1), jnp.int32), jnp.ones((1, 2, 2), jnp.int32), 2)
    for call in (
        lambda: dispatch.resolve("attention", q, name),
        lambda: attention.block_sparse_attention(q, q, q, layout, implementation=name),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert repr(name) in message
        assert all(allowed in message for allowed in ("triton", "mosaic_gpu", "xla")), message
