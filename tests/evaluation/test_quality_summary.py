"""One quality-harness run as a JSON record (models/evaluation/quality_summary.py): the number rules
(NaN and infinities in JSON), the per-variant record and the dense reference's fingerprint."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from dfsattn_jax.metrics import DISTANCE_CLASS_NAMES
from dfsattn_jax.schedule import DFSConfig, plan_schedule, reported_sparsity
from models.evaluation.quality import RunOutput
from models.evaluation.quality_summary import (
    as_float,
    as_matrix,
    fingerprint,
    finite_or_str,
    nanmean,
    rounded,
    same_fingerprint,
    summarize,
)
from models.evaluation.quality_variants import Variant


def test_numbers_survive_json():
    assert finite_or_str(1.25) == 1.25 and finite_or_str(np.float32(2.0)) == 2.0
    assert finite_or_str(float("nan")) is None
    assert finite_or_str(float("inf")) == "inf" and finite_or_str(-np.inf) == "-inf"
    table = rounded(np.array([[0.123456789, np.nan], [np.inf, -1.0]]), 3)
    assert table == [[0.123, None], ["inf", -1.0]]
    assert json.loads(json.dumps(table)) == table  # plain JSON, no NaN token
    assert rounded(np.float64(0.5)) == 0.5
    assert [as_float(x) for x in (1, 2.5)] == [1.0, 2.5] and np.isnan(as_float(None)) and np.isnan(as_float("inf"))
    back = as_matrix(table)
    assert back.dtype == np.float64 and back.shape == (2, 2)
    np.testing.assert_array_equal(back, [[0.123, np.nan], [np.nan, -1.0]])


def test_nanmean_ignores_nan_and_keeps_empty_cells_nan():
    a = np.array([[1.0, np.nan, np.nan], [3.0, 2.0, np.nan]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" warning
        per_column = nanmean(a, axis=0)
        np.testing.assert_array_equal(per_column, [2.0, 2.0, np.nan])
        assert float(nanmean(a)) == pytest.approx(2.0)
        assert np.isnan(nanmean(np.full(3, np.nan)))


def test_fingerprint_tells_runs_apart():
    rng = np.random.default_rng(11)
    latents = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    fp = fingerprint(latents)
    x = latents.astype(np.float64).reshape(3, -1)
    np.testing.assert_allclose(fp, np.stack([x.sum(1), (x**2).sum(1)], 1), rtol=1e-12)
    assert json.loads(json.dumps(fp)) == fp
    assert same_fingerprint(fingerprint(latents * (1 + 1e-6)), fp)  # rounding between calls
    assert not same_fingerprint(fingerprint(latents + 0.01), fp)
    assert not same_fingerprint(fp[:2], fp)  # another batch


def _run_output(plan, rng, steps=6, layers=3, heads=2) -> RunOutput:
    classes = len(DISTANCE_CLASS_NAMES)
    measured = np.ones(steps, bool)
    measured[1] = False

    def probe(*shape):
        x = rng.uniform(0.2, 0.9, size=(steps, layers, *shape)).astype(np.float32)
        x[~measured] = np.nan
        return x

    return RunOutput(
        latents=rng.normal(size=(2, 3, 2, 4, 4)).astype(np.float32), recall=probe(), error=probe(),
        head_recall=probe(heads), top_mass=probe(heads), mass_by_class=probe(classes),
        missed_by_class=probe(classes), skipped=np.where(plan.sparse, 0.5, 0.0).astype(np.float32) if plan else np.zeros(steps),
        refreshed=plan.refresh.astype(np.int32) * 2 if plan else np.zeros(steps, np.int32), cache=None, plan=plan,
        time_s=1.5, measured=measured,
    )  # fmt: skip


def test_summarize_a_sparse_and_the_dense_run():
    rng = np.random.default_rng(5)
    config = DFSConfig(block_size=32, tile_size=8, density=0.5, density_decrement=0.0, dense_steps=2,
                       refresh_interval=2, dense_layers=(0,))  # fmt: skip
    plan = plan_schedule(config, 6, 4)
    out = _run_output(plan, rng)
    dense_latents = out.latents + 0.1
    scores = {"psnr": np.array([30.0, np.inf]), "ssim": np.array([0.9, 1.0])}
    v = Variant("hilbert3d/d=0.5", "order", density=0.5)
    rec = summarize(v, out, scores, dense_latents, (1, 2), 3, (0,))
    assert json.loads(json.dumps(rec, allow_nan=False)) == rec
    assert rec["name"] == v.name and rec["schedule"] == "0.5" and rec["psnr"] == [30.0, "inf"]
    assert rec["psnr_mean"] == "inf" and rec["ssim_min"] == 0.9 and rec["measured_steps"] == [0, 2, 3, 4, 5]
    sparse = plan.sparse
    assert rec["recall_mean"] == pytest.approx(float(np.nanmean(out.recall[sparse][:, [1, 2]])))
    assert rec["attn_error_mean"] == pytest.approx(float(np.nanmean(out.error[sparse][:, [1, 2]])))
    np.testing.assert_allclose(rec["recall_per_layer"], np.nanmean(out.recall[sparse], axis=0), atol=1e-5)
    np.testing.assert_allclose(rec["top_mass_dense_steps_per_layer"], np.nanmean(out.top_mass[~sparse], axis=(0, 2)), atol=1e-5)
    assert np.array(rec["missed_by_class_per_layer"]).shape == (3, len(DISTANCE_CLASS_NAMES))
    assert rec["recall_per_step_layer"][1] == [None, None, None]  # the unmeasured step
    assert rec["sparse_steps"] == 4 and rec["refresh_steps"] == list(plan.refresh_steps) and rec["num_refreshes"] == 2
    assert rec["sparsity"] == pytest.approx(0.5) and rec["mean_density"] == pytest.approx(0.5)
    assert rec["planned_sparsity"] == pytest.approx(reported_sparsity(plan, 3, (0,)))
    expected_error = np.linalg.norm(out.latents - dense_latents) / np.linalg.norm(dense_latents)
    assert rec["latent_rel_error"] == pytest.approx(expected_error, rel=1e-6)
    dense = summarize(Variant("dense", "dense", sparse=False, order="raster"), _run_output(None, rng),
                      {"psnr": np.array([np.inf, np.inf]), "ssim": np.ones(2)}, dense_latents, (1, 2), 3, (0,))  # fmt: skip
    assert dense["schedule"] == "dense" and dense["sparsity"] == 0.0 and dense["recall_mean"] == 1.0
    assert dense["attn_error_mean"] is None and dense["num_refreshes"] == 0 and "recall_per_layer" not in dense
