"""models/evaluation/learning.py: the flow-matching objective, the held-out loss and the
nearest-real-clip measures, on the smoke-sized model and clips (CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.evaluation import learning as L
from models.evaluation.clips import NUM_PHOTOS, load_photo_bank, make_clips, render_clips, sample_clip_params
from models.evaluation.fidelity import psnr, spread, ssim
from models.evaluation.small_dit import SMOKE_DIT_CONFIG, ClipConditioner
from models.wan.transformer import WanTransformer3DModel

CONFIG = SMOKE_DIT_CONFIG  # 4 frames of 16x16 px


@pytest.fixture(scope="module")
def bank():
    return load_photo_bank(CONFIG.clip.bank_size)


def _modules(seed: int):
    """Smoke-sized modules with small random float32 weights, built abstractly (no XLA initialisers)."""
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: WanTransformer3DModel(CONFIG.wan, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32))
    conditioner = nnx.eval_shape(lambda: ClipConditioner(CONFIG.tokens_per_field, CONFIG.wan.text_dim, rngs=nnx.Rngs(0)))
    for module in (model, conditioner):
        state = nnx.state(module, nnx.Param)
        nnx.update(module, jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), state))
    return model, conditioner


def test_heldout_sigmas_are_quantiles_of_the_training_distribution():
    sigmas = L.heldout_sigmas(8, 3.0)
    assert sigmas.shape == (8,) and np.all(np.diff(sigmas) > 0) and 0 < sigmas[0] and sigmas[-1] < 1
    drawn = np.sort(np.asarray(L.sample_sigmas(jax.random.key(0), 200_000, 3.0), np.float64))
    empirical = drawn[((np.arange(8) + 0.5) / 8 * drawn.size).astype(int)]
    np.testing.assert_allclose(sigmas, empirical, atol=3e-3)  # sampling error of a quantile of 2e5 draws
    np.testing.assert_allclose(L.heldout_sigmas(1, 3.0), [0.75])  # the median, shifted
    with pytest.raises(ValueError, match="count"):
        L.heldout_sigmas(0, 3.0)


def test_heldout_set_is_deterministic_and_is_the_flow_matching_loss(bank):
    model, conditioner = _modules(3)
    held = L.HeldoutSet(CONFIG, bank=bank, num_clips=2, num_sigmas=2, batch=2, seed=5)
    first, second = held(model, conditioner), held(model, conditioner)
    assert first == second and len(first["per_sigma"]) == 2 and first["num_clips"] == 2
    assert first["loss"] == pytest.approx(np.mean(first["per_sigma"]))
    # The first clip batch at the first σ, by hand: same clips, σ and noise key.
    params = sample_clip_params((5, L.HELDOUT_TAG), 2, CONFIG.clip)
    latents = jax.jit(L.clips_to_latents, static_argnums=(2, 3))(jnp.asarray(bank.images), params, CONFIG.clip, CONFIG.codec)
    eps = jax.random.normal(jax.random.fold_in(jax.random.key(5), 0), latents.shape, jnp.float32)
    sigma = jnp.full((2,), held.sigmas[0], jnp.float32)
    text = conditioner(params.photo, params.motion)
    noisy = (1 - sigma[:, None, None, None, None]) * latents + sigma[:, None, None, None, None] * eps
    out, _ = nnx.jit(lambda m, *a: m(*a))(model, noisy, sigma * 1000.0, text)
    by_hand = np.mean(np.square(np.asarray(out, np.float64) - np.asarray(eps - latents, np.float64)), axis=(1, 2, 3, 4))
    np.testing.assert_allclose(np.asarray(L.velocity_loss(model, text, latents, eps, sigma)), by_hand, rtol=1e-5)
    other = L.HeldoutSet(CONFIG, bank=bank, num_clips=2, num_sigmas=2, batch=2, seed=6)(model, conditioner)
    assert other["loss"] != first["loss"]  # another seed, another set
    with pytest.raises(ValueError, match="num_clips"):
        L.HeldoutSet(CONFIG, bank=bank, num_clips=0)


def test_nearest_clip_finds_a_candidate_and_photo_match_recognises_real_clips(bank):
    photo, motion = np.array([2, 6]), np.array([1, 3])
    candidates = [sample_clip_params((0, L.CANDIDATE_TAG, int(p), int(m)), 4, CONFIG.clip, photo=int(p), motion=int(m))
                  for p, m in zip(photo, motion)]  # fmt: skip
    from models.evaluation.clips import render_clips

    render = jax.jit(render_clips, static_argnums=2)
    videos = np.stack([np.asarray(render(jnp.asarray(bank.images), c, CONFIG.clip))[2] for c in candidates])
    near = L.nearest_clip_psnr(videos, photo, motion, CONFIG.clip, bank=bank, num_candidates=4, chunk=3)
    # candidate 2 itself (rendered in another batch: float32 rounding apart)
    assert (near["psnr"] > 100).all() and (near["index"] == 2).all()
    np.testing.assert_allclose(near["ssim"], 1.0, atol=1e-5)
    noisy = np.clip(videos + np.random.default_rng(0).normal(0, 0.1, videos.shape), -1, 1)
    near = L.nearest_clip_psnr(noisy, photo, motion, CONFIG.clip, bank=bank, num_candidates=4)
    expected = np.asarray(psnr(noisy, videos, data_range=2.0))
    assert (near["index"] == 2).all() and np.allclose(near["psnr"], expected, rtol=1e-5)
    match = L.photo_match(videos, photo, motion, CONFIG.clip, bank=bank, num_candidates=4)
    assert match["psnr"].shape == (2, NUM_PHOTOS) and match["accuracy"] == 1.0
    np.testing.assert_array_equal(match["predicted"], photo)
    with pytest.raises(ValueError, match="videos must have shape"):
        L.nearest_clip_psnr(videos[:, :2], photo, motion, CONFIG.clip, bank=bank)
    with pytest.raises(ValueError, match="photo must be in"):
        L.nearest_clip_psnr(videos, np.array([2, NUM_PHOTOS]), motion, CONFIG.clip, bank=bank)
    with pytest.raises(ValueError, match="num_candidates"):
        L.photo_match(videos, photo, motion, CONFIG.clip, bank=bank, num_candidates=0)


def test_learning_report_scores_given_videos_and_real_clips(bank):
    model, conditioner = _modules(4)
    clips = make_clips((1, 2), 2, CONFIG.clip, bank=bank)  # any videos stand in for samples
    report, videos = L.learning_report(model, conditioner, CONFIG, num_samples=2, num_candidates=2, photo_candidates=1,
                                       heldout_clips=2, heldout_sigma_count=1, videos=clips.video)  # fmt: skip
    assert videos["real"].shape == clips.video.shape and report["classes"] == [[0, 0], [1, 1]]
    for key in ("samples", "real"):
        values = report[key]["nearest_psnr"]
        assert len(values) == 2 and report[key]["nearest_psnr_summary"] == spread(values)
    assert np.isfinite(report["heldout"]["loss"]) and report["heldout"]["num_clips"] == 2
    ratio = report["samples"]["sharpness_summary"]["mean"] / report["real"]["sharpness_summary"]["mean"]
    assert report["sharpness_ratio"] == pytest.approx(ratio) and all(0 < x <= 1 for x in report["real"]["nearest_ssim"])


# ----------------------------------------------------------------------------------------------
# The computations as they were before one pass per batch / per candidate pool: the references.


@functools.partial(jax.jit, static_argnums=(0, 1))
def _old_heldout_batch(graphdef, config, state, images, clip_params, sigma, key):
    """One batch at one σ: re-rendered and re-encoded for every σ (the former ``_heldout_batch``)."""
    model, conditioner = nnx.merge(graphdef, state)
    latents = L.clips_to_latents(images, clip_params, config.clip, config.codec)
    eps = jax.random.normal(key, latents.shape, jnp.float32)
    text = conditioner(clip_params.photo, clip_params.motion)
    return L.velocity_loss(model, text, latents, eps, jnp.full((latents.shape[0],), sigma, jnp.float32))


def _old_heldout_losses(held: L.HeldoutSet, model, conditioner) -> np.ndarray:
    """``[num_clips, num_sigmas]`` per-clip losses by the former per-σ loop (a host sync per σ)."""
    graphdef, state = nnx.split((model, conditioner))
    losses = np.zeros((held.num_clips, len(held.sigmas)))
    for start in range(0, held.num_clips, held.batch):
        part = jax.tree.map(lambda x: x[start : start + held.batch], held.params)
        for j, sigma in enumerate(held.sigmas):
            key = jax.random.fold_in(jax.random.key(held.seed), start * len(held.sigmas) + j)
            loss = _old_heldout_batch(graphdef, held.config, state, held.images, part, jnp.float32(sigma), key)
            losses[start : start + part.photo.shape[0], j] = np.asarray(loss)
    return losses


_OLD_RENDER = jax.jit(render_clips, static_argnums=2)


def _old_best(bank, clip, video, photo: int, motion: int, num: int, seed: int = 0, chunk: int = 16):
    """``(PSNR, index, SSIM)`` of the nearest of one class's candidates to one video, the pool
    rendered for this video alone (the former ``_CandidatePools.best``)."""
    params = sample_clip_params((seed, L.CANDIDATE_TAG, photo, motion), num, clip, photo=photo, motion=motion)
    target = jnp.asarray(video, jnp.float32)[None]
    scores, best_clip = [], None
    for start in range(0, num, chunk):
        rendered = _OLD_RENDER(jnp.asarray(bank.images), jax.tree.map(lambda x: x[start : start + chunk], params), clip)
        scores.append(np.asarray(psnr(rendered, jnp.broadcast_to(target, rendered.shape), data_range=2.0)))
        if best_clip is None or scores[-1].max() > best_clip[0]:
            best_clip = (float(scores[-1].max()), rendered[int(np.argmax(scores[-1]))])
    scores = np.concatenate(scores)
    index = int(np.argmax(scores))
    return float(scores[index]), index, float(ssim(best_clip[1], target[0], data_range=2.0))


def _old_scores(bank, clip, videos, photo, motion, num_candidates, photo_candidates, chunk=16):
    """The former nearest_clip_psnr (psnr, index, ssim) and photo_match table, video by video."""
    near = np.array([_old_best(bank, clip, v, int(p), int(m), num_candidates, chunk=chunk)
                     for v, p, m in zip(videos, photo, motion)])  # fmt: skip
    table = np.array([[_old_best(bank, clip, v, p, int(m), photo_candidates, chunk=chunk)[0] for p in range(NUM_PHOTOS)]
                      for v, m in zip(videos, motion)])  # fmt: skip
    return near[:, 0], near[:, 1].astype(np.int64), near[:, 2], table


def _noisy_real_clips(bank, photo, motion, seed):
    """Real clips of the given classes (not candidates) with seeded noise: videos near, not on, candidates."""
    rng = np.random.default_rng(seed)
    video = np.stack([make_clips((seed, i), 1, CONFIG.clip, bank=bank, photo=int(p), motion=int(m)).video[0]
                      for i, (p, m) in enumerate(zip(photo, motion))])  # fmt: skip
    return np.clip(video + rng.normal(0, 0.05, video.shape), -1, 1).astype(np.float32)


def test_heldout_batch_equals_the_per_sigma_loop(bank):
    model, conditioner = _modules(5)
    # 4 clips in batches of 2 (the second batch's noise keys start at 2 x 3); 3 noise levels
    held = L.HeldoutSet(CONFIG, bank=bank, num_clips=4, num_sigmas=3, batch=2, seed=9)
    expected = _old_heldout_losses(held, model, conditioner)
    graphdef, state = nnx.split((model, conditioner))
    sigmas, key = jnp.asarray(held.sigmas, jnp.float32), jax.random.key(held.seed)
    got = np.full_like(expected, np.nan)  # poisoned: every entry must be written
    for start in (0, 2):
        part = jax.tree.map(lambda x: x[start : start + 2], held.params)
        loss = L._heldout_batch(graphdef, CONFIG, state, held.images, part, sigmas, key, jnp.int32(start * 3))
        assert loss.shape == (3, 2)
        got[start : start + 2] = np.asarray(loss).T
    assert np.all(expected > 0.05)  # a real loss (random weights: far from zero)
    np.testing.assert_allclose(got, expected, rtol=1e-5)  # float32 forward, same inputs and noise
    result = held(model, conditioner)
    np.testing.assert_allclose(result["per_sigma"], expected.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(result["loss"], expected.mean(), rtol=1e-5)


def test_pool_scores_equal_the_video_by_video_pools_and_render_each_class_once(bank, monkeypatch):
    # two videos of one class, three of motion 1 with other photos, one of motion 4
    photo, motion = np.array([2, 6, 2, 0, 3, 5]), np.array([1, 1, 1, 4, 1, 3])
    videos = _noisy_real_clips(bank, photo, motion, seed=17)
    # chunk 2 with 3 nearest / 5 per-photo candidates: pools larger than either use, a partial last chunk
    near_old, index_old, ssim_old, table_old = _old_scores(bank, CONFIG.clip, videos, photo, motion, 3, 5, chunk=2)
    renders = []
    real_render = L._render
    monkeypatch.setattr(L, "_render", lambda images, params, clip: renders.append(params.photo.shape[0]) or real_render(images, params, clip))
    near, table = L._pool_scores(videos, photo, motion, CONFIG.clip, bank, nearest=3, per_photo=5, seed=0, chunk=2)
    # 3 motions x 8 photos, each pool of 5 rendered once (3 chunks: 2 + 2 + 1)
    assert len(renders) == 3 * NUM_PHOTOS * 3 and sum(renders) == 3 * NUM_PHOTOS * 5
    np.testing.assert_allclose(near["psnr"], near_old, rtol=1e-6)  # float32 MSEs, same renders
    np.testing.assert_array_equal(near["index"], index_old)
    np.testing.assert_allclose(near["ssim"], ssim_old, atol=1e-6)
    np.testing.assert_allclose(table, table_old, rtol=1e-6)
    assert np.all(np.isfinite(table)) and np.all((near["psnr"] > 5) & (near["psnr"] < 60))
    # the public functions are the same pass with one use each
    monkeypatch.setattr(L, "_render", real_render)
    public = L.nearest_clip_psnr(videos, photo, motion, CONFIG.clip, bank=bank, num_candidates=3, chunk=2)
    np.testing.assert_array_equal(public["index"], index_old)
    np.testing.assert_allclose(public["psnr"], near_old, rtol=1e-6)
    match = L.photo_match(videos, photo, motion, CONFIG.clip, bank=bank, num_candidates=5, chunk=2)
    np.testing.assert_allclose(match["psnr"], table_old, rtol=1e-6)
    np.testing.assert_array_equal(match["predicted"], np.argmax(table_old, axis=1))


def test_learning_report_equals_scoring_samples_and_real_clips_apart(bank):
    model, conditioner = _modules(6)
    photo, motion = np.arange(5) % NUM_PHOTOS, np.arange(5) % 5
    samples = _noisy_real_clips(bank, photo, motion, seed=23)
    report, videos = L.learning_report(model, conditioner, CONFIG, num_samples=5, num_candidates=3, photo_candidates=2,
                                       videos=samples, heldout_result={"loss": 1.0})  # fmt: skip
    for name in ("samples", "real"):
        near, index, ssim_old, table = _old_scores(bank, CONFIG.clip, videos[name], photo, motion, 3, 2)
        np.testing.assert_allclose(report[name]["nearest_psnr"], near, rtol=1e-6)
        np.testing.assert_allclose(report[name]["nearest_ssim"], ssim_old, atol=1e-6)
        assert report[name]["nearest_psnr_summary"] == spread(report[name]["nearest_psnr"])
        assert report[name]["photo_predicted"] == [int(x) for x in np.argmax(table, axis=1)]
        assert report[name]["photo_accuracy"] == float(np.mean(np.argmax(table, axis=1) == photo))
    with pytest.raises(ValueError, match="photo_candidates"):
        L.learning_report(model, conditioner, CONFIG, num_samples=5, photo_candidates=0, videos=samples)


def test_sharpness_falls_with_blur_and_matches_a_hand_value():
    rng = np.random.default_rng(3)
    video = rng.uniform(-1, 1, size=(1, 2, 8, 8, 3))
    blurred = (video + np.roll(video, 1, axis=2) + np.roll(video, 1, axis=3)) / 3.0
    assert L.sharpness(blurred)[0] < 0.7 * L.sharpness(video)[0]
    stripes = np.zeros((1, 1, 4, 4, 3))
    stripes[..., ::2, :] = 1.0  # columns 0, 2 white: every horizontal step is 1, vertical 0
    np.testing.assert_allclose(L.sharpness(stripes), [0.5])
    with pytest.raises(ValueError, match="videos"):
        L.sharpness(np.zeros((2, 4, 4, 3)))


def test_spread_reports_student_interval():
    values = np.array([20.0, 22.0, 21.0, 25.0])
    s = spread(values)
    from scipy.stats import t

    half = t.ppf(0.975, 3) * values.std(ddof=1) / 2.0
    assert s == {"mean": 22.0, "min": 20.0, "max": 25.0, "ci95": pytest.approx(half), "n": 4}
    assert spread([3.0])["ci95"] is None and spread([1.0, np.inf])["ci95"] is None
    with pytest.raises(ValueError, match="values"):
        spread([])
