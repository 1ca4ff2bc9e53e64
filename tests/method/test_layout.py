"""Block layouts (docs/spec.md §3.5, §4): exact top-k selection, dense masks, traced counts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfsattn_jax.layout import (
    BlockLayout,
    blocks_for_density,
    check_density,
    check_layout,
    full_layout,
    select_blocks,
)


def random_scores(seed, shape=(2, 3, 5, 9)):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def numpy_mask(indices, counts, num_key_blocks):
    indices, counts = np.asarray(indices), np.asarray(counts)
    mask = np.zeros(indices.shape[:-1] + (num_key_blocks,), dtype=bool)
    for row in np.ndindex(*indices.shape[:-1]):
        mask[row + (indices[row][: counts[row]],)] = True
    return mask


def test_blocks_for_density_follows_the_reference_rule():
    assert [blocks_for_density(d, 591) for d in (0.3, 0.2, 0.1)] == [177, 118, 59]
    for density, nk in [(0.5, 7), (0.25, 16), (1.0, 5), (0.01, 10), (0.7, 3)]:
        assert blocks_for_density(density, nk) == max(1, int(density * nk))
    assert blocks_for_density(1e-6, 591) == 1


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), "dense", None])
def test_density_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match="density"):
        check_density(bad)
    with pytest.raises(ValueError, match="density"):
        blocks_for_density(bad, 10)


@pytest.mark.parametrize("num_blocks", [1, 3, 9])
def test_select_blocks_keeps_exact_top_k(num_blocks):
    scores = random_scores(num_blocks)
    layout = select_blocks(scores, num_blocks)
    assert layout.kv_indices.dtype == jnp.int32 and layout.kv_counts.dtype == jnp.int32
    assert layout.max_blocks == num_blocks and layout.num_key_blocks == 9
    s = np.asarray(scores)
    mask = np.asarray(layout.to_dense_mask())
    for row in np.ndindex(*s.shape[:-1]):
        expected = set(np.argsort(-s[row], kind="stable")[:num_blocks].tolist())
        assert set(np.flatnonzero(mask[row]).tolist()) == expected
        if num_blocks < 9:
            assert s[row][mask[row]].min() > s[row][~mask[row]].max()
    np.testing.assert_allclose(float(layout.density()), num_blocks / 9, rtol=1e-6)


def test_select_blocks_filler_is_next_best_and_ignored():
    """The top-2 blocks come first, ascending (docs/spec.md §4); the next-best 3 fill the row, ascending."""
    scores = random_scores(10)
    layout = select_blocks(scores, 2, max_blocks=5)
    assert layout.max_blocks == 5
    np.testing.assert_array_equal(np.asarray(layout.kv_counts), 2)
    order = np.argsort(-np.asarray(scores), axis=-1, kind="stable")[..., :5]
    expected = np.concatenate([np.sort(order[..., :2], axis=-1), np.sort(order[..., 2:], axis=-1)], axis=-1)
    np.testing.assert_array_equal(np.asarray(layout.kv_indices), expected)
    np.testing.assert_array_equal(np.asarray(layout.to_dense_mask()), numpy_mask(order, layout.kv_counts, 9))


def test_select_blocks_traced_count_does_not_retrace():
    traces = []

    @jax.jit
    def select(scores, num_blocks):
        traces.append(1)
        layout = select_blocks(scores, num_blocks, max_blocks=6)
        return layout.to_dense_mask(), layout.kv_counts

    scores = random_scores(11)
    for count in (1, 2, 4, 6):
        mask, counts = select(scores, jnp.int32(count))
        np.testing.assert_array_equal(np.asarray(counts), count)
        np.testing.assert_array_equal(np.asarray(mask), np.asarray(select_blocks(scores, count).to_dense_mask()))
    assert len(traces) == 1


def test_to_dense_mask_with_varying_counts():
    rng = np.random.default_rng(0)
    nk, kmax = 11, 6
    indices = np.stack([rng.permutation(nk)[:kmax] for _ in range(2 * 3 * 4)]).reshape(2, 3, 4, kmax)
    counts = rng.integers(1, kmax + 1, size=(2, 3, 4))
    layout = BlockLayout(jnp.asarray(indices, jnp.int32), jnp.asarray(counts, jnp.int32), nk)
    np.testing.assert_array_equal(np.asarray(layout.to_dense_mask()), numpy_mask(indices, counts, nk))
    np.testing.assert_allclose(float(layout.density()), counts.mean() / nk, rtol=1e-6)


def test_full_layout_and_pytree():
    layout = full_layout(2, 3, 4, 5)
    assert bool(jnp.all(layout.to_dense_mask()))
    assert layout.to_dense_mask().shape == (2, 3, 4, 5)
    assert len(jax.tree.leaves(layout)) == 2
    doubled = jax.jit(lambda lay: jax.tree.map(lambda x: x, lay))(layout)
    assert isinstance(doubled, BlockLayout) and doubled.num_key_blocks == 5
    chex.assert_trees_all_equal(doubled, layout)


def test_select_blocks_bad_inputs():
    scores = random_scores(12)
    with pytest.raises(ValueError, match="num_blocks"):
        select_blocks(scores, 5, max_blocks=4)
    with pytest.raises(ValueError, match="num_blocks"):
        select_blocks(scores, jnp.int32(7), max_blocks=6)
    with pytest.raises(ValueError, match="num_blocks"):
        select_blocks(scores, 0)
    with pytest.raises(ValueError, match="num_blocks"):
        select_blocks(scores, 2.0)
    with pytest.raises(ValueError, match="max_blocks"):
        select_blocks(scores, 3, max_blocks=10)
    with pytest.raises(ValueError, match="max_blocks"):
        jax.jit(lambda s, n: select_blocks(s, n).kv_counts)(scores, jnp.int32(2))
    with pytest.raises(ValueError, match="scores"):
        select_blocks(scores[0], 2)
    with pytest.raises(ValueError, match="scores"):
        select_blocks(jnp.ones((1, 1, 2, 3), jnp.int32), 2)


def test_check_layout():
    layout = full_layout(2, 3, 4, 4)
    check_layout(layout, batch=2, heads=3, num_blocks=4)
    with pytest.raises(ValueError, match="layout"):
        check_layout(layout, batch=1, heads=3, num_blocks=4)
    with pytest.raises(ValueError, match="layout"):
        check_layout(layout, batch=2, heads=3, num_blocks=5)
    with pytest.raises(TypeError, match="layout must be a BlockLayout"):
        check_layout(np.zeros((2, 3, 4, 4)), batch=2, heads=3, num_blocks=4)
