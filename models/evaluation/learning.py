"""Has a small video DiT learned its data? The flow-matching objective and measures of it.

The small DiTs of :mod:`models.evaluation.small_dit` are trained (``benchmarks/train_small.py``)
with rectified flow as Wan trains it: ``x_σ = (1 - σ) x0 + σ ε`` and the model predicts the
velocity ``ε - x0`` at timestep ``1000 σ`` (the sampler in :mod:`models.sampling.loop`
integrates exactly this velocity). This module holds that objective once
(:func:`sample_sigmas`, :func:`velocity_loss`, :func:`clips_to_latents`) and measures of how
well a model has learned its clips, usable on any registered model:

* :func:`heldout_loss`: the flow-matching loss on clips the training never drew (seeds of their
  own), at a fixed grid of noise levels (the quantiles of the training σ distribution) with
  fixed noise, so that two evaluations of one model give the same number and two checkpoints
  compare directly;
* :func:`nearest_clip_psnr` and :func:`photo_match`: each generated video's PSNR to the nearest
  of many real clips of its class (same background photo and motion; the camera path and
  sprites of a class vary, so "nearest of many" asks whether the sample looks like *some* real
  clip of its class) with the SSIM of that pair, and which photo's clips the sample is nearest
  to. The same measures of held-out *real* clips (:func:`learning_report`) give what a
  generator of real clips would score against that many candidates.
* :func:`sharpness` (mean absolute difference of adjacent pixels): PSNR to the nearest clip
  rewards blur. Measured on CPU for the v1 clips (16 held-out clips, 64 candidates per class):
  real clips score 15.5 dB, the per-pixel mean of 32 clips of the class (a blur of the class)
  17.0 dB, a constant grey video 12.8 dB. So a sample scores the same PSNR as a sharp real clip
  by being a blur of its class; the sharpness ratio to real clips and the SSIM to the nearest
  clip tell the two apart.

Seeds: training draws clip parameters from ``(seed, step)``; held-out clips from
``(seed, HELDOUT_TAG, i)`` and candidate clips from ``(seed, CANDIDATE_TAG, photo, motion)``,
disjoint streams of :class:`numpy.random.SeedSequence`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dfsattn_jax.checks import check_positive_int

from models.evaluation.clips import (
    NUM_MOTIONS,
    NUM_PHOTOS,
    ClipConfig,
    ClipParams,
    PhotoBank,
    load_photo_bank,
    make_clips,
    render_clips,
    sample_clip_params,
)
from models.evaluation.codec import LatentCodec, encode_latent, latents_to_video
from models.evaluation.fidelity import psnr, spread, ssim

__all__ = [
    "CANDIDATE_TAG",
    "HELDOUT_TAG",
    "clips_to_latents",
    "generate_samples",
    "HeldoutSet",
    "heldout_loss",
    "heldout_sigmas",
    "learning_report",
    "nearest_clip_psnr",
    "photo_match",
    "sample_sigmas",
    "sharpness",
    "shifted_sigma",
    "velocity_loss",
]

#: Seed-sequence tags of the held-out clips and of the candidate clips ("HELD", "NEAR").
HELDOUT_TAG = 0x48454C44
CANDIDATE_TAG = 0x4E454152


# ----------------------------------------------------------------------------------------------
# The objective


def shifted_sigma(u: Float[Array, "..."], shift: float) -> Float[Array, "..."]:
    """``σ = s u / (1 + (s - 1) u)``: the flow shift ``s`` applied to ``u`` in (0, 1)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_sigmas(key: jax.Array, batch: int, shift: float) -> Float[Array, " b"]:
    """Training noise levels: shifted logit-normal, ``σ = shifted_sigma(sigmoid(n), s)``, ``n ~ N(0, 1)``."""
    return shifted_sigma(jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32)), shift)


def heldout_sigmas(count: int, shift: float) -> np.ndarray:
    """``count`` noise levels at the quantiles ``(j + 1/2) / count`` of the training σ distribution
    (float64; logit-normal quantile ``sigmoid(Φ⁻¹(p))``, then :func:`shifted_sigma`)."""
    from statistics import NormalDist

    count = check_positive_int(count, "count")
    normal = NormalDist()
    p = (np.arange(count) + 0.5) / count
    u = 1.0 / (1.0 + np.exp(-np.array([normal.inv_cdf(x) for x in p])))
    return np.asarray(shifted_sigma(u, float(shift)), np.float64)


def clips_to_latents(
    images: Float[Array, "p s s 3"], params: ClipParams, clip: ClipConfig, codec: LatentCodec
) -> Float[Array, "b c f h w"]:
    """Renders clips and encodes them: ``[B, C, F, H, W]`` float32 (the model's layout)."""
    video = render_clips(images, params, clip)
    latent = encode_latent(video, codec)  # [B, F, H, W, C]
    return jnp.moveaxis(latent, -1, 1)


def velocity_loss(
    model,
    text: Float[Array, "b t e"],
    latents: Float[Array, "b c f h w"],
    eps: Float[Array, "b c f h w"],
    sigma: Float[Array, " b"],
) -> Float[Array, " b"]:
    """Per-clip mean squared error of the predicted velocity ``ε - x0`` at noise level ``σ`` (float32).

    Args:
      model: a :class:`~models.wan.transformer.WanTransformer3DModel`.
      text: the conditioning tokens (a :class:`~models.evaluation.small_dit.ClipConditioner` output).
      latents: clean latents ``x0``; eps: the noise ``ε`` (same shape); sigma: ``[B]`` in (0, 1).
    """
    s = sigma[:, None, None, None, None]
    noisy = (1.0 - s) * latents + s * eps
    out, _ = model(noisy.astype(model.dtype), sigma * 1000.0, text.astype(model.dtype))
    return jnp.mean(jnp.square(out.astype(jnp.float32) - (eps - latents)), axis=(1, 2, 3, 4))


# ----------------------------------------------------------------------------------------------
# Held-out loss


@functools.partial(jax.jit, static_argnums=(0, 1))
def _heldout_batch(
    graphdef, config, state, images, clip_params, sigmas: Float[Array, " s"], key: jax.Array, first: Int[Array, ""]
) -> Float[Array, "s b"]:
    """Per-clip velocity loss of one batch of held-out clips at every σ: ``[S, B]`` (compiled once
    per model and shapes).

    The clips are rendered, encoded and conditioned once; the σ values run one after another
    (``lax.map``: the memory of one forward pass of the batch, as a vmap over σ would multiply
    it by ``S``: 8 × 8 clips of the v2 model's 25,920 tokens). The noise at ``sigmas[j]`` is
    drawn from ``fold_in(key, first + j)``.
    """
    from flax import nnx

    model, conditioner = nnx.merge(graphdef, state)
    latents = clips_to_latents(images, clip_params, config.clip, config.codec)
    text = conditioner(clip_params.photo, clip_params.motion)

    def one(j_sigma):
        j, sigma = j_sigma
        eps = jax.random.normal(jax.random.fold_in(key, first + j), latents.shape, jnp.float32)
        return velocity_loss(model, text, latents, eps, jnp.full((latents.shape[0],), sigma, jnp.float32))

    return jax.lax.map(one, (jnp.arange(sigmas.shape[0]), sigmas))


class HeldoutSet:
    """A fixed held-out set and its compiled loss (:func:`heldout_loss` in a reusable form).

    ``num_clips`` clips from the held-out seed stream ``(seed, HELDOUT_TAG)``, each at every σ of
    :func:`heldout_sigmas` (``num_sigmas`` quantiles of the training distribution, shift
    ``config.train_shift``) with noise fixed by ``(seed, clip batch, σ index)``, conditioned on
    their class (never the null conditioning). Calling it on a model evaluates that model on
    exactly the same data and noise; the program is compiled once per model structure.

    Args:
      config: the model's :class:`~models.evaluation.small_dit.SmallDiTConfig` (clip size, codec, shift).
      bank: the photo bank (loaded at ``config.clip.bank_size`` when ``None``).
      num_clips, num_sigmas: size of the held-out set.
      batch: clips per forward pass.
      seed: selects the held-out set and its noise.
    """

    def __init__(self, config, *, bank: PhotoBank | None = None, num_clips: int = 16, num_sigmas: int = 8,
                 batch: int = 8, seed: int = 0):  # fmt: skip
        for name, value in (("num_clips", num_clips), ("num_sigmas", num_sigmas), ("batch", batch)):
            check_positive_int(value, name)
        self.config = config
        self.images = jnp.asarray((load_photo_bank(config.clip.bank_size) if bank is None else bank).images)
        self.sigmas = heldout_sigmas(num_sigmas, config.train_shift)
        self.num_clips, self.batch, self.seed = int(num_clips), int(batch), int(seed)
        self.params = sample_clip_params((self.seed, HELDOUT_TAG), self.num_clips, config.clip)

    def __call__(self, model, conditioner) -> dict[str, Any]:
        """``{"loss": mean over clips and σ, "per_sigma": [num_sigmas] means over clips, "sigmas",
        "num_clips", "seed"}`` (Python floats) of ``model`` with ``conditioner``."""
        from flax import nnx

        graphdef, state = nnx.split((model, conditioner))
        sigmas, key = jnp.asarray(self.sigmas, jnp.float32), jax.random.key(self.seed)
        losses = np.zeros((self.num_clips, len(self.sigmas)))
        for start in range(0, self.num_clips, self.batch):
            part = jax.tree.map(lambda x: x[start : start + self.batch], self.params)
            first = jnp.int32(start * len(self.sigmas))  # noise of (batch, σ index j): fold_in(key, first + j)
            loss = _heldout_batch(graphdef, self.config, state, self.images, part, sigmas, key, first)
            losses[start : start + part.photo.shape[0]] = np.asarray(loss).T  # one transfer per batch
        return {
            "loss": float(losses.mean()),
            "per_sigma": [float(x) for x in losses.mean(axis=0)],
            "sigmas": [float(s) for s in self.sigmas],
            "num_clips": self.num_clips,
            "seed": self.seed,
        }


def heldout_loss(
    model,
    conditioner,
    config,
    *,
    bank: PhotoBank | None = None,
    num_clips: int = 16,
    num_sigmas: int = 8,
    batch: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """The flow-matching loss of ``model`` on a held-out set at fixed noise levels (deterministic);
    see :class:`HeldoutSet` for the set and the returned dict."""
    held = HeldoutSet(config, bank=bank, num_clips=num_clips, num_sigmas=num_sigmas, batch=batch, seed=seed)
    return held(model, conditioner)


# ----------------------------------------------------------------------------------------------
# Samples and their nearest real clips


def generate_samples(
    model,
    conditioner,
    config,
    photo: Int[np.ndarray, " b"],
    motion: Int[np.ndarray, " b"],
    *,
    num_steps: int = 50,
    seed: int = 0,
    solver: str = "euler",
) -> Float[np.ndarray, "b t h w 3"]:
    """Dense classifier-free-guided samples of the given classes, decoded: ``[B, T, H, W, 3]`` in [-1, 1].

    The noise is ``jax.random.normal(key(seed), (B, *config.latent_shape))``; guidance and flow
    shift are the config's.
    """
    from models.sampling.loop import Sampler

    photo, motion = np.asarray(photo, np.int32), np.asarray(motion, np.int32)
    if photo.shape != motion.shape or photo.ndim != 1 or photo.size < 1:
        raise ValueError(f"photo and motion must be equal-length non-empty vectors, got {photo.shape} and {motion.shape}")
    batch = photo.shape[0]
    noise = jax.random.normal(jax.random.key(seed), (batch,) + config.latent_shape, jnp.float32)
    text = conditioner(jnp.asarray(photo), jnp.asarray(motion))
    negative = conditioner.unconditional(batch)
    sampler = Sampler(model, "dense", solver=solver, shift=config.sample_shift, progress=False)
    result = sampler(noise, text, negative, num_steps=num_steps, guidance_scale=config.guidance_scale)
    return latents_to_video(result.latents, config.codec)


def sharpness(videos: Float[np.ndarray, "b t h w 3"]) -> Float[np.ndarray, " b"]:
    """Mean absolute difference of horizontally and vertically adjacent pixels of each video
    (float64, values in [-1, 1]): what blur lowers. A sample far blurrier than real clips scores
    well on PSNR to its nearest real clip (the average of many camera paths is close to all of
    them) without looking like any of them; this says so."""
    v = np.asarray(videos, np.float64)
    if v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(f"videos must have shape [B, T, H, W, 3], got {v.shape}")
    dx = np.abs(np.diff(v, axis=3)).mean(axis=(1, 2, 3, 4))
    dy = np.abs(np.diff(v, axis=2)).mean(axis=(1, 2, 3, 4))
    return (dx + dy) / 2.0


def _check_videos(videos: np.ndarray, photo: np.ndarray, motion: np.ndarray, clip: ClipConfig) -> None:
    shape = (clip.frames, clip.height, clip.width, 3)
    if videos.ndim != 5 or tuple(videos.shape[1:]) != shape:
        raise ValueError(f"videos must have shape [B, {', '.join(map(str, shape))}], got {videos.shape}")
    if photo.shape != (videos.shape[0],) or motion.shape != (videos.shape[0],):
        raise ValueError(f"photo and motion must have shape [{videos.shape[0]}], got {photo.shape} and {motion.shape}")
    if not (((0 <= photo) & (photo < NUM_PHOTOS)).all() and ((0 <= motion) & (motion < NUM_MOTIONS)).all()):
        raise ValueError(f"photo must be in [0, {NUM_PHOTOS}) and motion in [0, {NUM_MOTIONS}), got {photo} and {motion}")


def _check_inputs(videos, photo, motion, clip: ClipConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(videos, photo, motion)`` as NumPy arrays."""
    videos, photo, motion = np.asarray(videos), np.asarray(photo, np.int64), np.asarray(motion, np.int64)
    _check_videos(videos, photo, motion, clip)
    return videos, photo, motion


_render = jax.jit(render_clips, static_argnums=2)


@jax.jit
def _psnr_table(rendered: Float[Array, "c t h w 3"], targets: Float[Array, "v t h w 3"]) -> Float[Array, "v c"]:
    """PSNR (data range 2) of every target against every rendered clip."""
    shape = (targets.shape[0],) + rendered.shape
    return psnr(jnp.broadcast_to(rendered[None], shape), jnp.broadcast_to(targets[:, None], shape), data_range=2.0)


def _pool_scores(
    videos: np.ndarray, photo: np.ndarray, motion: np.ndarray, clip: ClipConfig, bank: PhotoBank | None, *,
    nearest: int, per_photo: int, seed: int, chunk: int,
) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None]:  # fmt: skip
    """The nearest-clip measures (``nearest`` candidates of each video's class) and the photo-match
    table (``per_photo`` candidates of every photo with each video's motion) of checked videos,
    every candidate pool rendered once.

    The candidates of class ``(p, m)`` are those of ``sample_clip_params((seed, CANDIDATE_TAG, p,
    m), count)``, which draws clip by clip: the first ``k`` of a larger pool are the pool of ``k``.
    So each class needed is rendered once (in chunks of ``chunk``), with as many candidates as its
    larger use asks, and scored against every video of its motion in one pass.

    Returns:
      ``({"psnr", "index", "ssim"}: [B] each, or None when ``nearest`` is 0; the PSNR table
      float64[B, NUM_PHOTOS], or None when ``per_photo`` is 0)``.
    """
    bank = load_photo_bank(clip.bank_size) if bank is None else bank
    images, chunk, count_of = jnp.asarray(bank.images), max(1, int(chunk)), len(videos)
    targets = jnp.asarray(videos, jnp.float32)
    near = {"psnr": np.zeros(count_of), "index": np.zeros(count_of, np.int64), "ssim": np.zeros(count_of)}
    table = np.zeros((count_of, NUM_PHOTOS))
    for m in np.unique(motion):
        same_motion = np.flatnonzero(motion == m)
        for p in range(NUM_PHOTOS):
            own = same_motion[photo[same_motion] == p]  # the videos of class (p, m)
            limit = nearest if own.size else 0
            count = max(limit, per_photo)
            if count == 0:
                continue
            rows = same_motion if per_photo else own
            params = sample_clip_params((seed, CANDIDATE_TAG, p, int(m)), count, clip, photo=p, motion=int(m))
            scores, best, best_score = [], None, None
            for start in range(0, count, chunk):
                rendered = _render(images, jax.tree.map(lambda x: x[start : start + chunk], params), clip)
                scores.append(np.asarray(_psnr_table(rendered, targets[rows]), np.float64))
                if start < limit:  # the nearest candidate so far among the first `limit` (first on ties)
                    part = scores[-1][:, : limit - start]
                    improved = np.ones(len(rows), bool) if best is None else part.max(axis=1) > best_score
                    best_score = np.where(improved, part.max(axis=1), best_score)
                    chosen = rendered[jnp.asarray(np.argmax(part, axis=1))]
                    best = chosen if best is None else jnp.where(jnp.asarray(improved)[:, None, None, None, None], chosen, best)
            scores = np.concatenate(scores, axis=1)
            if per_photo:
                table[rows, p] = scores[:, :per_photo].max(axis=1)
            if limit:
                at = np.searchsorted(rows, own)  # where the class's videos stand in `rows`
                near["index"][own] = np.argmax(scores[at, :limit], axis=1)
                near["psnr"][own] = scores[at, near["index"][own]]
                near["ssim"][own] = np.asarray(ssim(best[at], targets[own], data_range=2.0), np.float64)
    return (near if nearest else None), (table if per_photo else None)


def _photo_result(table: np.ndarray, photo: np.ndarray) -> dict[str, Any]:
    predicted = np.argmax(table, axis=1)
    return {"psnr": table, "predicted": predicted, "accuracy": float(np.mean(predicted == photo))}


def nearest_clip_psnr(
    videos: Float[np.ndarray, "b t h w 3"],
    photo: Int[np.ndarray, " b"],
    motion: Int[np.ndarray, " b"],
    clip: ClipConfig,
    *,
    bank: PhotoBank | None = None,
    num_candidates: int = 64,
    seed: int = 0,
    chunk: int = 16,
) -> dict[str, np.ndarray]:
    """Each video's PSNR (dB, data range 2) to the nearest of ``num_candidates`` real clips of its class.

    The candidates of class ``(photo, motion)`` come from the seed ``(seed, CANDIDATE_TAG, photo,
    motion)``: the same pool for every video of the class and every model with clips of ``clip``
    (rendered once per class, ``chunk`` clips at a time).

    Returns:
      ``{"psnr": float64[B], "index": int64[B], "ssim": float64[B]}``: the best PSNR, which
      candidate gave it (the first one on ties), and the SSIM to that candidate.
    """
    videos, photo, motion = _check_inputs(videos, photo, motion, clip)
    nearest = check_positive_int(num_candidates, "num_candidates")
    near, _ = _pool_scores(videos, photo, motion, clip, bank, nearest=nearest, per_photo=0, seed=seed, chunk=chunk)
    return near


def photo_match(
    videos: Float[np.ndarray, "b t h w 3"],
    photo: Int[np.ndarray, " b"],
    motion: Int[np.ndarray, " b"],
    clip: ClipConfig,
    *,
    bank: PhotoBank | None = None,
    num_candidates: int = 16,
    seed: int = 0,
    chunk: int = 16,
) -> dict[str, Any]:
    """Which background photo each video is nearest to, among every photo's clips of its motion.

    For every video and every photo ``p``: the PSNR to the nearest of ``num_candidates`` real
    clips of class ``(p, motion)`` (the pools of :func:`nearest_clip_psnr`); the predicted photo
    is the best one.

    Returns:
      ``{"psnr": float64[B, NUM_PHOTOS], "predicted": int64[B], "accuracy": float}``.
    """
    videos, photo, motion = _check_inputs(videos, photo, motion, clip)
    per_photo = check_positive_int(num_candidates, "num_candidates")
    _, table = _pool_scores(videos, photo, motion, clip, bank, nearest=0, per_photo=per_photo, seed=seed, chunk=chunk)
    return _photo_result(table, photo)


def learning_report(
    model,
    conditioner,
    config,
    *,
    num_samples: int = 16,
    num_steps: int = 50,
    num_candidates: int = 64,
    photo_candidates: int = 16,
    heldout_clips: int = 16,
    heldout_sigma_count: int = 8,
    seed: int = 0,
    videos: np.ndarray | None = None,
    heldout: HeldoutSet | None = None,
    heldout_result: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Everything :mod:`benchmarks.learning_bench` reports about one model, and the videos.

    ``num_samples`` dense samples (classes ``i % 8``, ``i % 5``: every photo and motion; noise
    seed ``seed``), each scored by :func:`nearest_clip_psnr` and :func:`photo_match`; the same
    measures of as many held-out real clips of the same classes (the ceiling: what a generator
    of real clips would score against these candidates); and :func:`heldout_loss`. Samples and
    real clips are scored in one pass that renders each class's candidates once (16 samples:
    the 40 classes of their 5 motions, instead of 288 pool renders one video at a time).

    Args:
      videos: already generated samples of those classes (skips sampling), ``[B, T, H, W, 3]``.
      heldout: the held-out set to use (default: a new :class:`HeldoutSet` of ``heldout_clips``
        clips at ``heldout_sigma_count`` noise levels).
      heldout_result: that set's result for these weights when the caller has measured it
        already (what ``heldout(model, conditioner)`` returned): it is reported as is.

    Returns:
      ``(report, {"samples": videos, "real": held-out real clips})``; the report holds per-sample
      values and their mean, min, max and 95% confidence half-width.
    """
    from models.evaluation.clips import clip_classes

    nearest = check_positive_int(num_candidates, "num_candidates")
    per_photo = check_positive_int(photo_candidates, "photo_candidates")
    photo, motion = clip_classes(num_samples)
    bank = load_photo_bank(config.clip.bank_size)
    if videos is None:
        videos = generate_samples(model, conditioner, config, photo, motion, num_steps=num_steps, seed=seed)
    real = np.stack([
        make_clips((seed, HELDOUT_TAG, 2, i), 1, config.clip, bank=bank, photo=int(p), motion=int(m)).video[0]
        for i, (p, m) in enumerate(zip(photo, motion))
    ])  # fmt: skip
    out: dict[str, Any] = {"num_samples": int(num_samples), "num_steps": int(num_steps), "seed": int(seed),
                           "num_candidates": int(num_candidates), "photo_candidates": int(photo_candidates)}  # fmt: skip
    # samples and real clips in one pass: each class's candidates are rendered once for both
    samples, photo, motion = _check_inputs(videos, photo, motion, config.clip)
    near, table = _pool_scores(np.concatenate([samples, real]), np.tile(photo, 2), np.tile(motion, 2), config.clip, bank,
                               nearest=nearest, per_photo=per_photo, seed=seed, chunk=16)  # fmt: skip
    for name, video, rows in (("samples", samples, slice(0, len(photo))), ("real", real, slice(len(photo), None))):
        match = _photo_result(table[rows], photo)
        sharp = sharpness(video)
        out[name] = {
            "nearest_psnr": [float(x) for x in near["psnr"][rows]],
            "nearest_psnr_summary": spread(near["psnr"][rows]),
            "nearest_ssim": [float(x) for x in near["ssim"][rows]],
            "nearest_ssim_summary": spread(near["ssim"][rows]),
            "sharpness": [float(x) for x in sharp],
            "sharpness_summary": spread(sharp),
            "photo_predicted": [int(x) for x in match["predicted"]],
            "photo_accuracy": match["accuracy"],
        }
    out["sharpness_ratio"] = out["samples"]["sharpness_summary"]["mean"] / out["real"]["sharpness_summary"]["mean"]
    out["classes"] = [[int(p), int(m)] for p, m in zip(photo, motion)]
    if heldout_result is None:
        if heldout is None:
            heldout = HeldoutSet(config, bank=bank, num_clips=heldout_clips, num_sigmas=heldout_sigma_count, seed=seed)
        heldout_result = heldout(model, conditioner)
    out["heldout"] = heldout_result
    return out, {"samples": np.asarray(videos), "real": real}
