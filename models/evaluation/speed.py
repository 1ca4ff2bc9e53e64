"""How long a DFS schedule takes end to end on a real model, composed from measured per-step times.

``python -m benchmarks.e2e_bench`` measures, on one GPU, the time of a dense step, of a dense
step of the ``dfs`` backend, and of a sparse step and a refresh step at a few densities (its
``e2e_nvidia_h200.json``: Wan2.1-1.3B at 480p, 81 frames, 32,760 tokens = 256 key blocks, batch
2, on an H200). :class:`StepTimes` holds them (:meth:`StepTimes.from_e2e` reads the file its
caller names); :func:`compose` adds them up over a schedule's plan:

* a dense step costs the ``dfs`` backend's dense step (the dense run costs ``num_steps`` dense
  steps of the ``dense`` backend, the speedup's denominator);
* a sparse (or refresh) step at ``k`` kept key blocks: the measured step time interpolated
  **linearly in the kept-block count** between the measured counts, with the dense step as the
  point ``k = num_key_blocks``; below the smallest measured count, extrapolated along the line
  through the two smallest (e.g. density 0.05 = 12 blocks from the 25- and 51-block times). The
  refresh step's anchor at ``k = num_key_blocks`` is the dense step plus the mean measured
  refresh overhead;
* always-dense layers: the measured steps had ``measured_dense_layers`` dense layers; each sparse
  layer saves ``(dense step − sparse step) / (measured sparse layers)``, so a schedule with more
  (fewer) dense layers pays (gains) that much per layer and step.

The composition is a model of the measurements, not a measurement: ``python -m
benchmarks.e2e_bench --measure-full --schedule NAME`` times the whole run (NOTES: the default
schedule composed to 1.67× and measured 1.678× with the fused-scorer build; 1.58× and 1.58×
before it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Mapping

import numpy as np

from dfsattn_jax.schedule import DFSConfig, SchedulePlan, plan_schedule, reported_sparsity

__all__ = ["StepTimes", "compose", "compose_schedule", "plan_step_times"]


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Measured per-step times of one model at one size, in seconds.

    Attributes:
      dense: a dense step of the ``dense`` backend (cuDNN, raster order).
      dfs_dense: a dense step of the ``dfs`` backend.
      sparse: ``{kept key blocks: sparse step reusing cached layouts}``.
      refresh: ``{kept key blocks: refresh step (scoring, selection, sparse attention)}``.
      num_key_blocks: key blocks per row of the measured size.
      num_layers: self-attention layers of the model.
      measured_dense_layers: how many layers stayed dense in the measured steps.
      source: where the numbers come from (for reports).
    """

    dense: float
    dfs_dense: float
    sparse: Mapping[int, float]
    refresh: Mapping[int, float]
    num_key_blocks: int
    num_layers: int
    measured_dense_layers: int
    source: str = ""

    def __post_init__(self) -> None:
        if not self.sparse or set(self.sparse) != set(self.refresh):
            raise ValueError(f"sparse and refresh must be measured at the same kept-block counts, got "
                             f"{sorted(self.sparse)} and {sorted(self.refresh)}")  # fmt: skip
        if any(not 1 <= k < self.num_key_blocks for k in self.sparse):
            raise ValueError(f"kept-block counts must be in [1, {self.num_key_blocks}), got {sorted(self.sparse)}")
        if not 0 <= self.measured_dense_layers < self.num_layers:
            raise ValueError(f"measured_dense_layers must be in [0, {self.num_layers}), got {self.measured_dense_layers}")

    @classmethod
    def from_e2e(cls, results: str | os.PathLike | Mapping[str, Any]) -> "StepTimes":
        """From an e2e bench's results file (or its parsed JSON), which the caller names.

        Raises:
          ValueError: for ``results`` None, empty or naming no file.
        """
        source = "given"
        if not isinstance(results, Mapping):
            if results is None or not os.fspath(results) or not pathlib.Path(results).is_file():
                raise ValueError(f"results must be an e2e bench's results file (e2e_<device>.json) or its parsed "
                                 f"JSON, got {results!r}")  # fmt: skip
            source = pathlib.Path(results).name
            results = json.loads(pathlib.Path(results).read_text())
        per = results["per_step_s"]
        kept = {float(d): int(k) for d, k in results["kept_blocks"].items()}
        dense_layers = len(results.get("dfs_config", {}).get("dense_layers", [0]))
        from models.wan.config import get_config

        return cls(
            dense=float(per["dense"]),
            dfs_dense=float(per["dfs_dense_step"]),
            sparse={kept[float(d)]: float(t) for d, t in per["sparse"].items()},
            refresh={kept[float(d)]: float(t) for d, t in per["refresh"].items()},
            num_key_blocks=int(results["num_key_blocks"]),
            num_layers=get_config(results["config"]).num_layers,
            measured_dense_layers=dense_layers,
            source=f"{source}: {results.get('config')} on {results.get('card')}, {results.get('tokens')} tokens",
        )

    def _interpolate(self, table: Mapping[int, float], anchor: float, kept: int) -> float:
        ks = sorted(table)
        xs = np.array(ks + [self.num_key_blocks], np.float64)
        ys = np.array([table[k] for k in ks] + [anchor], np.float64)
        if kept >= xs[0]:
            return float(np.interp(kept, xs, ys))
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])  # extrapolate below the smallest measured count
        return float(ys[0] + (kept - xs[0]) * slope)

    def step(self, kept: int, *, refresh: bool, dense_layers: int) -> float:
        """One sparse step at ``kept`` key blocks (a refresh step if ``refresh``) with
        ``dense_layers`` always-dense layers."""
        if not 1 <= kept <= self.num_key_blocks:
            raise ValueError(f"kept must be in [1, {self.num_key_blocks}], got {kept}")
        overhead = float(np.mean([self.refresh[k] - self.sparse[k] for k in self.sparse]))
        table, anchor = (self.refresh, self.dfs_dense + overhead) if refresh else (self.sparse, self.dfs_dense)
        measured = self._interpolate(table, anchor, kept)
        per_layer = (self.dfs_dense - measured) / (self.num_layers - self.measured_dense_layers)
        return self.dfs_dense - (self.num_layers - dense_layers) * per_layer


def plan_step_times(plan: SchedulePlan, dense_step_s: float, sparse_step_s: Callable[[int], float]) -> list[float]:
    """Per-step times of ``plan``: ``dense_step_s`` at a dense step, ``sparse_step_s(s)`` at a
    sparse (or refresh) step ``s``. The one composition of a run from step times: :func:`compose`
    (interpolated times) and :func:`compose_schedule` (times measured at the plan's densities)."""
    return [float(sparse_step_s(s)) if plan.sparse[s] else dense_step_s for s in range(plan.num_steps)]


def compose_schedule(
    plan: SchedulePlan, dense_step_s: float, sparse_s: Mapping[float, float], refresh_s: Mapping[float, float]
) -> list[float]:
    """Per-step times of ``plan`` from times measured at its densities (``benchmarks.e2e_bench``,
    ``benchmarks.hunyuan_bench``): the sparse (at a refresh step, the refresh) time at the step's
    density; ``sparse_s``/``refresh_s`` are keyed by the density rounded to 6 digits."""

    def measured(s: int) -> float:
        d = round(float(plan.density[s]), 6)
        return refresh_s[d] if plan.refresh[s] else sparse_s[d]

    return plan_step_times(plan, dense_step_s, measured)


def compose(config: DFSConfig, times: StepTimes, num_steps: int = 50) -> dict[str, Any]:
    """The composed time of ``num_steps`` steps under ``config`` and of the dense run.

    Returns:
      ``{"dense_s", "dfs_s", "speedup", "sparsity", "steps_s": per-step list, "plan": {...}}``;
      ``sparsity`` is docs/spec.md §6's for the measured model.
    """
    plan: SchedulePlan = plan_schedule(config, num_steps, times.num_key_blocks)
    dense_layers = sum(1 for i in config.dense_layers if 0 <= i < times.num_layers)
    steps = plan_step_times(
        plan,
        times.dfs_dense,
        lambda s: times.step(int(plan.num_blocks[s]), refresh=bool(plan.refresh[s]), dense_layers=dense_layers),
    )
    dense_s = num_steps * times.dense
    dfs_s = float(sum(steps))
    return {
        "dense_s": dense_s,
        "dfs_s": dfs_s,
        "speedup": dense_s / dfs_s,
        "sparsity": reported_sparsity(plan, times.num_layers, config.dense_layers),
        "steps_s": steps,
        "plan": {
            "dense_steps": int((~plan.sparse).sum()),
            "refresh_steps": list(plan.refresh_steps),
            "densities": sorted({round(float(plan.density[s]), 6) for s in np.flatnonzero(plan.sparse)}, reverse=True),
            "kept_blocks": sorted({int(plan.num_blocks[s]) for s in np.flatnonzero(plan.sparse)}, reverse=True),
        },
        "source": times.source,
    }

