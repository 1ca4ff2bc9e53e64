"""Dense vs DFSAttn on the same model and noise: timings, sparsity, error, and a mask picture.

Two comparisons: :func:`run_comparison` on a Wan config with random weights, and
:func:`run_clip_comparison` on the shipped small video DiT (decoded videos, PSNR/SSIM, a
side-by-side GIF). Both sample through the production :class:`~models.sampling.loop.Sampler`.

:func:`run_comparison` samples the same noise with the same weights twice (dense self-attention
and DFSAttn), each after one compile warm-up (a short run of the same compiled program), then
``repeats`` timed runs of each, dense and DFS alternating, and reports the median time per step and
in total (every run's time is kept), the speedup of the medians, the sparsity actually used (docs/spec.md §6: mean
skipped block fraction over the sparse steps and all self-attention layers, dense layers 0),
and the relative error of the final latents against dense. It writes a JSON report and a PNG
of one layer's block masks for a few heads in raster and hilbert3d order, computed at the
first refresh step on the flow-matching interpolation of the dense result and the noise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfsattn_jax.cache import cache_layout
from dfsattn_jax.checks import check_positive_int
from dfsattn_jax.schedule import DFSConfig, default_schedule, reported_sparsity
from models.common.processor import AttentionBackend, AttentionState, init_cache, num_token_blocks, sparse_step
from models.evaluation.clips import BACKGROUND_PHOTOS, MOTIONS, clip_classes
from models.evaluation.codec import latents_to_video, token_grid as clip_token_grid
from models.evaluation.media import MP4_ENCODER_HINT, plot_block_masks, write_side_by_side_gif, write_side_by_side_mp4
from models.evaluation.quality import harness_blocks, video_scores
from models.evaluation.results import device_name, write_json
from models.sampling import Sampler
from models.wan.config import get_config, latent_shape, token_grid
from models.wan.transformer import WanTransformer3DModel

__all__ = [
    "block_masks",
    "default_dfs_config",
    "run_clip_comparison",
    "run_comparison",
]


def default_dfs_config(config_name: str) -> DFSConfig:
    """The paper's defaults; the ``tiny`` CPU config uses 32-token blocks of 8-token tiles so
    that its small grids still have several blocks."""
    if get_config(config_name).name == "tiny":
        return DFSConfig(block_size=32, tile_size=8)
    return DFSConfig()


def block_masks(
    model: WanTransformer3DModel,
    latents: jax.Array,
    timestep: float,
    text: jax.Array,
    dfs_config: DFSConfig,
    *,
    order: str,
    layer: int,
    density: float,
) -> np.ndarray:
    """Block masks ``bool[N, nq, nk]`` (first batch element) that ``layer`` selects in ``order``.

    Runs the model with the ``dfs`` backend in the given token order at a refresh step, up to
    and including ``layer`` (the later layers do not affect its masks).
    """
    cfg = model.config
    grid = token_grid(cfg, latents.shape[2:])
    num_tokens = math.prod(grid)
    nk = num_token_blocks(num_tokens, dfs_config.block_size)
    keep = max(1, int(density * nk))
    backend = AttentionBackend("dfs", dfs_config, order=order)
    slot = backend.slot(layer, cfg.num_layers)
    if slot is None:
        raise ValueError(f"layer {layer} is dense (dense_layers={dfs_config.dense_layers}); pick a sparse layer")
    batch = latents.shape[0]
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, latents, text):
        m = nnx.merge(graphdef, state)
        cache = init_cache(backend, cfg.num_layers, batch, cfg.num_heads, num_tokens, keep)
        t = jnp.full((batch,), timestep, jnp.float32)
        state = AttentionState(control=sparse_step(keep), cache=cache)
        _, state = m.forward(
            latents.astype(m.dtype), t, text.astype(m.dtype), backend=backend, state=state, num_layers=layer + 1
        )
        return cache_layout(state.cache, slot, nk).to_dense_mask()[0]

    return np.asarray(run(state, latents, text))


def _save_report(report: dict, out_dir: str) -> dict:
    """Writes ``report`` to ``out_dir/compare_<config>.json`` (its path recorded in it)."""
    report["report_json"] = os.path.join(out_dir, f"compare_{report['config']}.json")
    write_json(report["report_json"], report)
    return report


def _timed_pair(
    dense_sampler: Sampler, dfs_sampler: Sampler, noise, text, negative, steps: int, guidance_scale: float,
    repeats: int,
):
    """Warms each sampler up once (one compile of the program the timed runs use), then runs
    dense and DFS ``repeats`` times each, alternating so that drifting machine load hits both
    alike. Returns the last dense and DFS results and ``{"dense": [s, ...], "dfs": [s, ...]}``,
    each run's :attr:`~models.sampling.loop.SampleResult.time_s` (wall time blocked on the result)."""
    repeats = check_positive_int(repeats, "repeats")
    for sampler in (dense_sampler, dfs_sampler):
        sampler.warmup(noise, text, negative, num_steps=steps)  # compiles the same program
    times: dict[str, list[float]] = {"dense": [], "dfs": []}
    results: dict[str, Any] = {}
    for _ in range(int(repeats)):
        for name, sampler in (("dense", dense_sampler), ("dfs", dfs_sampler)):
            start = time.perf_counter()
            result = sampler(noise, text, negative, num_steps=steps, guidance_scale=guidance_scale)
            jax.block_until_ready(result.latents)
            elapsed = result.time_s if math.isfinite(result.time_s) else time.perf_counter() - start
            times[name].append(float(elapsed))
            results[name] = result
    return results["dense"], results["dfs"], times


def _timing_fields(times: dict[str, list[float]], steps: int) -> dict:
    """The report's timing entries: medians (total and per step), every run, and the speedup of
    the medians (with the per-run ratios, to show the spread)."""
    median = {k: float(statistics.median(v)) for k, v in times.items()}
    return {
        "repeats": len(times["dense"]),
        "timing": f"median of {len(times['dense'])} timed run(s) each after one warm-up compile; "
        "dense and DFS runs alternate",
        "time_runs_s": {k: [float(x) for x in v] for k, v in times.items()},
        "time_total_s": median,
        "time_per_step_s": {k: v / steps for k, v in median.items()},
        "speedup": median["dense"] / median["dfs"] if median["dfs"] > 0 else float("nan"),
        "speedup_runs": [d / s if s > 0 else float("nan") for d, s in zip(times["dense"], times["dfs"])],
    }


def run_comparison(
    config_name: str = "tiny",
    frames: int = 17,
    height: int = 256,
    width: int = 256,
    steps: int = 50,
    seed: int = 0,
    dfs_config: DFSConfig | None = None,
    *,
    guidance_scale: float = 5.0,
    shift: float = 5.0,
    solver: str = "euler",
    model: WanTransformer3DModel | None = None,
    text: jax.Array | None = None,
    negative_text: jax.Array | None = None,
    out_dir: str = "demo_out",
    mask_layer: int | None = None,
    mask_heads: int = 4,
    mask_orders: tuple[str, ...] = ("raster", "hilbert3d"),
    progress: bool = True,
    dtype: Any = None,
    repeats: int = 1,
    notes: dict | None = None,
) -> dict:
    """Samples the same noise dense and with DFSAttn and reports the difference.

    Args:
      config_name: model config (``"tiny"``, ``"wan2.1-1.3b"``, ``"wan2.1-14b"``).
      frames, height, width: video size in pixels (latents: ``(frames-1)/4+1`` frames, /8).
      steps: denoising steps.
      seed: seed of the random weights (when ``model`` is not given), noise and text.
      dfs_config: DFSAttn parameters, used as given; default :func:`default_dfs_config` scaled to
        ``steps`` by :func:`~dfsattn_jax.schedule.default_schedule` (50 steps: unchanged).
      guidance_scale: classifier-free guidance (the model runs a batch of 2).
      shift, solver: sampler settings.
      model: weights to use (default: random weights from ``seed``).
      text, negative_text: prompt embeddings ``[1, T, text_dim]`` (default: random).
      out_dir: where the JSON report and the PNG go.
      mask_layer: layer whose masks are drawn (default: the middle layer, or the first sparse one).
      mask_heads: heads drawn.
      mask_orders: token orders compared in the PNG.
      progress: show progress bars.
      dtype: activation/param dtype of a random model (default: bf16 on GPU, f32 on CPU).
      repeats: timed runs of each of dense and DFS after the warm-up; the report's times are
        their medians (``time_runs_s`` keeps every run) and the speedup is the medians' ratio.
      notes: extra entries merged into the report (e.g. what the caller scaled down).

    Returns:
      The report (also written as ``<out_dir>/compare_<config>.json``).
    """
    cfg = get_config(config_name)
    if dfs_config is None:
        dfs_config = default_schedule(steps, default_dfs_config(cfg.name))
    shape = latent_shape(cfg, frames, height, width)
    grid = token_grid(cfg, shape[1:])
    num_tokens = math.prod(grid)
    nk = num_token_blocks(num_tokens, dfs_config.block_size)
    key_noise, key_text, key_neg = jax.random.split(jax.random.key(seed), 3)
    if model is None:
        model = WanTransformer3DModel(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=dtype)
    elif model.config != cfg:
        raise ValueError(f"model has config {model.config.name!r}, config_name is {cfg.name!r}")
    noise = jax.random.normal(key_noise, (1, *shape), jnp.float32)
    if text is None:
        text = jax.random.normal(key_text, (1, cfg.text_len, cfg.text_dim), jnp.float32)
    if negative_text is None:
        negative_text = jax.random.normal(key_neg, tuple(text.shape), jnp.float32)

    dense_sampler = Sampler(model, "dense", solver=solver, shift=shift, progress=progress)
    dfs_backend = AttentionBackend("dfs", dfs_config)
    dfs_sampler = Sampler(model, dfs_backend, solver=solver, shift=shift, progress=progress)
    dense, sparse, times = _timed_pair(
        dense_sampler, dfs_sampler, noise, text, negative_text, steps, guidance_scale, repeats
    )

    ref = np.asarray(dense.latents, np.float64)
    out = np.asarray(sparse.latents, np.float64)
    rel_err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    plan = sparse.plan

    # Block masks of one layer at the first refresh step, raster vs hilbert3d.
    sparse_layers = dfs_backend.sparse_layers(cfg.num_layers)
    os.makedirs(out_dir, exist_ok=True)
    png_path = None
    mask_info: dict[str, Any] = {}
    if sparse_layers:
        layer = mask_layer if mask_layer is not None else cfg.num_layers // 2
        if layer not in sparse_layers:
            layer = sparse_layers[0]
        refresh = plan.refresh_steps
        step = refresh[0] if refresh else min(steps - 1, dfs_config.dense_steps)
        density = float(plan.density[step]) if plan.sparse[step] else dfs_config.density
        sigma = float(dense.sigmas[step])
        x_t = (1.0 - sigma) * dense.latents + sigma * noise
        masks = {
            order: block_masks(
                model, x_t, float(dense.timesteps[step]), text, dfs_config,
                order=order, layer=layer, density=density,
            )
            for order in mask_orders
        }
        png_path = plot_block_masks(
            masks,
            os.path.join(out_dir, f"masks_{cfg.name}.png"),
            title=f"{cfg.name}: layer {layer} block masks at step {step} (density {density:.2f}, {nk} key blocks)",
            heads=mask_heads,
        )
        mask_info = {
            "layer": layer,
            "step": step,
            "density": density,
            "kept_fraction": {o: float(m.mean()) for o, m in masks.items()},
        }

    report = {
        "config": cfg.name,
        "device": device_name(),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "dtype": str(model.dtype),
        "video": {"frames": frames, "height": height, "width": width},
        "latent_shape": list(shape),
        "token_grid": list(grid),
        "tokens": num_tokens,
        "num_key_blocks": nk,
        "steps": steps,
        "solver": solver,
        "shift": shift,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "dfs_config": dataclasses.asdict(dfs_config),
        "refresh_steps": list(sparse.refresh_steps),
        "sparse_steps": int(plan.sparse.sum()),
        **_timing_fields(times, steps),
        "sparsity": sparse.sparsity,
        "planned_sparsity": reported_sparsity(plan, cfg.num_layers, dfs_config.dense_layers),
        "relative_error": rel_err,
        "max_abs_error": float(np.max(np.abs(out - ref))),
        "compiles": {"dense": dense_sampler.trace_count, "dfs": dfs_sampler.trace_count},
        "masks": mask_info,
        "mask_png": png_path,
        **(notes or {}),
    }
    return _save_report(report, out_dir)


def run_clip_comparison(
    model,
    dit_config,
    conditioner,
    *,
    num_samples: int = 2,
    steps: int = 50,
    seed: int = 0,
    clip=None,
    dfs_config: DFSConfig | None = None,
    guidance_scale: float | None = None,
    out_dir: str = "demo_out",
    mask_layer: int | None = None,
    progress: bool = True,
    weights: str | None = None,
    repeats: int = 1,
    notes: dict | None = None,
    mp4: bool = True,
) -> dict:
    """Samples classes of the shipped clip model dense and with DFSAttn from the same noise.

    Both runs use the production :class:`~models.sampling.loop.Sampler` (one compile warm-up each,
    then ``repeats`` timed runs each; the report keeps every run's time, their medians and the
    medians' speedup). Writes into ``out_dir``: ``demo_<model>.gif`` (dense | DFSAttn, one row per
    sample), ``demo_<model>.mp4`` (the same video, when an MP4 encoder is installed:
    :func:`~models.evaluation.media.mp4_encoder`; otherwise the report's ``mp4_note`` says so),
    ``masks_<model>.png`` (one layer's block masks in raster and hilbert3d order at the
    first refresh step, :func:`models.evaluation.compare.block_masks`) and ``compare_<model>.json``.

    Args:
      model, dit_config, conditioner: from :func:`models.evaluation.small_dit.load_small_dit`.
      num_samples: classes sampled (:func:`clip_classes`).
      steps: denoising steps; the DFS schedule is :func:`default_schedule` for that count.
      seed: noise seed.
      clip: a :class:`~models.evaluation.clips.ClipConfig` overriding the trained clip size (smaller clips
        for CPU runs; the model has only seen the trained size).
      dfs_config: DFSAttn parameters before step scaling (default: ``DFSConfig()``, or 32-token
        blocks of 8-token tiles below 4096 tokens).
      guidance_scale: default ``dit_config.guidance_scale``.
      out_dir: output folder.
      mask_layer: layer drawn (default: the middle one).
      progress: progress bars.
      weights: the weights file (recorded in the report).
      repeats: timed runs of each of dense and DFS (see :func:`run_comparison`).
      notes: extra entries merged into the report (the demo records what it scaled down).
      mp4: also write the MP4 when an encoder is installed.

    Returns:
      The report (also written as JSON).
    """

    cfg = model.config
    clip = dit_config.clip if clip is None else clip
    s = dit_config.codec.space_to_depth
    shape = (dit_config.codec.channels, clip.frames, clip.height // s, clip.width // s)
    grid = clip_token_grid(clip, dit_config.codec, cfg.patch_size)
    num_tokens = math.prod(grid)
    if dfs_config is None:
        block_size, tile_size = harness_blocks(num_tokens)
        dfs_config = DFSConfig(block_size=block_size, tile_size=tile_size)
    dfs_config = default_schedule(steps, dfs_config)
    guidance_scale = dit_config.guidance_scale if guidance_scale is None else float(guidance_scale)
    photo, motion = clip_classes(num_samples)
    noise = jax.random.normal(jax.random.key(seed), (num_samples,) + shape, jnp.float32)
    text = conditioner(jnp.asarray(photo), jnp.asarray(motion))
    negative = conditioner.unconditional(num_samples)

    dense_sampler = Sampler(model, "dense", shift=dit_config.sample_shift, progress=progress)
    backend = AttentionBackend("dfs", dfs_config)
    dfs_sampler = Sampler(model, backend, shift=dit_config.sample_shift, progress=progress)
    dense, sparse, times = _timed_pair(dense_sampler, dfs_sampler, noise, text, negative, steps, guidance_scale, repeats)
    ref_video = latents_to_video(dense.latents, dit_config.codec)
    dfs_video = latents_to_video(sparse.latents, dit_config.codec)
    scores = video_scores(dfs_video, ref_video)
    captions = [f"{BACKGROUND_PHOTOS[p]} / {MOTIONS[m]}" for p, m in zip(photo, motion)]

    os.makedirs(out_dir, exist_ok=True)
    name = cfg.name
    scale = max(1, 256 // max(ref_video.shape[2:4]))
    gif = write_side_by_side_gif(
        ref_video, dfs_video, os.path.join(out_dir, f"demo_{name}.gif"), captions=captions, scale=scale
    )
    mp4_path, mp4_note = None, None
    if mp4:
        try:
            mp4_path = write_side_by_side_mp4(
                ref_video, dfs_video, os.path.join(out_dir, f"demo_{name}.mp4"), captions=captions, scale=scale
            )
        except Exception as err:  # an optional output: an encoder failure must not lose the run
            mp4_note = f"no MP4 written: the encoder failed ({type(err).__name__}: {err}); the GIF has the same video"
        else:
            if mp4_path is None:
                mp4_note = (
                    f"no MP4 written: no MP4 encoder is installed (to get one: {MP4_ENCODER_HINT}); the GIF has the same video"
                )
    plan = sparse.plan
    sparse_layers = backend.sparse_layers(cfg.num_layers)
    mask_png, mask_info = None, {}
    if sparse_layers and plan.refresh_steps:
        layer = mask_layer if mask_layer is not None else cfg.num_layers // 2
        layer = layer if layer in sparse_layers else sparse_layers[0]
        step = plan.refresh_steps[0]
        density = float(plan.density[step])
        sigma = float(dense.sigmas[step])
        x_t = (1.0 - sigma) * dense.latents[:1] + sigma * noise[:1]
        masks = {
            order: block_masks(model, x_t, float(dense.timesteps[step]), text[:1], dfs_config, order=order, layer=layer, density=density)
            for order in ("raster", "hilbert3d")
        }
        mask_png = plot_block_masks(
            masks, os.path.join(out_dir, f"masks_{name}.png"),
            title=f"{name}: layer {layer} block masks at step {step} (density {density:.2f}, "
            f"{plan.num_key_blocks} key blocks), {captions[0]}",
        )  # fmt: skip
        mask_info = {"layer": layer, "step": step, "density": density}
    report = {
        "config": name,
        "weights": weights,
        "device": device_name(),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "dtype": str(model.dtype),
        "clip": dataclasses.asdict(clip),
        "latent_shape": list(shape),
        "token_grid": list(grid),
        "tokens": num_tokens,
        "num_key_blocks": num_token_blocks(num_tokens, dfs_config.block_size),
        "samples": captions,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "dfs_config": dataclasses.asdict(dfs_config),
        "refresh_steps": list(sparse.refresh_steps),
        **_timing_fields(times, steps),
        "sparsity": sparse.sparsity,
        "planned_sparsity": reported_sparsity(plan, cfg.num_layers, dfs_config.dense_layers),
        "psnr": [float(x) for x in scores["psnr"]],
        "ssim": [float(x) for x in scores["ssim"]],
        "psnr_mean": float(np.mean(scores["psnr"])),
        "ssim_mean": float(np.mean(scores["ssim"])),
        "lpips": None,
        "lpips_note": "not measured: LPIPS needs pretrained network weights that cannot be installed without a download",
        "gif": gif,
        "mp4": mp4_path,
        "mp4_note": mp4_note,
        "masks": mask_info,
        "mask_png": mask_png,
        **(notes or {}),
    }
    return _save_report(report, out_dir)
