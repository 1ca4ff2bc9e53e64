"""The quality harness's variants (models/evaluation/quality_variants.py): the benchmark's list,
their plans and the selection by name, pattern or group."""

from __future__ import annotations

import numpy as np
import pytest

from dfsattn_jax.orders import token_order
from dfsattn_jax.schedule import DFSConfig, default_schedule, plan_schedule
from models.evaluation import quality_variants as V
from models.evaluation.clips import clip_classes


def test_schedules_and_variants():
    assert default_schedule(50) == DFSConfig()
    short = default_schedule(20)
    assert (short.dense_steps, short.refresh_interval) == (5, 5)
    assert plan_schedule(short, 20, 100).refresh_steps == (5, 10, 15)
    fixed = V.fixed_density(DFSConfig(), 0.05)
    plan = plan_schedule(fixed, 50, 128)
    assert plan.refresh_steps == (12, 24, 36, 48) and set(plan.num_blocks[plan.sparse]) == {6}
    variants = V.default_variants()
    names = [v.name for v in variants]
    assert len(names) == len(set(names)) and names[0] == "dense" and not variants[0].sparse
    groups = {g: sum(v.group == g for v in variants) for g in ("order", "tile", "window", "random", "oracle", "refresh")}
    assert groups == {"order": 25, "tile": 6, "window": 5, "random": 5, "oracle": 2, "refresh": 1}
    assert {v.scoring for v in variants if v.group == "random"} == {V.SCORING_RANDOM}
    assert [v.name for v in variants if v.group == "oracle"] == ["oracle-hilbert3d/d=0.2", "oracle-hilbert3d/default"]
    assert {v.tile_size for v in variants if v.group == "tile"} == {128, 8, 32}
    assert V.variant_plan(variants[0], 50, 128, DFSConfig()) is None
    with pytest.raises(ValueError, match="order"):
        V.Variant("x", "order", order="spiral")
    with pytest.raises(ValueError, match="scoring must be one of"):
        V.Variant("x", "order", scoring="exact")
    with pytest.raises(ValueError, match="density"):
        V.Variant("x", "order", density=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        clip_classes(0)
    photo, motion = clip_classes(8)
    assert len(set(photo)) == 8 and len(set(motion)) == 5


def test_select_variants_by_name_pattern_and_group():
    variants = V.default_variants(orders=("raster", "hilbert3d"), densities=(0.2,), other_tiles=(32,),
                                  tile_densities=(None,), oracle_densities=(None,))  # fmt: skip
    assert V.select_variants(variants, None) == list(variants)
    names = lambda selected: [v.name for v in selected]  # noqa: E731
    assert names(V.select_variants(variants, "raster/*")) == ["dense", "raster/d=0.2", "raster/default"]
    assert names(V.select_variants(variants, "group:oracle, hilbert3d/d=0.2")) == [
        "dense", "hilbert3d/d=0.2", "oracle-hilbert3d/default"]  # canonical order, dense always first
    assert names(V.select_variants(variants, "group:window")) == ["dense", "window-hilbert3d/d=0.2", "window-hilbert3d/default"]
    assert {v.group for v in variants} == set(V.VARIANT_GROUPS)
    with pytest.raises(ValueError, match=r"\['spiral/\*', 'group:tiles'\] match no variant"):
        V.select_variants(variants, "raster/*,spiral/*,group:tiles")


def test_window_step_scores_hold_the_window_at_sparse_steps():
    grid, block = (2, 8, 8), 16  # 128 tokens = 8 key blocks
    plan = plan_schedule(V.fixed_density(DFSConfig(block_size=block, tile_size=8, dense_steps=2, refresh_interval=2), 0.25), 6, 8)
    perm = np.asarray(token_order("hilbert3d", grid), np.int32)
    cache: dict = {}
    scores = V.window_step_scores(grid, perm, plan, 8, block_size=block, cache=cache)
    assert scores.shape == (8, 8, 8) and scores.dtype == np.float32
    assert not scores[~np.pad(plan.sparse, (0, 2))].any()  # dense and padded steps hold zeros
    sparse = np.flatnonzero(plan.sparse)
    assert len(sparse) == 4 and len(cache) == 1  # one density: computed once
    for step in sparse[1:]:
        np.testing.assert_array_equal(scores[step], scores[sparse[0]])
    assert scores[sparse[0]].any()
    np.testing.assert_array_equal(V.window_step_scores(grid, perm, plan, 8, block_size=block), scores)  # without a cache
