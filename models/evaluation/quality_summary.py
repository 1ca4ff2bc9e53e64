"""One quality-harness run as a JSON record, and the number rules every reader of those records shares.

:func:`summarize` turns a :class:`~models.evaluation.quality.RunOutput` and its per-sample video
scores into the record of one variant (the ``variants`` entries of the quality benchmark's
results file): PSNR and SSIM per sample with their spread, and the probes (recall, attention
error, concentration, mass and missed mass by distance class) averaged over the measured steps.
JSON holds no NaN or infinity: a missing value is ``None`` and an infinite PSNR (identical videos)
is the string ``"inf"``; :func:`as_float` and :func:`as_matrix` read them back as floats.
:func:`fingerprint` identifies the dense reference's final latents across calls.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from dfsattn_jax.schedule import reported_sparsity
from models.evaluation.fidelity import spread
from models.evaluation.quality import RunOutput
from models.evaluation.quality_variants import Variant

__all__ = [
    "as_float",
    "as_matrix",
    "finite_or_str",
    "fingerprint",
    "nanmean",
    "rounded",
    "same_fingerprint",
    "summarize",
]


def finite_or_str(x: float) -> float | str | None:
    """``x`` as JSON can hold it: ``None`` for NaN, ``"inf"`` / ``"-inf"`` for infinities."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def rounded(a: np.ndarray, digits: int = 5) -> Any:
    """``a`` (any shape) as nested lists of :func:`finite_or_str` values rounded to ``digits``."""
    a = np.asarray(a)
    if a.ndim == 0:
        return finite_or_str(round(float(a), digits))
    return [rounded(x, digits) for x in a]


def nanmean(a: np.ndarray, axis=None) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN, NaN (without a warning) where every value is NaN."""
    a = np.asarray(a, np.float64)
    with np.errstate(invalid="ignore"):
        count = np.sum(~np.isnan(a), axis=axis)
        total = np.nansum(a, axis=axis)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def as_float(x) -> float:
    """A stored number as a float: NaN for ``None`` and for a string (``"inf"`` included)."""
    return float("nan") if x is None or isinstance(x, str) else float(x)


def as_matrix(rows) -> np.ndarray:
    """A stored per-layer table (lists of numbers; ``None`` or a string for a missing value) as floats, NaN where missing."""
    return np.array([[as_float(x) for x in row] for row in rows], float)


def _spread_record(values: np.ndarray) -> dict[str, Any]:
    s = spread(values)
    return {k: (finite_or_str(v) if isinstance(v, float) else v) for k, v in s.items()}


def summarize(variant: Variant, out: RunOutput, scores: dict, dense_latents: np.ndarray,
              sparse_layers: Sequence[int], num_layers: int, dense_layers: Sequence[int]) -> dict:  # fmt: skip
    """One variant's record for the results file.

    Args:
      variant: the variant that ran.
      out: its run; ``out.recall`` etc. are ``[steps, layers(, heads | classes)]`` with NaN at
        unmeasured steps.
      scores: ``{"psnr": float64[B], "ssim": float64[B]}`` against the dense videos
        (:func:`~models.evaluation.quality.video_scores`).
      dense_latents: ``[B, C, F, H, W]`` final latents of the dense reference.
      sparse_layers: the runner's sparse layers (the probes' means run over these).
      num_layers: the model's layers; dense_layers: its always-dense layers (for the sparsity).
    """
    plan = out.plan
    psnr_s, ssim_s = _spread_record(scores["psnr"]), _spread_record(scores["ssim"])
    sparse_steps = np.zeros(out.recall.shape[0], bool) if plan is None else plan.sparse
    dense_steps = ~sparse_steps
    rec: dict[str, Any] = {
        "name": variant.name,
        "group": variant.group,
        "order": variant.order,
        "scoring": variant.scoring,
        "tile_size": variant.tile_size,
        "schedule": variant.schedule_label if variant.sparse else "dense",
        "refresh": variant.refresh,
        "psnr": [finite_or_str(x) for x in scores["psnr"]],
        "ssim": [float(x) for x in scores["ssim"]],
        "psnr_mean": psnr_s["mean"], "psnr_min": psnr_s["min"], "psnr_max": psnr_s["max"], "psnr_ci95": psnr_s["ci95"],
        "ssim_mean": ssim_s["mean"], "ssim_min": ssim_s["min"], "ssim_max": ssim_s["max"], "ssim_ci95": ssim_s["ci95"],
        "latent_rel_error": float(
            np.linalg.norm(out.latents - dense_latents) / max(np.linalg.norm(dense_latents), 1e-30)
        ),
        "time_measured_s": out.time_s,
        "measured_steps": [int(s) for s in np.flatnonzero(out.measured)],
        "recall_per_step_layer": rounded(out.recall),
        "error_per_step_layer": rounded(out.error, 6),
        "top_mass_per_layer": rounded(nanmean(out.top_mass, axis=(0, 2))),
        "top_mass_dense_steps_per_layer": rounded(nanmean(out.top_mass[dense_steps], axis=(0, 2))),
        "top_mass_per_layer_head": rounded(nanmean(out.top_mass, axis=0)),
        "mass_by_class_per_layer": rounded(nanmean(out.mass_by_class, axis=0)),
        "skipped_per_step": [round(float(x), 5) for x in out.skipped],
    }  # fmt: skip
    if plan is None:
        rec.update(sparsity=0.0, planned_sparsity=0.0, refresh_steps=[], num_refreshes=0, sparse_steps=0,
                   mean_density=1.0, recall_mean=1.0, attn_error_mean=None)  # fmt: skip
        return rec
    sparse = list(sparse_layers)
    rec.update(
        sparsity=out.sparsity,
        planned_sparsity=reported_sparsity(plan, num_layers, tuple(dense_layers)),
        refresh_steps=list(out.refresh_steps),
        num_refreshes=len(out.refresh_steps),
        sparse_steps=int(plan.sparse.sum()),
        mean_density=float(np.mean(plan.num_blocks[plan.sparse] / plan.num_key_blocks)),
        densities_in_force=sorted({round(float(d), 6) for d in plan.density[plan.sparse]}, reverse=True),
        recall_mean=finite_or_str(nanmean(out.recall[plan.sparse][:, sparse])),
        attn_error_mean=finite_or_str(nanmean(out.error[plan.sparse][:, sparse])),
        recall_per_layer=rounded(nanmean(out.recall[plan.sparse], axis=0)),
        recall_per_layer_head=rounded(nanmean(out.head_recall[plan.sparse], axis=0)),
        missed_by_class_per_layer=rounded(nanmean(out.missed_by_class[plan.sparse], axis=0)),
    )
    return rec


def fingerprint(latents: np.ndarray) -> list[list[float]]:
    """Per sample of ``latents`` ``[B, ...]``: the float64 sum and sum of squares, ``[[sum, sum_sq]] * B``."""
    x = np.asarray(latents, np.float64).reshape(latents.shape[0], -1)
    return [[float(a), float(b)] for a, b in zip(x.sum(axis=1), np.square(x).sum(axis=1))]


def same_fingerprint(a, b, rtol: float = 1e-4) -> bool:
    """Whether two :func:`fingerprint` values agree within ``rtol`` (relative to ``|b| + 1``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * (np.abs(b) + 1.0)))
