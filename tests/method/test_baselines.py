"""The static spatio-temporal window baseline against a brute-force NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dfsattn_jax import baselines
from dfsattn_jax.layout import blocks_for_density


def _brute_force(grid, perm, block_size, density, decay=2.0):
    """float64 pair costs and closeness by the definition, threshold by sorting all L² pairs."""
    f, h, w = grid
    length = f * h * w
    coords = np.array([(r // (h * w), (r // w) % h, r % w) for r in perm], np.int64)
    d = np.abs(coords[:, None, :] - coords[None, :, :])
    band = np.vectorize(lambda x: int(x).bit_length())(d[..., 0])
    theta = (1.0 + np.sqrt(d[..., 1] ** 2 + d[..., 2] ** 2)) * decay ** band.astype(np.float64)
    near = 1.0 / (1.0 + np.sqrt(np.sum(d**2, axis=-1)))
    keep = math.ceil(density * length * length - 1e-9 * length * length)
    threshold = np.sort(theta.ravel())[max(keep, 1) - 1]
    nb = -(-length // block_size)
    counts = np.zeros((nb, nb), np.int64)
    closeness = np.zeros((nb, nb))
    for u in range(nb):
        for v in range(nb):
            block = theta[u * block_size : (u + 1) * block_size, v * block_size : (v + 1) * block_size]
            counts[u, v] = np.sum(block <= threshold * (1 + 1e-6))
            closeness[u, v] = np.mean(near[u * block_size : (u + 1) * block_size, v * block_size : (v + 1) * block_size])
    return counts, closeness, threshold


@pytest.mark.parametrize("grid,block_size,density", [((4, 4, 6), 16, 0.3), ((5, 3, 7), 16, 0.15), ((3, 5, 5), 8, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_stats_match_brute_force(grid, block_size, density, seed):
    rng = np.random.default_rng(seed)
    length = int(np.prod(grid))
    perm = rng.permutation(length)
    stats = baselines.static_window_stats(grid, perm, block_size=block_size, density=density)
    counts, closeness, threshold = _brute_force(grid, perm, block_size, density)
    np.testing.assert_allclose(stats.threshold, threshold, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.counts), counts)
    # float32 reciprocals and sums of ≤ 256 terms: relative error well below 1e-5.
    np.testing.assert_allclose(np.asarray(stats.closeness), closeness, rtol=1e-5)
    assert counts.sum() >= density * length * length  # the token window holds at least ρ of the pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_keeps_dfs_count_and_best_blocks(seed):
    rng = np.random.default_rng(seed)
    grid = (4, 6, 8)
    perm = rng.permutation(int(np.prod(grid)))
    density = float(rng.uniform(0.15, 0.6))
    layout = baselines.static_window_layout(grid, perm, block_size=16, density=density, batch=2, heads=3)
    stats = baselines.static_window_stats(grid, perm, block_size=16, density=density)
    nk = 12
    k = blocks_for_density(density, nk)
    assert layout.kv_indices.shape == (2, 3, nk, k)
    assert layout.num_key_blocks == nk
    np.testing.assert_array_equal(np.asarray(layout.kv_counts), np.full((2, 3, nk), k))
    counts = np.asarray(stats.counts)
    closeness = np.asarray(stats.closeness)
    mask = np.asarray(layout.to_dense_mask())
    for u in range(nk):
        ranked = sorted(range(nk), key=lambda v: (-counts[u, v], -closeness[u, v], v))
        expected = np.zeros(nk, bool)
        expected[ranked[:k]] = True
        np.testing.assert_array_equal(mask[0, 0, u], expected)
    assert np.all(mask == mask[:1, :1])  # static: the same for every batch element and head


def test_frames_as_blocks_select_nearest_frames():
    # Raster order with one frame per block: the window favours the temporally nearest frames.
    grid = (8, 4, 4)
    perm = np.arange(128)
    for density in (0.25, 0.375, 0.5):
        layout = baselines.static_window_layout(grid, perm, block_size=16, density=density)
        mask = np.asarray(layout.to_dense_mask())[0, 0]
        for u in range(8):
            dist = np.abs(np.arange(8) - u)
            assert mask[u, u]
            assert dist[mask[u]].max() <= dist[~mask[u]].min()


def test_window_shrinks_with_temporal_distance():
    # At a fixed threshold the admitted spatial radius halves with each temporal band.
    grid = (9, 16, 16)
    length = 9 * 16 * 16
    perm = np.arange(length)
    stats = baselines.static_window_stats(grid, perm, block_size=256, density=0.2)  # one frame per block
    counts = np.asarray(stats.counts)
    row = counts[0]
    assert row[0] > row[1] > row[2] >= row[3] > row[4]  # frames at distance 0, 1, 2-3, 4-7
    assert row[2] == row[3] and row[4] == row[7]  # equal within a band


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_permutation_equivariance(seed):
    rng = np.random.default_rng(seed)
    grid = (4, 4, 8)
    block = 16
    perm = rng.permutation(128)
    sigma = rng.permutation(8)
    perm2 = perm.reshape(8, block)[sigma].ravel()
    s1 = baselines.static_window_stats(grid, perm, block_size=block, density=0.3)
    s2 = baselines.static_window_stats(grid, perm2, block_size=block, density=0.3)
    np.testing.assert_array_equal(np.asarray(s2.counts), np.asarray(s1.counts)[np.ix_(sigma, sigma)])


@pytest.mark.parametrize("seed", [0, 1])
def test_partial_last_block_and_capacity(seed):
    grid = (3, 5, 7)  # 105 tokens: 7 blocks of 16, the last one holding 9
    perm = np.random.default_rng(seed).permutation(105)
    layout = baselines.static_window_layout(grid, perm, block_size=16, density=0.3, max_blocks=5)
    assert layout.kv_indices.shape == (1, 1, 7, 5)
    np.testing.assert_array_equal(np.asarray(layout.kv_counts), np.full((1, 1, 7), blocks_for_density(0.3, 7)))
    stats = baselines.static_window_stats(grid, perm, block_size=16, density=0.3)
    counts = np.asarray(stats.counts)
    assert counts[:, 6].max() <= 16 * 9 and counts[6].max() <= 9 * 16
    full = baselines.static_window_layout(grid, perm, block_size=16, density=1.0)
    assert bool(np.asarray(full.to_dense_mask()).all())


def test_bad_inputs():
    perm = np.arange(32)
    with pytest.raises(ValueError, match="grid"):
        baselines.static_window_layout((2, 4), perm, block_size=8, density=0.5)
    with pytest.raises(ValueError, match="perm"):
        baselines.static_window_layout((2, 4, 4), perm[:-1], block_size=8, density=0.5)
    with pytest.raises(ValueError, match="permutation"):
        baselines.static_window_layout((2, 4, 4), np.zeros(32, int), block_size=8, density=0.5)
    with pytest.raises(ValueError, match="density"):
        baselines.static_window_layout((2, 4, 4), perm, block_size=8, density=0.0)
    with pytest.raises(ValueError, match="block_size"):
        baselines.static_window_layout((2, 4, 4), perm, block_size=0, density=0.5)
    with pytest.raises(ValueError, match="decay"):
        baselines.static_window_layout((2, 4, 4), perm, block_size=8, density=0.5, decay=0.5)
