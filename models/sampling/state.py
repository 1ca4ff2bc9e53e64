"""The state of the sampling loop: its carry (:class:`LoopState`), the records it writes at each
step (layouts refreshed, skipped block fraction, the hooks' probes) and what a run returns
(:class:`SampleResult`).

Records are padded to the loop's static step capacity ``P``; a run keeps the first ``num_steps``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dfsattn_jax.cache import MaskCache
from dfsattn_jax.schedule import SchedulePlan

__all__ = ["LoopState", "SampleResult", "init_loop_state", "record_step", "warn_if_not_finite"]


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


def init_loop_state(
    noise: Float[Array, "b c f h w"],
    solver: Any,
    cache: MaskCache | None,
    *,
    capacity: int,
    num_layers: int,
    probe_template: Any,
) -> LoopState:
    """The carry before the first step: ``noise`` as the latents, zero records of ``capacity``
    steps, and for each leaf of ``probe_template`` (the hooks' probe of one layer, ``None``
    without probes) a zero record ``[capacity, num_layers, *shape]`` of its dtype."""
    probes = None
    if probe_template is not None:
        probes = jax.tree.map(
            lambda z: jnp.zeros((capacity, num_layers) + jnp.shape(z), jnp.asarray(z).dtype), probe_template
        )
    return LoopState(
        latents=noise,
        solver=solver,
        cache=cache,
        refreshed=jnp.zeros((capacity,), jnp.int32),
        skipped=jnp.zeros((capacity,), jnp.float32),
        probes=probes,
    )


def record_step(
    state: LoopState,
    step: Int[Array, ""],
    *,
    refreshed: Int[Array, ""] | None = None,
    skipped: Float[Array, ""] | None = None,
    probes: tuple[Any, ...] | None = None,
) -> LoopState:
    """``state`` with the records of ``step`` written: the layouts ``refreshed`` and the
    ``skipped`` fraction (both given with a mask cache), and ``probes``, one pytree per layer
    (stacked into ``[num_layers, *shape]`` per leaf); ``None`` leaves a record as it is."""
    if refreshed is not None:
        state = state._replace(refreshed=state.refreshed.at[step].set(refreshed))
    if skipped is not None:
        state = state._replace(skipped=state.skipped.at[step].set(skipped))
    if probes is not None:
        per_layer = jax.tree.map(lambda *xs: jnp.stack(xs), *probes)
        state = state._replace(probes=jax.tree.map(lambda rec, p: rec.at[step].set(p), state.probes, per_layer))
    return state


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
        from the call, so warm up first: :meth:`~models.sampling.loop.Sampler.warmup`).
      compile_s: with ``progress``, the time from the call to the loop's start (tracing and
        compilation when the program is new); NaN without ``progress``.
      step_s: float64[num_steps], with ``progress``, the wall time of each step (between the
        loop's per-step callbacks, which run as the device finishes a step); NaN without.
      switch_step: with two experts, the steps the first ran before the second took over
        (``None``: one model).
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
    switch_step: int | None = None

    @classmethod
    def from_state(cls, final: LoopState, num_steps: int, **fields: Any) -> SampleResult:
        """The result of a run from its final carry: the cache, and the first ``num_steps`` of
        each record; ``fields`` gives the rest (``latents``, ``plan``, ``sigmas``, ...)."""
        return cls(
            cache=final.cache,
            refreshed=np.asarray(final.refreshed)[:num_steps],
            skipped=np.asarray(final.skipped)[:num_steps],
            probes=jax.tree.map(lambda x: np.asarray(x)[:num_steps], final.probes),
            **fields,
        )

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


def warn_if_not_finite(latents: Array, *, stacklevel: int = 2) -> None:
    """A ``RuntimeWarning`` when a run's final latents hold NaN or infinite values (never
    silent); ``stacklevel`` as :func:`warnings.warn`, counted from the caller of this function."""
    bad = int(latents.size - jnp.sum(jnp.isfinite(latents)))
    if bad:
        warnings.warn(
            f"sampling produced {bad} non-finite values among the {latents.size} final latents "
            f"(shape {tuple(latents.shape)}); the result is not usable",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
