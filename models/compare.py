"""Dense vs DFSAttn on the same model and noise: timings, sparsity, error, and a mask picture.

:func:`run_comparison` samples the same noise with the same weights twice (dense self-attention
and DFSAttn), each after a compile warm-up (a 1-step run of the same compiled program), and
reports time per step and in total, the speedup, the sparsity actually used (SPEC §6: mean
skipped block fraction over the sparse steps and all self-attention layers, dense layers 0),
and the relative error of the final latents against dense. It writes a JSON report and a PNG
of one layer's block masks for a few heads in raster and hilbert3d order, computed at the
first refresh step on the flow-matching interpolation of the dense result and the noise.
"""

from __future__ import annotations

import dataclasses
import json
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
from dfsattn_jax.schedule import DFSConfig, reported_sparsity
from models.attention_backend import AttentionBackend, init_cache, num_token_blocks, sparse_step
from models.configs import get_config, latent_shape, token_grid
from models.sampler import Sampler
from models.wan import WanTransformer3DModel

__all__ = ["run_comparison", "format_report", "default_dfs_config", "block_masks", "plot_block_masks", "device_name"]


def device_name() -> str:
    """The first JAX device's kind, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu"``."""
    dev = jax.devices()[0]
    return dev.device_kind if dev.platform != "cpu" else "cpu"


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
        prep = m.prepare(latents.astype(m.dtype), t, text.astype(m.dtype), backend=backend)
        x = prep.tokens
        for i in range(layer + 1):
            x, cache = m.run_block(i, x, prep, backend=backend, control=sparse_step(keep), cache=cache)
        return cache_layout(cache, slot, nk).to_dense_mask()[0]

    return np.asarray(run(state, latents, text))


def plot_block_masks(masks: dict[str, np.ndarray], path: str, *, title: str, heads: int = 4) -> str:
    """Saves a grid (rows: orders, columns: heads) of block masks ``bool[N, nq, nk]`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = list(masks)
    heads = max(1, min(heads, *(m.shape[0] for m in masks.values())))
    fig, axes = plt.subplots(len(orders), heads, figsize=(2.6 * heads, 2.8 * len(orders)), squeeze=False)
    for r, order in enumerate(orders):
        for h in range(heads):
            ax = axes[r][h]
            mask = masks[order][h]
            ax.imshow(mask, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
            ax.set_title(f"{order}, head {h}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel("query block", fontsize=7)
            if r == len(orders) - 1:
                ax.set_xlabel("key block", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
      dfs_config: DFSAttn parameters (default :func:`default_dfs_config`).
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
    dfs_config = dfs_config if dfs_config is not None else default_dfs_config(cfg.name)
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
    json_path = os.path.join(out_dir, f"compare_{cfg.name}.json")
    report["report_json"] = json_path
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    return report


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

