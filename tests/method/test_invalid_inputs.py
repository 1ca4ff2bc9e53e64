"""Invalid inputs of the attention entry points (invalid layouts, NaN scores, empty shapes): each
is rejected or handled as docs/spec.md §4 fixes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from dfsattn_jax import BlockLayout, block_scores, block_sparse_attention, reference_block_sparse_attention, select_blocks
from dfsattn_jax.layout import checkify_layout, layout_is_valid, sorted_layout, validate_layout
from helpers import rel_l2

BLOCK = 64
L = 3 * BLOCK - 8  # 184 tokens: 3 blocks, the last one partial


def qkv(seed: int, length: int = L, heads: int = 2, dim: int = 16):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(1, length, heads, dim)), jnp.float32) for _ in range(3))


def layout(indices, counts, nk: int = 3) -> BlockLayout:
    return BlockLayout(jnp.asarray(indices, jnp.int32), jnp.asarray(counts, jnp.int32), nk)


def one_row(row: list[int], count: int) -> BlockLayout:
    """Head 0, query block 0 gets ``row[:count]``; every other row is the valid ``[0, 1]``."""
    idx = np.tile(np.array([0, 1], np.int32), (1, 2, 3, 1))
    counts = np.full((1, 2, 3), 2, np.int32)
    idx[0, 0, 0, : len(row)] = row
    counts[0, 0, 0] = count
    return layout(idx, counts)


INVALID = {
    "index_past_last_block": (one_row([0, 3], 2), "must lie in \\[0, 3\\)"),
    "negative_index": (one_row([-1, 1], 2), "must lie in \\[0, 3\\)"),
    "duplicate_index": (one_row([1, 1], 2), "distinct and sorted"),
    "descending_indices": (one_row([1, 0], 2), "distinct and sorted"),
    "count_above_kmax": (one_row([0, 1], 3), "K_max=2"),
    "negative_count": (one_row([0, 1], -1), "K_max=2"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_invalid_layouts_give_wrong_numbers_now_raise(name, implementation):
    """Finding: an index past the last block, a duplicate, a count above K_max or a negative
    index ran and returned wrong values; every entry point now rejects the layout, naming the row."""
    bad, message = INVALID[name]
    q, k, v = qkv(0)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, k, v, bad, block_size=BLOCK, implementation=implementation, interpret=True)
    with pytest.raises(ValueError, match=message):
        reference_block_sparse_attention(q, k, v, bad, block_size=BLOCK)
    assert not bool(layout_is_valid(bad))


def test_layout_with_a_float_dtype_is_rejected():
    bad = BlockLayout(jnp.zeros((1, 2, 3, 1), jnp.float32), jnp.ones((1, 2, 3), jnp.int32), 3)
    q, k, v = qkv(1)
    with pytest.raises(TypeError, match="integer dtype"):
        block_sparse_attention(q, k, v, bad, block_size=BLOCK)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_layouts_are_caught_inside_jit_with_checkify(name):
    """The checked mode: under ``checkify.checkify`` a traced invalid layout becomes an error."""
    bad, _ = INVALID[name]

    @jax.jit
    def check(idx, counts):
        checkify_layout(BlockLayout(idx, counts, 3))
        return counts.sum()

    err, _ = checkify.checkify(check)(bad.kv_indices, bad.kv_counts)
    with pytest.raises(checkify.JaxRuntimeError, match="block layout contract"):
        err.throw()
    good = one_row([0, 2], 2)
    err, _ = checkify.checkify(check)(good.kv_indices, good.kv_counts)
    err.throw()  # no error for a valid layout


@pytest.mark.parametrize("name", sorted(INVALID))
def test_kernel_never_reads_outside_its_inputs_for_traced_invalid_layouts(name):
    """Inside jit nothing is validated; the kernel clips counts and indices, so an invalid layout
    can give wrong numbers but never a read outside q/k/v (finite output, no crash)."""
    bad, _ = INVALID[name]
    q, k, v = qkv(2)

    @jax.jit
    def run(idx, counts):
        return block_sparse_attention(
            q, k, v, BlockLayout(idx, counts, 3), block_size=BLOCK, implementation="triton", interpret=True
        )

    out = np.asarray(run(bad.kv_indices, bad.kv_counts))
    assert np.isfinite(out).all()


def test_count_zero_gives_zeros_in_kernel_and_reference():
    """Finding: a row with count 0 gave zeros from the kernel and a uniform average from the
    reference; both give zeros now (docs/spec.md §4), and the other rows are unchanged."""
    q, k, v = qkv(3)
    lay = one_row([0, 1], 0)
    ref = reference_block_sparse_attention(q, k, v, lay, block_size=BLOCK)
    out = block_sparse_attention(q, k, v, lay, block_size=BLOCK, implementation="triton", interpret=True)
    np.testing.assert_array_equal(np.asarray(ref)[0, :BLOCK, 0], 0.0)
    np.testing.assert_array_equal(np.asarray(out)[0, :BLOCK, 0], 0.0)
    assert np.abs(np.asarray(ref)[0, :BLOCK, 1]).max() > 0.01  # head 1's first block sees keys
    assert rel_l2(out, ref) < 1e-5


def test_nan_wins_select_blocks_never_keeps_a_nan_score():
    """Finding: ``[0.07, 0.94, 0.65, nan]`` kept block 3; a NaN is never selected now, and a row
    keeps at most as many blocks as it has non-NaN scores."""
    scores = jnp.asarray([[[[0.07, 0.94, 0.65, jnp.nan]]]], jnp.float32)
    top2 = select_blocks(scores, 2, max_blocks=4)
    assert np.asarray(top2.kv_indices)[0, 0, 0, :2].tolist() == [1, 2]
    top4 = select_blocks(scores, 4)
    assert int(top4.kv_counts[0, 0, 0]) == 3
    assert sorted(np.asarray(top4.kv_indices)[0, 0, 0, :3].tolist()) == [0, 1, 2]
    validate_layout(top4)
    all_nan = select_blocks(jnp.full((1, 1, 1, 4), jnp.nan), 2)
    assert int(all_nan.kv_counts[0, 0, 0]) == 0


def test_select_blocks_rows_are_sorted_ascending():
    rng = np.random.default_rng(4)
    scores = jnp.asarray(rng.normal(size=(2, 3, 5, 9)), jnp.float32)
    lay = select_blocks(scores, jnp.int32(4), max_blocks=6)
    validate_layout(lay)
    idx = np.asarray(lay.kv_indices)
    assert (np.diff(idx[..., :4], axis=-1) > 0).all()
    top = np.sort(np.argsort(-np.asarray(scores), axis=-1, kind="stable")[..., :4], axis=-1)
    np.testing.assert_array_equal(idx[..., :4], top)
    np.testing.assert_array_equal(np.asarray(sorted_layout(lay).kv_indices), idx)


@pytest.mark.parametrize("shape, axis", [((0, 64, 2, 16), "B"), ((1, 64, 0, 16), "N"), ((1, 64, 2, 0), "D"), ((1, 0, 2, 16), "L")])
def test_empty_shapes_crash_now_raise_value_error(shape, axis):
    """Finding: ``block_scores`` with batch 0, heads 0 or D 0 raised ZeroDivisionError."""
    x = jnp.zeros(shape, jnp.float32)
    with pytest.raises(ValueError, match=f"axis {axis}"):
        block_scores(x, x, tile_size=8, block_size=BLOCK)
    with pytest.raises(ValueError, match=f"axis {axis}"):
        block_sparse_attention(x, x, x, BlockLayout(jnp.zeros((1, 1, 1, 1), jnp.int32), jnp.ones((1, 1, 1), jnp.int32), 1))
