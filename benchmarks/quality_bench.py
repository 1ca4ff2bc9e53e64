"""Quality benchmark: DFSAttn's fidelity to dense sampling, per order, scoring and baseline, on a harness model.

On a small video DiT of ``models/evaluation/weights`` (``--model v1|v2``; ``--random`` for random
weights of the same architecture), every variant samples the same noise for the same classes
(``--samples`` 16: sample ``i`` is photo ``i % 8`` and motion ``i % 5``) with classifier-free
guidance over ``--steps`` (50) Euler steps of the shifted flow schedule:

* ``order``: raster, hilbert2d, block3d, morton3d, hilbert3d (DFS scoring, tile 16) at fixed
  densities 0.3, 0.2, 0.1, 0.05 (no decrement; dense steps and refresh interval as the default)
  and with the default schedule (docs/spec.md §6);
* ``tile``: hilbert3d with tile = block (plain block mean pooling) and tiles 8 and 32, with the
  default schedule and at density 0.1; tile 16 is the ``order`` row;
* ``window``: the static spatio-temporal window (``dfsattn_jax.baselines``) in hilbert3d order at
  each density and with the default schedule's densities;
* ``random``: a uniformly random layout with the same count (hilbert3d order), at each density
  and the default schedule: if it scores near DFS, the model barely uses its attention;
* ``oracle``: top-k of the exact dense block mass (the recall-optimal layout of the same count;
  hilbert3d order, cached like DFS) at density 0.2 and the default schedule: the gap between DFS
  and the oracle is what the scoring's estimate costs, the gap between the oracle and dense what
  the density itself costs;
* ``refresh``: hilbert3d with the mask refreshed at every sparse step instead of cached, with the
  default schedule and at density 0.2.

Measures (docs/spec.md §9) per variant: PSNR and SSIM of the decoded final videos against the
dense videos, per sample with mean, min, max and 95 % confidence interval; recall and attention
error per layer and step, recall per layer and head, the dense attention's concentration (mass of
each query row's top 20 % key blocks) per layer and head, and the dense mass and the missed mass
by distance class of the key (same/other frame × spatial distance); the sparsity used. LPIPS:
not installable without downloading network weights.

Resumable and splittable: ``--variants`` selects variants (comma-separated names, shell patterns
such as ``raster/*``, or ``group:NAME``); results go to ``quality_<tag>.json`` after every
variant, merged with the records already there when the setup is the same (model checksum,
grid, samples, seed, steps, ...; ``--fresh`` starts over). Every call samples the dense
reference first (the PSNR baseline; its final latents are fingerprinted and compared with the
stored run's) and regenerates the markdown and the plots from every record present. Past
``--max-s`` the remaining variants are skipped (listed), so a 10-minute job limit always gets its
files. All variants of a call run in ONE compiled program
(``models.evaluation.quality.QualityRunner``).

Outputs in ``--out-dir`` (default ``benchmarks/results``), ``<tag>`` = ``<model>_<device slug>``
(e.g. ``v2_nvidia_h200``; ``_random`` for random weights, ``_FxHxW`` for a clip size given with
``--frames/--height/--width``, ``smoke_cpu`` for ``--quick``):
``quality_<tag>.json`` (everything), ``quality_<tag>.md`` (tables and the paper's claims
checked), ``quality_density_<tag>.png`` (PSNR with its 95 % interval and recall vs density),
``quality_layers_<tag>.png`` (concentration, recall per layer and order, missed mass by
distance class), ``quality_recall_<tag>.png`` (recall vs step), ``quality_masks_<tag>.png`` (one
layer's block masks, raster vs hilbert3d). Paths in the JSON are repository-relative.

Usage (from the repository root; ``PYTHONPATH=.`` or the package installed)::

    # GPU, v2 in two calls of about 6 minutes (benchmarks/NOTES.md, "Fidelity v2 runbook"):
    python benchmarks/quality_bench.py --model v2 --variants 'group:order'
    python benchmarks/quality_bench.py --model v2 --variants 'group:tile,group:window,group:random,group:refresh'

    # Both models side by side, from their results files (no sampling): quality_compare_<slug>.md
    python benchmarks/quality_bench.py --compare v2,v1

    # CPU smoke run (a tiny random model, 1024 tokens, 10 steps, fewer densities; about a minute):
    JAX_PLATFORMS=cpu python benchmarks/quality_bench.py --quick

    # A shipped model on CPU-sized clips (4 frames of 32x32 px, 1024 tokens; a few variants):
    JAX_PLATFORMS=cpu python benchmarks/quality_bench.py --model v1 --frames 4 --height 32 --width 32 \
        --steps 12 --samples 2 --variants 'hilbert3d/d=0.2,raster/d=0.2'
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import math
import os
import pathlib
import platform
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfsattn_jax.layout import BlockLayout
from dfsattn_jax.metrics import DISTANCE_CLASS_NAMES
from dfsattn_jax.orders import ORDER_NAMES
from dfsattn_jax.schedule import DFSConfig, default_schedule, reported_sparsity
from models.common.processor import num_token_blocks
from models.evaluation import quality as Q
from models.evaluation.clips import BACKGROUND_PHOTOS, MOTIONS, clip_classes
from models.evaluation.codec import latents_to_video
from models.evaluation.fidelity import paired_spread, spread
from models.evaluation.results import device_name, device_slug, portable, write_json
from models.evaluation.small_dit import (
    SMOKE_HARNESS_CONFIG,
    ClipConditioner,
    SmallDiTConfig,
    get_small_dit,
    load_small_dit,
    random_small_dit,
)
from models.wan.transformer import WanTransformer3DModel

ALL_ORDERS = ("raster", "hilbert2d", "block3d", "morton3d", "hilbert3d")
GROUPS = ("dense", "order", "tile", "window", "random", "oracle", "refresh")
#: Setup fields that must agree for records of two calls to be merged.
SETUP_KEYS = ("model", "random", "sha256", "token_grid", "samples", "seed", "steps", "solver", "guidance_scale",
              "shift", "block_size", "tile_size", "query_samples", "dense_layers", "measure_every")  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(p) for p in text.split(",") if p.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p.strip())


def _names(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [n for n in names if n not in ORDER_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown orders {bad}; choose from {ORDER_NAMES}")
    return names


def _schedules(text: str) -> tuple[float | None, ...]:
    return tuple(None if p.strip() == "default" else float(p) for p in text.split(",") if p.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("v1", "v2"), default="v1", help="the harness model (default v1)")
    p.add_argument("--random", action="store_true", help="random weights of the model's architecture")
    p.add_argument("--weights", default=None, help="weights file (default: the model's shipped weights)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: a tiny random model, --steps 10 --samples 2 --densities 0.2,0.05 unless given")
    p.add_argument("--frames", type=int, default=None, help="override the clip frames (e.g. a CPU-sized model run)")
    p.add_argument("--height", type=int, default=None, help="override the clip height in pixels")
    p.add_argument("--width", type=int, default=None, help="override the clip width in pixels")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; quick 10)")
    p.add_argument("--samples", type=int, default=None, help="videos per variant (default 16; quick 2)")
    p.add_argument("--variants", default=None,
                   help="run only these: comma-separated names, shell patterns ('raster/*') or 'group:NAME' "
                        f"(groups {', '.join(GROUPS)}); default all")
    p.add_argument("--fresh", action="store_true", help="start a new results file instead of merging into the existing one")
    p.add_argument("--rerun", action="store_true", help="run selected variants even when the results file has them")
    p.add_argument("--orders", type=_names, default=ALL_ORDERS)
    p.add_argument("--densities", type=_floats, default=None, help="fixed densities (default 0.3,0.2,0.1,0.05)")
    p.add_argument("--tiles", type=_ints, default=None,
                   help="scoring tiles besides the DFS tile and tile = block (default 8,32; smoke 4,16)")
    p.add_argument("--tile-densities", type=_schedules, default=None,
                   help="schedules of the tile comparison: 'default' and/or fixed densities (default: default,0.1)")
    p.add_argument("--window-orders", type=_names, default=("hilbert3d",), help="orders of the static window baseline")
    p.add_argument("--random-orders", type=_names, default=("hilbert3d",), help="orders of the random-layout baseline")
    p.add_argument("--oracle-orders", type=_names, default=("hilbert3d",),
                   help="orders of the oracle layout (top-k of the exact dense block mass)")
    p.add_argument("--oracle-densities", type=_schedules, default=None,
                   help="schedules of the oracle layout (default: 0.2,default; quick: default)")
    p.add_argument("--refresh-densities", type=_schedules, default=None,
                   help="schedules of the every-step refresh comparison (default: default,0.2)")
    p.add_argument("--query-samples", type=int, default=256, help="query rows sampled for the probes")
    p.add_argument("--measure-every", type=int, default=1, help="probe every N-th step (and every refresh step)")
    p.add_argument("--timing", choices=("subset", "all", "none"), default="none",
                   help="variants re-run without measurements for timing (the harness is not a speed benchmark)")
    p.add_argument("--budget-s", type=float, default=400.0, help="after this many seconds, skip the timing re-runs")
    p.add_argument("--max-s", type=float, default=530.0,
                   help="after this many seconds, skip the remaining variants (listed in the JSON) and write the results")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--solver", default="euler", choices=("euler", "unipc"))
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file tag (default: <model>_<device slug>, plus _random)")
    p.add_argument("--compare", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), default=None,
                   help="no sampling: put the results of these models side by side (e.g. v2,v1, the first leads), "
                        "from quality_<model>_<device slug>.json in --out-dir, into quality_compare_<device slug>.md")
    p.add_argument("--compare-slug", default=None, help="device slug of the compared files (default: this machine's)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Setup


def _resize_clip(config: SmallDiTConfig, args) -> SmallDiTConfig:
    """``config`` with the clip size overridden by ``--frames/--height/--width`` (the model is unchanged)."""
    changes = {k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k) is not None}
    return dataclasses.replace(config, clip=dataclasses.replace(config.clip, **changes)) if changes else config


def _portable_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as results files may hold it: repository-relative, or only its name when outside
    the repository (results carry no machine paths)."""
    if path is None:
        return None
    try:
        return portable(os.path.abspath(os.fspath(path)))
    except ValueError:
        return pathlib.Path(path).name


def load_setup(args) -> tuple[WanTransformer3DModel, ClipConditioner, SmallDiTConfig, dict[str, Any]]:
    """The model, its conditioner, its config (clip size as asked) and where they came from."""
    if args.quick:
        model, conditioner = random_small_dit(SMOKE_HARNESS_CONFIG)
        return model, conditioner, _resize_clip(SMOKE_HARNESS_CONFIG, args), {"key": "smoke", "weights": None, "sha256": None, "random": True}
    entry = get_small_dit(args.model)
    if args.random:
        model, conditioner = random_small_dit(entry.config)
        source = {"key": args.model, "weights": None, "sha256": None, "random": True,
                  "note": "random weights of the architecture"}  # fmt: skip
        return model, conditioner, _resize_clip(entry.config, args), source
    # one read of the weights, every file's checksum verified
    model, conditioner, config, meta = load_small_dit(pathlib.Path(args.weights) if args.weights else args.model)
    source = {"key": args.model, "weights": _portable_path(meta["weights"]), "sha256": meta["sha256"],
              "random": False, "trained_clip": dataclasses.asdict(config.clip)}  # fmt: skip
    return model, conditioner, _resize_clip(config, args), source


def select_variants(variants: Sequence[Q.Variant], text: str | None) -> list[Q.Variant]:
    """The variants named by ``text`` (see ``--variants``), in their canonical order; the dense
    reference is always selected."""
    if text is None:
        return list(variants)
    patterns = [p.strip() for p in text.split(",") if p.strip()]

    def hit(v: Q.Variant, pattern: str) -> bool:
        return v.group == pattern[6:] if pattern.startswith("group:") else fnmatch.fnmatchcase(v.name, pattern)

    unmatched = [p for p in patterns if not any(hit(v, p) for v in variants)]
    if unmatched:
        raise ValueError(f"--variants {unmatched} match no variant (names like 'hilbert3d/d=0.2'; groups {GROUPS})")
    return [v for v in variants if v.name == "dense" or any(hit(v, p) for p in patterns)]


# ----------------------------------------------------------------------------------------------
# Summaries


def _finite_or_str(x: float) -> float | str | None:
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _round(a: np.ndarray, digits: int = 5) -> list:
    a = np.asarray(a)
    if a.ndim == 0:
        return _finite_or_str(round(float(a), digits))
    return [_round(x, digits) for x in a]


def _nanmean(a: np.ndarray, axis=None) -> np.ndarray:
    a = np.asarray(a, np.float64)
    with np.errstate(invalid="ignore"):
        count = np.sum(~np.isnan(a), axis=axis)
        total = np.nansum(a, axis=axis)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _spread_record(values: np.ndarray) -> dict[str, Any]:
    s = spread(values)
    return {k: (_finite_or_str(v) if isinstance(v, float) else v) for k, v in s.items()}


def summarize(variant: Q.Variant, out: Q.RunOutput, scores: dict, dense_latents: np.ndarray,
              sparse_layers: Sequence[int], num_layers: int, dense_layers: Sequence[int]) -> dict:  # fmt: skip
    """One variant's record for the JSON."""
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
        "psnr": [_finite_or_str(x) for x in scores["psnr"]],
        "ssim": [float(x) for x in scores["ssim"]],
        "psnr_mean": psnr_s["mean"], "psnr_min": psnr_s["min"], "psnr_max": psnr_s["max"], "psnr_ci95": psnr_s["ci95"],
        "ssim_mean": ssim_s["mean"], "ssim_min": ssim_s["min"], "ssim_max": ssim_s["max"], "ssim_ci95": ssim_s["ci95"],
        "latent_rel_error": float(
            np.linalg.norm(out.latents - dense_latents) / max(np.linalg.norm(dense_latents), 1e-30)
        ),
        "time_measured_s": out.time_s,
        "measured_steps": [int(s) for s in np.flatnonzero(out.measured)],
        "recall_per_step_layer": _round(out.recall),
        "error_per_step_layer": _round(out.error, 6),
        "top_mass_per_layer": _round(_nanmean(out.top_mass, axis=(0, 2))),
        "top_mass_dense_steps_per_layer": _round(_nanmean(out.top_mass[dense_steps], axis=(0, 2))),
        "top_mass_per_layer_head": _round(_nanmean(out.top_mass, axis=0)),
        "mass_by_class_per_layer": _round(_nanmean(out.mass_by_class, axis=0)),
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
        recall_mean=_finite_or_str(_nanmean(out.recall[plan.sparse][:, sparse])),
        attn_error_mean=_finite_or_str(_nanmean(out.error[plan.sparse][:, sparse])),
        recall_per_layer=_round(_nanmean(out.recall[plan.sparse], axis=0)),
        recall_per_layer_head=_round(_nanmean(out.head_recall[plan.sparse], axis=0)),
        missed_by_class_per_layer=_round(_nanmean(out.missed_by_class[plan.sparse], axis=0)),
    )
    return rec


def _fingerprint(latents: np.ndarray) -> list[list[float]]:
    """Per sample: the float64 sum and sum of squares of the final latents."""
    x = np.asarray(latents, np.float64).reshape(latents.shape[0], -1)
    return [[float(a), float(b)] for a, b in zip(x.sum(axis=1), np.square(x).sum(axis=1))]


def _same_fingerprint(a, b, rtol: float = 1e-4) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * (np.abs(b) + 1.0)))


# ----------------------------------------------------------------------------------------------
# Markdown


def _fmt(x, spec: str = ".2f", missing: str = "–") -> str:
    if x is None:
        return missing
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if math.isinf(x):
        return "∞"
    return format(x, spec)


def _with_ci(r: dict | None, key: str, spec: str = ".2f") -> str:
    if r is None or r.get(f"{key}_mean") is None:
        return "–"
    ci = r.get(f"{key}_ci95")
    text = _fmt(r[f"{key}_mean"], spec)
    return text if ci is None else f"{text} ± {_fmt(ci, spec)}"


def _schedule_text(schedule: dict, steps: int) -> str:
    d0, dec, dense, every = (schedule[k] for k in ("density", "density_decrement", "dense_steps", "refresh_interval"))
    if dec == 0:
        return f"dense steps 0–{dense - 1}, then sparse at density {d0:g}, mask refreshed every {every} steps, {steps} steps"
    return (f"dense steps 0–{dense - 1}, then sparse; mask refreshed every {every} steps from step {dense} "
            f"at density {d0:g} minus {dec:g} per refresh (down to {max(d0 - dec * (math.ceil(d0 / dec) - 1), 0):g}), "
            f"{steps} steps")  # fmt: skip


def markdown(report: dict) -> str:
    """The results as markdown tables, with the paper's claims checked."""
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    weights = "random weights" if meta["random"] else f"weights {meta['weights']}"
    lines = [
        f"# DFSAttn quality benchmark: {meta['model']} ({meta.get('key', '?')}) on {report['device']}",
        "",
        f"- model: {meta['model']} ({weights}), {meta['num_layers']} layers × {meta['num_heads']} heads of "
        f"{meta['head_dim']}; latent {meta['latent_shape']}, token grid {meta['token_grid']} = {meta['tokens']} tokens = "
        f"{meta['num_key_blocks']} blocks of {meta['block_size']} (last block {meta['last_block_tokens']} tokens)",
        f"- {meta['samples']} samples (classes {', '.join(meta['classes'][:8])}{', …' if meta['samples'] > 8 else ''}), "
        f"the same noise (seed {meta['seed']}) for every variant; {meta['steps']} {meta['solver']} steps, guidance "
        f"{meta['guidance_scale']}, shift {meta['shift']}",
        f"- default schedule: {_schedule_text(meta['default_schedule'], meta['steps'])}; fixed densities: the same "
        f"dense steps and refresh interval without decrement; dense layers {meta['dense_layers']}; DFS tile {meta['tile_size']}",
        f"- PSNR / SSIM: decoded final videos vs the dense videos; mean ± 95% confidence half-width over the "
        f"{meta['samples']} samples (Student t), min–max in the full table. LPIPS: not measured (needs pretrained network "
        "weights that cannot be installed without a download).",
        f"- probes: {meta['query_samples']} sampled query rows per layer and step (every {meta['measure_every']} step(s) "
        f"and every refresh), exact dense float32 softmax; recall and error are means over the sparse steps and sparse "
        f"layers; floor of the error (dense attention in {report['dtype']} vs exact): {_fmt(report['attn_error_floor'], '.2e')}.",
        f"- sparsity: docs/spec.md §6 (mean skipped block fraction over the sparse steps and all layers, dense layers 0).",
        f"- calls: {len(report.get('calls', []))}; jax {report['jax_version']}",
    ]
    if not report.get("complete", False):
        lines.append(f"- **incomplete**: not run yet: {', '.join(report.get('missing_variants', [])) or '–'}")
    if report.get("dense_mismatch"):
        lines.append(f"- **warning**: the dense reference differed between calls ({report['dense_mismatch']})")
    lines.append("")
    orders = meta["orders"]
    cols = [f"d={d:g}" for d in meta["densities"]] + ["default"]

    def grid_table(title: str, cell) -> list[str]:
        out = [f"### {title}", "", "| order | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for o in orders:
            out.append(f"| {o} | " + " | ".join(cell(by.get(f"{o}/{c}")) for c in cols) + " |")
        return out + [""]

    lines += ["## Token orders (DFS scoring)", ""]
    lines += grid_table("PSNR (dB) vs dense, mean ± 95% CI", lambda r: _with_ci(r, "psnr"))
    lines += grid_table("SSIM vs dense, mean ± 95% CI", lambda r: _with_ci(r, "ssim", ".3f"))
    lines += grid_table("Recall", lambda r: _fmt(r and r.get("recall_mean"), ".4f"))
    lines += grid_table("Attention error", lambda r: _fmt(r and r.get("attn_error_mean"), ".4f"))

    head = ["| variant | sparsity | PSNR (± 95% CI) | PSNR min–max | SSIM (± 95% CI) | SSIM min–max | recall | attn err | refreshes |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def row(r: dict) -> str:
        return (f"| {r['name']} | {_fmt(r['sparsity'], '.4f')} | {_with_ci(r, 'psnr')} | {_fmt(r['psnr_min'])}–{_fmt(r['psnr_max'])} | "
                f"{_with_ci(r, 'ssim', '.3f')} | {_fmt(r['ssim_min'], '.3f')}–{_fmt(r['ssim_max'], '.3f')} | "
                f"{_fmt(r.get('recall_mean'), '.4f')} | {_fmt(r.get('attn_error_mean'), '.4f')} | {r['num_refreshes']} |")  # fmt: skip

    def section(title: str, rows: list[dict | None]) -> list[str]:
        rows = [r for r in rows if r]
        return [f"## {title}", ""] + head + [row(r) for r in rows] + [""] if rows else []

    tiles = sorted(meta["tiles"])
    tile_rows = []
    for sched in [None] + [d for d in meta["tile_densities"] if d is not None]:
        label = "default" if sched is None else f"d={sched:g}"
        for t in tiles:
            tile_rows.append(by.get(f"hilbert3d/{label}" if t == meta["tile_size"] else f"hilbert3d/tile{t}/{label}"))
    lines += section(f"Scoring: tile size (hilbert3d; tile {meta['tile_size']} is DFS, tile {meta['block_size']} = block "
                     "is plain block mean pooling)", tile_rows)  # fmt: skip
    base_rows = []
    for c in cols:
        base_rows.append(by.get(f"hilbert3d/{c}"))
        base_rows += [by.get(f"window-{o}/{c}") for o in meta["window_orders"]]
        base_rows += [by.get(f"random-{o}/{c}") for o in meta["random_orders"]]
    lines += section("Baselines at equal density: static spatio-temporal window and random layouts vs DFS", base_rows)
    oracle_rows = []
    for sched in meta.get("oracle_densities", []):
        label = "default" if sched is None else f"d={sched:g}"
        oracle_rows += [by.get(f"hilbert3d/{label}"), by.get(f"hilbert3d/tile{meta['block_size']}/{label}")]
        oracle_rows += [by.get(f"oracle-{o}/{label}") for o in meta.get("oracle_orders", [])]
    lines += section("Scoring vs the oracle (top-k of the exact dense block mass, the recall-optimal layout of the "
                     "same count; cached like DFS): what the scoring's estimate costs, apart from the density", oracle_rows)  # fmt: skip
    refresh_rows = []
    for r in report["variants"]:
        if r["group"] == "refresh":
            refresh_rows += [by.get(r["name"].replace("/refresh-every-step", "")), r]
    lines += section("Mask refreshed at every sparse step vs cached per the schedule", refresh_rows)
    lines += _attention_tables(report, by)
    lines += ["## Claims of the paper, checked on this model", ""]
    lines += [f"- {c['claim']}: **{c['verdict']}** ({c['detail']})" for c in report["claims"]]
    lines += ["", "## All variants", ""] + head + [row(r) for r in report["variants"]] + [""]
    return "\n".join(lines)


def _attention_tables(report: dict, by: dict) -> list[str]:
    """Per-layer concentration, recall per layer and order, per-head recall, missed mass by distance."""
    meta = report["setup"]
    layers = list(range(meta["num_layers"]))
    sparse_layers = meta["sparse_layers"]
    lines = ["## The model's attention", ""]
    dense = by.get("dense")
    if dense:
        lines += [f"Concentration: the dense softmax mass of each query row's top 20% key blocks "
                  f"({max(1, int(0.2 * meta['num_key_blocks']))} of {meta['num_key_blocks']}), mean over rows, heads and "
                  "the measured steps; the dense run is in raster order, the order rows use the dense steps of each "
                  "order's default-schedule run (identical dense trajectory, blocks of that order).", "",
                  "| blocks of | " + " | ".join(f"layer {i}" for i in layers) + " |", "|---" * (len(layers) + 1) + "|",
                  "| raster (dense run, all steps) | " + " | ".join(_fmt(x, ".3f") for x in dense["top_mass_per_layer"]) + " |"]  # fmt: skip
        for o in meta["orders"]:
            r = by.get(f"{o}/default")
            if r:
                lines.append(f"| {o} (dense steps) | " + " | ".join(_fmt(x, ".3f") for x in r["top_mass_dense_steps_per_layer"]) + " |")
        lines += ["", "Where the dense mass lies, by distance class of the key (dense run, mean over layers):", "",
                  "| " + " | ".join(DISTANCE_CLASS_NAMES) + " |", "|---" * len(DISTANCE_CLASS_NAMES) + "|"]  # fmt: skip
        mass = _matrix(dense["mass_by_class_per_layer"])
        lines += ["| " + " | ".join(_fmt(x, ".3f") for x in _nanmean(mass, axis=0)) + " |", ""]
    density = next((f"d={d:g}" for d in meta["densities"] if abs(d - 0.2) < 1e-9), None) or "default"
    rows = [(o, by.get(f"{o}/{density}")) for o in meta["orders"]] + [(f"random ({o})", by.get(f"random-{o}/{density}"))
                                                                         for o in meta["random_orders"]]  # fmt: skip
    rows += [(f"oracle ({o})", by.get(f"oracle-{o}/{density}")) for o in meta.get("oracle_orders", [])]
    rows = [(o, r) for o, r in rows if r and r.get("recall_per_layer")]
    if rows:
        lines += [f"Recall per layer at {density} (mean over sparse steps):", "",
                  "| order | " + " | ".join(f"layer {i}" for i in sparse_layers) + " |", "|---" * (len(sparse_layers) + 1) + "|"]  # fmt: skip
        lines += [f"| {o} | " + " | ".join(_fmt(r["recall_per_layer"][i], ".3f") for i in sparse_layers) + " |" for o, r in rows]
        lines += ["", f"Missed mass by distance class at {density} (mean over sparse steps and sparse layers; the "
                  "columns sum to 1 − recall):", "", "| order | " + " | ".join(DISTANCE_CLASS_NAMES) + " |",
                  "|---" * (len(DISTANCE_CLASS_NAMES) + 1) + "|"]  # fmt: skip
        for o, r in rows:
            missed = _matrix(r["missed_by_class_per_layer"])
            lines.append(f"| {o} | " + " | ".join(_fmt(x, ".4f") for x in _nanmean(missed[sparse_layers], axis=0)) + " |")
        lines.append("")
    r = by.get("hilbert3d/default")
    if r and r.get("recall_per_layer_head"):
        heads = len(r["recall_per_layer_head"][0])
        lines += ["Recall per layer and head, hilbert3d/default (mean over sparse steps):", "",
                  "| layer | " + " | ".join(f"h{h}" for h in range(heads)) + " |", "|---" * (heads + 1) + "|"]  # fmt: skip
        lines += [f"| {i} | " + " | ".join(_fmt(x, ".3f") for x in r["recall_per_layer_head"][i]) + " |" for i in sparse_layers]
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# Claims


def _paired(by: dict, a: str, b: str) -> dict | None:
    """Per-sample PSNR difference ``a - b`` (dB): its spread, or ``None`` when either is missing or infinite."""
    ra, rb = by.get(a), by.get(b)
    return None if ra is None or rb is None else paired_spread(ra["psnr"], rb["psnr"])


def _diff_text(d: dict) -> str:
    ci = "" if d["ci95"] is None else f" ± {d['ci95']:.2f}"
    return f"{d['mean']:+.2f}{ci} dB"


def _verdict(diffs: list[dict], margin: float = 0.0) -> str:
    """``holds`` when every mean difference is ≥ ``-margin``; ``does not hold`` when one is below
    by more than its 95% interval; else ``inconclusive``."""
    if all(d["mean"] >= -margin for d in diffs):
        return "holds"
    if any(d["mean"] + (d["ci95"] or 0.0) < -margin for d in diffs):
        return "does not hold"
    return "inconclusive"


def check_claims(report: dict) -> list[dict]:
    """The paper's claims and the issue's targets, on the measured per-sample PSNRs (paired
    differences with their 95% intervals)."""
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    claims = []

    def add(claim: str, pairs: list[tuple[str, str, str]], margin: float = 0.0):
        diffs = [(label, _paired(by, a, b)) for label, a, b in pairs]
        diffs = [(label, d) for label, d in diffs if d is not None]
        if diffs:
            verdict = _verdict([d for _, d in diffs], margin)
            claims.append(dict(claim=claim, verdict=verdict, holds=verdict == "holds",
                               detail="; ".join(f"{label}: {_diff_text(d)}" for label, d in diffs)))  # fmt: skip

    low = [d for d in meta["densities"] if d <= 0.2]
    add("hilbert3d at least as good as every other order at density ≤ 0.2 (PSNR, hilbert3d − other)",
        [(f"vs {o} at d={d:g}", f"hilbert3d/d={d:g}", f"{o}/d={d:g}") for d in low for o in meta["orders"] if o != "hilbert3d"])
    scheds = ["default"] + [f"d={d:g}" for d in meta["tile_densities"] if d is not None]
    add(f"tile-{meta['tile_size']} scoring better than plain block pooling (tile {meta['block_size']})",
        [(s, f"hilbert3d/{s}", f"hilbert3d/tile{meta['block_size']}/{s}") for s in scheds])
    all_scheds = [f"d={d:g}" for d in meta["densities"]] + ["default"]
    add("DFS better than the static window at equal density",
        [(f"{s} ({o})", f"hilbert3d/{s}", f"window-{o}/{s}") for s in all_scheds for o in meta["window_orders"]])
    add("DFS better than a random layout at equal density (the model uses its attention)",
        [(f"{s} ({o})", f"{o}/{s}", f"random-{o}/{s}") for s in all_scheds for o in meta["random_orders"]])
    oracle_scheds = ["default" if d is None else f"d={d:g}" for d in meta.get("oracle_densities", [])]
    add("DFS scoring within 1 dB of the oracle layout (top-k of the exact block mass) at equal density",
        [(f"{s} ({o})", f"{o}/{s}", f"oracle-{o}/{s}") for s in oracle_scheds for o in meta.get("oracle_orders", [])],
        margin=1.0)
    for r in report["variants"]:
        if r["group"] == "refresh":
            cached = r["name"].replace("/refresh-every-step", "")
            if cached in by:
                cost = f"{by[cached]['num_refreshes']} vs {r['num_refreshes']} scoring steps"
                add(f"{cached}: caching the mask within 1 dB of refreshing it at every sparse step ({cost})",
                    [("cached − every step", cached, r["name"])], margin=1.0)
    default = by.get("hilbert3d/default")
    if default is not None and default["psnr_mean"] is not None:
        value = float("inf") if default["psnr_mean"] == "inf" else float(default["psnr_mean"])
        ci = default.get("psnr_ci95")
        claims.append(dict(claim="default schedule (hilbert3d) ≥ 30 dB PSNR vs dense", holds=value >= 30.0,
                           verdict="holds" if value >= 30.0 else "does not hold",
                           detail=f"{value:.2f}{'' if ci is None else f' ± {ci:.2f}'} dB, SSIM {default['ssim_mean']:.4f}"))  # fmt: skip
    dense = by.get("dense")
    if dense is not None:
        mass = [x for i, x in enumerate(dense["top_mass_per_layer"]) if i in meta["sparse_layers"] and x is not None]
        if mass:
            claims.append(dict(
                claim="attention concentrated: the top 20% of key blocks hold most (≥ 0.5) of the dense mass in every "
                      "sparse layer (model property, raster blocks)",
                holds=min(mass) >= 0.5, verdict="holds" if min(mass) >= 0.5 else "does not hold",
                detail="per sparse layer " + ", ".join(f"{x:.3f}" for x in mass),
            ))  # fmt: skip
    return claims


# ----------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x) -> float:
    return float("nan") if x is None or isinstance(x, str) else float(x)


def _matrix(rows) -> np.ndarray:
    """A stored per-layer table (lists of numbers; ``None`` or a string for a missing value) as floats, NaN where missing."""
    return np.array([[_num(x) for x in row] for row in rows], float)


def plot_density(report: dict, path: str) -> str:
    """PSNR (with its 95 % interval) and recall vs density per order, window, random, block pooling."""
    plt = _plt()
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    dens = list(meta["densities"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(o, f"{o}/d={{d:g}}", f"{o}/default", "-", "o") for o in meta["orders"]]
    series += [(f"window ({o})", f"window-{o}/d={{d:g}}", f"window-{o}/default", "--", "s") for o in meta["window_orders"]]
    series += [(f"random ({o})", f"random-{o}/d={{d:g}}", f"random-{o}/default", "-.", "x") for o in meta["random_orders"]]
    series += [(f"oracle ({o})", f"oracle-{o}/d={{d:g}}", f"oracle-{o}/default", "--", "*") for o in meta.get("oracle_orders", [])]
    series.append((f"block pooling (tile {meta['block_size']})", f"hilbert3d/tile{meta['block_size']}/d={{d:g}}",
                   f"hilbert3d/tile{meta['block_size']}/default", ":", "^"))  # fmt: skip
    for ax, key, label in ((axes[0], "psnr_mean", "PSNR vs dense (dB), mean ± 95% CI"), (axes[1], "recall_mean", "recall")):
        for name, pattern, default, style, marker in series:
            xs, ys, es = [], [], []
            for d in dens:
                r = by.get(pattern.format(d=d))
                if r is not None and np.isfinite(_num(r.get(key))):
                    xs.append(d)
                    ys.append(_num(r[key]))
                    es.append(_num(r.get("psnr_ci95")) if key == "psnr_mean" else 0.0)
            if not xs:
                continue
            es = np.nan_to_num(np.asarray(es, float))
            line = ax.errorbar(xs, ys, yerr=es if key == "psnr_mean" else None, ls=style, marker=marker, label=name, ms=4,
                               capsize=2)[0]  # fmt: skip
            r = by.get(default)
            if r is not None and np.isfinite(_num(r.get(key))):
                ax.plot([r["mean_density"]], [_num(r[key])], marker="*", ms=12, color=line.get_color(), ls="none")
        ax.set_xlabel("density (kept fraction of key blocks); ★ default schedule at its mean density", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{meta['model']}: grid {meta['token_grid']} = {meta['tokens']} tokens, {meta['samples']} samples, "
                 f"{meta['steps']} steps ({report['device']})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layers(report: dict, path: str) -> str:
    """Per layer: the dense attention's concentration, recall of each order at density 0.2, and
    the missed mass by distance class per order."""
    plt = _plt()
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    layers = np.arange(meta["num_layers"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dense = by.get("dense")
    if dense:
        axes[0].plot(layers, [_num(x) for x in dense["top_mass_per_layer"]], "k-o", label="raster blocks (dense run)")
    for o in meta["orders"]:
        r = by.get(f"{o}/default")
        if r:
            axes[0].plot(layers, [_num(x) for x in r["top_mass_dense_steps_per_layer"]], "--.", label=f"{o} blocks (dense steps)")
    axes[0].set_title("mass of each row's top 20% key blocks (dense attention)", fontsize=9)
    axes[0].set_xlabel("layer")
    axes[0].set_ylim(0, 1)
    density = next((f"d={d:g}" for d in meta["densities"] if abs(d - 0.2) < 1e-9), "default")
    names = [(o, f"{o}/{density}") for o in meta["orders"]] + [(f"random ({o})", f"random-{o}/{density}") for o in meta["random_orders"]]
    classes = len(DISTANCE_CLASS_NAMES)
    bottoms = np.zeros(len(names))
    for label, name in names:
        r = by.get(name)
        if not r or not r.get("recall_per_layer"):
            continue
        axes[1].plot(layers, [_num(x) for x in r["recall_per_layer"]], "-o", ms=3, label=label)
    colours = plt.cm.viridis(np.linspace(0, 0.9, classes))
    for c in range(classes):
        values = []
        for label, name in names:
            r = by.get(name)
            if not r or not r.get("missed_by_class_per_layer"):
                values.append(0.0)
                continue
            missed = _matrix(r["missed_by_class_per_layer"])
            values.append(float(_nanmean(missed[meta["sparse_layers"], c])))
        axes[2].bar(np.arange(len(names)), values, bottom=bottoms, color=colours[c], label=DISTANCE_CLASS_NAMES[c])
        bottoms += np.asarray(values)
    axes[1].set_title(f"recall per layer at {density}", fontsize=9)
    axes[1].set_xlabel("layer")
    axes[2].set_xticks(np.arange(len(names)), [label for label, _ in names], rotation=30, fontsize=7)
    axes[2].set_title(f"missed mass by distance class at {density} (sparse layers)", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(f"{meta['model']}: attention per layer ({report['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_recall_steps(report: dict, path: str, names: Sequence[str]) -> str:
    """Recall vs step (mean over sparse layers) for a few variants, and per layer for hilbert3d/default."""
    plt = _plt()
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    sparse_layers = meta["sparse_layers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        r = by.get(name)
        if r is None:
            continue
        rec = _matrix(r["recall_per_step_layer"])
        steps = np.arange(rec.shape[0])
        ok = ~np.isnan(rec[:, sparse_layers]).all(axis=1)
        axes[0].plot(steps[ok], _nanmean(rec[ok][:, sparse_layers], axis=1), label=name, lw=1.2)
    axes[0].set_title("mean over sparse layers", fontsize=9)
    r = by.get("hilbert3d/default")
    if r is not None:
        rec = _matrix(r["recall_per_step_layer"])
        steps = np.arange(rec.shape[0])
        for layer in range(rec.shape[1]):
            ok = ~np.isnan(rec[:, layer])
            axes[1].plot(steps[ok], rec[ok, layer], lw=1.2,
                         label=f"layer {layer}" + (" (dense)" if layer not in sparse_layers else ""))  # fmt: skip
        axes[1].set_title("hilbert3d/default, per layer", fontsize=9)
    for ax in axes:
        ax.set_xlabel("denoising step")
        ax.set_ylabel("recall of the layout in force")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{meta['model']}: recall vs step ({report['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cache_masks(cache, slot: int, num_key_blocks: int) -> np.ndarray:
    """Block masks ``bool[N, nq, nk]`` of the first batch element in a final mask cache's ``slot``."""
    layout = BlockLayout(jnp.asarray(cache.kv_indices[slot]), jnp.asarray(cache.kv_counts[slot]), num_key_blocks)
    return np.asarray(layout.to_dense_mask()[0])


# ----------------------------------------------------------------------------------------------
# Both models side by side (issue 14)


def fidelity_budget(report: dict, schedule: str = "default") -> dict[str, float | None]:
    """Where the PSNR of hilbert3d at ``schedule`` goes, from the stored mean PSNRs (dB):
    ``oracle`` (what density and caching leave with a perfect choice of blocks), ``dfs``,
    ``scoring_cost`` = oracle − DFS (what the scoring's estimate costs), ``caching_cost`` =
    every-step refresh − cached (what reusing the mask costs); ``None`` where a variant is
    missing or a PSNR infinite."""
    by = {r["name"]: r for r in report["variants"]}
    orders = report["setup"].get("oracle_orders") or ["hilbert3d"]

    def psnr(name: str) -> float | None:
        value = _num((by.get(name) or {}).get("psnr_mean"))  # NaN when missing, "inf" when identical
        return value if math.isfinite(value) else None

    dfs, oracle = psnr(f"hilbert3d/{schedule}"), psnr(f"oracle-{orders[0]}/{schedule}")
    every = psnr(f"hilbert3d/{schedule}/refresh-every-step")
    return {"dfs": dfs, "oracle": oracle, "every_step": every,
            "scoring_cost": None if dfs is None or oracle is None else oracle - dfs,
            "caching_cost": None if dfs is None or every is None else every - dfs}  # fmt: skip


def compare_markdown(reports: dict[str, dict]) -> str:
    """Markdown: the models of ``reports`` (label → :func:`main`'s report, the first leads) side
    by side: the claims' verdicts, PSNR per order and density, the default schedule's fidelity
    budget and the attention's concentration."""
    labels = list(reports)
    lines = ["# DFSAttn fidelity on the harness models, side by side", ""]
    for label, rep in reports.items():
        meta = rep["setup"]
        lines.append(f"- **{label}**: {meta['model']}, token grid {meta['token_grid']} = {meta['tokens']} tokens "
                     f"({meta['num_key_blocks']} blocks of {meta['block_size']}), {meta['num_layers']} layers × "
                     f"{meta['num_heads']} heads; {meta['samples']} samples × {meta['steps']} steps on {rep['device']}"
                     + ("" if rep.get("complete") else f"; **incomplete**: {len(rep.get('missing_variants', []))} variants not run"))  # fmt: skip
    lines += ["", "## The paper's claims", "", "| claim | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    keys: list[str] = []
    verdicts: dict[str, dict[str, str]] = {}
    for label, rep in reports.items():
        for c in rep.get("claims", []):
            key = c["claim"]  # the same text on both models (same schedule, steps and densities)
            if key not in verdicts:
                keys.append(key)
                verdicts[key] = {}
            verdicts[key][label] = f"**{c['verdict']}** ({c['detail']})"
    lines += [f"| {k} | " + " | ".join(verdicts[k].get(lb, "–") for lb in labels) + " |" for k in keys]
    lines += ["", "## PSNR vs dense (dB, mean ± 95% CI), DFS scoring", ""]
    for label, rep in reports.items():
        meta = rep["setup"]
        by = {r["name"]: r for r in rep["variants"]}
        cols = [f"d={d:g}" for d in meta["densities"]] + ["default"]
        lines += [f"**{label}**", "", "| order | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {o} | " + " | ".join(_with_ci(by.get(f"{o}/{c}"), "psnr") for c in cols) + " |" for o in meta["orders"]]
        lines.append("")
    lines += ["## Where the default schedule's PSNR goes (hilbert3d)", "",
              "The oracle keeps the recall-optimal blocks (top-k of the exact dense block mass) and caches them like "
              "DFS: its PSNR is what the density and the caching allow; oracle − DFS is what the scoring's estimate "
              "costs; every-step refresh − cached is what reusing the mask costs.", "",
              "| model | DFS | oracle | every-step refresh | scoring cost | caching cost |", "|---|---|---|---|---|---|"]  # fmt: skip
    for label, rep in reports.items():
        b = fidelity_budget(rep)
        lines.append(f"| {label} | {_fmt(b['dfs'])} | {_fmt(b['oracle'])} | {_fmt(b['every_step'])} | "
                     f"{_fmt(b['scoring_cost'], '+.2f')} | {_fmt(b['caching_cost'], '+.2f')} |")  # fmt: skip
    lines += ["", "## Concentration of the dense attention (mass of each row's top 20% key blocks, raster blocks)", "",
              "| model | per layer |", "|---|---|"]  # fmt: skip
    for label, rep in reports.items():
        dense = next((r for r in rep["variants"] if r["name"] == "dense"), None)
        mass = dense.get("top_mass_per_layer") if dense else None
        lines.append(f"| {label} | " + (", ".join(_fmt(x, ".3f") for x in mass) if mass else "–") + " |")
    return "\n".join(lines) + "\n"


def compare(args) -> dict:
    """``--compare``: reads each model's results file, writes ``quality_compare_<slug>.md``."""
    slug = args.compare_slug or device_slug()
    reports = {}
    for model in args.compare:
        path = os.path.join(args.out_dir, f"quality_{model}_{slug}.json")
        if not os.path.isfile(path):
            raise ValueError(f"--compare: no results file {path} for model {model!r} (run the benchmark first)")
        reports[model] = json.loads(pathlib.Path(path).read_text())
    text = compare_markdown(reports)
    out = os.path.join(args.out_dir, f"quality_compare_{slug}.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return {"markdown": out, "reports": reports}


# ----------------------------------------------------------------------------------------------
# Driver


def _measure_flags(plan, steps: int, every: int) -> np.ndarray:
    """Probe every ``every``-th step and every refresh step."""
    flags = np.arange(steps) % max(1, every) == 0
    if plan is not None:
        flags |= plan.refresh
    return flags


def _load_previous(path: str, setup: dict, fresh: bool) -> dict | None:
    """The results file of an earlier call with the same setup (``None``: none, or ``fresh``)."""
    if fresh or not os.path.isfile(path):
        return None
    previous = json.loads(pathlib.Path(path).read_text())
    old = previous.get("setup", {})
    differ = [k for k in SETUP_KEYS if json.dumps(old.get(k)) != json.dumps(setup.get(k))]
    if differ:
        raise ValueError(
            f"{path} holds results of another setup (differs in {differ}); pass --fresh to start over or --tag for a new file"
        )
    return previous


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return compare(args)
    t_start = time.perf_counter()
    steps = args.steps or (10 if args.quick else 50)
    num_samples = args.samples or (2 if args.quick else 16)
    model, conditioner, config, source = load_setup(args)
    cfg = config.wan
    block, tile = Q.harness_blocks(math.prod(config.token_grid))
    small_grid = block < 128  # CPU sizes
    other_tiles = args.tiles if args.tiles is not None else ((4, 16) if small_grid else (8, 32))
    tile_schedules = args.tile_densities or ((None,) if args.quick else (None, 0.1))
    refresh_schedules = args.refresh_densities or ((None,) if args.quick else (None, 0.2))
    oracle_schedules = args.oracle_densities or ((None,) if args.quick else (0.2, None))
    densities = args.densities or ((0.2, 0.05) if args.quick else (0.3, 0.2, 0.1, 0.05))
    if "hilbert3d" not in args.orders:
        raise ValueError("--orders must include hilbert3d (the tile, window and refresh comparisons refer to it)")
    base = default_schedule(steps, DFSConfig(block_size=block, tile_size=tile))
    variants = Q.default_variants(
        orders=args.orders, densities=densities, tile_size=tile, block_size=block, other_tiles=other_tiles,
        tile_densities=tile_schedules, window_orders=args.window_orders, random_orders=args.random_orders,
        oracle_orders=args.oracle_orders, oracle_densities=oracle_schedules, refresh_densities=refresh_schedules,
    )  # fmt: skip
    selected = select_variants(variants, args.variants)
    latent_shape, grid = config.latent_shape, config.token_grid
    tokens = math.prod(grid)
    nk = num_token_blocks(tokens, block)
    plans = {v.name: Q.variant_plan(v, steps, nk, base) for v in variants}
    max_blocks = max([p.max_blocks for p in plans.values() if p is not None] + [1])
    tiles = tuple(dict.fromkeys((tile, *other_tiles, block)))
    photo, motion = clip_classes(num_samples)
    device = device_name()
    key = source["key"]
    resized = any(getattr(args, k) is not None for k in ("frames", "height", "width"))
    size = f"_{config.clip.frames}x{config.clip.height}x{config.clip.width}" if resized else ""
    tag = args.tag or (f"{key}_{device_slug()}" + ("_random" if source["random"] and key != "smoke" else "") + size)
    setup = {
        "model": cfg.name, "key": key, "random": source["random"], "weights": source["weights"], "sha256": source["sha256"],
        "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim, "dim": cfg.dim,
        "clip": dataclasses.asdict(config.clip), "latent_shape": list(latent_shape), "token_grid": list(grid),
        "tokens": tokens, "num_key_blocks": nk, "last_block_tokens": tokens - (nk - 1) * block,
        "block_size": block, "tile_size": tile, "tiles": list(tiles), "max_blocks": max_blocks,
        "samples": num_samples, "classes": [f"{BACKGROUND_PHOTOS[p]}/{MOTIONS[m]}" for p, m in zip(photo, motion)],
        "seed": args.seed, "steps": steps, "solver": args.solver, "guidance_scale": config.guidance_scale,
        "shift": config.sample_shift, "default_schedule": dataclasses.asdict(base),
        "dense_layers": list(base.dense_layers), "orders": list(args.orders), "densities": list(densities),
        "tile_densities": list(tile_schedules), "window_orders": list(args.window_orders),
        "random_orders": list(args.random_orders), "refresh_densities": list(refresh_schedules),
        "oracle_orders": list(args.oracle_orders), "oracle_densities": list(oracle_schedules),
        "query_samples": min(args.query_samples, tokens), "measure_every": args.measure_every,
        "lpips": "not measured: LPIPS needs pretrained network weights that cannot be installed without a download",
    }  # fmt: skip
    os.makedirs(args.out_dir, exist_ok=True)
    paths = {name: os.path.join(args.out_dir, f"quality_{stem}{tag}{ext}") for name, stem, ext in (
        ("json", "", ".json"), ("markdown", "", ".md"), ("density_png", "density_", ".png"),
        ("layers_png", "layers_", ".png"), ("recall_png", "recall_", ".png"), ("masks_png", "masks_", ".png"))}  # fmt: skip
    previous = _load_previous(paths["json"], setup, args.fresh)
    records = {r["name"]: r for r in (previous or {}).get("variants", [])}
    todo = [v for v in selected if v.name == "dense" or args.rerun or v.name not in records]

    runner = Q.QualityRunner(
        model, latent_shape, block_size=block, tile_sizes=tiles, dense_layers=base.dense_layers,
        max_blocks=max_blocks, num_query_samples=args.query_samples, solver=args.solver, shift=config.sample_shift,
    )  # fmt: skip
    setup["sparse_layers"] = list(runner.sparse_layers)
    noise = jax.random.normal(jax.random.key(args.seed), (num_samples,) + latent_shape, jnp.float32)
    text = conditioner(jnp.asarray(photo), jnp.asarray(motion))
    negative = conditioner.unconditional(num_samples)
    guidance = config.guidance_scale
    print(f"[quality] {device}: {cfg.name} ({'random' if source['random'] else 'trained'} weights), grid {grid} = "
          f"{tokens} tokens, {nk} blocks of {block}; {num_samples} samples x {steps} steps; {len(todo)} of "
          f"{len(variants)} variants to run ({len(records)} in {paths['json']}); tiles {tiles}, K_max {max_blocks}",
          flush=True)  # fmt: skip
    compile_s = runner.warmup(noise, text, negative, num_steps=steps)
    print(f"[quality] compiled in {compile_s:.1f} s", flush=True)
    window_cache: dict = {}
    capacity = runner.capacity(steps)
    outputs: dict[str, Q.RunOutput] = {}
    dense_video = dense_latents = None
    error_floor = (previous or {}).get("attn_error_floor", float("nan"))
    dense_mismatch = (previous or {}).get("dense_mismatch")
    timing = {"none": set(), "all": {v.name for v in variants}}.get(args.timing)
    if timing is None:
        timing = {v.name for v in variants if v.group in ("dense", "refresh") or (v.group == "order" and v.order == "hilbert3d")}
    skipped_variants: list[str] = []
    calls = list((previous or {}).get("calls", []))
    call = {"variants": [], "compile_s": compile_s, "device": device}
    keep_cache = {"raster/default", "hilbert3d/default"}

    def report_of(complete_names: set[str]) -> dict:
        ordered = [records[v.name] for v in variants if v.name in records]
        missing = [v.name for v in variants if v.name not in complete_names]
        report = {
            "device": device, "backend": jax.default_backend(), "jax_version": jax.__version__,
            "python": platform.python_version(), "dtype": str(model.dtype), "setup": setup,
            "attn_error_floor": error_floor, "dense_fingerprint": (previous or {}).get("dense_fingerprint") or _fingerprint(dense_latents),
            "dense_mismatch": dense_mismatch, "calls": calls + [call], "variants": ordered,
            "complete": not missing, "missing_variants": missing,
        }  # fmt: skip
        report["claims"] = check_claims(report)
        return report

    for v in todo:
        t0 = time.perf_counter()
        if v.sparse and t0 - t_start > args.max_s:
            skipped_variants.append(v.name)
            continue
        plan = plans[v.name]
        static = None
        if v.scoring == Q.SCORING_WINDOW:
            perm, _ = runner.order_arrays(v.order)
            static = Q.window_step_scores(grid, perm, plan, capacity, block_size=block, cache=window_cache)
        kwargs = dict(num_steps=steps, plan=plan, order=v.order, scoring=runner.scoring_index(v, tile),
                      static_scores=static, guidance_scale=guidance, random_seed=args.seed)  # fmt: skip
        out = runner(noise, text, negative, measure=_measure_flags(plan, steps, args.measure_every), **kwargs)
        video = latents_to_video(out.latents, config.codec)
        if dense_video is None:
            if v.sparse:
                raise ValueError("the first variant must be the dense reference")
            dense_video, dense_latents = video, out.latents
            stored = (previous or {}).get("dense_fingerprint")
            if stored is not None and not _same_fingerprint(_fingerprint(out.latents), stored):
                dense_mismatch = f"call {len(calls) + 1}: dense latents differ from the stored fingerprint"
                print(f"[quality] WARNING: {dense_mismatch}", flush=True)
            if "dense" in records and not args.rerun:
                call["variants"].append("dense (reference only)")
                continue
            error_floor = float(np.nanmean(out.error))  # the dense kernel's own rounding against float32
        scores = Q.video_scores(video, dense_video)
        rec = summarize(v, out, scores, dense_latents, runner.sparse_layers, cfg.num_layers, base.dense_layers)
        if v.name in timing and time.perf_counter() - t_start < args.budget_s:
            rec["time_s"] = runner(noise, text, negative, measure=False, **kwargs).time_s
        records[v.name] = rec
        call["variants"].append(v.name)
        if v.name in keep_cache:
            outputs[v.name] = out
        write_json(paths["json"], report_of(set(records)))  # what is done so far survives a killed run
        print(f"[quality] {v.name:<40} sparsity {rec['sparsity']:.3f}  PSNR {_with_ci(rec, 'psnr'):>14} dB  "
              f"SSIM {rec['ssim_mean']:.4f}  recall {_fmt(rec.get('recall_mean'), '.4f')}  "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip

    call["total_s"] = time.perf_counter() - t_start
    call["skipped_over_max_s"] = skipped_variants
    call["compiles"] = runner.trace_count
    report = report_of(set(records))
    if skipped_variants:
        print(f"[quality] over --max-s: variants NOT run: {skipped_variants}", flush=True)
    plot_density(report, paths["density_png"])
    plot_layers(report, paths["layers_png"])
    plot_recall_steps(report, paths["recall_png"], ["hilbert3d/default", "raster/default", "hilbert3d/default/refresh-every-step",
                                                    "window-hilbert3d/default", "random-hilbert3d/default",
                                                    f"hilbert3d/tile{block}/default"])  # fmt: skip
    if all(n in outputs for n in keep_cache):
        from models.evaluation.compare import plot_block_masks

        mid = cfg.num_layers // 2
        mask_layer = mid if mid in runner.sparse_layers else runner.sparse_layers[0]
        slot = runner.sparse_layers.index(mask_layer)
        last = outputs["hilbert3d/default"].refresh_steps[-1]
        density = float(outputs["hilbert3d/default"].plan.density[last])
        masks = {o: cache_masks(outputs[f"{o}/default"].cache, slot, nk) for o in ("raster", "hilbert3d")}
        plot_block_masks(masks, paths["masks_png"], heads=min(4, cfg.num_heads),
                         title=f"{cfg.name}: layer {mask_layer} block masks of the last refresh\n(step {last}, density "
                               f"{density:g}, {nk} key blocks), sample 0 ({setup['classes'][0]})")  # fmt: skip
    if not os.path.isfile(paths["masks_png"]):
        paths["masks_png"] = None
    report["files"] = {k: _portable_path(p) for k, p in paths.items()}
    write_json(paths["json"], report)
    with open(paths["markdown"], "w") as f:
        f.write(markdown(report))
    report["files"] = paths
    print(f"[quality] done in {call['total_s']:.1f} s; {len(report['variants'])} of {len(variants)} variants in "
          f"{paths['json']}; missing: {len(report['missing_variants'])}", flush=True)  # fmt: skip
    print(f"{'variant':<40} {'sparsity':>8} {'PSNR (dB)':>16} {'SSIM':>7} {'recall':>7}")
    for r in report["variants"]:
        print(f"{r['name']:<40} {r['sparsity']:>8.3f} {_with_ci(r, 'psnr'):>16} {r['ssim_mean']:>7.4f} "
              f"{_fmt(r.get('recall_mean'), '.4f'):>7}")  # fmt: skip
    for c in report["claims"]:
        print(f"[quality] claim: {c['claim']}: {c['verdict']} ({c['detail']})")
    return report


if __name__ == "__main__":
    main()
