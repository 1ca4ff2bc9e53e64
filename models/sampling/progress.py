"""The progress bar and step clock of the sampling loop.

The jitted loop calls :meth:`StepClock.on_start` once the program has started on the device and
:meth:`StepClock.on_step` as each step finishes, through ``jax.debug.callback`` with a
:func:`done_marker` operand (from :mod:`models.common.progress`, the home of the other bars;
re-exported here); the clock keeps the host times of those calls, from which a run reads its
compile time, its step times and its wall time (:meth:`StepClock.timings`), and drives a tqdm bar.
One clock serves every run of a sampler: the compiled program keeps its callbacks.
"""

from __future__ import annotations

import time

import numpy as np

from models.common.progress import done_marker

__all__ = ["StepClock", "done_marker"]


class StepClock:
    """Host times of one run's start and steps, and its progress bar.

    Args:
      desc: the bar's label.
    """

    def __init__(self, desc: str):
        self.desc = desc
        self._num_steps = 0
        self._show_bar = False
        self._pbar = None
        self._started: float | None = None
        self._step_ends: dict[int, float] = {}

    def begin(self, num_steps: int, *, show_bar: bool) -> None:
        """Resets the clock for a run of ``num_steps`` steps (a bar only with ``show_bar``)."""
        self._num_steps = num_steps
        self._show_bar = show_bar
        self._started = None
        self._step_ends = {}

    def on_start(self, _ready=None) -> None:
        """The loop has started on the device (several devices call it once each)."""
        if self._started is not None:
            return
        self._started = time.perf_counter()
        if self._show_bar:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=self._num_steps, desc=self.desc, unit="step")

    def on_step(self, step, _ready=None) -> None:
        """Step ``step`` has finished on the device (the first call per step counts)."""
        self._step_ends.setdefault(int(step), time.perf_counter())
        pbar = self._pbar
        if pbar is not None:
            done = int(step) + 1
            if done > pbar.n:
                pbar.update(done - pbar.n)

    def close(self) -> None:
        """Closes the bar, if any."""
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def timings(self, start: float, end: float, num_steps: int) -> tuple[float, float, np.ndarray]:
        """``(time_s, compile_s, step_s)`` of a run called at host time ``start`` and blocked on
        at ``end``: the wall time from the loop's start (from ``start`` if it never reported),
        the time from ``start`` to the loop's start (NaN if it never reported), and
        float64[num_steps] the time of each step (NaN where a step did not report)."""
        started = start if self._started is None else self._started
        compile_s = float("nan") if self._started is None else self._started - start
        ends = [self._step_ends.get(i, float("nan")) for i in range(num_steps)]
        first = float("nan") if self._started is None else self._started
        return end - started, compile_s, np.diff(np.asarray([first, *ends], np.float64))
