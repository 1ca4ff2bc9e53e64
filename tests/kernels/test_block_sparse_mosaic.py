"""The Mosaic GPU (sm90a) block-sparse attention kernel against a float64 NumPy reference.

Three layers:
  * on CPU, the kernel runs in the Mosaic GPU interpreter (``plgpu.InterpretGPUParams``) with
    race detection and NaN-initialised buffers, so unwritten outputs and missing barriers fail;
    the interpreter always takes the shared-memory-P variant;
  * on CPU, the register-P fast path is lowered ahead of time for CUDA
    (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``): Pallas -> Mosaic GPU
    lowering, layout inference and MLIR verification for sm_90a, so API drift fails here;
  * on an sm90 GPU (``jax.default_backend() == "gpu"``), the compiled fast path against the
    reference and, with every block listed, against cuDNN dense attention.

Needs jax >= 0.11.1 (the interpreter and ``plgpu.kernel(out_type=...)``); skipped otherwise.
Tolerances: bf16 inputs and a bf16 P for the PV product give a relative L2 error of about
2e-3 against float64 (rounding of P at 2^-8 relative, averaged over >= 128 keys); 1e-2 is the
bound from METHOD.md for bf16 operands. float16 has 3 more mantissa bits: 4e-3.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402


def _version(v: str) -> tuple[int, ...]:
    out = []
    for piece in v.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


if _version(jax.__version__) < (0, 11, 1) or sys.version_info < (3, 12):
    pytest.skip(
        f"Mosaic GPU kernel tests need jax >= 0.11.1 and Python >= 3.12 "
        f"(have jax {jax.__version__}, Python {sys.version.split()[0]})",
        allow_module_level=True,
    )

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("jax.experimental.pallas.mosaic_gpu has no InterpretGPUParams", allow_module_level=True)

from helpers import rel_l2  # noqa: E402
from pallas_kernels.block_sparse_mosaic import (  # noqa: E402
    GRID_NAMES,
    THREAD_NAME,
    MosaicTuning,
    block_sparse_attention,
    unsupported,
)
from pallas_kernels.contract import BlockLayout  # noqa: E402

BLOCK = 128
ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs an sm90 GPU (jax.default_backend() == 'gpu')")
cpu_only = pytest.mark.skipif(ON_GPU, reason="interpreter tests run on CPU only")


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 oracle


def random_qkv(rng: np.random.Generator, b, seq_len, n, d, dtype):
    shape = (b, seq_len, n, d)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for _ in range(3))


def random_sorted_layout(rng: np.random.Generator, b, n, nq, *, counts=None, k_max=None, pad_value=None):
    """Distinct random key blocks per row, sorted ascending within the count (docs/spec.md §4).

    ``counts`` defaults to a sweep 0..nq across rows; entries past a row's count are set to
    ``pad_value`` (default: an out-of-range index, so reading one would be caught).
    """
    k_max = nq if k_max is None else k_max
    if counts is None:
        counts = (np.arange(b * n * nq) % (min(nq, k_max) + 1)).reshape(b, n, nq)
        counts = rng.permuted(counts.reshape(-1)).reshape(b, n, nq)
    counts = np.asarray(counts, np.int32)
    pad_value = nq + 1000 if pad_value is None else pad_value
    idx = np.full((b, n, nq, k_max), pad_value, np.int32)
    for bi in range(b):
        for ni in range(n):
            for u in range(nq):
                c = counts[bi, ni, u]
                idx[bi, ni, u, :c] = np.sort(rng.choice(nq, size=c, replace=False))
    return idx, counts


def reference(q, k, v, idx, counts, *, scale=None, kv_lengths=None) -> np.ndarray:
    """Float64 block-sparse attention (docs/spec.md §5) with key lengths; empty rows give 0."""
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    b, seq_len, n, d = qn.shape
    nq = idx.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_mask = np.zeros((b, n, nq, nq), bool)
    for bi in range(b):
        for ni in range(n):
            for u in range(nq):
                block_mask[bi, ni, u, idx[bi, ni, u, : counts[bi, ni, u]]] = True
    tok = np.repeat(np.repeat(block_mask, BLOCK, 2), BLOCK, 3)[:, :, :seq_len, :seq_len]
    if kv_lengths is not None:
        tok = tok & (np.arange(seq_len)[None, None, None, :] < np.asarray(kv_lengths)[:, None, None, None])
    s = np.einsum("blnd,bmnd->bnlm", qn, kn, optimize=True) * scale
    s = np.where(tok, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0.0))
    l = p.sum(-1, keepdims=True)
    p = p / np.where(l > 0, l, 1.0)
    return np.einsum("bnlm,bmnd->blnd", p, vn, optimize=True)


def tolerance(dtype) -> float:
    return 1e-2 if jnp.dtype(dtype) == jnp.bfloat16 else 4e-3


def _races():
    """The interpreter's race-detection state (private module; None if it moved)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    except ImportError:  # pragma: no cover - private API drift
        return None
    return get_races()


def layout_of(idx, counts) -> BlockLayout:
    """The kernel's layout from NumPy rows (``nq`` query blocks = key blocks)."""
    return BlockLayout(jnp.asarray(idx, jnp.int32), jnp.asarray(counts, jnp.int32), idx.shape[2])


def run_interpreted(capsys, q, k, v, layout, *, jit=False, **kwargs):
    """Runs the kernel in the interpreter with race detection and NaN-filled buffers (``jit``:
    with the layout traced, so that the contract's row checks do not run)."""
    params = plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")
    run = lambda lay: block_sparse_attention(q, k, v, lay, interpret=params, **kwargs)  # noqa: E731
    out = np.asarray(jax.jit(run)(layout) if jit else run(layout), np.float64)
    printed = capsys.readouterr().out
    assert "RACE DETECTED" not in printed, printed
    races = _races()
    if races is not None:
        assert not races.races_found
    return out


def check(out, ref, dtype):
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), f"{np.size(out) - np.isfinite(out).sum()} non-finite (unwritten?) outputs"
    err = rel_l2(out, ref)
    assert err < tolerance(dtype), err
    # Rows with no visible key must be exactly 0.
    zero_rows = np.all(ref == 0.0, axis=-1)
    assert np.all(out[zero_rows] == 0.0)


# ---------------------------------------------------------------------------------------------
# CPU: the interpreter (shared-memory-P variant)

INTERPRET_CASES = [
    # (batch, L, heads, D, dtype, kv_lengths)
    pytest.param(1, 1000, 2, 64, jnp.bfloat16, None, id="L1000-D64-bf16"),
    pytest.param(1, 1000, 2, 128, jnp.float16, None, id="L1000-D128-f16"),
    pytest.param(2, 2 * 128 + 40, 1, 128, jnp.bfloat16, None, id="L296-D128-bf16-B2"),
    pytest.param(2, 1000, 1, 64, jnp.bfloat16, (700, 100), id="L1000-D64-kvlen"),
    pytest.param(2, 2 * 128 + 40, 1, 128, jnp.float16, (130, 296), id="L296-D128-kvlen"),
]


@cpu_only
@pytest.mark.parametrize("b, seq_len, n, d, dtype, kv_lengths", INTERPRET_CASES)
def test_interpreter_matches_reference(capsys, b, seq_len, n, d, dtype, kv_lengths):
    rng = np.random.default_rng([seq_len, d, b, n, 0 if kv_lengths is None else kv_lengths[0]])
    nq = -(-seq_len // BLOCK)
    q, k, v = random_qkv(rng, b, seq_len, n, d, dtype)
    idx, counts = random_sorted_layout(rng, b, n, nq)
    assert counts.min() == 0 and counts.max() == nq  # the sweep covers empty and full rows
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    out = run_interpreted(capsys, q, k, v, layout_of(idx, counts), kv_lengths=lengths)
    ref = reference(q, k, v, idx, counts, kv_lengths=kv_lengths)
    check(out, ref, dtype)


@cpu_only
@pytest.mark.parametrize("scale", [0.05, -0.1])
def test_interpreter_full_layout_equals_dense(capsys, scale):
    """Every block listed, a custom scale (negative: the unfolded softmax) = dense attention."""
    rng = np.random.default_rng(11)
    b, seq_len, n, d = 1, 2 * 128 + 40, 2, 64
    nq = -(-seq_len // BLOCK)
    q, k, v = random_qkv(rng, b, seq_len, n, d, jnp.bfloat16)
    idx = np.broadcast_to(np.arange(nq, dtype=np.int32), (b, n, nq, nq))
    counts = np.full((b, n, nq), nq, np.int32)
    out = run_interpreted(capsys, q, k, v, layout_of(idx, counts), scale=scale)
    dense = jax.nn.dot_product_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), scale=scale, implementation="xla"
    )
    check(out, np.asarray(dense, np.float64), jnp.bfloat16)


@cpu_only
def test_registry_runs_the_kernel_in_its_interpreter(capsys):
    """``block_sparse_attention(implementation="mosaic_gpu", interpret=True)`` on a BlockLayout."""
    from dfsattn_jax import attention

    rng = np.random.default_rng(21)
    q, k, v = random_qkv(rng, 1, 296, 2, 64, jnp.bfloat16)
    idx, counts = random_sorted_layout(rng, 1, 2, 3, pad_value=0)
    layout = BlockLayout(jnp.asarray(idx), jnp.asarray(counts), 3)
    out = np.asarray(attention.block_sparse_attention(q, k, v, layout, implementation="mosaic_gpu", interpret=True), np.float64)
    check(out, reference(q, k, v, idx, counts), jnp.bfloat16)
    assert "RACE DETECTED" not in capsys.readouterr().out


def test_interpreter_refuses_lengths_not_a_multiple_of_8():
    """The interpreter deadlocks on the padded path (L % 8 != 0); the compiled kernel runs it
    (test_gpu_matches_reference at L=297), so the interpreter refuses it with a clear error."""
    rng = np.random.default_rng(22)
    q, k, v = random_qkv(rng, 1, 300, 1, 64, jnp.bfloat16)
    idx, counts = random_sorted_layout(rng, 1, 1, 3, pad_value=0)
    with pytest.raises(NotImplementedError, match="multiple of 8"):
        block_sparse_attention(q, k, v, layout_of(idx, counts), interpret=True)


@cpu_only
def test_interpreter_small_kmax_and_short_rows(capsys):
    """K_max smaller than nq and odd (no alignment assumption), counts below num_stages."""
    rng = np.random.default_rng(12)
    b, seq_len, n, d = 1, 1000, 1, 128
    nq = -(-seq_len // BLOCK)
    q, k, v = random_qkv(rng, b, seq_len, n, d, jnp.bfloat16)
    counts = np.array([[[0, 1, 2, 3, 1, 2, 3, 1]]], np.int32)
    idx, counts = random_sorted_layout(rng, b, n, nq, counts=counts, k_max=3)
    out = run_interpreted(capsys, q, k, v, layout_of(idx, counts), tuning=MosaicTuning(num_stages=3))
    check(out, reference(q, k, v, idx, counts), jnp.bfloat16)


@cpu_only
def test_interpreter_unsorted_rows_ragged_tail(capsys):
    """Rows in descending order (top-k score order), in a traced layout (a concrete one is
    rejected by the contract's row check), still mask the ragged last block."""
    rng = np.random.default_rng(13)
    b, seq_len, n, d = 1, 2 * 128 + 40, 2, 64
    nq = -(-seq_len // BLOCK)
    q, k, v = random_qkv(rng, b, seq_len, n, d, jnp.bfloat16)
    counts = np.array([[[3, 2, 1], [3, 2, 2]]], np.int32)
    idx, counts = random_sorted_layout(rng, b, n, nq, counts=counts)
    for u in np.ndindex(counts.shape):
        idx[u][: counts[u]] = idx[u][: counts[u]][::-1].copy()
    assert idx[0, 0, 0, 0] == nq - 1  # the partial block comes first in a full row
    out = run_interpreted(capsys, q, k, v, layout_of(idx, counts), jit=True)
    check(out, reference(q, k, v, idx, counts), jnp.bfloat16)


# ---------------------------------------------------------------------------------------------
# CPU: ahead-of-time lowering of the GPU kernel


def _lower_for_cuda(b, seq_len, n, d, dtype, k_max, *, tuning=None, with_lengths=True):
    nq = -(-seq_len // BLOCK)

    def f(q, k, v, idx, cnt, lengths):
        return block_sparse_attention(
            q, k, v, BlockLayout(idx, cnt, nq), kv_lengths=lengths if with_lengths else None, tuning=tuning
        )

    x = jax.ShapeDtypeStruct((b, seq_len, n, d), dtype)
    args = (
        x, x, x,
        jax.ShapeDtypeStruct((b, n, nq, k_max), jnp.int32),
        jax.ShapeDtypeStruct((b, n, nq), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    )
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "seq_len, d, dtype, k_max, stages",
    [
        (32760, 128, jnp.bfloat16, 51, 2),  # Wan-1.3B shape, K_max not a multiple of 4
        (75600, 128, jnp.bfloat16, 118, 3),
        (1000, 64, jnp.float16, 8, 2),
        (2 * 128 + 41, 64, jnp.bfloat16, 1, 3),  # L % 8 != 0 -> padded internally
    ],
)
def test_fast_path_lowers_for_cuda(seq_len, d, dtype, k_max, stages):
    text = _lower_for_cuda(1, seq_len, 2, d, dtype, k_max, tuning=MosaicTuning(num_stages=stages))
    assert "mosaic_gpu" in text.lower()


def test_smem_p_path_lowers_for_cuda():
    text = _lower_for_cuda(2, 1000, 2, 128, jnp.bfloat16, 5, tuning=MosaicTuning(p_in_registers=False), with_lengths=False)
    assert "mosaic_gpu" in text.lower()


def test_tuning_knobs_lower_for_cuda():
    tuning = MosaicTuning(fold_scale=False, schedule_barrier=False, compute_registers=240, producer_registers=24)
    text = _lower_for_cuda(1, 1000, 2, 64, jnp.bfloat16, 3, tuning=tuning)
    assert "mosaic_gpu" in text.lower()


def test_kernel_stays_device_local_inside_shard_map():
    """Issue 15: inside ``shard_map`` over the multi-GPU mesh, the kernel's grid axis once shared
    the name "heads" with the mesh axis, so ``lax.axis_index("heads")`` lowered to the device's mesh
    coordinate (read from the device id: an NVSHMEM / collective-metadata kernel launched behind a
    cross-device barrier) and most heads' outputs were never written on 2 H200s. Lowered for CUDA
    under the model's mesh axes, the kernel must read no device id and carry no replica ids."""
    from jax.sharding import Mesh, PartitionSpec as P

    from models.common.parallel import GUIDANCE_AXIS, HEADS_AXIS

    assert not {*GRID_NAMES, THREAD_NAME} & {GUIDANCE_AXIS, HEADS_AXIS}
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), (GUIDANCE_AXIS, HEADS_AXIS))
    tokens, layout = P(GUIDANCE_AXIS, None, HEADS_AXIS), P(GUIDANCE_AXIS, HEADS_AXIS)
    nq = 8

    def attend(q, k, v, idx, cnt):
        return block_sparse_attention(q, k, v, BlockLayout(idx, cnt, nq))

    f = jax.shard_map(attend, mesh=mesh, in_specs=(tokens,) * 3 + (layout,) * 2, out_specs=tokens, check_vma=False)
    x = jax.ShapeDtypeStruct((2, nq * BLOCK, 4, 64), jnp.bfloat16)
    args = (x, x, x, jax.ShapeDtypeStruct((2, 4, nq, 3), jnp.int32), jax.ShapeDtypeStruct((2, 4, nq), jnp.int32))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text.lower()
    assert "nvshmem" not in text
    assert "xla_replica_ids" not in text


# ---------------------------------------------------------------------------------------------
# Dispatch helpers and input checks


def test_unsupported_reasons():
    ok = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    assert unsupported(ok) is None
    assert unsupported(jax.ShapeDtypeStruct((1, 1000, 2, 64), jnp.float16)) is None
    assert "float32" in unsupported(jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.float32))
    assert "head dim" in unsupported(jax.ShapeDtypeStruct((1, 1000, 2, 96), jnp.bfloat16))
    assert "block_size" in unsupported(ok, block_size=64)


def test_rejects_bad_inputs():
    q = jnp.zeros((1, 300, 1, 64), jnp.bfloat16)
    idx = jnp.zeros((1, 1, 3, 3), jnp.int32)
    cnt = jnp.zeros((1, 1, 3), jnp.int32)
    with pytest.raises(ValueError, match="num_key_blocks"):
        block_sparse_attention(q, q, q, BlockLayout(idx, cnt, 2))
    with pytest.raises(NotImplementedError, match="the Mosaic GPU kernel does not support this input: dtype float32"):
        f = q.astype(jnp.float32)
        block_sparse_attention(f, f, f, BlockLayout(idx, cnt, 3))
    with pytest.raises(ValueError, match="kv_indices"):
        block_sparse_attention(q, q, q, BlockLayout(idx[:, :, :2], cnt, 3))
    with pytest.raises(TypeError, match="layout must be a BlockLayout"):
        block_sparse_attention(q, q, q, (idx, cnt))
    with pytest.raises(ValueError, match="num_stages"):
        MosaicTuning(num_stages=4)
    with pytest.raises(TypeError, match="p_in_registers"):
        MosaicTuning(p_in_registers=1)


def test_rejects_what_every_implementation_rejects():
    """The contract's checks (pallas_kernels.contract): key lengths out of [0, L] and a K_max above
    nq are rejected at the kernel's entry point, and so is a layout breaking docs/spec.md §4
    (through the dispatch too), naming the row."""
    from dfsattn_jax import attention

    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 2, 256, 1, 64, jnp.bfloat16)
    idx, cnt = random_sorted_layout(rng, 2, 1, 2)
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, L=256\]"):
        block_sparse_attention(q, k, v, layout_of(idx, cnt), kv_lengths=jnp.asarray([257, 3], jnp.int32))
    with pytest.raises(ValueError, match=r"^layout.max_blocks must be in \[1, 2\], got 3"):
        wide = np.concatenate([idx, idx[..., :1]], axis=-1)
        block_sparse_attention(q, k, v, layout_of(wide, cnt))
    with pytest.raises(ValueError, match=r"layout.kv_indices\[0, 0, 0\] lists \[1, 0\].*sorted ascending"):
        descending = np.tile(np.asarray([1, 0], np.int32), (2, 1, 2, 1))
        block_sparse_attention(q, k, v, layout_of(descending, np.full((2, 1, 2), 2, np.int32)), interpret=True)
    bad = layout_of(descending, np.full((2, 1, 2), 2, np.int32))
    with pytest.raises(ValueError, match=r"layout.kv_indices\[0, 0, 0\] lists \[1, 0\].*sorted ascending"):
        attention.block_sparse_attention(q, k, v, bad, implementation="mosaic_gpu", interpret=True)


# ---------------------------------------------------------------------------------------------
# GPU: the compiled fast path


@gpu_only
@pytest.mark.parametrize(
    "b, seq_len, n, d, dtype, kv_lengths",
    [
        (2, 1000, 3, 64, jnp.bfloat16, None),
        (2, 1000, 3, 128, jnp.float16, None),
        (2, 2 * 128 + 41, 2, 128, jnp.bfloat16, (200, 297)),
        (1, 4096 + 40, 4, 128, jnp.bfloat16, (3000,)),
    ],
)
@pytest.mark.parametrize("fast", [True, False], ids=["p_in_registers", "p_in_smem"])
def test_gpu_matches_reference(b, seq_len, n, d, dtype, kv_lengths, fast):
    rng = np.random.default_rng([seq_len, d, n, int(fast)])
    nq = -(-seq_len // BLOCK)
    q, k, v = random_qkv(rng, b, seq_len, n, d, dtype)
    idx, counts = random_sorted_layout(rng, b, n, nq)
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    tuning = MosaicTuning(p_in_registers=fast)
    out = block_sparse_attention(q, k, v, layout_of(idx, counts), kv_lengths=lengths, tuning=tuning)
    out = np.asarray(out, np.float64)
    check(out, reference(q, k, v, idx, counts, kv_lengths=kv_lengths), dtype)
    # Same inputs again: a race would show as a different result.
    again = block_sparse_attention(q, k, v, layout_of(idx, counts), kv_lengths=lengths, tuning=tuning)
    np.testing.assert_array_equal(np.asarray(again, np.float64), out)


@gpu_only
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_full_layout_equals_cudnn(d):
    rng = np.random.default_rng(d)
    b, seq_len, n = 1, 4096, 4
    nq = seq_len // BLOCK
    q, k, v = random_qkv(rng, b, seq_len, n, d, jnp.bfloat16)
    idx = np.broadcast_to(np.arange(nq, dtype=np.int32), (b, n, nq, nq))
    counts = np.full((b, n, nq), nq, np.int32)
    out = block_sparse_attention(q, k, v, layout_of(idx, counts))
    dense = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    ref = np.asarray(
        jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="xla"),
        np.float64,
    )
    assert rel_l2(out, ref) < 1e-2
    assert rel_l2(out, np.asarray(dense, np.float64)) < 1e-2
