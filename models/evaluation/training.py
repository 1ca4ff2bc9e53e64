"""How a small video DiT of the quality harness is trained: stages, learning rate, loss, step.

The driver is ``python -m benchmarks.train_small``; the models are those of
:mod:`models.evaluation.small_dit`, and checkpoints are :mod:`models.evaluation.training_checkpoints`.

Objective (:mod:`models.evaluation.learning`): rectified flow as Wan trains it, ``x_σ = (1 - σ) x0
+ σ ε``, the model predicts ``ε - x0`` at timestep ``1000 σ``; ``σ`` shifted logit-normal
(shift ``train_shift = 3``); the conditioning is replaced by the learned null embedding with
probability ``p_uncond`` (0.1; classifier-free guidance) (:func:`flow_matching_loss`).

Stages (:class:`Stage`): the run is a sequence of stages, each a step range
with its own batch and clip size (the same model: RoPE positions follow the grid). The v2 recipe
(:func:`recipe`) trains first on 4-frame clips at the full 60×108 px (6,480 tokens: the photos'
detail at the final spatial scale for 1/16 of the attention cost per clip), then on the 16-frame
clips (25,920 tokens).

Optimisation (:func:`make_optimizer`, :func:`make_train_step`): AdamW (β = 0.9, 0.99, weight
decay 0.01), global-norm clipping at 1; the learning rate is given to every step from the host
(:func:`learning_rate`): linear warm-up, cosine decay to 10 % of the peak over all stages, times a
linear re-warm ramp after a resume without optimizer moments. The clips are rendered on the
device inside the jitted step from parameters drawn on the host.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dfsattn_jax.checks import check_int_fields
from models.evaluation.clips import NUM_MOTIONS, NUM_PHOTOS, ClipConfig
from models.evaluation.learning import clips_to_latents, sample_sigmas, velocity_loss
from models.evaluation.small_dit import SMOKE_DIT_CONFIG, ClipConditioner, SmallDiTConfig, get_small_dit
from models.wan.transformer import WanTransformer3DModel

__all__ = [
    "SmallDiT",
    "Stage",
    "TrainConfig",
    "flow_matching_loss",
    "learning_rate",
    "make_optimizer",
    "make_train_step",
    "recipe",
    "single_stage",
]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A step range of the training run with its own batch and clip size.

    Attributes:
      end: the stage runs steps ``[previous end, end)``.
      batch: clips per step.
      frames, height, width: clip size (pixels); the model's clip config with these fields.
    """

    end: int
    batch: int
    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        check_int_fields(self, ("end", "batch", "frames", "height", "width"), prefix="stage ")

    def clip(self, base: ClipConfig) -> ClipConfig:
        return dataclasses.replace(base, frames=self.frames, height=self.height, width=self.width)

    def text(self) -> str:
        return f"{self.end}:{self.batch}:{self.frames}x{self.height}x{self.width}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
      stages: the run's stages (the last one's ``end`` is the total step count).
      lr: peak learning rate.
      warmup: linear warm-up steps.
      final_lr: the cosine decay's end, as a fraction of ``lr``.
      weight_decay: AdamW weight decay.
      grad_clip: global gradient-norm clip.
      p_uncond: probability of the null conditioning (classifier-free guidance).
      rewarm: steps of the linear learning-rate ramp after a resume without optimizer moments.
      seed: data and initialisation seed.
    """

    stages: tuple[Stage, ...]
    lr: float = 6e-4
    warmup: int = 100
    final_lr: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    p_uncond: float = 0.1
    rewarm: int = 100
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.stages[-1].end

    def stage_index(self, step: int) -> int:
        """The index of the stage that runs ``step``."""
        for i, stage in enumerate(self.stages):
            if step < stage.end:
                return i
        raise ValueError(f"step {step} is past the last stage (end {self.steps})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def single_stage(config: SmallDiTConfig, steps: int, batch: int) -> tuple[Stage, ...]:
    """One stage of ``steps`` steps of ``batch`` clips at the model's clip size."""
    clip = config.clip
    return (Stage(steps, batch, clip.frames, clip.height, clip.width),)


def recipe(model: str) -> tuple[SmallDiTConfig, TrainConfig]:
    """The default model config and training settings of ``"v1"``, ``"v2"`` or ``"smoke"``.

    v1 is the shipped run's settings (it stopped at 2,400 of 2,600 planned steps: ``--steps
    2400``); v2 is planned for 15–20 H200 minutes (benchmarks/NOTES.md).
    """
    if model == "smoke":
        config = SMOKE_DIT_CONFIG
        stages = (Stage(10, 2, 2, 16, 16), Stage(20, 2, 4, 16, 16))
        return config, TrainConfig(stages=stages, warmup=5, rewarm=3)
    config = get_small_dit(model).config
    if model == "v1":
        return config, TrainConfig(stages=single_stage(config, 2600, 8))
    stages = (Stage(2000, 32, 4, 60, 108), Stage(3100, 8, 16, 60, 108))
    return config, TrainConfig(stages=stages, lr=4e-4, warmup=200)


def learning_rate(step: int, cfg: TrainConfig, rewarm_from: int | None = None) -> float:
    """The learning rate of update ``step`` (0-based): linear warm-up to ``cfg.lr`` over
    ``cfg.warmup`` steps, then cosine decay to ``cfg.final_lr * cfg.lr`` at ``cfg.steps``; after
    a resume without optimizer moments at ``rewarm_from``, times ``min(1, (step - rewarm_from + 1) / cfg.rewarm)``."""
    warmup = max(1, min(cfg.warmup, cfg.steps - 1)) if cfg.steps > 1 else 1
    if step < warmup:
        lr = cfg.lr * step / warmup
    else:
        frac = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        end = cfg.final_lr * cfg.lr
        lr = end + (cfg.lr - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if rewarm_from is not None and step >= rewarm_from:
        lr *= min(1.0, (step - rewarm_from + 1) / max(1, cfg.rewarm))
    return float(lr)


class SmallDiT(nnx.Module):
    """What is trained: the transformer and its conditioner."""

    def __init__(self, config: SmallDiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype=jnp.float32):
        self.transformer = WanTransformer3DModel(config.wan, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conditioner = ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=rngs)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW without its learning rate (the step scales the update by ``-learning_rate(step)``)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.99),
        optax.add_decayed_weights(cfg.weight_decay),
    )


def flow_matching_loss(
    bundle: SmallDiT, latents: jax.Array, photo: jax.Array, motion: jax.Array, key: jax.Array,
    *, shift: float, p_uncond: float,
) -> jax.Array:  # fmt: skip
    """Mean squared error of the predicted velocity ``ε - x0``, conditioning dropped with ``p_uncond`` (float32)."""
    k_noise, k_sigma, k_drop = jax.random.split(key, 3)
    batch = latents.shape[0]
    eps = jax.random.normal(k_noise, latents.shape, jnp.float32)
    sigma = sample_sigmas(k_sigma, batch, shift)
    drop = jax.random.uniform(k_drop, (batch,)) < p_uncond
    text = bundle.conditioner(jnp.where(drop, NUM_PHOTOS, photo), jnp.where(drop, NUM_MOTIONS, motion))
    return jnp.mean(velocity_loss(bundle.transformer, text, latents, eps, sigma))


def make_train_step(graphdef, config: SmallDiTConfig, clip: ClipConfig, tx: optax.GradientTransformation, cfg: TrainConfig):
    """The jitted step ``(params, opt_state, images, clip_params, key, lr) -> (params, opt_state, loss)``
    on clips of size ``clip``."""

    def step(params, opt_state, images, clip_params, key, lr):
        latents = clips_to_latents(images, clip_params, clip, config.codec)

        def loss_fn(p):
            bundle = nnx.merge(graphdef, p)
            return flow_matching_loss(
                bundle, latents, clip_params.photo, clip_params.motion, key,
                shift=config.train_shift, p_uncond=cfg.p_uncond,
            )  # fmt: skip

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))
