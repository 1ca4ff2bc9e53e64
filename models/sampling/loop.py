"""Flow-matching sampling of a video DiT as ONE ``jax.jit`` program, dense or with DFSAttn.

:class:`Sampler` runs the whole denoising loop in one jitted function: a ``lax.fori_loop``
over the steps (traced count) carrying one state pytree (:class:`LoopState`: the latents, the
solver state, the attention state with the mask cache, and per-step records). The model's
conditioning is any pytree its ``forward`` takes (Wan: the text embeddings ``[B, T, E]``;
HunyuanVideo: a ``HunyuanConditioning`` with the prompt embeddings, their mask, the pooled CLIP
vector and the embedded guidance scale, so one batch of ``B`` and no CFG pass). Classifier-free
guidance (a negative conditioning) runs as one batch of ``2B`` (cond first, uncond second), each
element with its own DFS layouts. A model whose attention is joint over video and text says so
with ``joint_tokens(grid, cond)`` (:class:`~dfsattn_jax.joint.JointTokens`): the mask cache,
the plan and the skipped fractions then cover the joint sequence (docs/spec.md §6.1). The DFS plan (per-step ``sparse``, ``refresh``, ``num_blocks``) is an input array padded
to a static capacity (:mod:`models.sampling.schedule`), so neither the number of steps nor the
densities change the compiled program; only the cache capacity ``K_max`` is static (set by
``max_density`` or ``max_blocks``). The token order is an input too (a permutation array), so
runs in different orders share the program. Measurement and layout-source hooks
(:class:`~models.common.processor.AttentionHooks`, on the backend) plug into the model's own
attention; what their probes return is recorded per step and layer. A tqdm progress bar is
driven from the loop by ``jax.debug.callback``; compilation happens before the first step.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from dfsattn_jax.cache import MaskCache
from dfsattn_jax.joint import JointTokens
from dfsattn_jax.layout import blocks_for_density, check_density
from dfsattn_jax.schedule import DFSConfig, SchedulePlan, plan_schedule
from models.common.parallel import Parallelism, make_parallel, replicate, shard_batch, shard_cache
from models.common.processor import (
    AttentionBackend,
    AttentionState,
    TokenPermutation,
    init_cache,
    make_backend,
    num_token_blocks,
    skipped_fraction,
    token_permutation,
)
from models.sampling.schedule import (
    SCHEDULE_NAMES,
    FlowSchedule,
    StepPlan,
    flow_schedule,
    make_schedule,
    make_step_plan,
    step_capacity,
)
from models.sampling.solvers import Solver, get_solver

__all__ = ["AUTO", "LoopState", "SampleResult", "Sampler", "check_finite", "sample"]

#: ``plan=AUTO``: the plan follows the backend's DFS schedule (``None`` would mean all dense).
AUTO = "auto"


# --------------------------------------------------------------------------- sampler


def check_finite(**values: Any) -> None:
    """Raises ``ValueError`` naming the first argument that holds a NaN or an infinity (``None``,
    traced and non-floating values are skipped; a pytree is checked leaf by leaf and the error
    names the leaf's path): non-finite inputs would make every latent NaN."""
    for name, value in values.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            if leaf is None or isinstance(leaf, jax.core.Tracer):
                continue
            leaf = jnp.asarray(leaf)
            if not jnp.issubdtype(leaf.dtype, jnp.inexact):
                continue
            if not bool(jnp.all(jnp.isfinite(leaf))):
                where = f"{name}{jax.tree_util.keystr(path)}"
                raise ValueError(f"{where} must be finite, got NaN or infinite values")


def joint_tokens(model: nnx.Module, grid: tuple[int, int, int], cond: Any) -> JointTokens | None:
    """The spans of a joint text + video attention (``model.joint_tokens(grid, cond)``), or
    ``None`` for a model whose self-attention covers the video tokens only (Wan)."""
    method = getattr(model, "joint_tokens", None)
    return None if method is None else method(grid, cond).check()


def attention_tokens(grid: tuple[int, int, int], joint: JointTokens | None) -> int:
    """Tokens of the model's self-attention: the joint length, or ``prod(grid)``."""
    return math.prod(grid) if joint is None else joint.length


def _cast_conditioning(cond: Any, dtype) -> Any:
    """An array conditioning (Wan's text embeddings) in the model's dtype; a pytree (e.g.
    ``HunyuanConditioning``) as given: its model casts each field as diffusers does."""
    return cond.astype(dtype) if isinstance(cond, jax.Array) else cond


def _batch_concat(cond: Any, negative: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), cond, negative)


class LoopState(NamedTuple):
    """The carry of the sampling loop (a pytree).

    Attributes:
      latents: float32 ``[B, C, F, H, W]``.
      solver: the solver's state.
      cache: the mask cache (``None`` for the dense backend).
      refreshed: int32[P] layouts written at each step.
      skipped: float32[P] skipped block fraction over all self-attention layers at each step.
      probes: the hooks' records, each leaf ``[P, num_layers, *shape]`` for a probe leaf of
        ``shape`` (``None`` without probes).
    """

    latents: Array
    solver: Any
    cache: MaskCache | None
    refreshed: Array
    skipped: Array
    probes: Any


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What one sampling run returns.

    Attributes:
      latents: float32 final latents ``[B, C, F, H, W]``.
      cache: the final mask cache (``None`` for the dense backend).
      refreshed: int32[num_steps], layouts written at each step (sparse layers at a refresh
        step, 0 elsewhere), read from the carried ``MaskCache.refreshes``.
      skipped: float32[num_steps], mean skipped block fraction over all self-attention layers
        at each step (dense layers and dense steps count 0), from the layouts in force.
      plan: the DFS plan (``None``: dense).
      sigmas: float32[num_steps + 1]; timesteps: ``[num_steps]``, int64 (``"unipc"``
        schedule) or float32 (``"flow-match-euler"``), as the pipeline feeds them.
      probes: the hooks' records, each leaf ``[num_steps, num_layers, *shape]`` (``None`` without).
      time_s: wall time of the steps, blocked on the result (with ``progress``, measured from
        the loop's start on the device, so tracing and compilation are excluded; without it,
        from the call, so warm up first: :meth:`Sampler.warmup`).
      compile_s: with ``progress``, the time from the call to the loop's start (tracing and
        compilation when the program is new); NaN without ``progress``.
      step_s: float64[num_steps], with ``progress``, the wall time of each step (between the
        loop's per-step callbacks, which run as the device finishes a step); NaN without.
    """

    latents: Array
    cache: MaskCache | None
    refreshed: np.ndarray
    skipped: np.ndarray
    plan: SchedulePlan | None
    sigmas: np.ndarray
    timesteps: np.ndarray
    probes: Any = None
    time_s: float = float("nan")
    compile_s: float = float("nan")
    step_s: np.ndarray | None = None

    @property
    def refresh_steps(self) -> tuple[int, ...]:
        """Steps at which layouts were actually recomputed."""
        return tuple(int(s) for s in np.flatnonzero(self.refreshed))

    @property
    def sparsity(self) -> float:
        """docs/spec.md §6 reported sparsity: mean of ``skipped`` over the sparse steps (0 without any)."""
        if self.plan is None or not self.plan.sparse.any():
            return 0.0
        return float(np.mean(self.skipped[self.plan.sparse]))


class Sampler:
    """Samples a video DiT with a flow-matching solver in one jitted loop.

    Args:
      model: a transformer with ``config`` (``num_layers``, ``num_heads``), ``dtype``,
        ``check_inputs(noise, t, cond) -> grid``, ``forward(noise, t, cond, *, backend, state,
        order)`` and, when its attention is joint over video and text,
        ``joint_tokens(grid, cond) -> JointTokens``: :class:`models.wan.transformer.WanTransformer3DModel`
        or :class:`models.hunyuan_video.transformer.HunyuanVideoTransformer3DModel` (its current
        weights are read at every call).
      backend: self-attention backend (``"dense"``, ``"dfs"`` or an
        :class:`~models.common.processor.AttentionBackend`, possibly with hooks); the DFS
        schedule comes from ``backend.dfs``.
      solver: solver name or :class:`~models.sampling.solvers.Solver`.
      shift: flow shift of the schedule (Wan: 3.0 at 480p, 5.0 at 720p; HunyuanVideo: 7.0).
      schedule: the sigma/timestep rule (:data:`~models.sampling.schedule.SCHEDULE_NAMES`):
        ``"unipc"`` (Wan's pipelines) or ``"flow-match-euler"`` (HunyuanVideo's pipeline; Euler
        solver only).
      num_train_timesteps: 1000.
      max_density: the mask cache holds ``blocks_for_density(max_density)`` key blocks per row
        (at least the plan's ``max_blocks``), so every density up to it runs in the same
        compiled program; ``None`` sizes the cache to each plan.
      max_blocks: a fixed ``K_max`` instead (overrides ``max_density``).
      min_capacity: smallest padded step count.
      progress: show a tqdm progress bar over the steps.
      parallel: run over several devices (:mod:`models.common.parallel`): a device count (split
        by ``parallel_mode``), a ``jax.sharding.Mesh`` with axes ``"guidance"``/``"heads"``, or a
        :class:`~models.common.parallel.Parallelism`; ``None`` or 1: one device. The loop stays
        one jitted program; the model's weights are replicated onto the mesh (in place) at the
        first call; the latents come back replicated, the mask cache sharded like the heads.
      parallel_mode: how a device count is split: ``"auto"`` (2 x N/2 for an even count, else
        heads; heads only for a model that embeds its guidance, ``config.guidance_embeds``),
        ``"guidance"``, ``"heads"`` or ``"both"``.

    Attributes:
      trace_count: how many times the loop has been traced (= compiled programs).
    """

    def __init__(
        self,
        model: nnx.Module,
        backend: AttentionBackend | str = "dense",
        *,
        solver: str | Solver = "euler",
        shift: float = 5.0,
        schedule: str = "unipc",
        num_train_timesteps: int = 1000,
        max_density: float | None = 0.5,
        max_blocks: int | None = None,
        min_capacity: int = 64,
        progress: bool = True,
        parallel: Parallelism | jax.sharding.Mesh | int | None = None,
        parallel_mode: str = "auto",
    ):
        self.model = model
        self.backend = make_backend(backend)
        # A model that embeds its guidance scale (HunyuanVideo) samples without a cond/uncond
        # batch, so "auto" gives its devices to the heads.
        guided = not getattr(model.config, "guidance_embeds", False)
        self.parallel = make_parallel(parallel, parallel_mode, guided=guided)
        if self.parallel is not None:
            self.parallel.check_heads(model.config.num_heads)
            self.backend = dataclasses.replace(self.backend, parallel=self.parallel)
        self.solver = get_solver(solver)
        if schedule not in SCHEDULE_NAMES:
            raise ValueError(f"schedule must be one of {SCHEDULE_NAMES}, got {schedule!r}")
        if schedule == "flow-match-euler" and self.solver.name != "euler":
            raise ValueError(f"the flow-match-euler schedule runs the euler solver, got solver {self.solver.name!r}")
        self.schedule = schedule
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.max_density = None if max_density is None else check_density(max_density, "max_density")
        self.max_blocks = None if max_blocks is None else int(max_blocks)
        self.min_capacity = int(min_capacity)
        self.progress = bool(progress)
        self.trace_count = 0
        self._pbar = None
        self._quiet = False
        self._kmax = None
        self._bar_steps = 0
        self._started = None
        self._step_ends: dict[int, float] = {}
        self._run = jax.jit(self._loop, static_argnums=(0, 1))

    # -- host side -------------------------------------------------------------------

    def plan(self, num_steps: int, num_tokens: int, dfs: DFSConfig | None = None) -> SchedulePlan | None:
        """The DFS plan of a run (``None`` for the dense backend).

        ``dfs`` overrides the schedule fields (density, decrement, dense steps, refresh
        interval) of ``backend.dfs``; its static fields (tile and block size, order, dense
        layers) must equal the backend's.
        """
        if not self.backend.is_sparse:
            if dfs is not None:
                raise ValueError("dfs can only be given to a sampler with the dfs backend")
            return None
        if dfs is None:
            dfs = self.backend.dfs
        elif not isinstance(dfs, DFSConfig):
            raise ValueError(f"dfs must be a DFSConfig, got {type(dfs).__name__}")
        else:
            static = ("tile_size", "block_size", "order", "dense_layers")
            diff = [f for f in static if getattr(dfs, f) != getattr(self.backend.dfs, f)]
            if diff:
                raise ValueError(
                    f"dfs may only change the schedule; its {diff} differ from the backend's "
                    "(make a Sampler with that backend instead)"
                )
        return plan_schedule(dfs, num_steps, num_token_blocks(num_tokens, self.backend.block_size))

    def cache_capacity(self, plan: SchedulePlan | None, joint: JointTokens | None = None) -> int:
        """``K_max`` of the mask cache for ``plan`` (0 for the dense backend); for a joint
        attention at least one video block plus the text blocks
        (:meth:`~dfsattn_jax.joint.JointTokens.min_capacity`); a fixed ``max_blocks`` must pass
        :meth:`~dfsattn_jax.joint.JointTokens.check_capacity`."""
        if not self.backend.is_sparse:
            return 0
        least = 1 if joint is None else joint.min_capacity(self.backend.block_size)
        if self.max_blocks is not None:
            if plan is not None and plan.max_blocks > self.max_blocks:
                raise ValueError(f"plan keeps up to {plan.max_blocks} blocks, the sampler's max_blocks is {self.max_blocks}")
            if joint is not None:
                joint.check_capacity(self.max_blocks, self.backend.block_size)
            return self.max_blocks
        if plan is None:
            return least
        capacity = max(least, plan.max_blocks)
        if self.max_density is not None:
            capacity = max(capacity, blocks_for_density(self.max_density, plan.num_key_blocks))
        return capacity

    def _order(self, order: str | None, grid: tuple[int, int, int]) -> TokenPermutation | None:
        """The run's permutation as input arrays (``None``: the backend's static order)."""
        if order is None:
            return None
        perm = token_permutation(order, grid)
        if perm.perm is None:  # raster, given explicitly: identity arrays, to share the program
            ident = np.arange(math.prod(grid), dtype=np.int32)
            perm = TokenPermutation(ident, ident)
        return TokenPermutation(jnp.asarray(perm.perm), jnp.asarray(perm.inverse))

    def __call__(
        self,
        noise: Float[Array, "b c f h w"],
        text: Float[Array, "b t e"],
        negative_text: Float[Array, "b t e"] | None = None,
        *,
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        dfs: DFSConfig | None = None,
        plan: SchedulePlan | None | str = AUTO,
        order: str | None = None,
        hook_inputs: Any = None,
    ) -> SampleResult:
        """Denoises ``noise`` over ``num_steps`` steps.

        Args:
          noise: initial latents ``[B, C, F, H, W]`` (standard normal).
          text: the model's conditioning: prompt embeddings ``[B, T, text_dim]`` (Wan), or a
            pytree whose leaves lead with the batch (HunyuanVideo's ``HunyuanConditioning``,
            which carries its embedded guidance).
          negative_text: the negative conditioning for classifier-free guidance, the same
            structure and shapes as ``text`` (``None``: no guidance, batch ``B``); with it the
            model runs a batch of ``2B``.
          num_steps: denoising steps.
          guidance_scale: ``v = v_uncond + g * (v_cond - v_uncond)`` (traced: changing it does
            not recompile).
          dfs: schedule override for this run (see :meth:`plan`); densities up to
            ``max_density`` run in the same compiled program.
          plan: an explicit step plan instead (``None``: every step dense; :data:`AUTO`: from
            ``dfs`` or the backend).
          order: run in this token order, passed as an input array so that runs in any order
            share one program (``None``: the backend's order, baked into the program).
          hook_inputs: a pytree handed to the backend's hooks at every layer and step.
        """
        noise = jnp.asarray(noise)
        text = jax.tree.map(jnp.asarray, text)
        grid = self.model.check_inputs(noise, jnp.zeros((noise.shape[0],)), text)
        if negative_text is not None:
            negative_text = jax.tree.map(jnp.asarray, negative_text)
            shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
            if jax.tree.structure(negative_text) != jax.tree.structure(text) or shapes(negative_text) != shapes(text):
                raise ValueError(
                    f"negative_text must have the structure and shapes of text {shapes(text)}, got {shapes(negative_text)}"
                )
        check_finite(noise=noise, text=text, negative_text=negative_text, guidance_scale=guidance_scale)
        joint = joint_tokens(self.model, grid, text)
        num_tokens = attention_tokens(grid, joint)
        if self.parallel is not None:
            guided = negative_text is not None
            batch = noise.shape[0] * (2 if guided else 1)
            self.parallel.check(batch=batch, num_heads=self.model.config.num_heads, num_tokens=num_tokens, guided=guided)
        sigmas, timesteps = flow_schedule(num_steps, self.shift, self.num_train_timesteps, kind=self.schedule)
        capacity = step_capacity(num_steps, self.min_capacity)
        schedule = make_schedule(
            num_steps, capacity=capacity, shift=self.shift, num_train_timesteps=self.num_train_timesteps,
            kind=self.schedule,
        )  # fmt: skip
        if isinstance(plan, str):
            if plan != AUTO:
                raise ValueError(f"plan must be a SchedulePlan, None or {AUTO!r}, got {plan!r}")
            plan = self.plan(num_steps, num_tokens, dfs)
        elif plan is not None:
            nk = num_token_blocks(num_tokens, self.backend.block_size)
            if not self.backend.is_sparse:
                raise ValueError("plan can only be given to a sampler with the dfs backend")
            if plan.num_steps != num_steps or plan.num_key_blocks != nk:
                raise ValueError(
                    f"plan must cover {num_steps} steps over {nk} key blocks, got "
                    f"{plan.num_steps} steps over {plan.num_key_blocks}"
                )
        steps = make_step_plan(plan, capacity)
        graphdef, state = nnx.split(self.model)
        kmax = self.cache_capacity(plan, joint) if self._kmax is None else self._kmax
        inputs = (
            state, noise.astype(jnp.float32), text, negative_text, schedule, steps,
            jnp.asarray(guidance_scale, jnp.float32), self._order(order, grid), hook_inputs,
        )  # fmt: skip
        if self.parallel is not None:  # everything replicated onto the mesh; the weights once, in place
            inputs = jax.device_put(inputs, self.parallel.sharding())
            nnx.update(self.model, inputs[0])
        args = (graphdef, kmax, *inputs)
        self._bar_steps = num_steps
        self._started = None
        self._step_ends = {}
        start = time.perf_counter()
        try:
            final = self._run(*args)
            latents = jax.block_until_ready(final.latents)
            if self.progress:
                jax.effects_barrier()
        finally:
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
        end = time.perf_counter()
        _warn_if_not_finite(latents)
        started = start if self._started is None else self._started
        return SampleResult(
            latents=latents,
            cache=final.cache,
            refreshed=np.asarray(final.refreshed)[:num_steps],
            skipped=np.asarray(final.skipped)[:num_steps],
            plan=plan,
            sigmas=sigmas,
            timesteps=timesteps,
            probes=jax.tree.map(lambda x: np.asarray(x)[:num_steps], final.probes),
            time_s=end - started,
            compile_s=float("nan") if self._started is None else self._started - start,
            step_s=self._step_times(num_steps),
        )

    def warmup(
        self,
        noise: Float[Array, "b c f h w"],
        text: Float[Array, "b t e"],
        negative_text: Float[Array, "b t e"] | None = None,
        *,
        num_steps: int = 50,
        **kwargs: Any,
    ) -> float:
        """Compiles the program that a ``num_steps`` run uses, by running the fewest steps that
        share it; returns the wall time in seconds. ``kwargs`` as :meth:`__call__` (``plan``
        excepted: the short run is dense, in the same program)."""
        capacity = step_capacity(num_steps, self.min_capacity)
        fewest = 1 if capacity == step_capacity(1, self.min_capacity) else capacity // 2 + 1
        start = time.perf_counter()
        text = jax.tree.map(jnp.asarray, text)
        grid = self.model.check_inputs(jnp.asarray(noise), jnp.zeros((noise.shape[0],)), text)
        joint = joint_tokens(self.model, grid, text)
        plan = kwargs.pop("plan", AUTO)
        if isinstance(plan, str):
            plan = self.plan(num_steps, attention_tokens(grid, joint), kwargs.get("dfs"))
        kwargs.pop("dfs", None)
        # Same cache capacity as the long run, and no bar (the traced program keeps its callback).
        self._kmax = self.cache_capacity(plan, joint)
        self._quiet = True
        try:
            result = self(noise, text, negative_text, num_steps=fewest, plan=None, **kwargs)
        finally:
            self._quiet = False
            self._kmax = None
        jax.block_until_ready(result.latents)
        return time.perf_counter() - start

    def _on_start(self, _ready=None) -> None:
        if self._started is not None:  # several devices call it once each
            return
        self._started = time.perf_counter()
        if not self._quiet:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=self._bar_steps, desc=f"sampling ({self.backend.name})", unit="step")

    def _step_times(self, num_steps: int) -> np.ndarray:
        ends = [self._step_ends.get(i, float("nan")) for i in range(num_steps)]
        started = float("nan") if self._started is None else self._started
        return np.diff(np.asarray([started, *ends], np.float64))

    def _on_step(self, step, _ready=None) -> None:
        self._step_ends.setdefault(int(step), time.perf_counter())
        pbar = self._pbar
        if pbar is not None:
            done = int(step) + 1
            if done > pbar.n:
                pbar.update(done - pbar.n)

    # -- traced ----------------------------------------------------------------------

    def _loop(
        self,
        graphdef,
        max_blocks: int,
        state,
        noise: Float[Array, "b c f h w"],
        text: Any,
        negative_text: Any,
        schedule: FlowSchedule,
        steps: StepPlan,
        guidance_scale: Float[Array, ""],
        order: TokenPermutation | None,
        hook_inputs: Any,
    ) -> LoopState:
        self.trace_count += 1
        model = nnx.merge(graphdef, state)
        cfg = model.config
        backend = self.backend
        batch = noise.shape[0]
        guided = negative_text is not None
        cond = _cast_conditioning(_batch_concat(text, negative_text) if guided else text, model.dtype)
        model_batch = 2 * batch if guided else batch
        grid = model.check_inputs(noise, jnp.zeros((batch,)), text)
        joint = joint_tokens(model, grid, text)
        num_tokens = attention_tokens(grid, joint)
        capacity = steps.sparse.shape[0]
        template = backend.hooks.probe_template()
        probes = None
        if template is not None:
            probes = jax.tree.map(
                lambda z: jnp.zeros((capacity, cfg.num_layers) + jnp.shape(z), jnp.asarray(z).dtype), template
            )
        cache = None
        if backend.is_sparse:
            cache = init_cache(
                backend, cfg.num_layers, model_batch, cfg.num_heads, num_tokens, max_blocks, joint=joint
            )
        parallel = backend.parallel
        cond = shard_batch(cond, parallel)

        def body(i, carry: LoopState) -> LoopState:
            control = steps.control(i) if backend.is_sparse else None
            x = carry.latents
            x_in = shard_batch(jnp.tile(x, (2,) + (1,) * (x.ndim - 1)) if guided else x, parallel)
            t = shard_batch(jnp.broadcast_to(schedule.timesteps[i], (model_batch,)), parallel)
            before = carry.cache.refreshes if carry.cache is not None else None
            attention = AttentionState(control=control, cache=carry.cache, inputs=hook_inputs, step=i)
            out, attention = model.forward(
                x_in.astype(model.dtype), t, cond, backend=backend, state=attention, order=order
            )
            v = replicate(out.astype(jnp.float32), parallel)  # one all-gather; the rest is local
            if guided:
                v_cond, v_uncond = v[:batch], v[batch:]
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            x, solver_state = self.solver.step(carry.solver, v, x, i)
            new = carry._replace(latents=x, solver=solver_state, cache=shard_cache(attention.cache, parallel))
            if attention.cache is not None:
                skipped = skipped_fraction(attention.cache, cfg.num_layers, joint=joint, block_size=backend.block_size)
                frac = jnp.where(control.sparse, skipped, 0.0)
                new = new._replace(
                    refreshed=carry.refreshed.at[i].set(attention.cache.refreshes - before),
                    skipped=carry.skipped.at[i].set(frac),
                )
            if carry.probes is not None:
                per_layer = jax.tree.map(lambda *xs: jnp.stack(xs), *attention.probes)
                new = new._replace(probes=jax.tree.map(lambda rec, p: rec.at[i].set(p), carry.probes, per_layer))
            if self.progress:  # ordered effects need one device; unordered ones may repeat per device
                # The callback takes one element of the step's result, so it cannot run before the
                # step has finished: with only ``i`` as operand, XLA may schedule it at the start of
                # the iteration (seen on CPU host devices: a run's first step timed at ~0 ms).
                jax.debug.callback(self._on_step, i, _done_marker(x), ordered=parallel is None)
            return new

        carry = LoopState(
            latents=noise,
            solver=self.solver.init(schedule, noise),
            cache=shard_cache(cache, parallel),
            refreshed=jnp.zeros((capacity,), jnp.int32),
            skipped=jnp.zeros((capacity,), jnp.float32),
            probes=probes,
        )
        if self.progress:  # runs once the program has started: compilation is not a step
            jax.debug.callback(self._on_start, _done_marker(noise), ordered=parallel is None)
        return jax.lax.fori_loop(0, schedule.num_steps, body, carry)


def _warn_if_not_finite(latents: Array) -> None:
    """A ``RuntimeWarning`` when a run's final latents hold NaN or infinite values (never silent)."""
    bad = int(latents.size - jnp.sum(jnp.isfinite(latents)))
    if bad:
        warnings.warn(
            f"sampling produced {bad} non-finite values among the {latents.size} final latents "
            f"(shape {tuple(latents.shape)}); the result is not usable",
            RuntimeWarning,
            stacklevel=3,
        )


def _done_marker(x: Array) -> Array:
    """One element of ``x``: a callback operand that exists only once ``x`` has been computed."""
    return x.reshape(-1)[0]


def sample(
    model: nnx.Module,
    noise: Float[Array, "b c f h w"],
    text: Float[Array, "b t e"],
    negative_text: Float[Array, "b t e"] | None = None,
    *,
    backend: AttentionBackend | str = "dense",
    solver: str | Solver = "euler",
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    shift: float = 5.0,
    schedule: str = "unipc",
    progress: bool = True,
) -> SampleResult:
    """One-shot convenience wrapper around :class:`Sampler` (compiles on every call)."""
    sampler = Sampler(model, backend, solver=solver, shift=shift, schedule=schedule, progress=progress)
    return sampler(noise, text, negative_text, num_steps=num_steps, guidance_scale=guidance_scale)
