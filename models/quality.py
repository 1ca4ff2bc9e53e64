"""Quality harness: DFSAttn and other sparse schemes against dense sampling of one model (SPEC §9).

One compiled program for every variant. :class:`QualityRunner` samples a Wan model (the small
video DiT of :mod:`models.pretrained`, or any :class:`~models.wan.WanTransformer3DModel`) in one
``jax.jit``-ed flow-matching loop, like :class:`models.sampler.Sampler`, but with everything that
distinguishes the variants of the quality benchmark passed in as *arrays*:

* the token order: ``perm`` / ``inverse`` ``int32[L]`` (and the RoPE tables built from ``perm`` on
  device), so raster, hilbert2d, block3d, morton3d and hilbert3d share the program;
* the step plan (``sparse``, ``refresh``, ``num_blocks`` per step), so every density, the default
  schedule and "refresh at every sparse step" share it;
* the layout source at a refresh, an ``int32`` index into a ``lax.switch``: hierarchical DFS
  scoring (:func:`~dfsattn_jax.scoring.block_scores`) with each tile size of the runner's static
  ``tile_sizes`` (tile = block is plain block mean pooling), or externally given static block
  scores per step (the spatio-temporal window of :mod:`dfsattn_jax.baselines`; top-k of its
  ranks is exactly :func:`~dfsattn_jax.baselines.static_window_layout`).

Only the model, the batch and latent shapes, ``block_size``, ``tile_sizes``, ``dense_layers``,
``max_blocks`` (``K_max`` of the mask cache) and the number of sampled query rows are static.

The forward pass is the model's own (its ``condition_embedder``, ``patch_embedding``, blocks'
sub-modules, ``norm_out``, ``proj_out``), composed here with the self-attention of
:mod:`models.attention_backend` generalised as above; ``tests/test_quality.py`` checks that it
reproduces :class:`~models.sampler.Sampler` (dense and DFS) exactly.

Measurements (traced flag ``measure``; off, the loop runs at the speed of plain sampling):

* **recall** of the layout in force, per layer and step: the dense softmax mass its blocks cover
  (SPEC §9), exact per sampled query row, averaged over rows, batch (both guidance branches) and
  heads; 1 for dense layers and steps;
* **attention error** per layer and step: ``‖o_sparse − o_dense‖ / ‖o_dense‖`` over the sampled
  query rows (rows, heads, batch and channels pooled), ``o_dense`` computed exactly in float32.
  With all rows sampled it is SPEC §9's attention error; at dense steps it is the dense kernel's
  own rounding (cuDNN in bf16: ~4e-3), the floor of the measure;
* **skipped** block fraction per step (SPEC §6 convention; :attr:`RunOutput.sparsity`).

Fidelity (:func:`video_scores`): PSNR and SSIM (:mod:`dfsattn_jax.fidelity`) of each decoded
video against the dense run's, from the same noise. LPIPS is not measured: it needs pretrained
AlexNet/VGG weights that cannot be installed here without a download.

:func:`run_clip_comparison` is the demo's path for the shipped model: dense vs DFSAttn through
the production :class:`~models.sampler.Sampler`, PSNR/SSIM, and the two videos side by side as a
GIF (:func:`write_side_by_side_gif`, Pillow).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.baselines import static_window_scores
from dfsattn_jax.cache import MaskCache, cache_layout, init_mask_cache
from dfsattn_jax.fidelity import psnr, ssim
from dfsattn_jax.layout import check_density
from dfsattn_jax.orders import ORDER_NAMES, inverse_permutation, token_order
from dfsattn_jax.schedule import DFSConfig, SchedulePlan, plan_schedule, reported_sparsity
from dfsattn_jax.scoring import block_scores, check_tile_size
from models.attention_backend import (
    AttentionBackend,
    StepControl,
    num_token_blocks,
    self_attention,
    skipped_fraction,
)
from models.clips import MOTIONS, NUM_MOTIONS, NUM_PHOTOS, BACKGROUND_PHOTOS, decode_latent
from models.rope import rope_tables
from models.sampler import get_solver, make_schedule, make_step_plan, step_capacity
from models.wan import patchify, unpatchify

__all__ = [
    "SCORING_WINDOW",
    "Variant",
    "LayerStats",
    "RunOutput",
    "QualityRunner",
    "default_schedule",
    "fixed_density",
    "refresh_every_step",
    "variant_plan",
    "window_step_scores",
    "sampled_row_stats",
    "default_variants",
    "clip_classes",
    "latents_to_video",
    "video_scores",
    "card_slug",
    "write_side_by_side_gif",
    "run_clip_comparison",
    "format_clip_report",
]

#: ``Variant.scoring`` value of the static spatio-temporal window baseline.
SCORING_WINDOW = "window"
_HIGHEST = jax.lax.Precision.HIGHEST
#: Peak float32 elements of one batch of sampled softmax rows (128 MiB).
_ROW_BUDGET = 1 << 25


# ----------------------------------------------------------------------------------------------
# Plans and variants


def default_schedule(num_steps: int, base: DFSConfig = DFSConfig()) -> DFSConfig:
    """The default schedule for a run of ``num_steps`` steps.

    At 50 steps this is ``base`` itself (SPEC §6: dense 0–11, refreshes at 12, 24, 36). For other
    step counts ``dense_steps`` and ``refresh_interval`` are scaled by ``num_steps / 50`` (rounded,
    at least 1), so that short CPU runs keep the same shape: e.g. 20 steps → dense 0–4, refreshes
    at 5, 10, 15 with densities 0.3, 0.2, 0.1.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps == 50:
        return base
    factor = num_steps / 50.0
    return dataclasses.replace(
        base,
        dense_steps=max(1, round(base.dense_steps * factor)),
        refresh_interval=max(1, round(base.refresh_interval * factor)),
    )


def fixed_density(config: DFSConfig, density: float) -> DFSConfig:
    """``config`` at a fixed ``density``: no decrement (a refresh every ``refresh_interval`` steps
    after the dense steps, always at ``density``)."""
    return dataclasses.replace(config, density=check_density(density), density_decrement=0.0)


def refresh_every_step(plan: SchedulePlan) -> SchedulePlan:
    """The same densities as ``plan``, with the mask recomputed at every sparse step."""
    return dataclasses.replace(plan, refresh=plan.sparse.copy())


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of sampling, compared against the dense run.

    Attributes:
      name: unique label.
      group: ``"dense"``, ``"order"``, ``"tile"``, ``"window"`` or ``"refresh"`` (for tables).
      sparse: ``False`` for the dense reference (every other field is then ignored).
      order: token order (:data:`~dfsattn_jax.orders.ORDER_NAMES`).
      scoring: ``"dfs"`` (hierarchical scoring) or :data:`SCORING_WINDOW` (static window).
      tile_size: DFS scoring tile (``None``: the runner's default tile).
      density: a fixed density (no decrement); ``None``: the default schedule.
      refresh: ``"schedule"`` (cache between refreshes) or ``"every"`` (refresh at every sparse step).
    """

    name: str
    group: str
    sparse: bool = True
    order: str = "hilbert3d"
    scoring: str = "dfs"
    tile_size: int | None = None
    density: float | None = None
    refresh: str = "schedule"

    def __post_init__(self) -> None:
        if self.order not in ORDER_NAMES:
            raise ValueError(f"order must be one of {ORDER_NAMES}, got {self.order!r}")
        if self.scoring not in ("dfs", SCORING_WINDOW):
            raise ValueError(f"scoring must be 'dfs' or {SCORING_WINDOW!r}, got {self.scoring!r}")
        if self.refresh not in ("schedule", "every"):
            raise ValueError(f"refresh must be 'schedule' or 'every', got {self.refresh!r}")
        if self.density is not None:
            object.__setattr__(self, "density", check_density(self.density))

    @property
    def schedule_label(self) -> str:
        return "default" if self.density is None else f"{self.density:g}"


def variant_plan(variant: Variant, num_steps: int, num_key_blocks: int, base: DFSConfig) -> SchedulePlan | None:
    """The step plan of ``variant`` (``None`` for dense): ``base`` (already scaled to
    ``num_steps``, see :func:`default_schedule`), at a fixed density if given, refreshed at every
    sparse step if asked."""
    if not variant.sparse:
        return None
    config = base if variant.density is None else fixed_density(base, variant.density)
    plan = plan_schedule(config, num_steps, num_key_blocks)
    return refresh_every_step(plan) if variant.refresh == "every" else plan


def window_step_scores(
    grid: tuple[int, int, int],
    perm: Int[np.ndarray, " L"],
    plan: SchedulePlan,
    capacity: int,
    *,
    block_size: int,
    cache: dict | None = None,
) -> Float[np.ndarray, "p nq nk"]:
    """Static-window block scores for every step of ``plan``: ``float32[capacity, nq, nk]``.

    Step ``s`` holds :func:`~dfsattn_jax.baselines.static_window_scores` at the density in force
    (only refresh steps read them); other steps hold zeros. ``cache`` (a dict the caller owns)
    memoises the scores per ``(perm bytes, density)``.
    """
    nk = plan.num_key_blocks
    out = np.zeros((capacity, nk, nk), np.float32)
    for step in np.flatnonzero(plan.sparse):
        density = float(plan.density[step])
        key = (np.asarray(perm).tobytes(), block_size, density)
        if cache is None or key not in cache:
            scores = np.asarray(static_window_scores(grid, perm, block_size=block_size, density=density))
            if cache is not None:
                cache[key] = scores
        else:
            scores = cache[key]
        out[step] = scores
    return out


def default_variants(
    *,
    orders: Sequence[str] = ("raster", "hilbert2d", "block3d", "morton3d", "hilbert3d"),
    densities: Sequence[float] = (0.3, 0.2, 0.1, 0.05),
    tile_size: int = 16,
    block_size: int = 128,
    other_tiles: Sequence[int] = (8, 32),
    tile_densities: Sequence[float | None] = (None, 0.1),
    window_orders: Sequence[str] = ("hilbert3d",),
    refresh_densities: Sequence[float | None] = (None,),
) -> tuple[Variant, ...]:
    """The variants of the quality benchmark (issue 5), dense reference first.

    * ``order``: every order × (each fixed density, the default schedule), DFS scoring;
    * ``tile``: hilbert3d with tile = block (plain block mean pooling) and each of ``other_tiles``
      at each of ``tile_densities`` (``None``: default schedule); tile ``tile_size`` is in ``order``;
    * ``window``: the static window in each of ``window_orders`` at each density and with the
      default schedule's densities;
    * ``refresh``: hilbert3d refreshed at every sparse step at each of ``refresh_densities``
      (compare with the cached ``order`` rows of the same densities).
    """
    out = [Variant("dense", "dense", sparse=False, order="raster")]
    schedules: list[float | None] = [*densities, None]
    label = lambda d: "default" if d is None else f"d={d:g}"  # noqa: E731
    for order in orders:
        for d in schedules:
            out.append(Variant(f"{order}/{label(d)}", "order", order=order, density=d))
    tiles = [block_size] + [t for t in other_tiles if t not in (tile_size, block_size)]
    for tile in tiles:
        for d in tile_densities:
            out.append(Variant(f"hilbert3d/tile{tile}/{label(d)}", "tile", order="hilbert3d", tile_size=tile, density=d))
    for order in window_orders:
        for d in schedules:
            out.append(Variant(f"window-{order}/{label(d)}", "window", order=order, scoring=SCORING_WINDOW, density=d))
    for d in refresh_densities:
        out.append(Variant(f"hilbert3d/{label(d)}/refresh-every-step", "refresh", order="hilbert3d", density=d, refresh="every"))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Measurements inside the loop


class LayerStats(NamedTuple):
    """Recall and attention error of one layer at one step (float32 scalars)."""

    recall: Float[Array, ""]
    error: Float[Array, ""]


def sampled_row_stats(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    out: Float[Array, "b l n d"],
    block_mask: Bool[Array, "b n nq nk"],
    rows: Int[Array, " s"],
    *,
    block_size: int,
    scale: float | None = None,
    row_budget: int = _ROW_BUDGET,
) -> LayerStats:
    """Recall of ``block_mask`` and relative error of ``out`` on the query rows ``rows``.

    For each sampled row ``i`` (in attention order) the exact dense probabilities
    ``p_ij = softmax_j(q_i · k_j · scale)`` over all ``L`` keys (float32) give

    * recall: ``Σ_j p_ij M[block(i), block(j)]``, averaged over rows, batch and heads
      (equals :func:`dfsattn_jax.metrics.layout_recall` averaged, for the same rows);
    * error: ``sqrt(Σ ‖out_i − Σ_j p_ij v_j‖² / Σ ‖Σ_j p_ij v_j‖²)`` pooled over rows, batch and
      heads (equals :func:`dfsattn_jax.metrics.attention_error` against dense attention when
      every row is sampled).

    Memory: ``row_budget`` float32 elements of probabilities at a time (``lax.map`` over heads).
    """
    batch, length, heads, dim = q.shape
    nq, nk = block_mask.shape[-2:]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    num_rows = rows.shape[0]
    groups = batch * heads

    def per_head(x):  # [B, L', N, D] -> [B*N, L', D]
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(groups, x.shape[1], dim)

    q_rows = per_head(q[:, rows])
    o_rows = per_head(out[:, rows])
    k_heads = per_head(k)
    v_heads = per_head(v)
    m_rows = block_mask[:, :, rows // block_size, :].reshape(groups, num_rows, nk)
    key_pad = nk * block_size - length

    def one(args):
        q_h, k_h, v_h, o_h, m_h = args
        logits = jnp.einsum("sd,ld->sl", q_h.astype(jnp.float32), k_h.astype(jnp.float32), precision=_HIGHEST)
        probs = jax.nn.softmax(logits * scale, axis=-1)
        dense = jnp.einsum("sl,ld->sd", probs, v_h.astype(jnp.float32), precision=_HIGHEST)
        mass = jnp.sum(jnp.pad(probs, ((0, 0), (0, key_pad))).reshape(num_rows, nk, block_size), axis=-1)
        recall = jnp.mean(jnp.sum(mass * m_h.astype(jnp.float32), axis=-1))
        diff = o_h.astype(jnp.float32) - dense
        return recall, jnp.sum(diff * diff), jnp.sum(dense * dense)

    per_batch = max(1, min(groups, int(row_budget) // max(1, num_rows * length)))
    recall, num, den = jax.lax.map(one, (q_rows, k_heads, v_heads, o_rows, m_rows), batch_size=per_batch)
    error = jnp.sqrt(jnp.sum(num) / jnp.maximum(jnp.sum(den), jnp.finfo(jnp.float32).tiny))
    return LayerStats(jnp.mean(recall), error)


# ----------------------------------------------------------------------------------------------
# The runner


@dataclasses.dataclass(frozen=True)
class RunOutput:
    """One sampling run of :class:`QualityRunner`.

    Attributes:
      latents: float32 final latents ``[B, C, F, H, W]`` (the conditional batch).
      recall: float32[num_steps, num_layers] (NaN when not measured).
      error: float32[num_steps, num_layers] attention error (NaN when not measured).
      skipped: float32[num_steps] skipped block fraction over all self-attention layers.
      refreshed: int32[num_steps] layouts written at each step.
      cache: the final mask cache (NumPy arrays; ``None`` for a dense run).
      plan: the step plan (``None``: dense).
      time_s: wall time of the run (blocked on the result; the program was compiled before).
      measured: whether recall/error were measured.
    """

    latents: np.ndarray
    recall: np.ndarray
    error: np.ndarray
    skipped: np.ndarray
    refreshed: np.ndarray
    cache: MaskCache | None
    plan: SchedulePlan | None
    time_s: float
    measured: bool

    @property
    def sparsity(self) -> float:
        """SPEC §6: mean skipped block fraction over the sparse steps and all layers (0 if dense)."""
        if self.plan is None or not self.plan.sparse.any():
            return 0.0
        return float(np.mean(self.skipped[self.plan.sparse]))

    @property
    def refresh_steps(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.flatnonzero(self.refreshed))


class QualityRunner:
    """Samples ``model`` with classifier-free guidance in one jitted loop per static setting.

    Args:
      model: a :class:`~models.wan.WanTransformer3DModel`.
      latent_shape: ``(C, F, H, W)`` of the latents.
      block_size: tokens per attention block.
      tile_sizes: tile sizes the DFS scoring may use (scoring index ``i`` uses ``tile_sizes[i]``;
        index ``len(tile_sizes)`` uses the static scores input).
      dense_layers: self-attention layers that always stay dense.
      max_blocks: ``K_max`` of the mask cache (>= every plan's ``max_blocks``).
      num_query_samples: query rows sampled for recall and error (all rows when ``>= L``).
      solver, shift: sampler settings (as :class:`~models.sampler.Sampler`).
      min_capacity: smallest padded step count.
      seed: seed of the sampled query rows.
      sparse_implementation, dense_implementation: attention implementations (``None``: Pallas /
        cuDNN on GPU, XLA references elsewhere).

    Attributes:
      trace_count: programs traced so far (one per static setting and batch shape).
      rows: int32[S] the sampled query rows (attention order).
    """

    def __init__(
        self,
        model: nnx.Module,
        latent_shape: tuple[int, int, int, int],
        *,
        block_size: int = 128,
        tile_sizes: Sequence[int] = (16,),
        dense_layers: Sequence[int] = (0,),
        max_blocks: int,
        num_query_samples: int = 256,
        solver: str = "euler",
        shift: float = 5.0,
        min_capacity: int = 64,
        seed: int = 0,
        sparse_implementation: str | None = None,
        dense_implementation: str | None = None,
    ):
        cfg = model.config
        self.model = model
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if len(self.latent_shape) != 4 or self.latent_shape[0] != cfg.in_channels:
            raise ValueError(f"latent_shape must be (C={cfg.in_channels}, F, H, W), got {latent_shape!r}")
        self.grid = model.check_inputs(
            jnp.zeros((1,) + self.latent_shape), jnp.zeros((1,)), jnp.zeros((1, 1, cfg.text_dim))
        )
        self.num_tokens = math.prod(self.grid)
        self.tile_sizes = tuple(check_tile_size(t, block_size)[0] for t in tile_sizes)
        if not self.tile_sizes:
            raise ValueError("tile_sizes must hold at least one tile size")
        self.block_size = int(block_size)
        self.num_key_blocks = num_token_blocks(self.num_tokens, self.block_size)
        self.dense_layers = tuple(int(i) for i in dense_layers)
        bad = [i for i in self.dense_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} out of range for a model of {cfg.num_layers} layers")
        self.sparse_layers = tuple(i for i in range(cfg.num_layers) if i not in self.dense_layers)
        if not self.sparse_layers:
            raise ValueError(f"dense_layers {self.dense_layers} leave no sparse layer")
        if isinstance(max_blocks, bool) or not 1 <= int(max_blocks) <= self.num_key_blocks:
            raise ValueError(f"max_blocks must be in [1, {self.num_key_blocks}], got {max_blocks!r}")
        self.max_blocks = int(max_blocks)
        samples = int(num_query_samples)
        if samples < 1:
            raise ValueError(f"num_query_samples must be a positive integer, got {num_query_samples!r}")
        if samples >= self.num_tokens:
            rows = np.arange(self.num_tokens)
        else:
            rows = np.sort(np.random.default_rng(seed).choice(self.num_tokens, samples, replace=False))
        self.rows = rows.astype(np.int32)
        self.solver = get_solver(solver)
        self.shift = float(shift)
        self.min_capacity = int(min_capacity)
        self.sparse_implementation = sparse_implementation
        self.dense_implementation = dense_implementation
        # The model's own self-attention path; only the scoring source differs (``_scores``).
        self.backend = AttentionBackend(
            "dfs",
            DFSConfig(tile_size=self.tile_sizes[0], block_size=self.block_size, dense_layers=self.dense_layers),
            sparse_implementation=sparse_implementation,
            dense_implementation=dense_implementation,
        )
        self.trace_count = 0
        self._run = jax.jit(self._loop, static_argnums=(0,))

    # -- host side -------------------------------------------------------------------------

    def capacity(self, num_steps: int) -> int:
        return step_capacity(num_steps, self.min_capacity)

    def scoring_index(self, variant: Variant, default_tile: int) -> int:
        """The ``lax.switch`` index of ``variant``'s layout source."""
        if variant.scoring == SCORING_WINDOW:
            return len(self.tile_sizes)
        tile = default_tile if variant.tile_size is None else variant.tile_size
        if tile not in self.tile_sizes:
            raise ValueError(f"variant {variant.name!r} needs tile {tile}, the runner has tile_sizes {self.tile_sizes}")
        return self.tile_sizes.index(tile)

    def order_arrays(self, order: str) -> tuple[np.ndarray, np.ndarray]:
        """``(perm, inverse)`` int32[L] of ``order`` on the runner's token grid."""
        perm = np.asarray(token_order(order, self.grid), np.int32)
        return perm, np.asarray(inverse_permutation(perm), np.int32)

    def __call__(
        self,
        noise: Float[Array, "b c f h w"],
        text: Float[Array, "b t e"],
        negative_text: Float[Array, "b t e"],
        *,
        num_steps: int,
        plan: SchedulePlan | None,
        order: str = "raster",
        scoring: int = 0,
        static_scores: Float[np.ndarray, "p nq nk"] | None = None,
        guidance_scale: float = 5.0,
        measure: bool = True,
    ) -> RunOutput:
        """Denoises ``noise`` over ``num_steps`` steps (classifier-free guidance, batch ``2B``).

        Args:
          noise: ``[B, C, F, H, W]``; text, negative_text: ``[B, T, text_dim]``.
          num_steps: denoising steps.
          plan: the DFS step plan (``None``: dense everywhere); its ``max_blocks`` must not
            exceed the runner's.
          order: token order name.
          scoring: layout source index (:meth:`scoring_index`).
          static_scores: ``float32[capacity, nq, nk]`` for the static source (default zeros).
          guidance_scale: classifier-free guidance scale.
          measure: measure recall and attention error at every step and layer.
        """
        noise = jnp.asarray(noise, jnp.float32)
        if tuple(noise.shape[1:]) != self.latent_shape:
            raise ValueError(f"noise must have shape [B, *{self.latent_shape}], got {noise.shape}")
        text, negative_text = jnp.asarray(text), jnp.asarray(negative_text)
        if negative_text.shape != text.shape or text.shape[0] != noise.shape[0]:
            raise ValueError(
                f"text and negative_text must both have shape [B={noise.shape[0]}, T, E], got {text.shape} and {negative_text.shape}"
            )
        if plan is not None:
            if plan.num_steps != num_steps or plan.num_key_blocks != self.num_key_blocks:
                raise ValueError(
                    f"plan must cover {num_steps} steps over {self.num_key_blocks} key blocks, got "
                    f"{plan.num_steps} steps over {plan.num_key_blocks}"
                )
            if plan.max_blocks > self.max_blocks:
                raise ValueError(f"plan keeps up to {plan.max_blocks} blocks, the runner's max_blocks is {self.max_blocks}")
        if not 0 <= int(scoring) <= len(self.tile_sizes):
            raise ValueError(f"scoring must be in [0, {len(self.tile_sizes)}], got {scoring!r}")
        capacity = self.capacity(num_steps)
        nk = self.num_key_blocks
        if static_scores is None:
            static_scores = np.zeros((capacity, nk, nk), np.float32)
        elif tuple(np.shape(static_scores)) != (capacity, nk, nk):
            raise ValueError(f"static_scores must have shape {(capacity, nk, nk)}, got {np.shape(static_scores)}")
        perm, inverse = self.order_arrays(order)
        schedule = make_schedule(num_steps, capacity=capacity, shift=self.shift)
        steps = make_step_plan(plan, capacity)
        graphdef, state = nnx.split(self.model)
        start = time.perf_counter()
        latents, cache, recall, error, skipped, refreshed = self._run(
            graphdef, state, noise, text, negative_text, schedule, steps,
            jnp.asarray(perm), jnp.asarray(inverse), jnp.asarray(int(scoring), jnp.int32),
            jnp.asarray(static_scores, jnp.float32), jnp.asarray(self.rows),
            jnp.asarray(bool(measure)), jnp.asarray(guidance_scale, jnp.float32),
        )  # fmt: skip
        latents = np.asarray(jax.block_until_ready(latents))
        elapsed = time.perf_counter() - start
        recall = np.asarray(recall)[:num_steps]
        error = np.asarray(error)[:num_steps]
        if not measure:
            recall = np.full_like(recall, np.nan)
            error = np.full_like(error, np.nan)
        return RunOutput(
            latents=latents,
            recall=recall,
            error=error,
            skipped=np.asarray(skipped)[:num_steps],
            refreshed=np.asarray(refreshed)[:num_steps],
            cache=None if plan is None else jax.tree.map(np.asarray, cache),
            plan=plan,
            time_s=elapsed,
            measured=bool(measure),
        )

    def warmup(self, noise, text, negative_text, *, num_steps: int) -> float:
        """Compiles the program of a ``num_steps`` run (one step of it); returns seconds."""
        capacity = self.capacity(num_steps)
        fewest = 1 if capacity == self.capacity(1) else capacity // 2 + 1
        start = time.perf_counter()
        self(noise, text, negative_text, num_steps=fewest, plan=None, measure=True)
        return time.perf_counter() - start

    # -- traced ----------------------------------------------------------------------------

    def _loop(self, graphdef, state, noise, text, negative_text, schedule, steps, perm, inverse, scoring,
              static_scores, rows, measure, guidance_scale):  # fmt: skip
        self.trace_count += 1
        model = nnx.merge(graphdef, state)
        cfg = model.config
        batch = noise.shape[0]
        cond_text = jnp.concatenate([text, negative_text], axis=0)
        model_batch = 2 * batch
        capacity = steps.sparse.shape[0]
        cache = init_mask_cache(len(self.sparse_layers), model_batch, cfg.num_heads, self.num_key_blocks, self.max_blocks)
        rope = rope_tables(cfg.head_dim, self.grid, perm, theta=cfg.rope_theta, max_seq_len=cfg.rope_max_seq_len)
        nan_row = jnp.full((cfg.num_layers,), jnp.nan, jnp.float32)

        def body(i, carry):
            x, solver_state, cache, recall, error, skipped, refreshed = carry
            control = steps.control(i)
            x_in = jnp.concatenate([x, x], axis=0)
            t = jnp.broadcast_to(schedule.timesteps[i], (model_batch,))
            before = cache.refreshes
            out, cache, stats = self._forward(
                model, x_in.astype(model.dtype), t, cond_text.astype(model.dtype), perm, inverse, rope,
                control, cache, scoring, static_scores[i], rows, measure,
            )  # fmt: skip
            v = out.astype(jnp.float32)
            v = v[batch:] + guidance_scale * (v[:batch] - v[batch:])
            x, solver_state = self.solver.step(solver_state, v, x, i)
            recall = recall.at[i].set(jnp.where(measure, jnp.stack([s.recall for s in stats]), nan_row))
            error = error.at[i].set(jnp.where(measure, jnp.stack([s.error for s in stats]), nan_row))
            skipped = skipped.at[i].set(jnp.where(control.sparse, skipped_fraction(cache, cfg.num_layers), 0.0))
            refreshed = refreshed.at[i].set(cache.refreshes - before)
            return x, solver_state, cache, recall, error, skipped, refreshed

        carry = (
            noise,
            self.solver.init(schedule, noise),
            cache,
            jnp.zeros((capacity, cfg.num_layers), jnp.float32),
            jnp.zeros((capacity, cfg.num_layers), jnp.float32),
            jnp.zeros((capacity,), jnp.float32),
            jnp.zeros((capacity,), jnp.int32),
        )
        x, _, cache, recall, error, skipped, refreshed = jax.lax.fori_loop(0, schedule.num_steps, body, carry)
        return x, cache, recall, error, skipped, refreshed

    def _forward(self, model, hidden, t, text, perm, inverse, rope, control, cache, scoring, static_scores, rows, measure):
        """The model's forward pass (``WanTransformer3DModel.__call__``) with this module's attention."""
        cfg = model.config
        b = hidden.shape[0]
        patches = jnp.take(patchify(hidden, cfg.patch_size), perm, axis=1)
        x = model.patch_embedding(patches)
        temb, timestep_proj, text = model.condition_embedder(t, text)
        timestep_proj = timestep_proj.reshape(b, 6, cfg.dim)
        stats = []
        for layer, block in enumerate(model.blocks):
            def attend(q, k, v, state, layer=layer):
                out, cache, layer_stats = self._self_attention(
                    q, k, v, layer, control, state[0], scoring, static_scores, rows, measure
                )
                return out, (cache, layer_stats)

            x, (cache, layer_stats) = block(
                x, text, timestep_proj, rope, attend=attend, state=(cache, None),
                dense_implementation=self.dense_implementation,
            )
            stats.append(layer_stats)
        shift, scale = jnp.split(
            model.scale_shift_table[...].astype(jnp.float32) + temb.astype(jnp.float32)[:, None], 2, axis=1
        )
        x = (model.norm_out(x) * (1.0 + scale) + shift).astype(model.dtype)
        x = jnp.take(model.proj_out(x), inverse, axis=1)
        return unpatchify(x, self.grid, cfg.patch_size, cfg.out_channels), cache, stats

    def _scores(self, q, k, scoring, static_scores) -> Float[Array, "b n nq nk"]:
        """Block scores from the source ``scoring`` (a ``lax.switch``)."""
        batch, _, heads, _ = q.shape
        nk = self.num_key_blocks

        def dfs(tile):
            return lambda q, k, s: block_scores(q, k, tile_size=tile, block_size=self.block_size)

        def static(q, k, s):
            return jnp.broadcast_to(s.astype(jnp.float32), (batch, heads, nk, nk))

        branches = [dfs(t) for t in self.tile_sizes] + [static]
        return jax.lax.switch(scoring, branches, q, k, static_scores)

    def _self_attention(self, q, k, v, layer, control: StepControl, cache: MaskCache, scoring, static_scores, rows, measure):
        """``models.attention_backend.self_attention`` with a switchable layout source, plus stats."""
        nk = self.num_key_blocks
        batch, _, heads, _ = q.shape
        out, cache = self_attention(
            q, k, v, backend=self.backend, layer=layer, num_layers=self.model.config.num_layers,
            control=control, cache=cache, scores_fn=lambda q, k: self._scores(q, k, scoring, static_scores),
        )
        slot = self.backend.slot(layer, self.model.config.num_layers)

        def measured():
            if slot is None:
                mask = jnp.ones((batch, heads, nk, nk), bool)
            else:  # the slot now holds the layout this step used (or kept, at a dense step)
                used = cache_layout(cache, slot, nk).to_dense_mask()
                mask = jnp.logical_or(used, jnp.logical_not(control.sparse))
            return sampled_row_stats(q, k, v, out, mask, rows, block_size=self.block_size)

        zero = jnp.zeros((), jnp.float32)
        stats = jax.lax.cond(measure, measured, lambda: LayerStats(zero, zero))
        return out, cache, stats


# ----------------------------------------------------------------------------------------------
# Videos, scores, pictures


def clip_classes(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(photo, motion)`` int32[num_samples]: sample ``i`` is photo ``i % 8``, motion ``i % 5``
    (8 samples cover every photo and every motion)."""
    if isinstance(num_samples, bool) or int(num_samples) < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    i = np.arange(int(num_samples))
    return (i % NUM_PHOTOS).astype(np.int32), (i % NUM_MOTIONS).astype(np.int32)


def latents_to_video(latents: Float[Array, "b c f h w"], codec) -> np.ndarray:
    """Latents ``[B, C, F, H, W]`` → pixels ``[B, F, H, W, 3]`` in [-1, 1] (``models.clips`` codec)."""
    return np.asarray(decode_latent(jnp.moveaxis(jnp.asarray(latents, jnp.float32), 1, -1), codec))


def video_scores(video: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample PSNR (dB; inf when identical) and SSIM of ``video`` against ``reference``
    (``[B, T, H, W, 3]`` in [-1, 1])."""
    return {
        "psnr": np.asarray(psnr(video, reference, data_range=2.0), np.float64),
        "ssim": np.asarray(ssim(video, reference, data_range=2.0), np.float64),
    }


def card_slug(device_kind: str | None = None) -> str:
    """A file-name slug of the accelerator: ``"NVIDIA H100 80GB HBM3"`` → ``"nvidia_h100"``,
    ``"NVIDIA H200"`` → ``"nvidia_h200"``, CPU → ``"cpu"``."""
    if device_kind is None:
        dev = jax.devices()[0]
        device_kind = "cpu" if dev.platform == "cpu" else dev.device_kind
    words = [w for w in "".join(c if c.isalnum() else " " for c in device_kind.lower()).split() if w]
    if not words:
        return "unknown"
    if words[0] == "nvidia" and len(words) > 1:
        return "_".join(words[:2])
    return words[0]


def _to_uint8(video: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(video, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_side_by_side_gif(
    left: Float[np.ndarray, "b t h w 3"],
    right: Float[np.ndarray, "b t h w 3"],
    path: str | os.PathLike,
    *,
    titles: tuple[str, str] = ("dense", "DFSAttn"),
    captions: Sequence[str] | None = None,
    scale: int = 4,
    frame_ms: int = 125,
) -> str:
    """Writes an animated GIF: one row per sample, ``left`` and ``right`` side by side.

    Videos are ``[B, T, H, W, 3]`` in [-1, 1]; frames are upscaled ``scale``× (nearest), with a
    title strip on top and an optional caption per row. Uses Pillow (a matplotlib dependency).
    """
    from PIL import Image, ImageDraw, ImageFont

    left, right = np.asarray(left), np.asarray(right)
    if left.shape != right.shape or left.ndim != 5 or left.shape[-1] != 3:
        raise ValueError(f"left and right must both have shape [B, T, H, W, 3], got {left.shape} and {right.shape}")
    if isinstance(scale, bool) or int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    b, t, h, w, _ = left.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"captions must hold one string per sample ({b}), got {len(captions)}")
    font = ImageFont.load_default()
    gap, head, cap = 6, 16, 12 if captions is not None else 0
    cell_w, cell_h = w * scale, h * scale
    width = 2 * cell_w + 3 * gap
    height = head + b * (cap + cell_h + gap) + gap
    lu8, ru8 = _to_uint8(left), _to_uint8(right)
    frames = []
    for f in range(t):
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for c, title in enumerate(titles):
            draw.text((gap + c * (cell_w + gap) + 2, 2), title, fill=(0, 0, 0), font=font)
        for i in range(b):
            top = head + i * (cap + cell_h + gap)
            if captions is not None:
                draw.text((gap + 2, top), captions[i], fill=(60, 60, 60), font=font)
            for c, video in enumerate((lu8, ru8)):
                tile = Image.fromarray(video[i, f]).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (gap + c * (cell_w + gap), top + cap))
        frames.append(canvas.convert("P", palette=Image.ADAPTIVE, colors=255))
    path = str(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(frame_ms), loop=0)
    return path


# ----------------------------------------------------------------------------------------------
# The demo's comparison on the shipped model


def _timed_sample(sampler, noise, text, negative, steps: int, guidance_scale: float):
    sampler.warmup(noise, text, negative, num_steps=steps)
    start = time.perf_counter()
    result = sampler(noise, text, negative, num_steps=steps, guidance_scale=guidance_scale)
    jax.block_until_ready(result.latents)
    return result, time.perf_counter() - start


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

    Both runs use the production :class:`~models.sampler.Sampler` (each timed after a compile
    warm-up). Writes into ``out_dir``: ``demo_<model>.gif`` (dense | DFSAttn, one row per
    sample), ``masks_<model>.png`` (one layer's block masks in raster and hilbert3d order at the
    first refresh step, :func:`models.compare.block_masks`) and ``compare_<model>.json``.

    Args:
      model, dit_config, conditioner: from :func:`models.pretrained.load_small_video_dit` and
        :func:`~models.pretrained.load_clip_conditioner`.
      num_samples: classes sampled (:func:`clip_classes`).
      steps: denoising steps; the DFS schedule is :func:`default_schedule` for that count.
      seed: noise seed.
      clip: a :class:`~models.clips.ClipConfig` overriding the trained clip size (smaller clips
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
    from models.clips import token_grid as clip_token_grid
    from models.compare import block_masks, device_name, plot_block_masks
    from models.sampler import Sampler

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
    dense, t_dense = _timed_sample(dense_sampler, noise, text, negative, steps, guidance_scale)
    sparse, t_dfs = _timed_sample(dfs_sampler, noise, text, negative, steps, guidance_scale)
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
    json_path = os.path.join(out_dir, f"compare_{name}.json")
    report["report_json"] = json_path
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report


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
