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
Two experts (Wan2.2 A14B, :mod:`models.sampling.experts`): a ``model_2`` and a ``boundary``
timestep; the loop runs ``[0, switch)`` with ``model`` and ``[switch, n)`` with ``model_2``, each
with its guidance scale, in the same program.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from dfsattn_jax.joint import JointTokens
from dfsattn_jax.checks import check_density
from dfsattn_jax.layout import blocks_for_density
from dfsattn_jax.schedule import DFSConfig, SchedulePlan, plan_schedule
from models.common.parallel import Parallelism, make_parallel, replicate, shard_batch, shard_cache
from models.common.progress import done_marker, host_callbacks_available
from models.common.processor import (
    AttentionBackend,
    AttentionState,
    TokenPermutation,
    init_cache,
    make_backend,
    num_token_blocks,
    skipped_fraction,
)
from models.sampling.experts import check_boundary, check_expert_cache, check_experts, expert_switch, switch_plan
from models.sampling.inputs import (
    SamplerInputs,
    check_dfs_override,
    check_finite,
    check_plan,
    check_sampler_inputs,
)
from models.sampling.progress import StepClock
from models.sampling.schedule import (
    FlowSchedule,
    StepPlan,
    _flow_schedule,
    _pad_schedule,
    _pad_step_plan,
    check_schedule,
    step_capacity,
)
from models.sampling.solvers import Solver, get_solver
from models.sampling.state import LoopState, SampleResult, init_loop_state, record_step, warn_if_not_finite
from models.sampling.unipc import check_shift

__all__ = ["AUTO", "LoopState", "SampleResult", "Sampler", "check_finite", "sample"]

#: ``plan=AUTO``: the plan follows the backend's DFS schedule (``None`` would mean all dense).
AUTO = "auto"


def _cast_conditioning(cond: Any, dtype) -> Any:
    """An array conditioning (Wan's text embeddings) in the model's dtype; a pytree (e.g.
    ``HunyuanConditioning``) as given: its model casts each field as diffusers does."""
    return cond.astype(dtype) if isinstance(cond, jax.Array) else cond


def _batch_concat(cond: Any, negative: Any) -> Any:
    """``[cond; negative]`` along the batch, leaf by leaf: the guided batch of ``2B``."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), cond, negative)


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
      model_2: a second expert of ``model``'s class and shape (Wan2.2 A14B's low-noise
        transformer; :func:`~models.sampling.experts.check_experts`), run at the steps whose
        timestep is below ``boundary`` (``None``: ``model`` runs every step).
      boundary: the switch timestep, ``boundary_ratio * num_train_timesteps`` (875 for
        Wan2.2-T2V-A14B), in ``(0, num_train_timesteps)``; given with ``model_2`` only.
      expert_cache: how the DFS mask cache crosses the switch,
        :data:`~models.sampling.experts.EXPERT_CACHE_MODES`: ``"refresh"`` (the first sparse
        step of ``model_2`` recomputes the layouts) or ``"carry"`` (to measure the alternative).

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
        model_2: nnx.Module | None = None,
        boundary: float | None = None,
        expert_cache: str = "refresh",
    ):
        self.model = model
        self.model_2 = model_2
        if model_2 is not None:
            check_experts(model, model_2)
        elif boundary is not None:
            raise ValueError("boundary is where model_2 takes over: give model_2 with it")
        self.boundary = None if model_2 is None else check_boundary(boundary, int(num_train_timesteps))
        self.expert_cache = check_expert_cache(expert_cache)
        self.backend = make_backend(backend)
        # A model that embeds its guidance scale (HunyuanVideo) samples without a cond/uncond
        # batch, so "auto" gives its devices to the heads.
        guided = not getattr(model.config, "guidance_embeds", False)
        self.parallel = make_parallel(parallel, parallel_mode, guided=guided)
        if self.parallel is not None:
            self.parallel.check_heads(model.config.num_heads)
            self.backend = dataclasses.replace(self.backend, parallel=self.parallel)
        self.solver = get_solver(solver)
        self.schedule = check_schedule(schedule)
        if schedule == "flow-match-euler" and self.solver.name != "euler":
            raise ValueError(f"the flow-match-euler schedule runs the euler solver, got solver {self.solver.name!r}")
        self.shift = check_shift(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.max_density = None if max_density is None else check_density(max_density, "max_density")
        self.max_blocks = None if max_blocks is None else int(max_blocks)
        self.min_capacity = int(min_capacity)
        self.progress = bool(progress)
        if self.progress and not host_callbacks_available():
            # The bar and the step clock are host callbacks, which need a CPU device.
            warnings.warn(
                "JAX has no CPU device here (JAX_PLATFORMS leaves out 'cpu'), which its host callbacks need: "
                "sampling without a progress bar or per-step times; add 'cpu' to JAX_PLATFORMS for them",
                stacklevel=2,
            )
            self.progress = False
        self.trace_count = 0
        self._clock = StepClock(f"sampling ({self.backend.name})")
        self._run = jax.jit(self._loop, static_argnums=(0, 1, 2, 3, 4))

    # -- host side -------------------------------------------------------------------

    def switch_step(self, num_steps: int) -> int | None:
        """How many leading steps of a ``num_steps`` run ``model`` runs before ``model_2`` takes
        over (:func:`~models.sampling.experts.expert_switch`; ``None`` without ``model_2``)."""
        if self.model_2 is None:
            return None
        _, timesteps = _flow_schedule(self.schedule, int(num_steps), self.shift, self.num_train_timesteps)
        return expert_switch(timesteps, self.boundary)

    def _switch_plan(self, plan: SchedulePlan | None) -> SchedulePlan | None:
        """``plan`` with the expert switch's refresh (:func:`~models.sampling.experts.switch_plan`)."""
        if plan is None or self.model_2 is None:
            return plan
        return switch_plan(plan, self.switch_step(plan.num_steps), self.expert_cache)

    def plan(self, num_steps: int, num_tokens: int, dfs: DFSConfig | None = None) -> SchedulePlan | None:
        """The DFS plan of a run (``None`` for the dense backend).

        ``dfs`` overrides the schedule fields (density, decrement, dense steps, refresh
        interval) of ``backend.dfs``; its static fields (tile and block size, order, dense
        layers) must equal the backend's. With ``model_2`` the plan refreshes at the switch as
        ``expert_cache`` says.
        """
        if dfs is not None:
            dfs = check_dfs_override(dfs, self.backend)
        if not self.backend.is_sparse:
            return None
        dfs = self.backend.dfs if dfs is None else dfs
        plan = plan_schedule(dfs, num_steps, num_token_blocks(num_tokens, self.backend.block_size))
        return self._switch_plan(plan)

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

    def _resolve_plan(
        self, plan: SchedulePlan | None | str, dfs: DFSConfig | None, run: SamplerInputs
    ) -> SchedulePlan | None:
        """The plan of a checked run: :meth:`plan` for :data:`AUTO`, else ``plan`` once it fits the run."""
        if isinstance(plan, str):
            if plan != AUTO:
                raise ValueError(f"plan must be a SchedulePlan, None or {AUTO!r}, got {plan!r}")
            return self.plan(run.num_steps, run.num_tokens, dfs)
        if plan is not None:
            check_plan(plan, run.num_steps, run.num_tokens, self.backend)
        return self._switch_plan(plan)

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
        guidance_scale_2: float | None = None,
        condition: Float[Array, "b cc f h w"] | None = None,
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
          guidance_scale_2: ``model_2``'s guidance scale (traced; ``None``: ``guidance_scale``);
            only with ``model_2``.
          condition: latent channels ``[B, C_c, F, H, W]`` the model takes after the latents'
            at every step (Wan I2V: the mask and the image latents); ``None``: none.
        """
        run = check_sampler_inputs(
            self.model, noise, text, negative_text, num_steps=num_steps, guidance_scale=guidance_scale,
            order=order, parallel=self.parallel, guidance_scale_2=guidance_scale_2,
            experts=1 if self.model_2 is None else 2, condition=condition,
        )  # fmt: skip
        plan = self._resolve_plan(plan, dfs, run)
        return self._sample(run, run.num_steps, plan, self.cache_capacity(plan, run.joint), hook_inputs, bar=True)

    def warmup(
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
        guidance_scale_2: float | None = None,
        condition: Float[Array, "b cc f h w"] | None = None,
    ) -> float:
        """Compiles the program that a ``num_steps`` run uses, by running the fewest steps that
        share it; returns the wall time in seconds. Arguments as :meth:`__call__`; ``dfs`` and
        ``plan`` only size the mask cache as the long run does (the short run is dense, in the
        same program), and no progress bar is shown."""
        start = time.perf_counter()
        run = check_sampler_inputs(
            self.model, noise, text, negative_text, num_steps=num_steps, guidance_scale=guidance_scale,
            order=order, parallel=self.parallel, guidance_scale_2=guidance_scale_2,
            experts=1 if self.model_2 is None else 2, condition=condition,
        )  # fmt: skip
        kmax = self.cache_capacity(self._resolve_plan(plan, dfs, run), run.joint)
        capacity = step_capacity(run.num_steps, self.min_capacity)
        fewest = 1 if capacity == step_capacity(1, self.min_capacity) else capacity // 2 + 1
        result = self._sample(run, fewest, None, kmax, hook_inputs, bar=False)
        jax.block_until_ready(result.latents)
        return time.perf_counter() - start

    def _sample(
        self, run: SamplerInputs, num_steps: int, plan: SchedulePlan | None, kmax: int, hook_inputs: Any, *, bar: bool
    ) -> SampleResult:
        """Runs the compiled loop on checked inputs for ``num_steps`` steps (``plan`` fits them,
        ``kmax`` is the cache capacity) and collects the result; ``bar``: a progress bar when
        the sampler shows progress."""
        capacity = step_capacity(num_steps, self.min_capacity)
        sigmas, timesteps = _flow_schedule(self.schedule, num_steps, self.shift, self.num_train_timesteps)
        graphdef, state = nnx.split(self.model)
        inputs = (
            state, run.noise, run.text, run.negative_text, _pad_schedule(sigmas, timesteps, capacity),
            _pad_step_plan(plan, capacity), run.guidance_scale, run.order, hook_inputs,
        )  # fmt: skip
        graphdef_2, expert_2, switch = None, None, None
        if self.model_2 is not None:  # (weights, guidance scale, switch step): inputs, not static
            switch = expert_switch(timesteps, self.boundary)
            graphdef_2, state_2 = nnx.split(self.model_2)
            expert_2 = (state_2, run.guidance_scale_2, jnp.asarray(switch, jnp.int32))
        condition = run.condition
        if self.parallel is not None:  # everything replicated onto the mesh; the weights once, in place
            inputs, expert_2, condition = jax.device_put((inputs, expert_2, condition), self.parallel.sharding())
            nnx.update(self.model, inputs[0])
            if expert_2 is not None:
                nnx.update(self.model_2, expert_2[0])
        self._clock.begin(num_steps, show_bar=bar)
        start = time.perf_counter()
        try:
            final = self._run(graphdef, kmax, run.num_tokens, run.joint, graphdef_2, *inputs, expert_2, condition)
            latents = jax.block_until_ready(final.latents)
            if self.progress:
                jax.effects_barrier()
        finally:
            self._clock.close()
        end = time.perf_counter()
        warn_if_not_finite(latents, stacklevel=3)  # names the caller of __call__ or warmup
        time_s, compile_s, step_s = self._clock.timings(start, end, num_steps)
        return SampleResult.from_state(
            final, num_steps, latents=latents, plan=plan, sigmas=sigmas, timesteps=timesteps,
            time_s=time_s, compile_s=compile_s, step_s=step_s, switch_step=switch,
        )  # fmt: skip

    # -- traced ----------------------------------------------------------------------

    def _loop(
        self,
        graphdef,
        max_blocks: int,
        num_tokens: int,
        joint: JointTokens | None,
        graphdef_2,
        state,
        noise: Float[Array, "b c f h w"],
        text: Any,
        negative_text: Any,
        schedule: FlowSchedule,
        steps: StepPlan,
        guidance_scale: Float[Array, ""],
        order: TokenPermutation | None,
        hook_inputs: Any,
        expert_2: tuple[Any, Float[Array, ""], Int[Array, ""]] | None,
        condition: Float[Array, "b cc f h w"] | None,
    ) -> LoopState:
        """The whole denoising loop (jitted; ``graphdef``, ``max_blocks``, ``num_tokens``,
        ``joint`` and ``graphdef_2`` are static, the inputs checked by
        :func:`~models.sampling.inputs.check_sampler_inputs`). ``expert_2``: ``model_2``'s
        weights, guidance scale and the switch step (``None``: one model, one loop); ``condition``:
        channels appended to the latents at every step (``None``: none)."""
        self.trace_count += 1
        model = nnx.merge(graphdef, state)
        cfg = model.config
        backend = self.backend
        batch = noise.shape[0]
        guided = negative_text is not None
        cond = _cast_conditioning(_batch_concat(text, negative_text) if guided else text, model.dtype)
        model_batch = 2 * batch if guided else batch
        cache = None
        if backend.is_sparse:
            cache = init_cache(
                backend, cfg.num_layers, model_batch, cfg.num_heads, num_tokens, max_blocks, joint=joint
            )
        parallel = backend.parallel
        cond = shard_batch(cond, parallel)

        def make_body(expert: nnx.Module, scale: Float[Array, ""]):
            """The step of ``expert`` with guidance scale ``scale``."""

            def body(i, carry: LoopState) -> LoopState:
                control = steps.control(i) if backend.is_sparse else None
                x = carry.latents
                x_in = x if condition is None else jnp.concatenate([x, condition], axis=1)
                x_in = shard_batch(jnp.tile(x_in, (2,) + (1,) * (x.ndim - 1)) if guided else x_in, parallel)
                t = shard_batch(jnp.broadcast_to(schedule.timesteps[i], (model_batch,)), parallel)
                before = carry.cache.refreshes if carry.cache is not None else None
                attention = AttentionState(control=control, cache=carry.cache, inputs=hook_inputs, step=i)
                out, attention = expert.forward(
                    x_in.astype(expert.dtype), t, cond, backend=backend, state=attention, order=order
                )
                v = replicate(out.astype(jnp.float32), parallel)  # one all-gather; the rest is local
                if guided:
                    v_cond, v_uncond = v[:batch], v[batch:]
                    v = v_uncond + scale * (v_cond - v_uncond)
                x, solver_state = self.solver.step(carry.solver, v, x, i)
                new_cache = shard_cache(attention.cache, parallel)
                new = carry._replace(latents=x, solver=solver_state, cache=new_cache)
                if attention.cache is not None:
                    skipped = skipped_fraction(
                        attention.cache, cfg.num_layers, joint=joint, block_size=backend.block_size
                    )
                    new = record_step(
                        new, i, refreshed=attention.cache.refreshes - before,
                        skipped=jnp.where(control.sparse, skipped, 0.0),
                    )  # fmt: skip
                if carry.probes is not None:
                    new = record_step(new, i, probes=attention.probes)
                if self.progress:  # ordered effects need one device; unordered ones may repeat per device
                    # The operand is one element of the step's result, so the callback cannot run early.
                    jax.debug.callback(self._clock.on_step, i, done_marker(x), ordered=parallel is None)
                return new

            return body

        carry = init_loop_state(
            noise,
            self.solver.init(schedule, noise),
            shard_cache(cache, parallel),
            capacity=steps.sparse.shape[0],
            num_layers=cfg.num_layers,
            probe_template=backend.hooks.probe_template(),
        )
        if self.progress:  # runs once the program has started: compilation is not a step
            jax.debug.callback(self._clock.on_start, done_marker(noise), ordered=parallel is None)
        if expert_2 is None:
            return jax.lax.fori_loop(0, schedule.num_steps, make_body(model, guidance_scale), carry)
        state_2, guidance_scale_2, switch = expert_2
        carry = jax.lax.fori_loop(0, switch, make_body(model, guidance_scale), carry)
        model_2 = nnx.merge(graphdef_2, state_2)
        return jax.lax.fori_loop(switch, schedule.num_steps, make_body(model_2, guidance_scale_2), carry)


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
