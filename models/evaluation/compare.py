"""Dense vs DFSAttn on the same model and noise: timings, sparsity, error, and a mask picture.

Two comparisons: :func:`run_comparison` on a Wan config with random weights, and
:func:`run_clip_comparison` on the shipped small video DiT (decoded videos, PSNR/SSIM, a
side-by-side GIF). Both sample through the production :class:`~models.sampling.loop.Sampler`.

:func:`run_comparison` samples the same noise with the same weights twice (dense self-attention
and DFSAttn), each after a compile warm-up (a 1-step run of the same compiled program), and
reports time per step and in total, the speedup, the sparsity actually used (docs/spec.md §6: mean
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
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfsattn_jax.cache import cache_layout
from dfsattn_jax.schedule import DFSConfig, default_schedule, reported_sparsity
from models.common.processor import AttentionBackend, AttentionState, init_cache, num_token_blocks, sparse_step
from models.evaluation.clips import BACKGROUND_PHOTOS, MOTIONS, clip_classes
from models.evaluation.codec import latents_to_video, token_grid as clip_token_grid
from models.evaluation.media import plot_block_masks, write_side_by_side_gif
from models.evaluation.quality import video_scores
from models.evaluation.results import device_name, write_json
from models.sampling import Sampler
from models.wan.config import get_config, latent_shape, token_grid
from models.wan.transformer import WanTransformer3DModel

__all__ = [
    "block_masks",
    "default_dfs_config",
    "format_clip_report",
    "format_report",
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


def _timed(sampler: Sampler, noise, text, negative, steps: int, guidance_scale: float):
    sampler.warmup(noise, text, negative, num_steps=steps)  # compiles the same program
    start = time.perf_counter()
    result = sampler(noise, text, negative, num_steps=steps, guidance_scale=guidance_scale)
    jax.block_until_ready(result.latents)
    return result, time.perf_counter() - start


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
    dense, t_dense = _timed(dense_sampler, noise, text, negative_text, steps, guidance_scale)
    sparse, t_dfs = _timed(dfs_sampler, noise, text, negative_text, steps, guidance_scale)

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
        "time_total_s": {"dense": t_dense, "dfs": t_dfs},
        "time_per_step_s": {"dense": t_dense / steps, "dfs": t_dfs / steps},
        "speedup": t_dense / t_dfs if t_dfs > 0 else float("nan"),
        "sparsity": sparse.sparsity,
        "planned_sparsity": reported_sparsity(plan, cfg.num_layers, dfs_config.dense_layers),
        "relative_error": rel_err,
        "max_abs_error": float(np.max(np.abs(out - ref))),
        "compiles": {"dense": dense_sampler.trace_count, "dfs": dfs_sampler.trace_count},
        "masks": mask_info,
        "mask_png": png_path,
    }
    return _save_report(report, out_dir)


def format_report(report: dict) -> str:
    """A short human-readable summary of :func:`run_comparison`'s report."""
    t = report["time_per_step_s"]
    lines = [
        f"{report['config']} on {report['device']}: {report['tokens']} tokens, {report['steps']} steps",
        f"  time/step  dense {t['dense'] * 1e3:9.2f} ms   dfs {t['dfs'] * 1e3:9.2f} ms   "
        f"speedup {report['speedup']:.2f}x",
        f"  total      dense {report['time_total_s']['dense']:9.2f} s    dfs {report['time_total_s']['dfs']:9.2f} s",
        f"  sparsity {report['sparsity']:.4f} (planned {report['planned_sparsity']:.4f}), "
        f"refreshes at {report['refresh_steps']}",
        f"  final latents: relative error vs dense {report['relative_error']:.4e}",
        f"  report {report['report_json']}, masks {report['mask_png']}",
    ]
    return "\n".join(lines)


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
) -> dict:
    """Samples classes of the shipped clip model dense and with DFSAttn from the same noise.

    Both runs use the production :class:`~models.sampling.loop.Sampler` (each timed after a compile
    warm-up). Writes into ``out_dir``: ``demo_<model>.gif`` (dense | DFSAttn, one row per
    sample), ``masks_<model>.png`` (one layer's block masks in raster and hilbert3d order at the
    first refresh step, :func:`models.evaluation.compare.block_masks`) and ``compare_<model>.json``.

    Args:
      model, dit_config, conditioner: from :func:`models.evaluation.small_dit.load_small_video_dit` and
        :func:`~models.evaluation.small_dit.load_clip_conditioner`.
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
        dfs_config = DFSConfig() if num_tokens >= 4096 else DFSConfig(block_size=32, tile_size=8)
    dfs_config = default_schedule(steps, dfs_config)
    guidance_scale = dit_config.guidance_scale if guidance_scale is None else float(guidance_scale)
    photo, motion = clip_classes(num_samples)
    noise = jax.random.normal(jax.random.key(seed), (num_samples,) + shape, jnp.float32)
    text = conditioner(jnp.asarray(photo), jnp.asarray(motion))
    negative = conditioner.unconditional(num_samples)

    dense_sampler = Sampler(model, "dense", shift=dit_config.sample_shift, progress=progress)
    backend = AttentionBackend("dfs", dfs_config)
    dfs_sampler = Sampler(model, backend, shift=dit_config.sample_shift, progress=progress)
    dense, t_dense = _timed(dense_sampler, noise, text, negative, steps, guidance_scale)
    sparse, t_dfs = _timed(dfs_sampler, noise, text, negative, steps, guidance_scale)
    ref_video = latents_to_video(dense.latents, dit_config.codec)
    dfs_video = latents_to_video(sparse.latents, dit_config.codec)
    scores = video_scores(dfs_video, ref_video)
    captions = [f"{BACKGROUND_PHOTOS[p]} / {MOTIONS[m]}" for p, m in zip(photo, motion)]

    os.makedirs(out_dir, exist_ok=True)
    name = cfg.name
    gif = write_side_by_side_gif(
        ref_video, dfs_video, os.path.join(out_dir, f"demo_{name}.gif"), captions=captions,
        scale=max(1, 256 // max(ref_video.shape[2:4])),
    )  # fmt: skip
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
        "time_total_s": {"dense": t_dense, "dfs": t_dfs},
        "time_per_step_s": {"dense": t_dense / steps, "dfs": t_dfs / steps},
        "speedup": t_dense / t_dfs if t_dfs > 0 else float("nan"),
        "sparsity": sparse.sparsity,
        "planned_sparsity": reported_sparsity(plan, cfg.num_layers, dfs_config.dense_layers),
        "psnr": [float(x) for x in scores["psnr"]],
        "ssim": [float(x) for x in scores["ssim"]],
        "psnr_mean": float(np.mean(scores["psnr"])),
        "ssim_mean": float(np.mean(scores["ssim"])),
        "lpips": None,
        "lpips_note": "not measured: LPIPS needs pretrained network weights that cannot be installed without a download",
        "gif": gif,
        "masks": mask_info,
        "mask_png": mask_png,
    }
    return _save_report(report, out_dir)


def format_clip_report(report: dict) -> str:
    """A short human-readable summary of :func:`run_clip_comparison`'s report."""
    t = report["time_per_step_s"]
    per = ", ".join(
        f"{c}: {p:.2f} dB / {s:.4f}" for c, p, s in zip(report["samples"], report["psnr"], report["ssim"])
    )
    lines = [
        f"{report['config']} (trained weights {report['weights']}) on {report['device']}: {report['tokens']} tokens, "
        f"{len(report['samples'])} samples, {report['steps']} steps",
        f"  time/step  dense {t['dense'] * 1e3:9.2f} ms   dfs {t['dfs'] * 1e3:9.2f} ms   speedup {report['speedup']:.2f}x",
        f"  sparsity {report['sparsity']:.4f} (planned {report['planned_sparsity']:.4f}), refreshes at {report['refresh_steps']}",
        f"  DFSAttn vs dense video: PSNR {report['psnr_mean']:.2f} dB, SSIM {report['ssim_mean']:.4f} (mean); {per}",
        f"  video {report['gif']}, masks {report['mask_png']}, report {report['report_json']}",
    ]
    return "\n".join(lines)
