"""Flow-matching schedules and per-step DFS plans, padded to a static step capacity.

Wan's pipelines configure diffusers' ``UniPCMultistepScheduler`` with ``use_flow_sigmas=True``,
``prediction_type="flow_prediction"`` and ``flow_shift``. Its ``set_timesteps(n)`` computes::

    s = linspace(1, 1/1000, n + 1)[:-1]                      # n values, descending
    s = shift * s / (1 + (shift - 1) * s)                     # first one nudged by -1e-6 if == 1
    timesteps = int64(s * 1000)                               # truncation, as torch's cast
    sigmas = float32(concat([s, [0]]))                        # final_sigmas_type="zero"

:func:`flow_schedule` returns :mod:`models.sampling.unipc`'s implementation of this rule, so
Euler and UniPC share sigmas and timesteps. Every per-step array is padded to a static capacity
(``>= 64`` steps, a power of two), so neither the number of steps nor the densities change the
compiled sampling program.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.schedule import SchedulePlan
from models.common.processor import StepControl
from models.sampling.unipc import flow_sigmas, flow_timesteps

__all__ = ["FlowSchedule", "StepPlan", "flow_schedule", "make_schedule", "make_step_plan", "step_capacity"]


def flow_schedule(
    num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Wan's shifted flow-matching schedule, as diffusers' UniPC ``set_timesteps`` with flow sigmas.

    Returns:
      ``(sigmas float32[num_steps + 1], timesteps int64[num_steps])``; ``sigmas[-1] == 0``.
    """
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
