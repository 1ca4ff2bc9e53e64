"""The quality harness (models/evaluation/quality.py) and a short run of benchmarks/quality_bench.py, on CPU.

One small random model of the smoke size (2 layers, 4×8×8 = 256 tokens, 8 blocks of 32) and one
compiled :class:`QualityRunner` serve most tests (module fixture), so the file compiles the
instrumented sampling loop once.
"""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfsattn_jax.baselines import static_window_layout
from dfsattn_jax.layout import BlockLayout, select_blocks
from dfsattn_jax.metrics import attention_error, layout_recall
from dfsattn_jax.reference import reference_block_sparse_attention
from dfsattn_jax.schedule import DFSConfig, plan_schedule, reported_sparsity
from dfsattn_jax.metrics import sampled_row_stats
from dfsattn_jax.schedule import default_schedule
from models.evaluation.clips import clip_classes
from models.evaluation.codec import latents_to_video
from benchmarks import quality_bench as bench
from models.evaluation import quality as Q
from models.evaluation import quality_variants as V
from models.evaluation.quality_compare import fidelity_budget
from models.evaluation.media import plot_sample_grid, sample_grid_figure, write_side_by_side_gif
from models.evaluation.results import device_slug
from models.common.processor import AttentionBackend
from models.evaluation.small_dit import SMOKE_DIT_CONFIG, ClipConditioner
from models.sampling.loop import Sampler
from models.wan.transformer import WanTransformer3DModel

CONFIG = SMOKE_DIT_CONFIG  # latent [3, 4, 16, 16] -> token grid (4, 8, 8)
SMOKE_HEADS = CONFIG.wan.num_heads
BLOCK, TILE = 32, 8
STEPS = 8
NK = math.prod(CONFIG.token_grid) // BLOCK  # 8 key blocks
BASE = default_schedule(STEPS, DFSConfig(block_size=BLOCK, tile_size=TILE))  # dense 0-1, refresh 2, 4, 6


@pytest.fixture(scope="module")
def setup():
    seed = int(np.random.default_rng(0).integers(2**31 - 2))
    model = WanTransformer3DModel(CONFIG.wan, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)
    conditioner = ClipConditioner(CONFIG.tokens_per_field, CONFIG.wan.text_dim, rngs=nnx.Rngs(seed + 1))
    runner = Q.QualityRunner(
        model, CONFIG.latent_shape, block_size=BLOCK, tile_sizes=(TILE, BLOCK), max_blocks=NK,
        num_query_samples=10**6, shift=CONFIG.sample_shift,
    )  # fmt: skip
    photo, motion = clip_classes(2)
    noise = jax.random.normal(jax.random.key(seed), (2,) + CONFIG.latent_shape, jnp.float32)
    text = conditioner(jnp.asarray(photo), jnp.asarray(motion))
    negative = conditioner.unconditional(2)
    dense = runner(noise, text, negative, num_steps=STEPS, plan=None, guidance_scale=CONFIG.guidance_scale)
    return dict(model=model, runner=runner, noise=noise, text=text, negative=negative, dense=dense)


def _run(setup, plan, **kwargs):
    s = setup
    return s["runner"](s["noise"], s["text"], s["negative"], num_steps=STEPS, plan=plan,
                       guidance_scale=CONFIG.guidance_scale, **kwargs)  # fmt: skip


def _video(latents):
    return latents_to_video(latents, CONFIG.codec)


def test_runner_reproduces_the_sampler(setup):
    """Same weights, noise and plan: the instrumented loop equals models.sampling.loop.Sampler (float32)."""
    s = setup
    dense = Sampler(s["model"], "dense", shift=CONFIG.sample_shift, progress=False)(
        s["noise"], s["text"], s["negative"], num_steps=STEPS, guidance_scale=CONFIG.guidance_scale
    )
    chex.assert_trees_all_close(s["dense"].latents, np.asarray(dense.latents), rtol=1e-5, atol=1e-5)
    sampler = Sampler(s["model"], AttentionBackend("dfs", BASE), shift=CONFIG.sample_shift, progress=False)
    dfs = sampler(s["noise"], s["text"], s["negative"], num_steps=STEPS, guidance_scale=CONFIG.guidance_scale)
    plan = plan_schedule(BASE, STEPS, NK)
    ours = _run(s, plan, order="hilbert3d", scoring=0)
    chex.assert_trees_all_close(ours.latents, np.asarray(dfs.latents), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours.refreshed, dfs.refreshed)
    np.testing.assert_allclose(ours.skipped, dfs.skipped, rtol=1e-6)
    assert ours.sparsity == pytest.approx(dfs.sparsity)
    assert not np.allclose(ours.latents, s["dense"].latents, atol=1e-3)  # sparsity changed something


def test_density_one_equals_dense(setup):
    plan = plan_schedule(V.fixed_density(BASE, 1.0), STEPS, NK)
    assert plan.sparse.sum() == STEPS - BASE.dense_steps and (plan.num_blocks == NK).all()
    out = _run(setup, plan, order="raster", scoring=0)
    scores = Q.video_scores(_video(out.latents), _video(setup["dense"].latents))
    assert np.isinf(scores["psnr"]).all() and (scores["psnr"] > 0).all()
    np.testing.assert_allclose(scores["ssim"], 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.recall, 1.0, atol=1e-5)  # float32 sums of 256 probabilities
    assert (out.error < 1e-5).all()  # float32 rounding only
    assert out.sparsity == 0.0


def test_recall_error_and_sparsity_are_sane(setup):
    runner = setup["runner"]
    plan = plan_schedule(BASE, STEPS, NK)
    out = _run(setup, plan, order="hilbert3d", scoring=0)
    assert out.recall.shape == out.error.shape == (STEPS, CONFIG.wan.num_layers)
    assert ((out.recall >= 0) & (out.recall <= 1 + 1e-5)).all() and (out.error >= 0).all()
    dense_cells = np.zeros_like(out.recall, bool)
    dense_cells[~plan.sparse] = True
    dense_cells[:, list(BASE.dense_layers)] = True
    np.testing.assert_allclose(out.recall[dense_cells], 1.0, atol=1e-5)
    assert (out.error[dense_cells] < 1e-5).all()
    sparse_cells = out.recall[plan.sparse][:, list(runner.sparse_layers)]
    assert (sparse_cells < 1.0 - 1e-4).all() and (out.error[plan.sparse][:, list(runner.sparse_layers)] > 1e-4).all()
    assert out.sparsity == pytest.approx(reported_sparsity(plan, CONFIG.wan.num_layers, BASE.dense_layers))
    assert out.refresh_steps == plan.refresh_steps
    scores = Q.video_scores(_video(out.latents), _video(setup["dense"].latents))
    assert np.isfinite(scores["psnr"]).all() and (scores["psnr"] > 10).all()
    assert ((scores["ssim"] > 0) & (scores["ssim"] < 1)).all()


def test_refresh_every_step_plan_refreshes_at_every_sparse_step(setup):
    plan = plan_schedule(V.fixed_density(BASE, 0.25), STEPS, NK)
    every = V.refresh_every_step(plan)
    np.testing.assert_array_equal(every.refresh, plan.sparse)
    np.testing.assert_array_equal(every.num_blocks, plan.num_blocks)
    assert plan.refresh.sum() < every.refresh.sum()
    out = _run(setup, every, order="hilbert3d", scoring=0)
    num_sparse = len(setup["runner"].sparse_layers)
    np.testing.assert_array_equal(out.refreshed, np.where(plan.sparse, num_sparse, 0))
    measured = _run(setup, every, order="hilbert3d", scoring=0, measure=False)
    np.testing.assert_array_equal(measured.latents, out.latents)  # measuring does not perturb sampling
    assert np.isnan(measured.recall).all() and np.isnan(measured.error).all()


def test_one_program_serves_every_variant(setup):
    runner = setup["runner"]
    grid = CONFIG.token_grid
    before = runner.trace_count
    variants = [
        V.Variant("a", "order", order="raster", density=0.25),
        V.Variant("b", "order", order="morton3d"),
        V.Variant("c", "tile", order="hilbert3d", tile_size=BLOCK),
        V.Variant("d", "window", order="hilbert3d", scoring=V.SCORING_WINDOW, density=0.25),
    ]
    for v in variants:
        plan = V.variant_plan(v, STEPS, NK, BASE)
        static = None
        if v.scoring == V.SCORING_WINDOW:
            perm, _ = runner.order_arrays(v.order)
            static = V.window_step_scores(grid, perm, plan, runner.capacity(STEPS), block_size=BLOCK)
        out = _run(setup, plan, order=v.order, scoring=runner.scoring_index(v, TILE), static_scores=static)
        assert np.isfinite(out.latents).all()
        if v.scoring == V.SCORING_WINDOW:  # the cached layout is the static window's
            expected = static_window_layout(grid, perm, block_size=BLOCK, density=0.25, batch=4, heads=CONFIG.wan.num_heads)
            for slot in range(len(runner.sparse_layers)):
                layout = BlockLayout(jnp.asarray(out.cache.kv_indices[slot]), jnp.asarray(out.cache.kv_counts[slot]), NK)
                np.testing.assert_array_equal(layout.to_dense_mask(), expected.to_dense_mask())
    assert runner.trace_count == before  # compiled once, by the fixture


def test_sampled_row_stats_match_metrics():
    rng = np.random.default_rng(0)
    b, length, n, d, block = 2, 80, 3, 16, 16
    q, k, v = (jnp.asarray(rng.normal(size=(b, length, n, d)) * 1.5, jnp.float32) for _ in range(3))
    nk = -(-length // block)
    layout = select_blocks(jnp.asarray(rng.normal(size=(b, n, nk, nk)), jnp.float32), 2)
    out = reference_block_sparse_attention(q, k, v, layout, block_size=block)
    rows = jnp.arange(length, dtype=jnp.int32)
    stats = sampled_row_stats(q, k, v, out, layout.to_dense_mask(), rows, block_size=block, row_budget=3 * length * length)
    expected_recall = jnp.mean(layout_recall(q, k, layout, block_size=block, num_query_samples=length))
    dense = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(stats.recall, expected_recall, rtol=1e-5)
    np.testing.assert_allclose(stats.error, attention_error(out, dense), rtol=1e-4)
    assert 0.0 < float(stats.recall) < 1.0 and float(stats.error) > 0.0
    # A subset of rows: recall of exactly those rows.
    sub = jnp.asarray(np.sort(rng.choice(length, 20, replace=False)), jnp.int32)
    part = sampled_row_stats(q, k, v, out, layout.to_dense_mask(), sub, block_size=block)
    probs = jax.nn.softmax(jnp.einsum("bsnd,blnd->bnsl", q[:, sub], k) / math.sqrt(d), axis=-1)
    token_mask = layout.to_dense_mask()[:, :, sub // block][..., jnp.arange(length) // block]
    np.testing.assert_allclose(part.recall, jnp.mean(jnp.sum(probs * token_mask, axis=-1)), rtol=1e-5)


def test_runner_rejects_bad_arguments(setup):
    runner, model = setup["runner"], setup["model"]
    with pytest.raises(ValueError, match=rf"max_blocks must be in \[1, {NK}\], got {NK + 1}"):
        Q.QualityRunner(model, CONFIG.latent_shape, block_size=BLOCK, tile_sizes=(TILE,), max_blocks=NK + 1)
    for bad in (2.0, True, 0):  # the project's integer rule (dfsattn_jax.checks), as init_cache's
        with pytest.raises(ValueError, match="max_blocks must be a positive integer"):
            Q.QualityRunner(model, CONFIG.latent_shape, block_size=BLOCK, tile_sizes=(TILE,), max_blocks=bad)
    with pytest.raises(ValueError, match="dense_layers"):
        Q.QualityRunner(model, CONFIG.latent_shape, block_size=BLOCK, dense_layers=(0, 1), tile_sizes=(TILE,), max_blocks=2)
    with pytest.raises(ValueError, match="tile_size"):
        Q.QualityRunner(model, CONFIG.latent_shape, block_size=BLOCK, tile_sizes=(12,), max_blocks=2)
    with pytest.raises(ValueError, match="latent_shape"):
        Q.QualityRunner(model, (4, 4, 16, 16), block_size=BLOCK, max_blocks=2)
    with pytest.raises(ValueError, match="tile"):
        runner.scoring_index(V.Variant("x", "tile", tile_size=16), TILE)
    with pytest.raises(ValueError, match="static_scores"):
        _run(setup, None, static_scores=np.zeros((3, NK, NK), np.float32))
    with pytest.raises(ValueError, match="plan"):
        _run(setup, plan_schedule(BASE, STEPS + 1, NK))


def test_side_by_side_gif(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    left = rng.uniform(-1, 1, size=(2, 3, 8, 10, 3))
    right = rng.uniform(-1, 1, size=(2, 3, 8, 10, 3))
    path = write_side_by_side_gif(left, right, tmp_path / "x.gif", captions=["a", "b"], scale=2)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        width, height = gif.size
    assert width == 2 * 2 * 10 + 3 * 6 and height > 2 * 2 * 8
    with pytest.raises(ValueError, match="left and right"):
        write_side_by_side_gif(left, right[:1], tmp_path / "y.gif")
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100"
    assert device_slug("NVIDIA H200") == "nvidia_h200" and device_slug("cpu") == "cpu"


@pytest.mark.parametrize("hw", [(16, 16), (15, 27)])
def test_sample_grid_long_captions_keep_frames_full_size(tmp_path, hw):
    """A caption wider than its column (square clips) must not shrink the frames: it once made
    every frame of the v1 learning grid a few pixels wide. The PNG keeps the figure's size with
    a palette of at most 256 colours, and every frame is drawn."""
    import matplotlib.pyplot as plt
    from PIL import Image

    rng = np.random.default_rng(3)
    h, w = hw
    real = rng.uniform(-1, 1, size=(3, 5, h, w, 3))
    generated = rng.uniform(-1, 1, size=(3, 5, h, w, 3))
    captions = ["immunohistochemistry / zoom_in", "hubble_deep_field / pan", "a"]
    fig = sample_grid_figure(real, generated, captions=captions, columns=4)
    try:
        fig.canvas.draw()
        column_w = fig.get_figwidth() / 4
        boxes = [ax.get_position() for ax in fig.axes]
        assert len(boxes) == 2 * 3 * 4
        widths = np.array([b.width * fig.get_figwidth() for b in boxes])
        assert widths.min() > 0.6 * column_w, (widths.min(), column_w)
        assert [ax.images[0].get_array().shape[:2] for ax in fig.axes] == [(h, w)] * 24
    finally:
        plt.close(fig)
    path = plot_sample_grid(real, generated, tmp_path / "grid.png", captions=captions, columns=4)
    with Image.open(path) as png:
        size = np.array(png.size)
        assert png.mode == "P" and np.abs(size - [90 * 1.1 * 4 * w / h, 90 * 1.25 * 6]).max() < 1  # whole pixels
        assert len(png.getcolors(256)) <= 256
    with pytest.raises(ValueError, match="captions"):
        sample_grid_figure(real, generated, captions=captions[:2])


def test_quality_bench_short_run_in_two_calls(tmp_path):
    """benchmarks/quality_bench.py --quick, trimmed further, split into two calls whose records merge."""
    import pathlib

    common = ["--quick", "--samples", "2", "--steps", "4", "--orders", "raster,hilbert3d", "--densities", "0.2",
              "--tiles", "16", "--query-samples", "64", "--out-dir", str(tmp_path)]  # fmt: skip
    first = bench.main([*common, "--variants", "group:order,random-*"])
    assert first["calls"][-1]["compiles"] == 1  # every variant of a call in one program
    assert not first["complete"] and "window-hilbert3d/d=0.2" in first["missing_variants"]
    report = bench.main([*common, "--variants", "group:tile,group:window,group:oracle,group:refresh"])
    by = {r["name"]: r for r in report["variants"]}
    assert set(by) == {
        "dense", "raster/d=0.2", "raster/default", "hilbert3d/d=0.2", "hilbert3d/default",
        "hilbert3d/tile32/default", "hilbert3d/tile16/default", "window-hilbert3d/d=0.2",
        "window-hilbert3d/default", "random-hilbert3d/d=0.2", "random-hilbert3d/default",
        "oracle-hilbert3d/default", "hilbert3d/default/refresh-every-step",
    }  # fmt: skip
    assert report["complete"] and len(report["calls"]) == 2 and not report["dense_mismatch"]
    assert report["calls"][1]["variants"][0] == "dense (reference only)"
    assert by["dense"]["psnr_mean"] == "inf" and by["dense"]["ssim_mean"] == 1.0
    heads = SMOKE_HEADS
    for name, r in by.items():
        assert len(r["psnr"]) == 2 and len(r["top_mass_per_layer"]) == CONFIG.wan.num_layers, name
        if name == "dense":
            continue
        assert isinstance(r["psnr_mean"], float) and r["psnr_mean"] > 10, name
        assert r["psnr_min"] <= r["psnr_mean"] <= r["psnr_max"] and r["psnr_ci95"] > 0, name
        assert 0 < r["ssim_mean"] <= 1 and 0 <= r["recall_mean"] <= 1 and r["attn_error_mean"] > 0, name
        assert 0 < r["sparsity"] < 1 and r["sparsity"] == pytest.approx(r["planned_sparsity"]), name
        assert len(r["recall_per_step_layer"]) == 4 and len(r["recall_per_layer_head"][1]) == heads, name
        missed = np.sum(r["missed_by_class_per_layer"][1])
        assert missed == pytest.approx(1.0 - r["recall_per_layer"][1], abs=1e-4), name
    assert by["hilbert3d/default/refresh-every-step"]["num_refreshes"] == by["hilbert3d/default"]["sparse_steps"]
    files = report["files"]
    saved = json.loads(open(files["json"]).read())
    assert saved["setup"]["tokens"] == 1024 and len(saved["variants"]) == 13 and saved["setup"]["token_grid"] == [4, 16, 16]
    assert str(tmp_path) not in open(files["json"]).read()  # no machine paths: repository-relative or bare names
    table = open(files["markdown"]).read()
    for fragment in ("## Token orders", "static spatio-temporal window and random layouts", "LPIPS", "± ",
                     "Missed mass by distance class", "Recall per layer and head", "DFS better than a random layout",
                     "Scoring vs the oracle", "DFS scoring within 1 dB of the oracle layout"):  # fmt: skip
        assert fragment in table, fragment
    for key in ("density_png", "layers_png", "recall_png", "masks_png"):
        assert pathlib.Path(files[key]).stat().st_size > 5000
    # Two models side by side (--compare): the second a copy with a shifted oracle PSNR.
    other = json.loads(json.dumps(saved))
    for r in other["variants"]:
        if r["name"] == "oracle-hilbert3d/default":
            r["psnr_mean"] += 1.5
    (tmp_path / "quality_v2_testslug.json").write_text(json.dumps(saved))
    (tmp_path / "quality_v1_testslug.json").write_text(json.dumps(other))
    both = bench.main(["--compare", "v2,v1", "--compare-slug", "testslug", "--out-dir", str(tmp_path)])
    budget = fidelity_budget(saved)
    assert budget["scoring_cost"] == pytest.approx(by["oracle-hilbert3d/default"]["psnr_mean"] - by["hilbert3d/default"]["psnr_mean"])
    assert fidelity_budget(other)["scoring_cost"] == pytest.approx(budget["scoring_cost"] + 1.5)
    assert budget["caching_cost"] == pytest.approx(
        by["hilbert3d/default/refresh-every-step"]["psnr_mean"] - by["hilbert3d/default"]["psnr_mean"])
    text = pathlib.Path(both["markdown"]).read_text()
    assert "| claim | v2 | v1 |" in text and text.count("| DFS better than a random layout at equal density (the model uses its attention) |") == 1
    assert f"| v2 | {budget['dfs']:.2f} | {budget['oracle']:.2f} |" in text
    assert f"{budget['scoring_cost'] + 1.5:+.2f}" in text
    with pytest.raises(ValueError, match="no results file"):
        bench.main(["--compare", "v3", "--compare-slug", "testslug", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="another setup"):
        bench.main([*common, "--samples", "3", "--variants", "dense"])
    with pytest.raises(ValueError, match="match no variant"):
        bench.main([*common, "--variants", "spiral/*"])


def test_random_layouts_whole_layers_and_probed_steps(setup):
    runner = setup["runner"]
    plan = plan_schedule(V.fixed_density(BASE, 0.25), STEPS, NK)  # 2 of 8 key blocks
    random_index = runner.scoring_index(V.Variant("r", "random", scoring=V.SCORING_RANDOM), TILE)
    assert random_index == len(runner.tile_sizes) + 1
    dfs = _run(setup, plan, order="hilbert3d", scoring=0, measure=False)
    rand = _run(setup, plan, order="hilbert3d", scoring=random_index, measure=False, random_seed=3)
    again = _run(setup, plan, order="hilbert3d", scoring=random_index, measure=False, random_seed=3)
    other = _run(setup, plan, order="hilbert3d", scoring=random_index, measure=False, random_seed=4)
    np.testing.assert_array_equal(rand.cache.kv_indices, again.cache.kv_indices)  # the seed fixes the layouts
    assert (rand.cache.kv_counts == 2).all() and rand.sparsity == pytest.approx(dfs.sparsity)
    assert not np.array_equal(rand.cache.kv_indices, other.cache.kv_indices)
    assert not np.array_equal(rand.cache.kv_indices[..., :2], dfs.cache.kv_indices[..., :2])
    # A sparse layer kept whole: recall 1 and no skipped block there; probed only where asked.
    flags = np.zeros(STEPS, bool)
    flags[[0, 3, 5]] = True
    whole = _run(setup, plan, order="hilbert3d", scoring=0, dense_layers=(1,), measure=flags)
    assert (whole.cache.kv_counts == NK).all() and whole.sparsity == 0.0
    np.testing.assert_array_equal(whole.measured, flags)
    assert np.isnan(whole.recall[~flags]).all() and np.isnan(whole.head_recall[~flags]).all()
    np.testing.assert_allclose(whole.recall[flags], 1.0, atol=1e-5)
    np.testing.assert_allclose(whole.missed_by_class[flags], 0.0, atol=1e-6)
    np.testing.assert_allclose(whole.mass_by_class[flags].sum(axis=-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="dense_layers entries"):
        _run(setup, plan, dense_layers=(0,))  # layer 0 is dense already
    with pytest.raises(ValueError, match="measure"):
        _run(setup, plan, measure=[True, False])


def test_oracle_layouts_keep_the_most_mass(setup):
    """The oracle (top-k of the exact block mass) against DFS scoring and a random layout at the
    same count. At the first refresh the three runs share their dense history, so the first
    sparse layer sees the same q and k in each: there the oracle's recall (every row measured)
    is the highest, in every head."""
    runner = setup["runner"]
    plan = plan_schedule(V.fixed_density(BASE, 0.25), STEPS, NK)  # 2 of 8 key blocks
    oracle_index = runner.scoring_index(V.Variant("o", "oracle", scoring=V.SCORING_ORACLE), TILE)
    assert oracle_index == len(runner.tile_sizes) + 2
    random_index = oracle_index - 1
    oracle = _run(setup, plan, order="hilbert3d", scoring=oracle_index)
    dfs = _run(setup, plan, order="hilbert3d", scoring=0)
    rand = _run(setup, plan, order="hilbert3d", scoring=random_index, random_seed=5)
    first, layer = plan.refresh_steps[0], runner.sparse_layers[0]
    assert (oracle.cache.kv_counts == 2).all() and oracle.sparsity == pytest.approx(dfs.sparsity)
    for other in (dfs, rand):
        assert oracle.recall[first, layer] >= other.recall[first, layer] - 1e-6
        assert (oracle.head_recall[first, layer] >= other.head_recall[first, layer] - 1e-6).all()
    assert oracle.recall[first, layer] > rand.recall[first, layer] + 0.01
    assert np.isfinite(oracle.latents).all() and not np.allclose(oracle.latents, dfs.latents, atol=1e-4)
    with pytest.raises(ValueError, match=rf"scoring must be in \[0, {oracle_index}\]"):
        _run(setup, plan, scoring=oracle_index + 1)


def test_probe_statistics_match_float64_numpy():
    from dfsattn_jax.metrics import DISTANCE_CLASS_NAMES, distance_classes

    rng = np.random.default_rng(7)
    b, grid, n, d, block = 2, (2, 4, 10), 3, 8, 16
    length = int(np.prod(grid))  # 80 tokens = 5 blocks of 16
    q, k, v = (rng.normal(size=(b, length, n, d)) * 1.3 for _ in range(3))
    perm = np.asarray(Q.order_coords("hilbert3d", grid))
    nk = -(-length // block)
    layout = select_blocks(jnp.asarray(rng.normal(size=(b, n, nk, nk)), jnp.float32), 2)
    out = reference_block_sparse_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), layout, block_size=block)
    rows = np.sort(rng.choice(length, 24, replace=False)).astype(np.int32)
    mask = np.asarray(layout.to_dense_mask())
    stats = sampled_row_stats(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), out, jnp.asarray(mask), jnp.asarray(rows),
                              block_size=block, top_blocks=2, coords=jnp.asarray(perm))  # fmt: skip
    # float64 reference
    logits = np.einsum("bsnd,blnd->bnsl", q[:, rows], k) / np.sqrt(d)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # [B, N, S, L]
    token_mask = mask[:, :, rows // block][..., np.arange(length) // block]
    head_recall = (p * token_mask).sum(-1).mean(axis=(0, 2))
    blocks = np.stack([p[..., i * block : (i + 1) * block].sum(-1) for i in range(nk)], -1)  # [B, N, S, nk]
    top = np.sort(blocks, axis=-1)[..., -2:].sum(-1).mean(axis=(0, 2))
    cls = np.asarray(distance_classes(jnp.asarray(perm[rows]), jnp.asarray(perm)))
    by_class = np.array([(p * (cls == c)).sum(-1).mean() for c in range(len(DISTANCE_CLASS_NAMES))])
    missed = np.array([(p * (1 - token_mask) * (cls == c)).sum(-1).mean() for c in range(len(DISTANCE_CLASS_NAMES))])
    np.testing.assert_allclose(stats.head_recall, head_recall, rtol=1e-5)  # float32 sums of <= 80 probabilities
    np.testing.assert_allclose(stats.recall, head_recall.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats.top_mass, top, rtol=1e-5)
    np.testing.assert_allclose(stats.mass_by_class, by_class, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.missed_by_class, missed, rtol=1e-5, atol=1e-7)
    assert 0 < head_recall.min() < 1 and (by_class > 0).sum() >= 4
    # distance classes by hand for a few pairs: (frame, row, col)
    pairs = np.array([[0, 0, 0], [0, 1, 1], [0, 0, 5], [0, 3, 9], [1, 0, 0], [1, 2, 3], [1, 3, 9]])
    expected = [[0, 0, 1, 2, 3, 4, 5]]
    np.testing.assert_array_equal(np.asarray(distance_classes(jnp.asarray(pairs[:1]), jnp.asarray(pairs))), expected)
