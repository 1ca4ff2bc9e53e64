"""The one harness of the benchmarks: the timer, the run record and the report files.

Every bench in this package is a thin driver over it (run from the repository root as
``python -m benchmarks.<name>``):

* :func:`median_time` times a call: untimed warm-up calls, then the median of several timed
  repeats, each blocked on its result (``jax.block_until_ready``), so the device's work is timed,
  not the dispatch; :func:`first_call` times a program's first (compiling) call apart;
* :func:`memory_stats` and :func:`peak_memory_bytes` read the device's allocator;
* :func:`run_record` is what every results file says about its run: device, JAX and Python
  versions, the date and the command line;
* :func:`write_markdown` writes a report's lines (tables from
  :func:`models.evaluation.tables.markdown_table`) beside its JSON
  (:func:`models.evaluation.results.write_json`);
* :func:`module_command` is the command of a bench's child process (a worker or a stage),
  :func:`bench_module` a bench's module name.

Results go to :data:`RESULTS_DIR` unless a bench is given a path.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from models.common.files import atomic_write_text
from models.evaluation.results import device_name, portable

__all__ = [
    "MAX_CALLS_PER_REPEAT",
    "RESULTS_DIR",
    "Timing",
    "bench_module",
    "first_call",
    "median_time",
    "memory_stats",
    "module_command",
    "peak_memory_bytes",
    "run_record",
    "write_markdown",
]

#: Where the benches write their results by default (``benchmarks/results``).
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
#: The most back-to-back calls one timed repeat makes (``median_time(target_s=...)``).
MAX_CALLS_PER_REPEAT = 50


@dataclasses.dataclass(frozen=True)
class Timing:
    """The timed repeats of one call.

    Attributes:
      times_s: seconds per call, one per repeat (a repeat's time divided by its calls).
      calls_per_repeat: back-to-back calls per repeat (1 unless ``target_s`` asked for more).
    """

    times_s: tuple[float, ...]
    calls_per_repeat: int

    @property
    def median_s(self) -> float:
        """The median seconds per call over the repeats."""
        return statistics.median(self.times_s)

    @property
    def median_ms(self) -> float:
        """The median milliseconds per call over the repeats."""
        return 1e3 * self.median_s

    @property
    def times_ms(self) -> list[float]:
        """Milliseconds per call, one per repeat."""
        return [1e3 * t for t in self.times_s]


def median_time(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int,
    repeats: int,
    target_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Times ``fn(*args)``: ``warmup`` untimed calls, then ``repeats`` timed repeats.

    Each warm-up call and each repeat is blocked on its result (``jax.block_until_ready``)
    before the clock is read. With ``target_s > 0`` a repeat is a batch of back-to-back calls
    lasting about ``target_s`` (at most :data:`MAX_CALLS_PER_REPEAT`, sized by the fastest
    warm-up call, so at least one warm-up call is made), blocked once at its end: for calls so
    short that a block per call would weigh on the time.

    Args:
      fn: the callable, e.g. a jitted or compiled function (a jitted one's first call compiles:
        give it a warm-up call, or time that call with :func:`first_call` first).
      *args: its arguments.
      warmup: untimed calls before the timed ones (>= 0).
      repeats: timed repeats (>= 1).
      target_s: seconds of back-to-back calls per repeat (>= 0; 0: one call per repeat).
      clock: the clock, in seconds.

    Returns:
      The :class:`Timing` of the repeats (its ``median_s`` is the bench's number).

    Raises:
      ValueError: for ``warmup < 0``, ``repeats < 1`` or ``target_s < 0``.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not target_s >= 0:
        raise ValueError(f"target_s must be >= 0, got {target_s}")
    fastest = math.inf
    for _ in range(max(warmup, 1 if target_s > 0 else 0)):
        fastest = min(fastest, first_call(fn, *args, clock=clock)[1])
    calls = 1 if target_s == 0 else max(1, min(MAX_CALLS_PER_REPEAT, int(target_s / max(fastest, 1e-6))))
    times = []
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((clock() - start) / calls)
    return Timing(tuple(times), calls)


def first_call(fn: Callable[..., Any], *args: Any, clock: Callable[[], float] = time.perf_counter) -> tuple[Any, float]:
    """``(fn(*args) blocked on, its seconds)``: of a program's first call, compile and run."""
    start = clock()
    out = jax.block_until_ready(fn(*args))
    return out, clock() - start


def memory_stats(device: Any = None) -> dict[str, Any]:
    """The allocator statistics of ``device`` (default: the first device): ``peak_bytes_in_use``,
    ``bytes_in_use``, ... ; ``{}`` on a backend that keeps none (CPU)."""
    try:
        return dict((device if device is not None else jax.devices()[0]).memory_stats() or {})
    except Exception:  # noqa: BLE001 - backends without memory stats
        return {}


def peak_memory_bytes(device: Any = None) -> int | None:
    """The allocator's peak bytes in use on ``device`` (default: the first device); ``None``
    where the backend keeps no statistics (CPU)."""
    return int(memory_stats(device).get("peak_bytes_in_use", 0)) or None


def bench_module(bench: str | os.PathLike) -> str:
    """The module name of the bench whose file is ``bench`` (its ``__file__``):
    ``.../benchmarks/e2e_bench.py`` -> ``"benchmarks.e2e_bench"`` (however it was started)."""
    return f"{__package__}.{pathlib.Path(bench).stem}"


def run_record(
    bench: str | os.PathLike, argv: Sequence[str] | None = None, *, device: str | None = None
) -> dict[str, str]:
    """What a results file says about its run.

    Args:
      bench: the bench's file (its ``__file__``; :func:`bench_module`).
      argv: its arguments (default: this process's, ``sys.argv[1:]``).
      device: the device's name when it is known without asking JAX (a driver that must not
        start a backend); default :func:`~models.evaluation.results.device_name`.

    Returns:
      ``{"device", "jax", "python", "date": UTC ISO 8601 to the second,
      "command": "python -m MODULE ARGS" (shell-quoted; an absolute path in ARGS, or after
      ``--flag=``, made repository-relative or cut to its file name as
      :func:`~models.evaluation.results.portable` does: results carry no machine paths)}``.
    """
    argv = [_portable_arg(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    return {
        "device": device_name() if device is None else device,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", bench_module(bench), *argv]),
    }


def _portable_arg(arg: str) -> str:
    flag, eq, value = arg.partition("=")
    return f"{flag}={portable(value)}" if eq and flag.startswith("-") else portable(arg)


def module_command(bench: str | os.PathLike, argv: Sequence[str]) -> list[str]:
    """The command of a child process running the bench whose file is ``bench`` with ``argv`` in
    this interpreter (``[sys.executable, "-m", bench_module(bench), *argv]``; it inherits the
    working directory, the repository root)."""
    return [sys.executable, "-m", bench_module(bench), *argv]


def write_markdown(path: str | os.PathLike, lines: Sequence[str]) -> pathlib.Path:
    """Writes ``lines`` (a report: headings, prose, :func:`~models.evaluation.tables.markdown_table`
    lines) as a Markdown file ending in one newline, atomically, creating parent folders."""
    return atomic_write_text(path, "\n".join(lines) + "\n")
