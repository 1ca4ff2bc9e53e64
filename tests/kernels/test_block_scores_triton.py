"""The fused Pallas block-scoring kernel against the float64 NumPy brute force and the jnp scorer.

Every test runs the kernel in the Pallas interpreter (``interpret=True``, any backend); on a GPU
(``JAX_PLATFORMS=cuda python -m pytest -k compiled tests/kernels/test_block_scores_triton.py``) the same
cases also run the compiled Triton kernel. Inputs come from fixed seeds: a failure replays exactly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_block_scores

from dfsattn_jax import dispatch
from dfsattn_jax.layout import blocks_for_density
from dfsattn_jax.metrics import selection_agreement
from dfsattn_jax.orders import token_order
from dfsattn_jax.scoring import block_scores, tile_means
from models.evaluation.synthetic import synthetic_qkv
from pallas_kernels.block_scores_triton import PRECISIONS, ScoreTuning, tile_block_scores

# The interpreter everywhere, plus the compiled kernel where a GPU exists.
INTERPRET = [True] + ([False] if jax.default_backend() == "gpu" else [])
# Test ids say the mode: ``-k compiled`` selects the GPU runs.
MODE_ID = {True: "interpret", False: "compiled"}.get


def random_qk(seed: int, shape, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))


def kernel_scores(q, k, *, tile, block, kv_lengths=None, interpret=True, **kwargs):
    """The kernel on the tile means of ``q``, ``k``, from an all-NaN output buffer."""
    lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    qbar = tile_means(q, tile)
    kbar = tile_means(k, tile, lengths)
    length = q.shape[1]
    n = jnp.full((q.shape[0],), length, jnp.int32) if lengths is None else lengths
    return tile_block_scores(
        qbar, kbar, (n + tile - 1) // tile, tiles_per_block=block // tile, interpret=interpret,
        poison_output=True, **kwargs,
    )


# (batch, L, heads, D, tile, block, kv_lengths): odd L, partial last tile and block; several
# query programs and key chunks (T > 64 and > 128 tiles); kv_lengths 0, < L inside a tile, = L.
CASES = {
    "odd-L-d64": (2, 1001, 2, 64, 16, 128, None),
    "lengths-d128": (2, 999, 3, 128, 16, 128, (999, 413)),
    "zero-length": (2, 517, 2, 64, 16, 128, (0, 517)),
    "chunks-lengths": (1, 4100, 2, 64, 16, 128, (1500,)),
    "chunks-full": (2, 4100, 1, 64, 16, 128, None),
    "tpb4": (2, 700, 2, 64, 16, 64, (700, 97)),
    "tpb1-block-pooling": (1, 2100, 2, 64, 16, 16, (1999,)),
    "tpb16": (1, 2050, 2, 64, 8, 128, None),
}


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
@pytest.mark.parametrize("case", list(CASES))
def test_float32_kernel_matches_float64_and_jnp(case, interpret):
    batch, length, heads, dim, tile, block, kv_lengths = CASES[case]
    q, k = random_qk(list(CASES).index(case), (batch, length, heads, dim))
    got = kernel_scores(q, k, tile=tile, block=block, kv_lengths=kv_lengths, interpret=interpret, precision="float32")
    want = numpy_block_scores(q, k, tile, block, kv_lengths)
    jnp_scores = block_scores(
        q, k, tile_size=tile, block_size=block, implementation="jnp",
        kv_lengths=None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32),
    )
    assert got.shape == want.shape and got.dtype == jnp.float32
    got = np.asarray(got)
    assert np.isfinite(got).all(), "an output element was not written (NaN poison) or is not finite"
    # float32 end to end (means, logits, exp2, sums of <= 64 terms <= 1): a few ulps of 8.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got, np.asarray(jnp_scores), rtol=1e-5, atol=2e-6)
    if kv_lengths is not None:
        for b, n_keys in enumerate(kv_lengths):
            assert (got[b, :, :, -(-n_keys // block) :] == 0.0).all()  # blocks past the length


def _logit_rounding_bound(q, k, tile, unit: float) -> np.ndarray:
    """Per (batch, head): ``unit * max_ij sum_d |q̄_id k̄_jd| / sqrt(D)``, the largest change of a
    logit when every product of means carries a relative error of at most ``unit``."""
    qbar = np.abs(np.asarray(tile_means(q, tile), np.float64))
    kbar = np.abs(np.asarray(tile_means(k, tile), np.float64))
    return unit * np.einsum("bnid,bnjd->bnij", qbar, kbar).max(axis=(2, 3)) / math.sqrt(q.shape[-1])


# Relative error of one product of rounded means: bf16 rounds both factors (2 * 2^-9), tf32
# likewise (2 * 2^-11); bf16x3 drops the lo*lo term and rounds the lo parts (~3 * 2^-17).
UNIT = {"bf16": 2.0**-8, "tf32": 2.0**-10, "bf16x3": 3 * 2.0**-17}


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
@pytest.mark.parametrize("precision", ["bf16", "bf16x3", "tf32"])
def test_reduced_precision_within_rounding_bound(precision, interpret):
    q, k = random_qk(21, (2, 2060, 2, 128))
    q, k = 3.0 * q, 3.0 * k  # logits of a few units, like trained models' tile means
    got = np.asarray(kernel_scores(q, k, tile=16, block=128, interpret=interpret, precision=precision))
    want = numpy_block_scores(q, k, 16, 128)
    assert np.isfinite(got).all()
    # A logit error of at most eps changes each probability by a factor in [e^-2eps, e^2eps].
    eps = _logit_rounding_bound(q, k, 16, UNIT[precision])[:, :, None, None]
    assert eps.max() > 1e-6  # the bound is not vacuous: these inputs do get rounded
    np.testing.assert_array_less(np.abs(got - want), (2.1 * eps + 1e-5) * want + 2e-6)


def _round_significand(x: np.ndarray, bits: int) -> np.ndarray:
    """``x`` rounded to ``bits`` significant bits (to nearest, ties to even), in float64."""
    mantissa, exponent = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def numpy_scores_of_rounded_means(q, k, tile, block, bits: int) -> np.ndarray:
    """float64 block scores whose logits are products of the tile means rounded to ``bits``
    significant bits, ``q̄`` after scaling by ``log2(e) / sqrt(D)`` (what the kernel's bf16 and
    tf32 precisions compute), softmax in base 2."""
    dim = q.shape[-1]
    qbar = _round_significand(np.asarray(tile_means(q, tile), np.float64) * (math.log2(math.e) / math.sqrt(dim)), bits)
    kbar = _round_significand(np.asarray(tile_means(k, tile), np.float64), bits)
    logits = np.einsum("bnid,bnjd->bnij", qbar, kbar)
    probs = np.exp2(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    per, nb = block // tile, -(-q.shape[1] // block)
    pad = nb * per - probs.shape[-1]
    probs = np.pad(probs, ((0, 0), (0, 0), (0, pad), (0, pad)))
    return probs.reshape(*probs.shape[:2], nb, per, nb, per).sum(axis=(3, 5))


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
@pytest.mark.parametrize("precision, bits", [("bf16", 8), ("tf32", 11)])
def test_reduced_precision_is_rounded_means_exactly(precision, bits, interpret):
    """bf16 / tf32 mean exactly: logits of the means rounded to 8 / 11 significant bits."""
    q, k = random_qk(26, (2, 1100, 2, 64))
    q, k = 3.0 * q, 3.0 * k
    got = np.asarray(kernel_scores(q, k, tile=16, block=128, interpret=interpret, precision=precision))
    want = numpy_scores_of_rounded_means(q, k, 16, 128, bits)
    # What is left: float32 logits and exp2, the ~2^-17 split of the block sums.
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    # ... a tolerance at which the rounding itself shows: unrounded means do not pass it.
    assert not np.allclose(got, numpy_block_scores(q, k, 16, 128), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
def test_row_sums_by_matmul_match_reshape(interpret):
    q, k = random_qk(22, (2, 2100, 2, 64))
    lengths = (2100, 1234)
    by_dot = kernel_scores(
        q, k, tile=16, block=128, kv_lengths=lengths, interpret=interpret, precision="float32",
        tuning=ScoreTuning(block_q=128, num_warps=8, row_sum="dot"),
    )
    want = numpy_block_scores(q, k, 16, 128, lengths)
    np.testing.assert_allclose(np.asarray(by_dot), want, rtol=1e-5, atol=2e-6)
    by_dot_bf16 = kernel_scores(
        q, k, tile=16, block=128, kv_lengths=lengths, interpret=interpret, precision="bf16",
        tuning=ScoreTuning(block_q=128, num_warps=8, row_sum="dot"),
    )
    by_reshape_bf16 = kernel_scores(q, k, tile=16, block=128, kv_lengths=lengths, interpret=interpret, precision="bf16")
    # Same bf16 logits; the two row sums differ only by the ~2^-17 split of the row terms.
    np.testing.assert_allclose(np.asarray(by_dot_bf16), np.asarray(by_reshape_bf16), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("interpret", INTERPRET, ids=MODE_ID)
def test_topk_agreement_on_video_like_qk(interpret):
    """The default precision keeps the jnp scorer's top-k decisions (>= 99.9% of them) on
    video-like q/k in hilbert3d order; bf16x3 and tf32 keep all of them here."""
    grid = (8, 32, 32)
    q, k, _ = synthetic_qkv(grid, heads=4, head_dim=128, seed=3)
    perm = jnp.asarray(token_order("hilbert3d", grid))
    q, k = (x[:, perm].astype(jnp.bfloat16) for x in (q, k))
    reference = block_scores(q, k, implementation="jnp")
    nk = reference.shape[-1]
    for precision, floor in (("bf16", 0.999), ("bf16x3", 1.0), ("tf32", 0.9995)):
        got = block_scores(q, k, implementation="triton", interpret=interpret, precision=precision)
        for density in (0.3, 0.2, 0.1):
            agreement = float(selection_agreement(got, reference, blocks_for_density(density, nk)))
            assert agreement >= floor, (precision, density, agreement)


def test_block_scores_selects_the_kernel_like_attention():
    q, k = random_qk(23, (1, 520, 2, 64))
    assert dispatch.resolve("scoring", q, "triton") == ("triton", "asked for")
    name, reason = dispatch.resolve("scoring", q)
    if jax.default_backend() == "gpu":
        assert name == "triton"
    else:
        assert (name, reason) == ("jnp", "default off GPU")
    # The entry point runs the kernel on the means it computes: the same numbers as calling it.
    via_entry = block_scores(q, k, implementation="triton", interpret=True, precision="bf16x3")
    direct = kernel_scores(q, k, tile=16, block=128, precision="bf16x3")
    np.testing.assert_array_equal(np.asarray(via_entry), np.asarray(direct))


def test_unsupported_input_falls_back_or_raises(monkeypatch):
    q, k = random_qk(24, (1, 96, 2, 24))  # head dim 24: not a power of two
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)  # the kernel is this device's default
    name, reason = dispatch.resolve("scoring", q)
    assert name == "jnp" and "triton does not support this input (head dim 24" in reason
    name, reason = dispatch.resolve("scoring", random_qk(24, (1, 96, 2, 32))[0], tile_size=16, block_size=48)
    assert name == "jnp" and "tiles per block 3" in reason
    with pytest.raises(NotImplementedError, match="'triton' cannot take this input: head dim 24"):
        block_scores(q, k, implementation="triton", interpret=True)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, k: block_scores(q, k, implementation="cuda"), ValueError, "implementation must be one of"),
        (lambda q, k: block_scores(q, k, implementation="triton", precision="fp8", interpret=True), ValueError, "precision"),
        (
            lambda q, k: block_scores(q, k, implementation="triton", interpret=True, kv_lengths=jnp.asarray([1, 2])),
            ValueError, r"kv_lengths.*\[B=1\]",
        ),
        (
            lambda q, k: block_scores(
                q, k, implementation="triton", interpret=True, kv_lengths=jnp.asarray([129], jnp.int32)
            ),
            ValueError, r"kv_lengths.*\[0, L=128\]",
        ),
        (lambda q, k: block_scores(q, k[:, :64], implementation="triton", interpret=True), ValueError, "k must have the shape"),
        (lambda q, k: kernel_scores(q, k, tile=16, block=128, tuning=ScoreTuning(block_q=48)), ValueError, "block_q"),
        (lambda q, k: kernel_scores(q, k, tile=16, block=128, tuning=ScoreTuning(block_k=64)), ValueError, "block_k"),
        (
            lambda q, k: kernel_scores(q, k, tile=16, block=128, tuning=ScoreTuning(row_sum="dot")),
            ValueError, "row_sum='dot' needs block_q",
        ),
        (lambda q, k: kernel_scores(q, k, tile=16, block=128, tuning=ScoreTuning(row_sum="scan")), ValueError, "row_sum"),
        (
            lambda q, k: tile_block_scores(
                tile_means(q, 16), tile_means(k, 16)[:, :, :4], jnp.asarray([8]), tiles_per_block=8, interpret=True
            ),
            ValueError, "qbar and kbar",
        ),
        (
            lambda q, k: tile_block_scores(
                tile_means(q, 16), tile_means(k, 16), jnp.asarray([8, 8]), tiles_per_block=8, interpret=True
            ),
            ValueError, r"valid_key_tiles.*\[B=1\]",
        ),
        (
            lambda q, k: tile_block_scores(
                tile_means(q, 16), tile_means(k, 16), jnp.asarray([8]), tiles_per_block=6, interpret=True
            ),
            NotImplementedError, "tiles_per_block",
        ),
        (
            lambda q, k: tile_block_scores(
                tile_means(q, 16), tile_means(k, 16), jnp.asarray([8.0]), tiles_per_block=8, interpret=True
            ),
            TypeError,
            "valid_key_tiles must be an integer array",
        ),
    ],
)
def test_bad_inputs_raise(call, error, match):
    q, k = random_qk(25, (1, 128, 2, 64))
    with pytest.raises(error, match=match):
        call(q, k)


def test_precisions_are_listed_and_default_is_one():
    from pallas_kernels.block_scores_triton import DEFAULT_PRECISION

    assert DEFAULT_PRECISION in PRECISIONS
    assert PRECISIONS == ("bf16", "bf16x3", "tf32", "float32")


@pytest.mark.parametrize("precision", ["bf16", "bf16x3", "float32"])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.skipif(
    jax.default_backend() != "gpu" and tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11),
    reason="jax >= 0.11 lowers Pallas Triton only with a GPU device present (the compiled GPU tests cover it)",
)
def test_lowers_for_cuda(precision, with_lengths):
    """Ahead-of-time lowering of the compiled (Triton) kernel through the entry point (on CPU
    with jax 0.10; jax >= 0.11 needs a GPU device for it)."""

    def f(q, k, lengths):
        return block_scores(
            q, k, implementation="triton", precision=precision, kv_lengths=lengths if with_lengths else None
        )

    x = jax.ShapeDtypeStruct((1, 32760, 2, 128), jnp.bfloat16)
    lowered = jax.jit(f).trace(x, x, jax.ShapeDtypeStruct((1,), jnp.int32)).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "triton" in text.lower() and "dfs_block_scores" in text


def test_selection_agreement_counts_decisions():
    rng = np.random.default_rng(27)
    scores = jnp.asarray(rng.permutation(24).reshape(1, 2, 3, 4).astype(np.float32))
    # Swap the 2nd and 3rd best blocks of one row: with top-2 kept, two decisions change.
    swapped = np.asarray(scores).copy()
    row = swapped[0, 1, 2]
    order = np.argsort(-row)
    row[order[1]], row[order[2]] = row[order[2]], row[order[1]]
    assert float(selection_agreement(scores, scores, 2)) == 1.0
    assert float(selection_agreement(jnp.asarray(swapped), scores, 2)) == pytest.approx(1.0 - 2 / 24)
    assert float(selection_agreement(jnp.asarray(swapped), scores, 1)) == 1.0  # the best is unchanged
    with pytest.raises(ValueError, match="one shape"):
        selection_agreement(scores, scores[:, :1], 2)
