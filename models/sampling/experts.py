"""Two experts in one sampling loop (Wan2.2 A14B): the host-side rules, checked once.

Wan2.2's A14B pipelines denoise with two transformers of one shape: ``transformer`` (the
high-noise expert) runs the steps whose timestep ``t >= boundary`` with ``guidance_scale``,
``transformer_2`` (the low-noise expert) the others with ``guidance_scale_2``, where
``boundary = boundary_ratio * num_train_timesteps`` (diffusers 0.42.1 ``pipeline_wan.py``
585-604). diffusers compares the int64 timestep tensor with the Python float ``boundary``, which
torch does in float32 (the default dtype); :func:`expert_switch` does the same. The timesteps
fall, so the high-noise expert runs the first ``switch`` steps and the low-noise expert the
rest: :class:`~models.sampling.loop.Sampler` runs ``lax.fori_loop(0, switch)`` with one and
``lax.fori_loop(switch, n)`` with the other in one jit program (``switch`` is an input, so runs of
any length share the program).

The DFS mask cache across the switch (:data:`EXPERT_CACHE_MODES`):

``"refresh"`` (default)
  One cache; the first sparse step at or after the switch recomputes the layouts
  (:func:`switch_plan` sets its ``refresh``), so no layout the high-noise expert's attention
  chose is used by the low-noise expert. The dense warm-up stays as the schedule says (the
  low-noise expert starts mid-schedule, where the schedule is already sparse). One cache per
  expert would give the same layouts (each expert runs one contiguous range of steps, so the
  low-noise expert's cache would be empty at the switch and filled by that same refresh) at twice
  the memory: at 720p with 40 layers a cache of ``K_max`` 177 already holds about 1.3 GB per
  guided sample.
``"carry"``
  The plan as it is: the layouts in force at the switch stay in force until the schedule's next
  refresh. For measuring how well the high-noise expert's layouts fit the low-noise expert
  (recall at the switch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from flax import nnx
from jaxtyping import Float

from dfsattn_jax.schedule import SchedulePlan

__all__ = [
    "EXPERT_CACHE_MODES",
    "check_boundary",
    "check_expert_cache",
    "check_experts",
    "expert_switch",
    "switch_plan",
]

#: How the mask cache crosses the expert switch (module docstring).
EXPERT_CACHE_MODES: tuple[str, ...] = ("refresh", "carry")

#: The config fields two experts must share to run in one loop with one mask cache.
_SHARED_FIELDS = ("num_layers", "num_heads", "in_channels", "out_channels", "patch_size")


def check_boundary(boundary: Any, num_train_timesteps: int) -> float:
    """``boundary`` (a timestep value) as a float after checking it is a finite number in
    ``(0, num_train_timesteps)``.

    Raises:
      ValueError: naming ``boundary``.
    """
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float, np.integer, np.floating)):
        raise ValueError(f"boundary must be a number (a timestep in (0, {num_train_timesteps})), got {boundary!r}")
    value = float(boundary)
    if not math.isfinite(value) or not 0.0 < value < num_train_timesteps:
        raise ValueError(f"boundary must be a timestep in (0, {num_train_timesteps}), got {boundary!r}")
    return value


def check_expert_cache(mode: Any) -> str:
    """``mode`` if it is one of :data:`EXPERT_CACHE_MODES`, else a ``ValueError`` naming ``expert_cache``."""
    if not isinstance(mode, str) or mode not in EXPERT_CACHE_MODES:
        raise ValueError(f"expert_cache must be one of {EXPERT_CACHE_MODES}, got {mode!r}")
    return mode


def check_experts(model: nnx.Module, model_2: nnx.Module) -> None:
    """Checks that ``model_2`` can take over from ``model`` in one loop: the same class, dtype and
    shape fields (:data:`_SHARED_FIELDS`: layers and heads size the one mask cache; channels and
    patch the latents).

    Raises:
      ValueError: naming ``model_2`` and the field that differs.
    """
    if type(model_2) is not type(model):
        raise ValueError(f"model_2 must be a {type(model).__name__} like model, got {type(model_2).__name__}")
    if getattr(model_2, "dtype", None) != getattr(model, "dtype", None):
        raise ValueError(f"model_2 must have model's dtype {model.dtype}, got {model_2.dtype}")
    for field in _SHARED_FIELDS:
        mine, theirs = getattr(model.config, field, None), getattr(model_2.config, field, None)
        if mine != theirs:
            raise ValueError(f"model_2 must have model's config.{field}={mine!r}, got {theirs!r}")


def expert_switch(timesteps: Float[np.ndarray, " n"], boundary: float) -> int:
    """The number of leading steps the high-noise expert runs: the steps whose timestep is
    ``>= boundary``, compared in float32 as torch compares diffusers' int64 timesteps with the
    Python float boundary.

    Raises:
      ValueError: if the high-noise steps are not a prefix of the schedule (timesteps that do
        not fall), which one switch cannot run.
    """
    high = np.asarray(timesteps).astype(np.float32) >= np.float32(boundary)
    switch = int(np.argmin(high)) if not high.all() else int(high.size)
    if high[switch:].any():
        raise ValueError(f"the timesteps {np.asarray(timesteps).tolist()} cross boundary={boundary} more than once")
    return switch


def switch_plan(plan: SchedulePlan | None, switch: int, mode: str) -> SchedulePlan | None:
    """``plan`` with the expert switch applied (``mode`` of :data:`EXPERT_CACHE_MODES`): for
    ``"refresh"`` the first sparse step at or after ``switch`` refreshes its layouts (when the
    switch falls inside the run); for ``"carry"``, or without a plan, ``plan`` unchanged.
    Idempotent."""
    if plan is None or mode == "carry" or not 0 < switch < plan.num_steps:
        return plan
    sparse_after = np.flatnonzero(np.asarray(plan.sparse)[switch:])
    if sparse_after.size == 0:
        return plan
    refresh = np.array(plan.refresh, dtype=bool, copy=True)
    refresh[switch + int(sparse_after[0])] = True
    return dataclasses.replace(plan, refresh=refresh)
