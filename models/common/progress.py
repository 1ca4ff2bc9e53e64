"""Progress bars that a jit program can advance: :class:`TickBar` and :func:`done_marker`.

A bar counts ticks towards a total. The host ticks it (a checkpoint shard read, a prompt
encoded), or a compiled program does, through ``jax.debug.callback(bar.tick, done_marker(y))``
placed after the computation of ``y``: the callback's operand is one element of ``y``, so it runs
once ``y`` exists, not when the program starts. The bar's identity is what a jit cache keys on
when the bar (or its bound ``tick``) is a static argument: a caller that keeps one bar compiles
once.

The sampling loop's clock (:mod:`models.sampling.progress`) uses the same marker.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
from jaxtyping import Array

__all__ = ["TickBar", "done_marker", "host_callbacks_available"]


def host_callbacks_available() -> bool:
    """Whether a jit program can call back into Python here: JAX places a callback's operands on
    a CPU device, and ``JAX_PLATFORMS=cuda`` (no ``cpu`` in the list) leaves none, so every
    ``jax.debug.callback`` would fail when the program runs."""
    try:
        return bool(jax.devices("cpu"))
    except RuntimeError:
        return False


def done_marker(x: Array) -> Array:
    """One element of ``x`` (any shape, at least one element), a scalar: a callback operand that
    exists only once ``x`` has been computed.

    With no operand computed from ``x`` (a step index alone, say), XLA may schedule a callback
    before ``x`` (seen on CPU host devices: a sampling run's first step timed at ~0 ms).
    """
    return x.reshape(-1)[0]


class TickBar:
    """A tqdm bar (``tqdm.auto``, on stderr) advanced one tick at a time, by the host or from a
    jit program.

    Every tick is counted (:attr:`count`) whether or not the bar is shown, so a test or a caller
    can read what a run reported.

    Args:
      desc: the bar's label.
      unit: what a tick stands for (tqdm's ``unit``).
      show: draw the bar; ``False``: count only.
    """

    def __init__(self, desc: str, *, unit: str = "it", show: bool = True):
        self.desc = desc
        self.unit = unit
        self.show = bool(show)
        self.total = 0
        self.count = 0
        self._pbar: Any = None

    def open(self, total: int) -> None:
        """Starts a run of ``total`` ticks: the count goes back to 0 (a bar still open is closed)."""
        self.close()
        self.total = int(total)
        self.count = 0
        if self.show:
            from tqdm.auto import tqdm

            self._pbar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=sys.stderr)

    def tick(self, _marker: Any = None) -> None:
        """One more tick (``_marker``: a :func:`done_marker` operand from a jit program; ignored)."""
        self.count += 1
        if self._pbar is not None:
            self._pbar.update(1)

    def complete(self) -> None:
        """Counts the run's remaining ticks at once (its work reported nothing on the way)."""
        if self.count < self.total:
            if self._pbar is not None:
                self._pbar.update(self.total - self.count)
            self.count = self.total

    def close(self) -> None:
        """Closes the bar, if one is drawn (the count stays readable)."""
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def __repr__(self) -> str:
        return f"TickBar({self.desc!r}, {self.count}/{self.total} {self.unit})"
