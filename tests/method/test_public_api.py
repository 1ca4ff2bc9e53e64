"""The README's API example, run as written over a few fixed seeds (CPU: the XLA implementation; a GPU:
the default kernel, against a dense reference without TF32)."""

import jax
import pytest

import dfsattn_jax
from dfsattn_jax import (attention_error, block_scores, block_sparse_attention, blocks_for_density,
                         inverse_permutation, layout_recall, select_blocks, token_order)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_readme_example_round_trip(seed):
    grid = (4, 8, 16)
    perm = token_order("hilbert3d", grid)
    keys = jax.random.split(jax.random.key(seed), 3)
    raster = [jax.random.normal(key, (1, 512, 2, 64)) for key in keys]
    q, k, v = (x[:, perm] for x in raster)
    scores = block_scores(q, k)
    layout = select_blocks(scores, blocks_for_density(0.5, scores.shape[-1]))
    out = block_sparse_attention(q, k, v, layout)[:, inverse_permutation(perm)]
    assert out.shape == (1, 512, 2, 64)
    # Every block kept: the round trip through the order equals dense attention in raster order.
    full = select_blocks(scores, scores.shape[-1])
    out_full = block_sparse_attention(q, k, v, full)[:, inverse_permutation(perm)]
    with jax.default_matmul_precision("highest"):  # no TF32 in the XLA reference on a GPU
        dense = jax.nn.dot_product_attention(*raster, implementation="xla")
    assert float(attention_error(out_full, dense)) < 1e-5
    assert 0.0 < float(layout_recall(q, k, layout).mean()) < 1.0
    assert set(dfsattn_jax.__all__) >= {"block_sparse_attention", "dense_attention", "token_order"}
