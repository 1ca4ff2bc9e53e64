"""Train the small video DiT of the quality harness (``models/evaluation/small_dit.py``) on synthetic clips.

Model: the Wan2.1 architecture of ``models/wan/transformer.py`` at :data:`models.evaluation.small_dit.SMALL_WAN_CONFIG`
(dim 256, 6 layers, 4 heads of 64, 6.9 M parameters), on 16-frame 64×64 clips of
``models/evaluation/clips.py`` (latent ``[3, 16, 64, 64]``, 16,384 tokens), conditioned through the
cross-attention on a learned embedding of the clip's photo and motion class
(:class:`models.evaluation.small_dit.ClipConditioner`, 2 + 2 tokens of width 64).

Objective: rectified flow as Wan trains it: ``x_σ = (1 - σ) x0 + σ ε``, the model predicts
``ε - x0`` at timestep ``1000 σ`` (the sampler in ``models/sampling/loop.py`` integrates exactly this
velocity). ``σ = s u / (1 + (s - 1) u)`` with ``u = sigmoid(n)``, ``n ~ N(0, 1)`` (logit-normal,
shifted by ``s = train_shift = 3`` towards high noise, where the shift-5 sampler spends its
steps). The conditioning is replaced by the learned null embedding with probability 0.1
(classifier-free guidance).

Optimisation: optax AdamW (β = 0.9, 0.99, weight decay 0.01), global-norm clipping at 1, linear
warm-up then cosine decay to 10 %; float32 master weights, bfloat16 activations on GPU (float32
on CPU). The clips are rendered on the device inside the jitted step from parameters drawn on
the host with the seed ``(seed, step)``, so a resumed run sees exactly the data it would have.

Outputs (``--out``, default ``out/train_small``): ``checkpoint.safetensors`` (params, AdamW
state and step; written every ``--checkpoint-every`` steps and at the end; a rerun with the same
``--out`` resumes from it), ``losses.json``, ``loss.png`` (the loss curve), ``samples.png`` /
``samples.gif`` (real clips vs 50-step samples of the same classes), ``train_summary.json``;
with ``--results DIR`` copies of the pictures and summaries (for the README); with ``--export
PATH`` the shipped weights (bfloat16 safetensors + ``.sha256``).

Usage (from the repository root; needs the package installed: ``pip install -e .``)::

    # CPU smoke test (tiny model, 4-frame 16×16 clips; well under a minute):
    JAX_PLATFORMS=cpu python benchmarks/train_small.py --smoke --out /tmp/train_smoke

    # The shipped model: about 7 min on one H100 (7.2 steps/s at batch 8, 32 s compile, 22 s
    # of sampling); --time-limit guarantees the 8-minute budget on a slower machine:
    python benchmarks/train_small.py --steps 2600 --batch 8 --time-limit 450 \\
        --out out/train_small --results benchmarks/results/train_small \\
        --export models/evaluation/weights/small_video_dit.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.evaluation.clips import (
    MOTIONS,
    NUM_MOTIONS,
    NUM_PHOTOS,
    BACKGROUND_PHOTOS,
    ClipParams,
    load_photo_bank,
    render_clips,
    sample_clip_params,
)
from models.evaluation.codec import encode_latent, latents_to_video
from models.evaluation.results import device_name, portable, write_json
from models.evaluation.small_dit import (
    SMALL_DIT_CONFIG,
    SMOKE_DIT_CONFIG,
    ClipConditioner,
    SmallDiTConfig,
    flatten_state,
    save_small_video_dit,
    unflatten_into,
)
from models.io import atomic_write, atomic_write_bytes, atomic_write_text
from models.wan.transformer import WanTransformer3DModel

CHECKPOINT = "checkpoint.safetensors"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
      steps: optimizer steps in total (a resumed run continues up to it).
      batch: clips per step.
      lr: peak learning rate.
      warmup: linear warm-up steps.
      weight_decay: AdamW weight decay.
      grad_clip: global gradient-norm clip.
      p_uncond: probability of the null conditioning (classifier-free guidance).
      seed: data and initialisation seed.
    """

    steps: int = 2600
    batch: int = 8
    lr: float = 6e-4
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    p_uncond: float = 0.1
    seed: int = 0


class SmallDiT(nnx.Module):
    """What is trained: the transformer and its conditioner."""

    def __init__(self, config: SmallDiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype=jnp.float32):
        self.transformer = WanTransformer3DModel(config.wan, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conditioner = ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=rngs)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    warmup = max(1, min(cfg.warmup, cfg.steps - 1)) if cfg.steps > 1 else 1
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(cfg.steps, warmup + 1),
        end_value=0.1 * cfg.lr,
    )  # fmt: skip
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay),
    )


def sample_sigmas(key: jax.Array, batch: int, shift: float) -> jax.Array:
    """Training noise levels: shifted logit-normal, ``σ = s u / (1 + (s - 1) u)``, ``u = sigmoid(N(0, 1))``."""
    u = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    return shift * u / (1.0 + (shift - 1.0) * u)


def clips_to_latents(images: jax.Array, params: ClipParams, config: SmallDiTConfig) -> jax.Array:
    """Renders clips and encodes them: ``[B, C, F, H, W]`` float32 (the model's layout)."""
    video = render_clips(images, params, config.clip)
    latent = encode_latent(video, config.codec)  # [B, F, H, W, C]
    return jnp.moveaxis(latent, -1, 1)


def flow_matching_loss(
    bundle: SmallDiT, latents: jax.Array, photo: jax.Array, motion: jax.Array, key: jax.Array,
    *, shift: float, p_uncond: float,
) -> jax.Array:  # fmt: skip
    """Mean squared error of the predicted velocity ``ε - x0`` (float32)."""
    k_noise, k_sigma, k_drop = jax.random.split(key, 3)
    batch = latents.shape[0]
    eps = jax.random.normal(k_noise, latents.shape, jnp.float32)
    sigma = sample_sigmas(k_sigma, batch, shift)
    s = sigma[:, None, None, None, None]
    noisy = (1.0 - s) * latents + s * eps
    drop = jax.random.uniform(k_drop, (batch,)) < p_uncond
    text = bundle.conditioner(jnp.where(drop, NUM_PHOTOS, photo), jnp.where(drop, NUM_MOTIONS, motion))
    model = bundle.transformer
    out, _ = model(noisy.astype(model.dtype), sigma * 1000.0, text.astype(model.dtype))
    return jnp.mean(jnp.square(out.astype(jnp.float32) - (eps - latents)))


def make_train_step(graphdef, config: SmallDiTConfig, tx: optax.GradientTransformation, cfg: TrainConfig):
    """The jitted step ``(params, opt_state, images, clip_params, key) -> (params, opt_state, loss)``."""

    def step(params, opt_state, images, clip_params, key):
        latents = clips_to_latents(images, clip_params, config)

        def loss_fn(p):
            bundle = nnx.merge(graphdef, p)
            return flow_matching_loss(
                bundle, latents, clip_params.photo, clip_params.motion, key,
                shift=config.train_shift, p_uncond=cfg.p_uncond,
            )  # fmt: skip

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _opt_names(opt_state) -> list[str]:
    return ["opt" + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]


def save_checkpoint(path: pathlib.Path, params, opt_state, step: int, config: SmallDiTConfig, cfg: TrainConfig) -> None:
    """Params (float32), the optimizer state and the step, atomically (models.io.atomic_write_bytes)."""
    from safetensors.numpy import save

    tensors = flatten_state(nnx.to_pure_dict(params), "params.")
    leaves = jax.tree_util.tree_leaves(opt_state)
    tensors.update({name: np.asarray(leaf) for name, leaf in zip(_opt_names(opt_state), leaves)})
    tensors["step"] = np.asarray(step, np.int64)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {"config": config.to_json(), "train": json.dumps(dataclasses.asdict(cfg)), "step": str(step)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_checkpoint(path: pathlib.Path, params, opt_state, config: SmallDiTConfig):
    """Restores ``(params, opt_state, step)`` into the given templates; checks the model config."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("config") != config.to_json():
        raise ValueError(f"checkpoint {str(path)!r} was trained with another model config; use another --out")
    pure = unflatten_into(nnx.to_pure_dict(params), {k: v for k, v in tensors.items() if k.startswith("params.")}, "params.")
    nnx.replace_by_pure_dict(params, pure)
    names = _opt_names(opt_state)
    leaves, treedef = jax.tree_util.tree_flatten(opt_state)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks optimizer tensors {missing[:3]}")
    opt_state = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(tensors[n], leaf.dtype).reshape(leaf.shape) for n, leaf in zip(names, leaves)]
    )
    return params, opt_state, int(np.asarray(tensors["step"]).reshape(-1)[0])


# ----------------------------------------------------------------------------------------------
# Pictures


def plot_losses(losses: list[tuple[int, float]], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s for s, _ in losses])
    values = np.array([v for _, v in losses])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, lw=0.5, alpha=0.4, label="per step")
    if len(values) >= 10:
        k = max(5, len(values) // 50)
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (MSE of ε − x0)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:  # keeps the suffix: matplotlib picks the format from it
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _to_uint8(video: np.ndarray) -> np.ndarray:
    return np.clip(np.round((video + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_sample_pictures(
    real: np.ndarray, generated: np.ndarray, captions: Sequence[str], png: pathlib.Path, gif: pathlib.Path
) -> None:
    """PNG: for each class a row of real frames and a row of generated frames; GIF: side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n, t = real.shape[:2]
    cols = min(t, 8)
    frames = np.linspace(0, t - 1, cols).round().astype(int)
    fig, axes = plt.subplots(2 * n, cols, figsize=(1.1 * cols, 1.25 * 2 * n), squeeze=False)
    for i in range(n):
        for j, f in enumerate(frames):
            for r, (video, kind) in enumerate(((real, "real"), (generated, "sample"))):
                ax = axes[2 * i + r, j]
                ax.imshow(_to_uint8(video[i, f]))
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(kind, fontsize=7)
            axes[2 * i, j].set_title(f"t={f}", fontsize=6)
        axes[2 * i, 0].annotate(captions[i], (0, 1.35), xycoords="axes fraction", fontsize=7, ha="left")
    fig.tight_layout()
    with atomic_write(png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    # GIF: top row real clips, bottom row samples.
    rows = [np.concatenate(list(_to_uint8(v)), axis=2) for v in (real, generated)]  # [T, H, n*W, 3]
    pad = np.full(rows[0].shape[:1] + (2,) + rows[0].shape[2:], 255, np.uint8)
    movie = np.concatenate([rows[0], pad, rows[1]], axis=1)
    images = [Image.fromarray(frame) for frame in movie]
    with atomic_write(gif) as tmp:  # keeps the .gif suffix: Pillow picks the format from it
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=120, loop=0)


def generate_samples(
    bundle: SmallDiT, config: SmallDiTConfig, photo: np.ndarray, motion: np.ndarray, *, num_steps: int, seed: int
) -> np.ndarray:
    """Dense classifier-free-guided samples of the given classes: ``[B, F, H, W, 3]`` pixels."""
    from models.sampling.loop import Sampler

    batch = photo.shape[0]
    noise = jax.random.normal(jax.random.key(seed), (batch,) + config.latent_shape, jnp.float32)
    text = bundle.conditioner(jnp.asarray(photo), jnp.asarray(motion))
    negative = bundle.conditioner.unconditional(batch)
    sampler = Sampler(bundle.transformer, "dense", shift=config.sample_shift, progress=False)
    result = sampler(noise, text, negative, num_steps=num_steps, guidance_scale=config.guidance_scale)
    return latents_to_video(result.latents, config.codec)


# ----------------------------------------------------------------------------------------------
# Driver


def _portable_path(path: pathlib.Path) -> str:
    """``path`` as results may hold it: repository-relative, or only its name when outside the
    repository (no machine paths in results files)."""
    try:
        return portable(pathlib.Path(path).resolve())
    except ValueError:
        return pathlib.Path(path).name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and clips, few steps (CPU smoke test)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default out/train_small[_smoke])")
    p.add_argument("--steps", type=int, default=None, help=f"total steps (default {d.steps}; smoke 20)")
    p.add_argument("--batch", type=int, default=None, help=f"clips per step (default {d.batch}; smoke 2)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=None, help=f"warm-up steps (default {d.warmup}; smoke 5)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--time-limit", type=float, default=None, help="stop training (and save) after this many seconds")
    p.add_argument("--sample-steps", type=int, default=None, help="denoising steps of the samples (default 50; smoke 4)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--no-samples", action="store_true")
    p.add_argument("--export", type=pathlib.Path, default=None, help="write the shipped weights (+ .sha256) here")
    p.add_argument("--results", type=pathlib.Path, default=None,
                   help="also copy loss.png, samples.png/.gif, losses.json and train_summary.json here")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Tiny CPU runs are dominated by XLA:CPU's LLVM optimisation (3× faster compiles at
        # level 0, same speed for these shapes). Takes effect only if no backend exists yet.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    config = SMOKE_DIT_CONFIG if args.smoke else SMALL_DIT_CONFIG
    defaults = dict(steps=20, batch=2, warmup=5) if args.smoke else {}
    cfg = TrainConfig(
        steps=args.steps or defaults.get("steps", TrainConfig.steps),
        batch=args.batch or defaults.get("batch", TrainConfig.batch),
        lr=args.lr,
        warmup=args.warmup if args.warmup is not None else defaults.get("warmup", TrainConfig.warmup),
        seed=args.seed,
    )
    if cfg.steps < 1 or cfg.batch < 1:
        raise ValueError(f"--steps and --batch must be positive, got {cfg.steps} and {cfg.batch}")
    out = args.out or pathlib.Path("out/train_small_smoke" if args.smoke else "out/train_small")
    out.mkdir(parents=True, exist_ok=True)
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    print(
        f"device {device_name()}; model {config.wan.name} (dim {config.wan.dim}, "
        f"{config.wan.num_layers} layers, {config.wan.num_heads} heads); latent {config.latent_shape}, "
        f"tokens {math.prod(config.token_grid)}; {cfg.steps} steps × batch {cfg.batch}; activations {jnp.dtype(dtype).name}",
        flush=True,
    )

    bank = load_photo_bank(config.clip.bank_size)
    images = jnp.asarray(bank.images)
    bundle = SmallDiT(config, rngs=nnx.Rngs(cfg.seed), dtype=dtype)
    graphdef, params = nnx.split(bundle, nnx.Param)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    start = 0
    losses: list[tuple[int, float]] = []
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not args.fresh:
        params, opt_state, start = load_checkpoint(ckpt, params, opt_state, config)
        if (out / "losses.json").exists():
            losses = [(int(s), float(v)) for s, v in json.loads((out / "losses.json").read_text()) if s < start]
        print(f"resumed from {ckpt} at step {start}", flush=True)
    train_step = make_train_step(graphdef, config, tx, cfg)
    base_key = jax.random.key(cfg.seed)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt, params, opt_state, step, config, cfg)
        atomic_write_text(out / "losses.json", json.dumps(losses))

    t_loop = time.perf_counter()
    pending: list[tuple[int, jax.Array]] = []
    step = start
    compile_s = None
    stopped_early = False
    while step < cfg.steps:
        clip_params = sample_clip_params((cfg.seed, step), cfg.batch, config.clip)
        params, opt_state, loss = train_step(params, opt_state, images, clip_params, jax.random.fold_in(base_key, step))
        pending.append((step, loss))
        step += 1
        if compile_s is None:
            jax.block_until_ready(loss)
            compile_s = time.perf_counter() - t_loop
            t_steady = time.perf_counter()
            print(f"step {step}: loss {float(loss):.4f} (first step incl. compile {compile_s:.1f} s)", flush=True)
        if step % args.log_every == 0 or step == cfg.steps:
            losses.extend((s, float(v)) for s, v in pending)
            pending.clear()
            rate = (step - start - 1) / max(time.perf_counter() - t_steady, 1e-9)
            recent = np.mean([v for _, v in losses[-args.log_every :]])
            print(f"step {step}: loss {recent:.4f} ({rate:.2f} steps/s)", flush=True)
        if step % args.checkpoint_every == 0 and step < cfg.steps:
            losses.extend((s, float(v)) for s, v in pending)
            pending.clear()
            checkpoint(step)
        if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit and step < cfg.steps:
            print(f"time limit reached at step {step}", flush=True)
            stopped_early = True
            break
    losses.extend((s, float(v)) for s, v in pending)
    if step > start:
        checkpoint(step)
    train_s = time.perf_counter() - t_loop
    steady = (step - start - 1) / max(time.perf_counter() - t_steady, 1e-9) if step - start > 1 else float("nan")
    if losses:
        plot_losses(losses, out / "loss.png", f"{config.wan.name}: {step} steps × batch {cfg.batch}")

    bundle = nnx.merge(graphdef, params)
    summary: dict[str, Any] = dict(
        device=device_name(),
        model=config.wan.name,
        parameters=int(num_params),
        tokens=math.prod(config.token_grid),
        steps=step,
        batch=cfg.batch,
        stopped_early=stopped_early,
        first_step_s=compile_s,
        steps_per_s=steady,
        train_s=train_s,
        final_loss=float(np.mean([v for _, v in losses[-100:]])) if losses else None,
    )
    if not args.no_samples:
        t0 = time.perf_counter()
        n = args.num_samples
        photo = np.arange(n) % NUM_PHOTOS
        motion = np.arange(n) % NUM_MOTIONS
        real = np.stack([
            np.asarray(render_clips(images, sample_clip_params((cfg.seed, 7, i), 1, config.clip, photo=int(p), motion=int(m)), config.clip))[0]
            for i, (p, m) in enumerate(zip(photo, motion))
        ])  # fmt: skip
        num_steps = args.sample_steps or (4 if args.smoke else 50)
        generated = generate_samples(bundle, config, photo, motion, num_steps=num_steps, seed=cfg.seed + 1)
        captions = [f"{BACKGROUND_PHOTOS[p]} / {MOTIONS[m]}" for p, m in zip(photo, motion)]
        save_sample_pictures(real, generated, captions, out / "samples.png", out / "samples.gif")
        summary["sample_s"] = time.perf_counter() - t0
        summary["sample_steps"] = num_steps
    if args.export is not None:
        digest = save_small_video_dit(
            args.export, bundle.transformer, bundle.conditioner, config,
            metadata={"steps": str(step), "batch": str(cfg.batch), "final_loss": str(summary["final_loss"]),
                      "train": json.dumps(dataclasses.asdict(cfg))},
        )  # fmt: skip
        summary["export"] = _portable_path(args.export)
        summary["sha256"] = digest
        summary["export_bytes"] = os.path.getsize(args.export)
    summary["total_s"] = time.perf_counter() - t_start
    write_json(out / "train_summary.json", summary)
    if args.results is not None:
        for name in ("loss.png", "samples.png", "samples.gif", "losses.json", "train_summary.json"):
            if (out / name).is_file():
                with atomic_write(args.results / name) as tmp:
                    shutil.copyfile(out / name, tmp)
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
