"""Quality harness: DFSAttn and other sparse schemes against dense sampling of one model (docs/spec.md §9).

One compiled program for every variant. :class:`QualityRunner` samples a Wan model (the small
video DiT of :mod:`models.evaluation.small_dit`, or any
:class:`~models.wan.transformer.WanTransformer3DModel`) through the production
:class:`~models.sampling.loop.Sampler` and the model's own forward pass, with everything that
distinguishes the variants (:mod:`models.evaluation.quality_variants`) passed in as *arrays*:

* the token order (the sampler's ``order`` input: a permutation array, RoPE tables built from it
  on device), so raster, hilbert2d, block3d, morton3d and hilbert3d share the program;
* the step plan (``sparse``, ``refresh``, ``num_blocks`` per step), so every density, the default
  schedule and "refresh at every sparse step" share it;
* the layout source at a refresh (:class:`QualityHooks`, an ``int32`` index into a
  ``lax.switch``): hierarchical DFS scoring (:func:`~dfsattn_jax.scoring.block_scores`) with each
  tile size of the runner's static ``tile_sizes`` (tile = block is plain block mean pooling),
  externally given static block scores per step (the spatio-temporal window of
  :mod:`dfsattn_jax.baselines`; top-k of its ranks is exactly
  :func:`~dfsattn_jax.baselines.static_window_layout`), uniform random scores (a random
  layout with the same count: if it scores near DFS, the model barely uses its attention), or
  the exact dense block mass (:func:`~dfsattn_jax.metrics.block_attention_mass`: the
  recall-optimal layout of the same count, an oracle that tells what the scoring's estimate
  costs from what the density itself costs);
* which sparse layers keep every key block (``dense_layers`` of a run; the schedule search uses
  it to try always-dense layers without a compile per set).

Only the model, the batch and latent shapes, ``block_size``, ``tile_sizes``, the truly dense
``dense_layers``, ``max_blocks`` (``K_max`` of the mask cache) and the number of sampled query
rows are static.

Measurements (the hooks' probe, under a traced per-step flag; off, the loop runs at the speed of
plain sampling), from :func:`dfsattn_jax.metrics.sampled_row_stats` on sampled query rows with
the exact dense float32 softmax:

* **recall** of the layout in force, per layer and step, and per head: the dense softmax mass
  its blocks cover (docs/spec.md §9), averaged over rows and batch (both guidance branches); 1
  for dense layers and steps;
* **attention error** per layer and step: ``‖o_sparse − o_dense‖ / ‖o_dense‖`` over the sampled
  query rows. At dense steps it is the dense kernel's own rounding (cuDNN in bf16: ~4e-3), the
  floor of the measure;
* **concentration** per layer, step and head: the dense mass of each row's top 20 % key blocks
  (in the run's token order), a property of the model's attention;
* where the mass lies and what the layout **misses**, by distance class of the key token
  (same or other frames × spatial distance; :data:`~dfsattn_jax.metrics.DISTANCE_CLASS_NAMES`);
* **skipped** block fraction per step (docs/spec.md §6 convention; :attr:`RunOutput.sparsity`).

Fidelity (:func:`video_scores`): PSNR and SSIM (:mod:`models.evaluation.fidelity`) of each decoded
video against the dense run's, from the same noise. LPIPS is not measured: it needs pretrained
AlexNet/VGG weights that cannot be installed here without a download.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.cache import MaskCache
from dfsattn_jax.checks import check_positive_int
from dfsattn_jax.metrics import DISTANCE_CLASS_NAMES, LayerStats, block_attention_mass, sampled_row_stats
from dfsattn_jax.orders import inverse_permutation, token_order
from dfsattn_jax.schedule import DFSConfig, SchedulePlan
from dfsattn_jax.checks import check_tile_size
from dfsattn_jax.scoring import block_scores
from models.common.processor import AttentionBackend, AttentionHooks, num_token_blocks
from models.evaluation.fidelity import psnr, ssim
from models.evaluation.quality_variants import SCORING_ORACLE, SCORING_RANDOM, SCORING_WINDOW, Variant
from models.sampling import Sampler, step_capacity

__all__ = [
    "SMALL_GRID_TOKENS",
    "harness_blocks",
    "QualityHooks",
    "QualityInputs",
    "QualityRunner",
    "RunOutput",
    "order_coords",
    "video_scores",
]

#: Below this many tokens (the CPU-sized clips) the harness runs DFS on 32-token blocks of 8-token tiles.
SMALL_GRID_TOKENS = 4096


def harness_blocks(num_tokens: int) -> tuple[int, int]:
    """``(block_size, tile_size)`` the harness runs DFS at for ``num_tokens``: 128 / 16, or 32 / 8
    below :data:`SMALL_GRID_TOKENS` (CPU sizes)."""
    return (32, 8) if num_tokens < SMALL_GRID_TOKENS else (128, 16)


# ----------------------------------------------------------------------------------------------
# The runner: the production sampler with hooks


@dataclasses.dataclass(frozen=True)
class QualityHooks(AttentionHooks):
    """The runner's hooks on the model's own attention.

    ``inputs`` (traced, per run) is :class:`QualityInputs`. At a refresh the layout source is
    ``lax.switch(inputs.scoring, ...)`` over DFS scoring with each of ``tile_sizes``, the static
    scores of the step, uniform random scores (a random layout at the same count) and the exact
    dense block mass (the oracle); layers
    flagged in ``inputs.dense_layer`` keep every key block. Every layer's attention is probed
    (:func:`~dfsattn_jax.metrics.sampled_row_stats` on ``inputs.rows``, with the tokens'
    coordinates) at the steps flagged in ``inputs.measure_steps`` (a ``lax.cond``).
    """

    tile_sizes: tuple[int, ...]
    block_size: int
    num_heads: int
    row_budget: int = 1 << 25

    def scores(self, q, k, *, layer, inputs, step):
        batch, _, heads, _ = q.shape
        nk = inputs.static_scores.shape[-1]

        def dfs(tile):
            return lambda q, k, s: block_scores(q, k, tile_size=tile, block_size=self.block_size)

        def static(q, k, s):
            return jnp.broadcast_to(s.astype(jnp.float32), (batch, heads, nk, nk))

        def random(q, k, s):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(inputs.random_seed), step), layer)
            return jax.random.uniform(key, (batch, heads, nk, nk), jnp.float32)

        def oracle(q, k, s):
            return block_attention_mass(q, k, block_size=self.block_size)

        branches = [dfs(t) for t in self.tile_sizes] + [static, random, oracle]
        return jax.lax.switch(inputs.scoring, branches, q, k, inputs.static_scores[step])

    def layer_blocks(self, num_blocks, *, layer, inputs, step, num_key_blocks):
        return jnp.where(inputs.dense_layer[layer], jnp.int32(num_key_blocks), num_blocks).astype(num_blocks.dtype)

    def probe(self, q, k, v, out, block_mask, *, layer, inputs, step):
        def measured():
            return sampled_row_stats(
                q, k, v, out, block_mask, inputs.rows, block_size=self.block_size, row_budget=self.row_budget,
                coords=inputs.coords,
            )  # fmt: skip

        return jax.lax.cond(inputs.measure_steps[step], measured, self.probe_template)

    def probe_template(self):
        zero = jnp.zeros((), jnp.float32)
        heads = jnp.zeros((self.num_heads,), jnp.float32)
        classes = jnp.zeros((len(DISTANCE_CLASS_NAMES),), jnp.float32)
        return LayerStats(zero, zero, heads, heads, classes, classes)


class QualityInputs(NamedTuple):
    """What distinguishes the variants, as arrays (a pytree handed to :class:`QualityHooks`).

    Attributes:
      scoring: int32[] layout source index (:meth:`QualityRunner.scoring_index`).
      static_scores: float32[P, nq, nk] static block scores per step (the window baseline).
      rows: int32[S] sampled query rows (attention order).
      measure_steps: bool[P] the steps whose attention is probed.
      coords: int32[L, 3] (frame, row, column) of the token at each attention position.
      random_seed: int32[] seed of the random layouts.
      dense_layer: bool[num_layers] layers that keep every key block at a refresh.
    """

    scoring: Int[Array, ""]
    static_scores: Float[Array, "p nq nk"]
    rows: Int[Array, " s"]
    measure_steps: Bool[Array, " p"]
    coords: Int[Array, "l 3"]
    random_seed: Int[Array, ""]
    dense_layer: Bool[Array, " layers"]


@dataclasses.dataclass(frozen=True)
class RunOutput:
    """One sampling run of :class:`QualityRunner`. Unmeasured steps hold NaN in the probes.

    Attributes:
      latents: float32 final latents ``[B, C, F, H, W]`` (the conditional batch).
      recall: float32[num_steps, num_layers] covered dense softmax mass.
      error: float32[num_steps, num_layers] attention error.
      head_recall: float32[num_steps, num_layers, N] recall per head.
      top_mass: float32[num_steps, num_layers, N] dense mass of each row's top 20 % key blocks.
      mass_by_class: float32[num_steps, num_layers, C] dense mass per distance class
        (:data:`~dfsattn_jax.metrics.DISTANCE_CLASS_NAMES`).
      missed_by_class: float32[num_steps, num_layers, C] the part the layout misses.
      skipped: float32[num_steps] skipped block fraction over all self-attention layers.
      refreshed: int32[num_steps] layouts written at each step.
      cache: the final mask cache (NumPy arrays; ``None`` for a dense run).
      plan: the step plan (``None``: dense).
      time_s: wall time of the run (blocked on the result; the program was compiled before).
      measured: bool[num_steps] the probed steps.
    """

    latents: np.ndarray
    recall: np.ndarray
    error: np.ndarray
    head_recall: np.ndarray
    top_mass: np.ndarray
    mass_by_class: np.ndarray
    missed_by_class: np.ndarray
    skipped: np.ndarray
    refreshed: np.ndarray
    cache: MaskCache | None
    plan: SchedulePlan | None
    time_s: float
    measured: np.ndarray

    @property
    def sparsity(self) -> float:
        """docs/spec.md §6: mean skipped block fraction over the sparse steps and all layers (0 if dense)."""
        if self.plan is None or not self.plan.sparse.any():
            return 0.0
        return float(np.mean(self.skipped[self.plan.sparse]))

    @property
    def refresh_steps(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.flatnonzero(self.refreshed))


def order_coords(order: str, grid: tuple[int, int, int]) -> Int[np.ndarray, "l 3"]:
    """``(frame, row, column)`` of the token at each position of ``order`` on ``grid`` (int32[L, 3])."""
    perm = np.asarray(token_order(order, grid), np.int64)
    return np.stack(np.unravel_index(perm, grid), axis=1).astype(np.int32)


class QualityRunner:
    """Samples ``model`` with classifier-free guidance through the production sampler, one
    compiled program for every variant (see the module docstring).

    Args:
      model: a :class:`~models.wan.transformer.WanTransformer3DModel`.
      latent_shape: ``(C, F, H, W)`` of the latents.
      block_size: tokens per attention block.
      tile_sizes: tile sizes the DFS scoring may use (scoring index ``i`` uses ``tile_sizes[i]``;
        index ``len(tile_sizes)`` the static scores input, ``len(tile_sizes) + 1`` random scores,
        ``len(tile_sizes) + 2`` the exact block mass).
      dense_layers: self-attention layers that always stay dense (dense attention, static).
      max_blocks: ``K_max`` of the mask cache (>= every plan's ``max_blocks``; the key block
        count when runs keep layers whole through ``dense_layers`` of :meth:`__call__`).
      num_query_samples: query rows sampled for the probes (all rows when ``>= L``).
      solver, shift: sampler settings (as :class:`~models.sampling.loop.Sampler`).
      min_capacity: smallest padded step count.
      seed: seed of the sampled query rows.
      sparse_implementation, dense_implementation: attention implementations (``None``: the
        device's defaults).
      row_budget: float32 elements of probe probabilities held at a time.

    Attributes:
      sampler: the :class:`~models.sampling.loop.Sampler` every run goes through.
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
        row_budget: int = 1 << 25,
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
        self.num_layers = cfg.num_layers
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
        self.max_blocks = check_positive_int(max_blocks, "max_blocks")
        if self.max_blocks > self.num_key_blocks:
            raise ValueError(f"max_blocks must be in [1, {self.num_key_blocks}], got {max_blocks!r}")
        samples = check_positive_int(num_query_samples, "num_query_samples")
        if samples >= self.num_tokens:
            rows = np.arange(self.num_tokens)
        else:
            rows = np.sort(np.random.default_rng(seed).choice(self.num_tokens, samples, replace=False))
        self.rows = rows.astype(np.int32)
        self.min_capacity = int(min_capacity)
        backend = AttentionBackend(
            "dfs",
            DFSConfig(tile_size=self.tile_sizes[0], block_size=self.block_size, dense_layers=self.dense_layers),
            sparse_implementation=sparse_implementation,
            dense_implementation=dense_implementation,
            hooks=QualityHooks(self.tile_sizes, self.block_size, cfg.num_heads, int(row_budget)),
        )
        self.sampler = Sampler(
            model, backend, solver=solver, shift=shift, max_blocks=self.max_blocks,
            min_capacity=self.min_capacity, progress=False,
        )  # fmt: skip

    @property
    def backend(self) -> AttentionBackend:
        return self.sampler.backend

    @property
    def trace_count(self) -> int:
        """Programs traced so far (one per static setting and batch shape)."""
        return self.sampler.trace_count

    def capacity(self, num_steps: int) -> int:
        return step_capacity(num_steps, self.min_capacity)

    def scoring_index(self, variant: Variant, default_tile: int) -> int:
        """The ``lax.switch`` index of ``variant``'s layout source."""
        if variant.scoring == SCORING_WINDOW:
            return len(self.tile_sizes)
        if variant.scoring == SCORING_RANDOM:
            return len(self.tile_sizes) + 1
        if variant.scoring == SCORING_ORACLE:
            return len(self.tile_sizes) + 2
        tile = default_tile if variant.tile_size is None else variant.tile_size
        if tile not in self.tile_sizes:
            raise ValueError(f"variant {variant.name!r} needs tile {tile}, the runner has tile_sizes {self.tile_sizes}")
        return self.tile_sizes.index(tile)

    def order_arrays(self, order: str) -> tuple[np.ndarray, np.ndarray]:
        """``(perm, inverse)`` int32[L] of ``order`` on the runner's token grid."""
        perm = np.asarray(token_order(order, self.grid), np.int32)
        return perm, np.asarray(inverse_permutation(perm), np.int32)

    def measure_steps(self, num_steps: int, measure: bool | Sequence[bool]) -> np.ndarray:
        """``bool[num_steps]`` of the probed steps from ``measure`` (one flag, or one per step)."""
        flags = np.asarray(measure, bool)
        if flags.ndim == 0:
            return np.full(num_steps, bool(flags))
        if flags.shape != (num_steps,):
            raise ValueError(f"measure must be one bool or {num_steps} bools (one per step), got shape {flags.shape}")
        return flags

    def _inputs(self, num_steps: int, scoring: int, static_scores, measure, order: str, random_seed: int,
                dense_layers: Sequence[int]) -> QualityInputs:  # fmt: skip
        if not 0 <= int(scoring) <= len(self.tile_sizes) + 2:
            raise ValueError(f"scoring must be in [0, {len(self.tile_sizes) + 2}], got {scoring!r}")
        capacity = self.capacity(num_steps)
        nk = self.num_key_blocks
        if static_scores is None:
            static_scores = np.zeros((capacity, nk, nk), np.float32)
        elif tuple(np.shape(static_scores)) != (capacity, nk, nk):
            raise ValueError(f"static_scores must have shape {(capacity, nk, nk)}, got {np.shape(static_scores)}")
        steps = np.zeros(capacity, bool)
        steps[:num_steps] = self.measure_steps(num_steps, measure)
        whole = np.zeros(self.num_layers, bool)
        for layer in dense_layers:
            if layer not in self.sparse_layers:
                raise ValueError(f"dense_layers entries must be sparse layers of the runner {self.sparse_layers}, got {layer!r}")
            whole[layer] = True
        if whole.any() and self.max_blocks < nk:
            raise ValueError(f"dense_layers {tuple(dense_layers)} keep all {nk} key blocks: the runner needs max_blocks={nk}, "
                             f"it has {self.max_blocks}")  # fmt: skip
        return QualityInputs(
            jnp.asarray(int(scoring), jnp.int32), jnp.asarray(static_scores, jnp.float32), jnp.asarray(self.rows),
            jnp.asarray(steps), jnp.asarray(order_coords(order, self.grid)), jnp.asarray(int(random_seed), jnp.int32),
            jnp.asarray(whole),
        )  # fmt: skip

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
        measure: bool | Sequence[bool] = True,
        random_seed: int = 0,
        dense_layers: Sequence[int] = (),
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
          measure: probe every step (``True``), none, or the steps flagged (``num_steps`` bools).
          random_seed: seed of the random layouts (scoring index ``len(tile_sizes) + 1``).
          dense_layers: sparse layers of the runner that keep every key block in this run (the
            block-sparse kernel with a full layout equals dense attention up to rounding); needs
            ``max_blocks`` equal to the key block count.
        """
        noise = jnp.asarray(noise, jnp.float32)
        if tuple(noise.shape[1:]) != self.latent_shape:
            raise ValueError(f"noise must have shape [B, *{self.latent_shape}], got {noise.shape}")
        text, negative_text = jnp.asarray(text), jnp.asarray(negative_text)
        if negative_text.shape != text.shape or text.shape[0] != noise.shape[0]:
            raise ValueError(
                f"text and negative_text must both have shape [B={noise.shape[0]}, T, E], got {text.shape} and {negative_text.shape}"
            )
        inputs = self._inputs(num_steps, scoring, static_scores, measure, order, random_seed, dense_layers)
        result = self.sampler(
            noise, text, negative_text, num_steps=num_steps, guidance_scale=guidance_scale,
            plan=plan, order=order, hook_inputs=inputs,
        )  # fmt: skip
        measured = np.asarray(inputs.measure_steps)[:num_steps]

        def masked(x):
            x = np.asarray(x, np.float32).copy()
            x[~measured] = np.nan
            return x

        probes = result.probes
        return RunOutput(
            latents=np.asarray(result.latents),
            recall=masked(probes.recall),
            error=masked(probes.error),
            head_recall=masked(probes.head_recall),
            top_mass=masked(probes.top_mass),
            mass_by_class=masked(probes.mass_by_class),
            missed_by_class=masked(probes.missed_by_class),
            skipped=result.skipped,
            refreshed=result.refreshed,
            cache=None if plan is None else jax.tree.map(np.asarray, result.cache),
            plan=plan,
            time_s=result.time_s,
            measured=measured,
        )

    def warmup(self, noise, text, negative_text, *, num_steps: int) -> float:
        """Compiles the program of a ``num_steps`` run (one step of it); returns seconds."""
        inputs = self._inputs(num_steps, 0, None, True, "raster", 0, ())
        return self.sampler.warmup(noise, text, negative_text, num_steps=num_steps, order="raster", hook_inputs=inputs)


# ----------------------------------------------------------------------------------------------
# Videos, scores, pictures


def video_scores(video: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample PSNR (dB; inf when identical) and SSIM of ``video`` against ``reference``
    (``[B, T, H, W, 3]`` in [-1, 1])."""
    return {
        "psnr": np.asarray(psnr(video, reference, data_range=2.0), np.float64),
        "ssim": np.asarray(ssim(video, reference, data_range=2.0), np.float64),
    }
