"""Flow-matching schedules and per-step DFS plans, padded to a static step capacity.

Two schedules (:data:`SCHEDULE_NAMES`), each the one a diffusers pipeline configures:

``"unipc"`` (Wan2.1)
  Wan's pipelines configure diffusers' ``UniPCMultistepScheduler`` with ``use_flow_sigmas=True``,
``prediction_type="flow_prediction"`` and ``flow_shift``. Its ``set_timesteps(n)`` computes::

    s = linspace(1, 1/1000, n + 1)[:-1]                      # n values, descending
    s = shift * s / (1 + (shift - 1) * s)                     # first one nudged by -1e-6 if == 1
    timesteps = int64(s * 1000)                               # truncation, as torch's cast
    sigmas = float32(concat([s, [0]]))                        # final_sigmas_type="zero"

  :mod:`models.sampling.unipc` implements this rule, so Euler and UniPC share it.
``"flow-match-euler"`` (HunyuanVideo)
  The HunyuanVideo pipeline passes ``sigmas = linspace(1, 0, n + 1)[:-1]`` to diffusers'
  ``FlowMatchEulerDiscreteScheduler(shift=7.0)`` (no dynamic shifting, no terminal stretch, no
  Karras/exponential/beta sigmas), whose ``set_timesteps`` computes, in float32::

    s = float32(linspace(1, 0, n + 1)[:-1])                  # n values, the first exactly 1
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = s * 1000                                      # float32, not truncated
    sigmas = concat([s, [0]])

  and whose ``step`` is Euler, ``x + (sigma[i+1] - sigma[i]) * v`` (:data:`~models.sampling.solvers.EULER`).
  At 50 steps and shift 7 the timesteps run 1000.0, 997.093, …, 225.81, 125.0.

Every per-step array is padded to a static capacity
(``>= 64`` steps, a power of two), so neither the number of steps nor the densities change the
compiled sampling program.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.checks import check_positive_int
from dfsattn_jax.schedule import SchedulePlan
from models.common.processor import StepControl
from models.sampling.unipc import _unipc_schedule, check_shift

__all__ = [
    "SCHEDULE_NAMES",
    "FlowSchedule",
    "StepPlan",
    "check_schedule",
    "flow_match_euler_schedule",
    "flow_schedule",
    "make_schedule",
    "make_step_plan",
    "step_capacity",
]

#: The sigma/timestep rules :func:`flow_schedule` knows (module docstring).
SCHEDULE_NAMES: tuple[str, ...] = ("unipc", "flow-match-euler")


def check_schedule(kind: str) -> str:
    """``kind`` if it is one of :data:`SCHEDULE_NAMES`, else a ``ValueError`` naming ``schedule``."""
    if not isinstance(kind, str) or kind not in SCHEDULE_NAMES:
        raise ValueError(f"schedule must be one of {SCHEDULE_NAMES}, got {kind!r}")
    return kind


def flow_schedule(
    num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000, *, kind: str = "unipc"
) -> tuple[np.ndarray, np.ndarray]:
    """A shifted flow-matching schedule: ``kind="unipc"`` is Wan's (diffusers' UniPC
    ``set_timesteps`` with flow sigmas), ``"flow-match-euler"`` HunyuanVideo's
    (:func:`flow_match_euler_schedule`).

    Returns:
      ``(sigmas float32[num_steps + 1], timesteps[num_steps])``, ``sigmas[-1] == 0``; timesteps
      int64 for ``"unipc"`` (truncated, as the Wan pipeline feeds them), float32 for
      ``"flow-match-euler"``.

    Raises:
      ValueError: naming ``schedule``, ``num_steps`` or ``shift``.
    """
    kind = check_schedule(kind)
    return _flow_schedule(kind, check_positive_int(num_steps, "num_steps"), check_shift(shift), num_train_timesteps)


def _flow_schedule(kind: str, num_steps: int, shift: float, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`flow_schedule` of checked arguments (no checks here)."""
    rule = _flow_match_euler_schedule if kind == "flow-match-euler" else _unipc_schedule
    return rule(num_steps, shift, num_train_timesteps)


def flow_match_euler_schedule(
    num_steps: int, shift: float = 7.0, num_train_timesteps: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """HunyuanVideo's schedule: diffusers' ``FlowMatchEulerDiscreteScheduler(shift)`` given the
    pipeline's ``sigmas = linspace(1, 0, n + 1)[:-1]`` (module docstring), in float32 as diffusers
    computes it.

    Returns:
      ``(sigmas float32[num_steps + 1], timesteps float32[num_steps])``: ``sigmas[0] == 1``,
      ``sigmas[-1] == 0``, ``timesteps = 1000 * sigmas[:-1]``.

    Raises:
      ValueError: if ``num_steps < 1`` or ``shift`` is not a positive finite number.
    """
    return _flow_match_euler_schedule(check_positive_int(num_steps, "num_steps"), check_shift(shift), num_train_timesteps)


def _flow_match_euler_schedule(num_steps: int, shift: float, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`flow_match_euler_schedule` of checked arguments (no checks here)."""
    s = np.linspace(1.0, 0.0, num_steps + 1)[:-1].astype(np.float32)
    s = np.float32(shift) * s / (np.float32(1.0) + np.float32(shift - 1.0) * s)
    timesteps = (s * np.float32(num_train_timesteps)).astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)]).astype(np.float32), timesteps


def step_capacity(num_steps: int, minimum: int = 64) -> int:
    """Static length of the per-step arrays: ``max(minimum, next power of two >= num_steps)``."""
    return max(int(minimum), 1 << max(0, int(num_steps) - 1).bit_length())


class FlowSchedule(NamedTuple):
    """Sigmas and timesteps padded to a static capacity ``P`` (a pytree).

    Attributes:
      sigmas: float32[P + 1]; ``sigmas[:n + 1]`` is the schedule, zeros after.
      timesteps: float32[P]; the model's timesteps (integer-valued for ``"unipc"``), zeros after ``n``.
      num_steps: int32[], ``n``.
    """

    sigmas: Float[Array, " p1"]
    timesteps: Float[Array, " p"]
    num_steps: Int[Array, ""]


def make_schedule(
    num_steps: int,
    *,
    capacity: int | None = None,
    shift: float = 5.0,
    num_train_timesteps: int = 1000,
    kind: str = "unipc",
) -> FlowSchedule:
    """The :func:`flow_schedule` of ``kind`` padded to ``capacity`` (default :func:`step_capacity`)."""
    sigmas, timesteps = flow_schedule(num_steps, shift, num_train_timesteps, kind=kind)
    capacity = step_capacity(num_steps) if capacity is None else int(capacity)
    if capacity < num_steps:
        raise ValueError(f"capacity must be >= num_steps={num_steps}, got {capacity}")
    return _pad_schedule(sigmas, timesteps, capacity)


def _pad_schedule(sigmas: np.ndarray, timesteps: np.ndarray, capacity: int) -> FlowSchedule:
    """``(sigmas [n + 1], timesteps [n])`` padded with zeros to ``capacity >= n`` steps (no checks here)."""
    num_steps = timesteps.shape[0]
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
    if plan is not None and plan.num_steps > capacity:
        raise ValueError(f"capacity must be >= the plan's {plan.num_steps} steps, got {capacity}")
    return _pad_step_plan(plan, capacity)


def _pad_step_plan(plan: SchedulePlan | None, capacity: int) -> StepPlan:
    """:func:`make_step_plan` of a plan of at most ``capacity`` steps (no checks here)."""
    sparse = np.zeros(capacity, bool)
    refresh = np.zeros(capacity, bool)
    num_blocks = np.ones(capacity, np.int32)
    if plan is not None:
        n = plan.num_steps
        sparse[:n] = plan.sparse
        refresh[:n] = plan.refresh
        num_blocks[:n] = plan.num_blocks
    return StepPlan(jnp.asarray(sparse), jnp.asarray(refresh), jnp.asarray(num_blocks))
