"""pallas_kernels.contract.kernel_rows: what both kernel wrappers read from a (traced) layout."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.contract import kernel_rows

BLOCK = 4


def _rows(seed: int, nq: int = 5, k_max: int = 4):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.permutation(nq)[:k_max] for _ in range(2 * 3 * nq)]).reshape(2, 3, nq, k_max)
    counts = rng.integers(1, k_max + 1, size=(2, 3, nq))
    return indices.astype(np.int32), counts.astype(np.int32)


def test_out_of_range_entries_are_clipped_into_the_row_and_sequence():
    indices, counts = _rows(0)
    indices[0, 0, 0] = [-3, 99, 2, 7]
    counts[0, 0, 1], counts[1, 2, 3] = -2, 50
    got_i, got_c, got_l = (np.asarray(a) for a in kernel_rows(indices, counts, None, seq_len=5 * BLOCK, block_size=BLOCK))
    np.testing.assert_array_equal(got_i, np.clip(indices, 0, 4))
    np.testing.assert_array_equal(got_c, np.clip(counts, 0, 4))
    np.testing.assert_array_equal(got_l, [20, 20])  # no lengths: every key visible
    assert got_i.dtype == got_c.dtype == got_l.dtype == np.int32


def test_key_lengths_are_clipped_and_drop_blocks_with_no_visible_key():
    nq = 5
    indices = np.broadcast_to(np.arange(nq, dtype=np.int32), (2, 1, nq, nq)).copy()  # ascending rows
    counts = np.full((2, 1, nq), nq, np.int32)
    lengths = np.array([9, 100], np.int32)  # 9 keys: blocks 0..2 hold some; 100 is clipped to L = 20
    _, got_c, got_l = kernel_rows(indices, counts, lengths, seq_len=nq * BLOCK, block_size=BLOCK)
    np.testing.assert_array_equal(np.asarray(got_l), [9, 20])
    np.testing.assert_array_equal(np.asarray(got_c)[0], np.full((1, nq), 3))
    np.testing.assert_array_equal(np.asarray(got_c)[1], np.full((1, nq), nq))


@pytest.mark.parametrize("seq_len, moved", [(18, True), (20, False)], ids=["partial_last_block", "whole_blocks"])
def test_the_partial_block_becomes_each_rows_last_visited_entry(seq_len, moved):
    # Three rows of interest (block ids < nq = 5; the last entries past each count are unvisited).
    indices = np.array([[[[4, 0, 2, 1], [1, 4, 3, 0], [0, 1, 2, 3]]]], np.int32)
    counts = np.array([[[3, 2, 4]]], np.int32)
    nq = 5
    indices = np.concatenate([indices, np.zeros((1, 1, nq - 3, 4), np.int32)], axis=2)
    counts = np.concatenate([counts, np.ones((1, 1, nq - 3), np.int32)], axis=2)
    got, _, _ = kernel_rows(indices, counts, None, seq_len=seq_len, block_size=BLOCK)
    got = np.asarray(got)
    if moved:  # block 4 (keys 16..17) swapped with the last visited entry of the rows that list it
        np.testing.assert_array_equal(got[0, 0, 0], [2, 0, 4, 1])
        np.testing.assert_array_equal(got[0, 0, 1], [1, 4, 3, 0])  # already its last visited entry
    else:
        np.testing.assert_array_equal(got, indices)
    np.testing.assert_array_equal(got[0, 0, 2], [0, 1, 2, 3])  # a row without block 4 is untouched
