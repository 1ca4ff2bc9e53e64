"""Flow-matching ODE solvers as pairs of pure functions.

A solver is ``init(schedule, sample) -> state`` and ``step(state, model_output, sample,
step_index) -> (new_sample, new_state)`` (:class:`Solver`), chosen by name with
:func:`get_solver`: ``"euler"`` (here) and ``"unipc"`` (:mod:`models.sampling.unipc`, Wan's
default). ``schedule`` is a :class:`~models.sampling.schedule.FlowSchedule` padded to a static
capacity, with a traced ``num_steps``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from models.sampling import unipc
from models.sampling.schedule import FlowSchedule

__all__ = ["EULER", "SOLVER_NAMES", "UNIPC", "Solver", "euler_init", "euler_step", "get_solver"]

SOLVER_NAMES: tuple[str, ...] = ("euler", "unipc")


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


UNIPC = Solver("unipc", unipc.unipc_init, unipc.unipc_step)


def get_solver(solver: str | Solver) -> Solver:
    """The solver named ``solver`` (``"euler"`` or ``"unipc"``); a :class:`Solver` is returned as is."""
    if isinstance(solver, Solver):
        return solver
    named = {"euler": EULER, "unipc": UNIPC}
    if solver not in named:
        raise ValueError(f"solver must be one of {SOLVER_NAMES} or a Solver, got {solver!r}")
    return named[solver]
