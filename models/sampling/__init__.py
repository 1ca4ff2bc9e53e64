"""Flow-matching sampling: one jitted loop (:mod:`~models.sampling.loop`) with its carry and
results (:mod:`~models.sampling.state`), the checks of a call (:mod:`~models.sampling.inputs`),
two experts in one loop (:mod:`~models.sampling.experts`, Wan2.2 A14B) and its progress bar and
step clock (:mod:`~models.sampling.progress`); its schedules
(:mod:`~models.sampling.schedule`) and solvers (:mod:`~models.sampling.solvers`, UniPC in
:mod:`~models.sampling.unipc`)."""

from models.sampling.experts import EXPERT_CACHE_MODES, expert_switch
from models.sampling.loop import AUTO, LoopState, SampleResult, Sampler, sample
from models.sampling.schedule import (
    SCHEDULE_NAMES,
    FlowSchedule,
    StepPlan,
    flow_match_euler_schedule,
    flow_schedule,
    make_schedule,
    make_step_plan,
    step_capacity,
)
from models.sampling.solvers import SOLVER_NAMES, Solver, get_solver

__all__ = [
    "AUTO",
    "EXPERT_CACHE_MODES",
    "FlowSchedule",
    "LoopState",
    "SCHEDULE_NAMES",
    "SOLVER_NAMES",
    "SampleResult",
    "Sampler",
    "Solver",
    "StepPlan",
    "expert_switch",
    "flow_match_euler_schedule",
    "flow_schedule",
    "get_solver",
    "make_schedule",
    "make_step_plan",
    "sample",
    "step_capacity",
]
