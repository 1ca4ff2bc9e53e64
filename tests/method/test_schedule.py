"""The step schedule (docs/spec.md §6), with expected plans worked out by hand from the rule."""

import numpy as np
import pytest

from dfsattn_jax.schedule import DFSConfig, plan_schedule, reported_sparsity


def test_default_config():
    config = DFSConfig()
    assert (config.density, config.density_decrement, config.dense_steps, config.refresh_interval) == (0.3, 0.1, 12, 12)
    assert (config.tile_size, config.block_size, config.order, config.dense_layers) == (16, 128, "hilbert3d", (0,))
    with pytest.raises(AttributeError):
        config.density = 0.5  # frozen


def test_default_plan_over_50_steps():
    plan = plan_schedule(DFSConfig(), 50, 591)
    # last usable interval: ceil(0.3 / 0.1) - 1 = 2 -> intervals 0, 1, 2 refresh (steps 12, 24, 36).
    expected_density = np.array([1.0] * 12 + [0.3] * 12 + [0.2] * 12 + [0.1] * 14)
    expected_blocks = np.array([591] * 12 + [177] * 12 + [118] * 12 + [59] * 14)
    np.testing.assert_array_equal(plan.sparse, np.arange(50) >= 12)
    assert plan.refresh_steps == (12, 24, 36)
    assert not plan.refresh[48]
    np.testing.assert_allclose(plan.density, expected_density, rtol=1e-12)
    np.testing.assert_array_equal(plan.num_blocks, expected_blocks)
    assert plan.num_blocks.dtype == np.int32 and plan.density.dtype == np.float64
    assert plan.max_blocks == 177 and plan.num_key_blocks == 591 and plan.num_steps == 50


def test_default_plan_over_20_steps():
    plan = plan_schedule(DFSConfig(), 20, 591)
    np.testing.assert_array_equal(plan.sparse, np.arange(20) >= 12)
    assert plan.refresh_steps == (12,)
    np.testing.assert_array_equal(plan.num_blocks, [591] * 12 + [177] * 8)
    assert plan.max_blocks == 177


def test_default_plan_over_4_steps_is_dense():
    plan = plan_schedule(DFSConfig(), 4, 591)
    assert not plan.sparse.any() and not plan.refresh.any()
    np.testing.assert_array_equal(plan.num_blocks, [591] * 4)
    np.testing.assert_array_equal(plan.density, [1.0] * 4)
    assert plan.max_blocks == 0


def test_short_plan_over_4_steps():
    plan = plan_schedule(DFSConfig(dense_steps=1, refresh_interval=1), 4, 591)
    np.testing.assert_array_equal(plan.sparse, [False, True, True, True])
    assert plan.refresh_steps == (1, 2, 3)
    np.testing.assert_array_equal(plan.num_blocks, [591, 177, 118, 59])
    assert plan.max_blocks == 177


def test_zero_decrement_refreshes_forever():
    plan = plan_schedule(DFSConfig(density_decrement=0.0), 50, 591)
    assert plan.refresh_steps == (12, 24, 36, 48)
    np.testing.assert_array_equal(plan.num_blocks, [591] * 12 + [177] * 38)


def test_large_decrement_stops_early():
    # ceil(0.3 / 0.25) - 1 = 1: refreshes at 12 (0.3) and 24 (0.05 -> int(29.55) = 29 blocks).
    plan = plan_schedule(DFSConfig(density_decrement=0.25), 50, 591)
    assert plan.refresh_steps == (12, 24)
    np.testing.assert_array_equal(plan.num_blocks, [591] * 12 + [177] * 12 + [29] * 26)


def test_tiny_problem_keeps_at_least_one_block():
    plan = plan_schedule(DFSConfig(), 50, 4)  # int(0.3*4)=1, int(0.2*4)=0 -> 1, int(0.1*4)=0 -> 1
    np.testing.assert_array_equal(plan.num_blocks, [4] * 12 + [1] * 38)


def test_reported_sparsity():
    plan = plan_schedule(DFSConfig(), 50, 591)
    per_step = [1 - 177 / 591] * 12 + [1 - 118 / 591] * 12 + [1 - 59 / 591] * 14
    assert reported_sparsity(plan, 30, (0,)) == pytest.approx(np.mean(per_step) * 29 / 30, rel=1e-12)
    assert reported_sparsity(plan_schedule(DFSConfig(), 4, 591), 30) == 0.0


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(density_decrement=-0.1), "density_decrement"),
        (dict(density_decrement=float("nan")), "density_decrement"),
        (dict(dense_steps=-1), "dense_steps"),
        (dict(refresh_interval=0), "refresh_interval"),
        (dict(tile_size=48), "tile_size"),
        (dict(block_size=0), "block_size"),
        (dict(order="zigzag"), "order"),
        (dict(dense_layers=(-1,)), "dense_layers"),
        (dict(dense_layers=3), "dense_layers"),
    ],
)
def test_bad_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DFSConfig(**kwargs)


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        plan_schedule(DFSConfig(), 0, 10)
    with pytest.raises(ValueError, match="num_key_blocks"):
        plan_schedule(DFSConfig(), 10, 0)
    with pytest.raises(ValueError, match="config"):
        plan_schedule({"density": 0.3}, 10, 10)
