"""Flow-matching sampling of a Wan model as ONE ``jax.jit`` program, dense or with DFSAttn.

Schedule. Wan's pipelines configure diffusers' ``UniPCMultistepScheduler`` with
``use_flow_sigmas=True``, ``prediction_type="flow_prediction"`` and ``flow_shift`` (5.0 here by
default). Its ``set_timesteps(n)`` computes::

    s = linspace(1, 1/1000, n + 1)[:-1]                      # n values, descending
    s = shift * s / (1 + (shift - 1) * s)                     # first one nudged by -1e-6 if == 1
    timesteps = int64(s * 1000)                               # truncation, as torch's cast
    sigmas = float32(concat([s, [0]]))                        # final_sigmas_type="zero"

:func:`flow_schedule` returns ``models.unipc``'s implementation of this rule, so Euler and UniPC
share sigmas and timesteps (tests/test_loading.py checks them against diffusers).

Solvers. A solver is a pair of pure functions (:class:`Solver`)::

    init(schedule, sample) -> state
    step(state, model_output, sample, step_index) -> (new_sample, new_state)

chosen by name with :func:`get_solver`: ``"euler"`` (here) and ``"unipc"`` (``models.unipc``'s
``unipc_init``/``unipc_step``). ``schedule`` is a :class:`FlowSchedule`
whose arrays are padded to a static capacity and whose ``num_steps`` is traced.

Loop. :class:`Sampler` runs the whole denoising loop in one jitted function: a
``lax.fori_loop`` over the steps (traced count) carrying the latents, the solver state, the
mask cache and per-step statistics. Classifier-free guidance runs as one batch of ``2B``
(cond first, uncond second), each element with its own DFS layouts. The DFS plan (per-step
``sparse``, ``refresh``, ``num_blocks``) is an input array, and every per-step array is padded
to a static capacity (``>= 64`` steps, a power of two), so neither the number of steps nor the
densities change the compiled program; only the cache capacity ``K_max`` is static (set by
``max_density``). A tqdm progress bar is driven from the loop by ``jax.debug.callback``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.cache import MaskCache
from dfsattn_jax.layout import blocks_for_density, check_density
from dfsattn_jax.schedule import DFSConfig, SchedulePlan, plan_schedule
from models.attention_backend import (
    AttentionBackend,
    StepControl,
    init_cache,
    make_backend,
    num_token_blocks,
    skipped_fraction,
)
from models.configs import token_grid

__all__ = [
    "FlowSchedule",
    "StepPlan",
    "Solver",
    "SampleResult",
    "Sampler",
    "flow_schedule",
    "make_schedule",
    "make_step_plan",
    "step_capacity",
    "get_solver",
    "euler_init",
    "euler_step",
    "EULER",
    "SOLVER_NAMES",
    "sample",
]

SOLVER_NAMES: tuple[str, ...] = ("euler", "unipc")


# --------------------------------------------------------------------------- schedule


def flow_schedule(
    num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Wan's shifted flow-matching schedule, as diffusers' UniPC ``set_timesteps`` with flow sigmas.

    Returns:
      ``(sigmas float32[num_steps + 1], timesteps int64[num_steps])``; ``sigmas[-1] == 0``.
    """
    from models.unipc import flow_sigmas, flow_timesteps  # one implementation of the rule

    return (
        flow_sigmas(num_steps, shift, num_train_timesteps),
        flow_timesteps(num_steps, shift, num_train_timesteps),
    )


def step_capacity(num_steps: int, minimum: int = 64) -> int:
    """Static length of the per-step arrays: ``max(minimum, next power of two >= num_steps)``."""
    return max(int(minimum), 1 << max(0, int(num_steps) - 1).bit_length())


class FlowSchedule(NamedTuple):
    """Sigmas and timesteps padded to a static capacity ``P`` (a pytree).

    Attributes:
      sigmas: float32[P + 1]; ``sigmas[:n + 1]`` is the schedule, zeros after.
      timesteps: float32[P]; integer-valued model timesteps, zeros after ``n``.
      num_steps: int32[], ``n``.
    """

    sigmas: Float[Array, " p1"]
    timesteps: Float[Array, " p"]
    num_steps: Int[Array, ""]


def make_schedule(
    num_steps: int, *, capacity: int | None = None, shift: float = 5.0, num_train_timesteps: int = 1000
) -> FlowSchedule:
    """The :func:`flow_schedule` padded to ``capacity`` (default :func:`step_capacity`)."""
    sigmas, timesteps = flow_schedule(num_steps, shift, num_train_timesteps)
    capacity = step_capacity(num_steps) if capacity is None else int(capacity)
    if capacity < num_steps:
        raise ValueError(f"capacity must be >= num_steps={num_steps}, got {capacity}")
    sig = np.zeros(capacity + 1, np.float32)
    sig[: num_steps + 1] = sigmas
    ts = np.zeros(capacity, np.float32)
    ts[:num_steps] = timesteps
    return FlowSchedule(jnp.asarray(sig), jnp.asarray(ts), jnp.asarray(num_steps, jnp.int32))


class StepPlan(NamedTuple):
    """Per-step DFS controls padded to the capacity ``P`` (a pytree)."""

    sparse: Bool[Array, " p"]
    refresh: Bool[Array, " p"]
    num_blocks: Int[Array, " p"]

    def control(self, step: Int[Array, ""]) -> StepControl:
        return StepControl(self.sparse[step], self.refresh[step], self.num_blocks[step])


def make_step_plan(plan: SchedulePlan | None, capacity: int) -> StepPlan:
    """Pads a :class:`SchedulePlan` (``None``: all steps dense) to ``capacity`` steps."""
    sparse = np.zeros(capacity, bool)
    refresh = np.zeros(capacity, bool)
    num_blocks = np.ones(capacity, np.int32)
    if plan is not None:
        n = plan.num_steps
        if n > capacity:
            raise ValueError(f"capacity must be >= the plan's {n} steps, got {capacity}")
        sparse[:n] = plan.sparse
        refresh[:n] = plan.refresh
        num_blocks[:n] = plan.num_blocks
    return StepPlan(jnp.asarray(sparse), jnp.asarray(refresh), jnp.asarray(num_blocks))


# --------------------------------------------------------------------------- solvers


class Solver(NamedTuple):
    """A sampler's ODE solver: two pure functions (see the module docstring)."""

    name: str
    init: Callable[[FlowSchedule, Array], Any]
    step: Callable[[Any, Array, Array, Array], tuple[Array, Any]]


def euler_init(schedule: FlowSchedule, sample: Float[Array, "..."]) -> FlowSchedule:
    """Euler's state is the schedule itself."""
    del sample
    return schedule


def euler_step(
    state: FlowSchedule, model_output: Float[Array, "..."], sample: Float[Array, "..."], step_index: Int[Array, ""]
) -> tuple[Float[Array, "..."], FlowSchedule]:
    """``x + (sigma[i+1] - sigma[i]) * v`` in float32 (flow-matching Euler)."""
    dt = state.sigmas[step_index + 1] - state.sigmas[step_index]
    new = sample.astype(jnp.float32) + dt * model_output.astype(jnp.float32)
    return new.astype(sample.dtype), state


EULER = Solver("euler", euler_init, euler_step)


def get_solver(solver: str | Solver) -> Solver:
    """The solver named ``solver`` (``"euler"`` or ``"unipc"``); a :class:`Solver` is returned as is.

    ``"unipc"`` comes from ``models.unipc``: its ``SOLVER`` if it defines one, else its
    ``unipc_init``/``unipc_step`` (or ``init``/``step``) functions.
    """
    if isinstance(solver, Solver):
        return solver
    if solver == "euler":
        return EULER
    if solver == "unipc":
        module = importlib.import_module("models.unipc")
        found = getattr(module, "SOLVER", None)
        if isinstance(found, Solver):
            return found
        init = getattr(module, "unipc_init", None) or getattr(module, "init")
        step = getattr(module, "unipc_step", None) or getattr(module, "step")
        return Solver("unipc", init, step)
    raise ValueError(f"solver must be one of {SOLVER_NAMES} or a Solver, got {solver!r}")


# --------------------------------------------------------------------------- sampler


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
      plan: the DFS plan (``None`` for the dense backend).
      sigmas: float32[num_steps + 1]; timesteps: int64[num_steps].
    """

    latents: Array
    cache: MaskCache | None
    refreshed: np.ndarray
    skipped: np.ndarray
    plan: SchedulePlan | None
    sigmas: np.ndarray
    timesteps: np.ndarray

    @property
    def refresh_steps(self) -> tuple[int, ...]:
        """Steps at which layouts were actually recomputed."""
        return tuple(int(s) for s in np.flatnonzero(self.refreshed))

    @property
    def sparsity(self) -> float:
        """SPEC §6 reported sparsity: mean of ``skipped`` over the sparse steps (0 without any)."""
        if self.plan is None or not self.plan.sparse.any():
            return 0.0
        return float(np.mean(self.skipped[self.plan.sparse]))


class Sampler:
    """Samples a Wan model with a flow-matching solver in one jitted loop.

    Args:
      model: a :class:`models.wan.WanTransformer3DModel` (its current weights are read at
        every call).
      backend: self-attention backend (``"dense"``, ``"dfs"`` or an
        :class:`~models.attention_backend.AttentionBackend`); the DFS schedule comes from
        ``backend.dfs``.
      solver: solver name or :class:`Solver`.
      shift: flow shift of the schedule (Wan: 5.0).
      num_train_timesteps: 1000.
      max_density: the mask cache holds ``blocks_for_density(max_density)`` key blocks per row
        (at least the plan's ``max_blocks``), so every density up to it runs in the same
        compiled program; ``None`` sizes the cache to each plan (smallest, recompiles when
        the plan's ``max_blocks`` changes).
      min_capacity: smallest padded step count.
      progress: show a tqdm progress bar over the steps.

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
        num_train_timesteps: int = 1000,
        max_density: float | None = 0.5,
        min_capacity: int = 64,
        progress: bool = True,
    ):
        self.model = model
        self.backend = make_backend(backend)
        self.solver = get_solver(solver)
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.max_density = None if max_density is None else check_density(max_density, "max_density")
        self.min_capacity = int(min_capacity)
        self.progress = bool(progress)
        self.trace_count = 0
        self._pbar = None
        self._quiet = False
        self._kmax = None
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

    def cache_capacity(self, plan: SchedulePlan | None) -> int:
        """``K_max`` of the mask cache for ``plan`` (0 for the dense backend)."""
        if plan is None:
            return 0
        capacity = max(1, plan.max_blocks)
        if self.max_density is not None:
            capacity = max(capacity, blocks_for_density(self.max_density, plan.num_key_blocks))
        return capacity

    def __call__(
        self,
        noise: Float[Array, "b c f h w"],
        text: Float[Array, "b t e"],
        negative_text: Float[Array, "b t e"] | None = None,
        *,
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        dfs: DFSConfig | None = None,
    ) -> SampleResult:
        """Denoises ``noise`` over ``num_steps`` steps.

        Args:
          noise: initial latents ``[B, C, F, H, W]`` (standard normal).
          text: prompt embeddings ``[B, T, text_dim]``.
          negative_text: negative-prompt embeddings for classifier-free guidance (``None``:
            no guidance, batch ``B``); with it the model runs a batch of ``2B``.
          num_steps: denoising steps.
          guidance_scale: ``v = v_uncond + g * (v_cond - v_uncond)`` (traced: changing it does
            not recompile).
          dfs: schedule override for this run (see :meth:`plan`); densities up to
            ``max_density`` run in the same compiled program.
        """
        noise = jnp.asarray(noise)
        text = jnp.asarray(text)
        grid = self.model.check_inputs(noise, jnp.zeros((noise.shape[0],)), text)
        if negative_text is not None:
            negative_text = jnp.asarray(negative_text)
            if negative_text.shape != text.shape:
                raise ValueError(
                    f"negative_text must have the shape of text {text.shape}, got {negative_text.shape}"
                )
        num_tokens = math.prod(grid)
        sigmas, timesteps = flow_schedule(num_steps, self.shift, self.num_train_timesteps)
        capacity = step_capacity(num_steps, self.min_capacity)
        schedule = make_schedule(
            num_steps, capacity=capacity, shift=self.shift, num_train_timesteps=self.num_train_timesteps
        )
        plan = self.plan(num_steps, num_tokens, dfs)
        steps = make_step_plan(plan, capacity)
        graphdef, state = nnx.split(self.model)
        if self.progress and not self._quiet:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=num_steps, desc=f"sampling ({self.backend.name})", unit="step")
        try:
            latents, cache, refreshed, skipped = self._run(
                graphdef,
                self.cache_capacity(plan) if self._kmax is None else self._kmax,
                state,
                noise.astype(jnp.float32),
                text,
                negative_text,
                schedule,
                steps,
                jnp.asarray(guidance_scale, jnp.float32),
            )
            latents = jax.block_until_ready(latents)
            if self.progress:
                jax.effects_barrier()
        finally:
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
        return SampleResult(
            latents=latents,
            cache=cache,
            refreshed=np.asarray(refreshed)[:num_steps],
            skipped=np.asarray(skipped)[:num_steps],
            plan=plan,
            sigmas=sigmas,
            timesteps=timesteps,
        )

    def warmup(
        self,
        noise: Float[Array, "b c f h w"],
        text: Float[Array, "b t e"],
        negative_text: Float[Array, "b t e"] | None = None,
        *,
        num_steps: int = 50,
    ) -> float:
        """Compiles the program that a ``num_steps`` run uses, by running the fewest steps that
        share it; returns the wall time in seconds."""
        capacity = step_capacity(num_steps, self.min_capacity)
        fewest = 1 if capacity == step_capacity(1, self.min_capacity) else capacity // 2 + 1
        start = time.perf_counter()
        grid = self.model.check_inputs(jnp.asarray(noise), jnp.zeros((noise.shape[0],)), jnp.asarray(text))
        # Same cache capacity as the long run, and no bar (the traced program keeps its callback).
        self._kmax = self.cache_capacity(self.plan(num_steps, math.prod(grid)))
        self._quiet = True
        try:
            result = self(noise, text, negative_text, num_steps=fewest)
        finally:
            self._quiet = False
            self._kmax = None
        jax.block_until_ready(result.latents)
        return time.perf_counter() - start

    def _on_step(self, step) -> None:
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
        text: Float[Array, "b t e"],
        negative_text: Float[Array, "b t e"] | None,
        schedule: FlowSchedule,
        steps: StepPlan,
        guidance_scale: Float[Array, ""],
    ):
        self.trace_count += 1
        model = nnx.merge(graphdef, state)
        cfg = model.config
        batch = noise.shape[0]
        guided = negative_text is not None
        cond_text = jnp.concatenate([text, negative_text], axis=0) if guided else text
        model_batch = 2 * batch if guided else batch
        num_tokens = math.prod(token_grid(cfg, noise.shape[2:]))
        cache = None
        if self.backend.is_sparse:
            cache = init_cache(self.backend, cfg.num_layers, model_batch, cfg.num_heads, num_tokens, max_blocks)
        capacity = steps.sparse.shape[0]

        def body(i, carry):
            x, solver_state, cache, refreshed, skipped = carry
            control = steps.control(i) if self.backend.is_sparse else None
            x_in = jnp.concatenate([x, x], axis=0) if guided else x
            t = jnp.broadcast_to(schedule.timesteps[i], (model_batch,))
            before = cache.refreshes if cache is not None else jnp.zeros((), jnp.int32)
            out, cache = model(
                x_in.astype(model.dtype), t, cond_text.astype(model.dtype),
                backend=self.backend, control=control, cache=cache,
            )
            v = out.astype(jnp.float32)
            if guided:
                v_cond, v_uncond = v[:batch], v[batch:]
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            x, solver_state = self.solver.step(solver_state, v, x, i)
            if cache is not None:
                refreshed = refreshed.at[i].set(cache.refreshes - before)
                frac = jnp.where(control.sparse, skipped_fraction(cache, cfg.num_layers), 0.0)
                skipped = skipped.at[i].set(frac)
            if self.progress:
                jax.debug.callback(self._on_step, i, ordered=True)
            return x, solver_state, cache, refreshed, skipped

        carry = (
            noise,
            self.solver.init(schedule, noise),
            cache,
            jnp.zeros((capacity,), jnp.int32),
            jnp.zeros((capacity,), jnp.float32),
        )
        x, _, cache, refreshed, skipped = jax.lax.fori_loop(0, schedule.num_steps, body, carry)
        return x, cache, refreshed, skipped


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
    progress: bool = True,
) -> SampleResult:
    """One-shot convenience wrapper around :class:`Sampler` (compiles on every call)."""
    sampler = Sampler(model, backend, solver=solver, shift=shift, progress=progress)
    return sampler(noise, text, negative_text, num_steps=num_steps, guidance_scale=guidance_scale)
