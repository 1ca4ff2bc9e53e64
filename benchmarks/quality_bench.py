"""Quality benchmark (issue 5): DFSAttn's fidelity to dense sampling, per order, scoring and baseline.

On the small video DiT shipped in ``models/evaluation/weights`` (``--model auto`` falls back to random
weights of the same architecture while the weights are absent), every variant samples the same
noise for the same classes (``--samples`` ≥ 8 covers all 8 photos and all 5 motions) with
classifier-free guidance over ``--steps`` (50) Euler steps of the shifted flow schedule:

* orders: raster, hilbert2d, block3d, morton3d, hilbert3d (DFS scoring, tile 16) at fixed
  densities 0.3, 0.2, 0.1, 0.05 (no decrement; dense steps and refresh interval as the default)
  and with the default schedule (docs/spec.md §6);
* scoring: hilbert3d with tile = block (plain block mean pooling) and tiles 8 and 32, with the
  default schedule and at ``--tile-density`` (0.1); tile 16 is the ``order`` row;
* baselines on the same kernel at equal density: the static spatio-temporal window
  (``dfsattn_jax.baselines``) in hilbert3d order (``--window-orders``), at each density and with
  the default schedule's densities; and hilbert3d with the mask refreshed at every sparse step
  instead of cached per the default schedule.

Measures (docs/spec.md §9): recall and attention error per layer and step (on ``--query-samples``
sampled query rows, exact dense softmax), PSNR and SSIM of the decoded final videos against the
dense videos (LPIPS: not installable without downloading network weights), the sparsity used
(docs/spec.md §6 convention), and wall time (each variant runs once measured; the ``--timing`` subset
runs a second time without measurements, the time to compare).

All variants run in ONE compiled program (``models.evaluation.quality.QualityRunner``: order, plan and layout
source are inputs), so the run costs one compile plus the runs. The comparisons the claims rest on
run first; past ``--budget-s`` (400 s) the timing re-runs stop and past ``--max-s`` (530 s) the
remaining variants are skipped (listed in the outputs), so a 10-minute job limit always gets its
files; the JSON is also rewritten after every variant.

Outputs in ``--out-dir`` (default ``benchmarks/results``), ``<tag>`` = device slug
(:func:`models.evaluation.results.device_slug`: ``nvidia_h100``, ``nvidia_h200``, ``cpu``), plus ``_random`` for random weights at full size and ``_smoke`` for the
CPU size: ``quality_<tag>.json`` (everything, per-step/per-layer recall and error included),
``quality_<tag>.md`` (tables and the paper's claims checked), ``quality_density_<tag>.png``
(PSNR and recall vs density per order and baseline), ``quality_recall_<tag>.png`` (recall vs step),
``quality_masks_<tag>.png`` (one layer's block masks, raster vs hilbert3d). Paths in the JSON are
repository-relative (file names only for paths outside the repository).

Usage (from the repository root; needs the package installed: ``pip install -e .``)::

    # GPU, the shipped model (38 variants; planned for 4-6 minutes on one H100 including the compile):
    python benchmarks/quality_bench.py

    # CPU smoke run (a tiny random model, 1024 tokens, 10 steps, fewer densities; about a minute):
    JAX_PLATFORMS=cpu python benchmarks/quality_bench.py --quick

    # The shipped model on CPU-sized clips (4 frames of 32x32 px, 1024 tokens; a few variants):
    JAX_PLATFORMS=cpu python benchmarks/quality_bench.py --frames 4 --height 32 --width 32 --steps 12 \
        --samples 2 --orders raster,hilbert3d --densities 0.2 --tile-densities default --timing none
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import platform
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfsattn_jax.layout import BlockLayout
from dfsattn_jax.orders import ORDER_NAMES
from dfsattn_jax.schedule import DFSConfig, reported_sparsity
from dfsattn_jax.schedule import default_schedule
from models.evaluation.clips import clip_classes
from models.evaluation.codec import latents_to_video
from models.evaluation import quality as Q
from models.evaluation.clips import BACKGROUND_PHOTOS, MOTIONS, ClipConfig
from models.evaluation.results import device_name, device_slug, portable, write_json
from models.evaluation.small_dit import (
    SMALL_DIT_CONFIG,
    SMOKE_DIT_CONFIG,
    ClipConditioner,
    SmallDiTConfig,
    default_weights_path,
    load_clip_conditioner,
    load_small_video_dit,
    read_checksum,
)
from models.wan.transformer import WanTransformer3DModel

#: CPU smoke size: the smoke model of ``small_dit`` on 4-frame 32×32 clips (4×16×16 = 1024 tokens).
SMOKE_SETUP = dataclasses.replace(SMOKE_DIT_CONFIG, clip=ClipConfig(frames=4, height=32, width=32))

ALL_ORDERS = ("raster", "hilbert2d", "block3d", "morton3d", "hilbert3d")


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("auto", "pretrained", "random"), default="auto",
                   help="shipped weights, random weights of the same architecture, or auto (shipped if present)")
    p.add_argument("--weights", default=None, help="weights file (default models/evaluation/weights/small_video_dit.safetensors)")
    p.add_argument("--size", choices=("full", "smoke"), default=None,
                   help="full: the shipped model's clips (16x32x32 tokens); smoke: a tiny random model for CPU")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: --size smoke --steps 10 --samples 2 --densities 0.2,0.05 "
                        "--tile-densities default unless given")
    p.add_argument("--frames", type=int, default=None, help="override the clip frames (e.g. a CPU-sized shipped model)")
    p.add_argument("--height", type=int, default=None, help="override the clip height in pixels")
    p.add_argument("--width", type=int, default=None, help="override the clip width in pixels")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; quick 10)")
    p.add_argument("--samples", type=int, default=None, help="videos per variant (default 8; quick 2)")
    p.add_argument("--orders", type=_names, default=ALL_ORDERS)
    p.add_argument("--densities", type=_floats, default=None, help="fixed densities (default 0.3,0.2,0.1,0.05)")
    p.add_argument("--tiles", type=_ints, default=None,
                   help="scoring tiles besides the DFS tile and tile = block (default 8,32; smoke 4,16)")
    p.add_argument("--tile-densities", default=None,
                   help="schedules of the tile comparison: 'default' and/or fixed densities (default: default,0.1)")
    p.add_argument("--window-orders", type=_names, default=("hilbert3d",), help="orders of the static window baseline")
    p.add_argument("--query-samples", type=int, default=256, help="query rows sampled for recall and error")
    p.add_argument("--timing", choices=("subset", "all", "none"), default="subset",
                   help="variants re-run without measurements for timing")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="after this many seconds, skip the timing re-runs (the measured runs still all run)")
    p.add_argument("--max-s", type=float, default=530.0,
                   help="after this many seconds, skip the remaining variants (listed in the JSON) and write the results")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--solver", default="euler", choices=("euler", "unipc"))
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file tag (default: card slug + _random/_smoke)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Setup


def _resize_clip(config: SmallDiTConfig, args) -> SmallDiTConfig:
    """``config`` with the clip size overridden by ``--frames/--height/--width`` (the model is unchanged)."""
    clip = config.clip
    changes = {k: getattr(args, k) for k in ("frames", "height", "width") if getattr(args, k) is not None}
    return dataclasses.replace(config, clip=dataclasses.replace(clip, **changes)) if changes else config


def _portable_path(path: str | os.PathLike | None) -> str | None:
    """``path`` as results files may hold it: repository-relative, or only its name when outside
    the repository (results carry no machine paths)."""
    if path is None:
        return None
    try:
        return portable(os.fspath(path))
    except ValueError:
        return pathlib.Path(path).name


def load_setup(args) -> tuple[WanTransformer3DModel, ClipConditioner, SmallDiTConfig, dict[str, Any]]:
    """The model, its conditioner, its config (clip size as asked) and where they came from."""
    size = args.size or ("smoke" if args.quick else "full")
    weights = pathlib.Path(args.weights) if args.weights else default_weights_path()
    use_weights = args.model == "pretrained" or (args.model == "auto" and size == "full" and weights.is_file())
    if use_weights:
        if size == "smoke":
            raise ValueError("--size smoke uses a random tiny model; drop --model pretrained or use --size full")
        model, config = load_small_video_dit(weights)
        conditioner = load_clip_conditioner(weights)
        source = {"weights": _portable_path(weights), "sha256": read_checksum(weights), "random": False,
                  "trained_clip": dataclasses.asdict(config.clip)}  # fmt: skip
        return model, conditioner, _resize_clip(config, args), source
    config = SMALL_DIT_CONFIG if size == "full" else SMOKE_SETUP
    model = WanTransformer3DModel(config.wan, rngs=nnx.Rngs(1234))
    conditioner = ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(1235))
    note = "random weights (the shipped weights are absent or not asked for)"
    return model, conditioner, _resize_clip(config, args), {"weights": None, "sha256": None, "random": True, "note": note}


def _tile_schedules(text: str) -> tuple[float | None, ...]:
    out: list[float | None] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            out.append(None if part == "default" else float(part))
    return tuple(out)


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
    return [[_finite_or_str(round(float(v), digits)) for v in row] for row in np.asarray(a)]


def summarize(variant: Q.Variant, out: Q.RunOutput, scores: dict, dense_latents: np.ndarray,
              sparse_layers: Sequence[int], num_layers: int, dense_layers: Sequence[int]) -> dict:  # fmt: skip
    """One variant's record for the JSON."""
    plan = out.plan
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
        "psnr_mean": _finite_or_str(np.mean(scores["psnr"])),
        "psnr_min": _finite_or_str(np.min(scores["psnr"])),
        "ssim_mean": float(np.mean(scores["ssim"])),
        "latent_rel_error": float(
            np.linalg.norm(out.latents - dense_latents) / max(np.linalg.norm(dense_latents), 1e-30)
        ),
        "time_measured_s": out.time_s,
        "recall_per_step_layer": _round(out.recall),
        "error_per_step_layer": _round(out.error, 6),
        "skipped_per_step": [round(float(x), 5) for x in out.skipped],
    }
    if plan is None:
        rec.update(sparsity=0.0, planned_sparsity=0.0, refresh_steps=[], num_refreshes=0, sparse_steps=0,
                   mean_density=1.0, recall_mean=1.0, attn_error_mean=None)  # fmt: skip
        return rec
    sparse = plan.sparse
    rec.update(
        sparsity=out.sparsity,
        planned_sparsity=reported_sparsity(plan, num_layers, tuple(dense_layers)),
        refresh_steps=list(out.refresh_steps),
        num_refreshes=len(out.refresh_steps),
        sparse_steps=int(sparse.sum()),
        mean_density=float(np.mean(plan.num_blocks[sparse] / plan.num_key_blocks)),
        densities_in_force=sorted({round(float(d), 6) for d in plan.density[sparse]}, reverse=True),
        recall_mean=float(np.mean(out.recall[sparse][:, list(sparse_layers)])),
        attn_error_mean=float(np.mean(out.error[sparse][:, list(sparse_layers)])),
    )
    return rec


def _fmt(x, spec: str = ".2f", missing: str = "–") -> str:
    if x is None:
        return missing
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if math.isinf(x):
        return "∞"
    return format(x, spec)


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
    lines = [
        f"# DFSAttn quality benchmark: {meta['model']} on {report['device']}",
        "",
        f"- model: {meta['model']} ({'random weights' if meta['random'] else 'shipped weights, sha256 ' + str(meta['sha256'])}), "
        f"{meta['num_layers']} layers × {meta['num_heads']} heads; latent {meta['latent_shape']}, token grid "
        f"{meta['token_grid']} = {meta['tokens']} tokens = {meta['num_key_blocks']} blocks of {meta['block_size']}",
        f"- {meta['samples']} samples ({', '.join(meta['classes'])}), the same noise (seed {meta['seed']}) for every variant; "
        f"{meta['steps']} {meta['solver']} steps, guidance {meta['guidance_scale']}, shift {meta['shift']}",
        f"- default schedule: {_schedule_text(meta['default_schedule'], meta['steps'])}; fixed densities: the same "
        f"dense steps and refresh interval without decrement; dense layers {meta['dense_layers']}; DFS tile {meta['tile_size']}",
        f"- recall / attention error: {meta['query_samples']} sampled query rows per layer and step, exact dense softmax; "
        f"means over the sparse steps and sparse layers; floor of the error (dense attention in {report['dtype']} vs "
        f"exact): {report['attn_error_floor']:.2e}. PSNR / SSIM: decoded final videos vs the dense videos, mean over samples. "
        "LPIPS: not measured (needs pretrained network weights that cannot be installed without a download).",
        f"- sparsity: docs/spec.md §6 (mean skipped block fraction over the sparse steps and all layers, dense layers 0). "
        f"Time: wall time of the {meta['steps']}-step run of all {meta['samples']} samples (batch {2 * meta['samples']} with guidance), "
        "without measurements where given, else with (marked *).",
        f"- one compiled program for all {len(report['variants'])} variants: compile {report['compile_s']:.1f} s, "
        f"total wall {report['total_s']:.1f} s; jax {report['jax_version']}",
    ]
    if report.get("variants_skipped_over_max_s"):
        lines.append(f"- **incomplete**: over the time limit, not run: {', '.join(report['variants_skipped_over_max_s'])}")
    lines.append("")
    orders = meta["orders"]
    cols = [f"d={d:g}" for d in meta["densities"]] + ["default"]

    def grid_table(title: str, key: str, spec: str):
        out = [f"### {title}", "", "| order | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for o in orders:
            cells = []
            for c in cols:
                r = by.get(f"{o}/{c}")
                cells.append(_fmt(r[key] if r else None, spec))
            out.append(f"| {o} | " + " | ".join(cells) + " |")
        return out + [""]

    lines += ["## Token orders (DFS scoring)", ""]
    lines += grid_table("PSNR (dB) vs dense", "psnr_mean", ".2f")
    lines += grid_table("SSIM vs dense", "ssim_mean", ".4f")
    lines += grid_table("Recall", "recall_mean", ".4f")
    lines += grid_table("Attention error", "attn_error_mean", ".4f")

    def row(r: dict) -> str:
        t = r.get("time_s")
        time_cell = _fmt(t, ".2f") if t is not None else _fmt(r["time_measured_s"], ".2f") + "*"
        return (f"| {r['name']} | {_fmt(r['sparsity'], '.4f')} | {_fmt(r['psnr_mean'])} | {_fmt(r['psnr_min'])} | "
                f"{_fmt(r['ssim_mean'], '.4f')} | {_fmt(r['recall_mean'], '.4f')} | {_fmt(r['attn_error_mean'], '.4f')} | "
                f"{r['num_refreshes']} | {time_cell} |")  # fmt: skip

    head = ["| variant | sparsity | PSNR | PSNR min | SSIM | recall | attn err | refreshes | time (s) |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"## Scoring: tile size (hilbert3d); tile {meta['block_size']} = block is plain block mean pooling", "",
              "| tile | schedule | sparsity | PSNR | PSNR min | SSIM | recall | attn err | time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for sched in [None] + [d for d in meta["tile_densities"] if d is not None]:
        label = "default" if sched is None else f"d={sched:g}"
        for t in sorted(meta["tiles"]):
            name = f"hilbert3d/{label}" if t == meta["tile_size"] else f"hilbert3d/tile{t}/{label}"
            r = by.get(name)
            if r is None:
                continue
            cells = row(r).split(" | ")
            kind = " (DFS)" if t == meta["tile_size"] else " (block pooling)" if t == meta["block_size"] else ""
            lines.append(f"| {t}{kind} | {label} | " + " | ".join(cells[1:7]) + " | " + cells[-1])
    lines += [""]
    window_rows = [r for r in report["variants"] if r["group"] == "window"]
    lines += ["## Baselines at equal density: static spatio-temporal window vs DFS", ""] + head
    for c in cols:
        for r in [by.get(f"hilbert3d/{c}")] + [w for w in window_rows if w["schedule"] == c.replace("d=", "")]:
            if r:
                lines.append(row(r))
    lines += [""]
    refresh_rows = [r for r in report["variants"] if r["group"] == "refresh"]
    lines += ["## Mask refreshed at every sparse step vs cached per the schedule", ""] + head
    for r in refresh_rows:
        cached = by.get(r["name"].replace("/refresh-every-step", ""))
        lines += [row(x) for x in (cached, r) if x]
    lines += [""]
    lines += ["## Claims of the paper, checked on this model", ""]
    lines += [f"- {c['claim']}: **{'holds' if c['holds'] else 'does not hold'}** ({c['detail']})" for c in report["claims"]]
    lines += ["", "## All variants", ""] + head + [row(r) for r in report["variants"]] + [""]
    return "\n".join(lines)


def check_claims(report: dict) -> list[dict]:
    """The issue's targets, evaluated on the measured PSNRs."""
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    claims = []

    def val(name):
        r = by.get(name)
        if r is None or r["psnr_mean"] is None:
            return None
        return float("inf") if r["psnr_mean"] == "inf" else float(r["psnr_mean"])

    low = [d for d in meta["densities"] if d <= 0.2]
    fails, checked = [], 0
    for d in low:
        h = val(f"hilbert3d/d={d:g}")
        for o in meta["orders"]:
            other = val(f"{o}/d={d:g}")
            if o == "hilbert3d" or h is None or other is None:
                continue
            checked += 1
            if h < other:
                fails.append(f"{o} {other:.2f} > hilbert3d {h:.2f} dB at d={d:g}")
    if checked:
        claims.append(dict(claim="hilbert3d at least as good as every other order at density ≤ 0.2 (PSNR)",
                           holds=not fails, detail="; ".join(fails) or f"{checked} comparisons"))  # fmt: skip
    pairs = []
    for sched in ["default"] + [f"d={d:g}" for d in meta["tile_densities"] if d is not None]:
        a, b = val(f"hilbert3d/{sched}"), val(f"hilbert3d/tile{meta['block_size']}/{sched}")
        if a is not None and b is not None:
            pairs.append((sched, a, b))
    if pairs:
        claims.append(dict(claim=f"tile-{meta['tile_size']} scoring better than plain block pooling (tile {meta['block_size']})",
                           holds=all(a > b for _, a, b in pairs),
                           detail="; ".join(f"{s}: {a:.2f} vs {b:.2f} dB" for s, a, b in pairs)))  # fmt: skip
    pairs = []
    for sched in [f"d={d:g}" for d in meta["densities"]] + ["default"]:
        a = val(f"hilbert3d/{sched}")
        for o in meta["window_orders"]:
            b = val(f"window-{o}/{sched}")
            if a is not None and b is not None:
                pairs.append((f"{sched} ({o} window)", a, b))
    if pairs:
        claims.append(dict(claim="DFS better than the static window at equal density", holds=all(a > b for _, a, b in pairs),
                           detail="; ".join(f"{s}: {a:.2f} vs {b:.2f} dB" for s, a, b in pairs)))  # fmt: skip
    for r in report["variants"]:
        if r["group"] != "refresh":
            continue
        cached_name = r["name"].replace("/refresh-every-step", "")
        a, b = val(cached_name), val(r["name"])
        if a is None or b is None:
            continue
        cost = f"{by[cached_name]['num_refreshes']} vs {r['num_refreshes']} scoring steps"
        claims.append(dict(claim=f"{cached_name} within 1 dB of refreshing at every sparse step",
                           holds=a >= b - 1.0, detail=f"{a:.2f} vs {b:.2f} dB; {cost}"))  # fmt: skip
    default = val("hilbert3d/default")
    if default is not None:
        claims.append(dict(claim="default schedule (hilbert3d) ≥ 30 dB PSNR vs dense", holds=default >= 30.0,
                           detail=f"{default:.2f} dB, SSIM {by['hilbert3d/default']['ssim_mean']:.4f}"))  # fmt: skip
    return claims


# ----------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_density(report: dict, path: str) -> str:
    """PSNR and recall vs density: one line per order, dashed for the window, dotted for block pooling."""
    plt = _plt()
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    dens = list(meta["densities"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(o, f"{o}/d={{d:g}}", f"{o}/default", "-", "o") for o in meta["orders"]]
    series += [(f"window ({o})", f"window-{o}/d={{d:g}}", f"window-{o}/default", "--", "s") for o in meta["window_orders"]]
    series.append((f"block pooling (tile {meta['block_size']})", f"hilbert3d/tile{meta['block_size']}/d={{d:g}}",
                   f"hilbert3d/tile{meta['block_size']}/default", ":", "^"))  # fmt: skip
    for ax, key, label in ((axes[0], "psnr_mean", "PSNR vs dense (dB)"), (axes[1], "recall_mean", "recall")):
        for name, pattern, default, style, marker in series:
            xs, ys = [], []
            for d in dens:
                r = by.get(pattern.format(d=d))
                if r is not None and isinstance(r[key], (int, float)):
                    xs.append(d)
                    ys.append(r[key])
            if not xs:
                continue
            (line,) = ax.plot(xs, ys, style, marker=marker, label=name, ms=4)
            r = by.get(default)
            if r is not None and isinstance(r[key], (int, float)):
                ax.plot([r["mean_density"]], [r[key]], marker="*", ms=12, color=line.get_color(), ls="none")
        ax.set_xlabel("density (kept fraction of key blocks); ★ default schedule at its mean density", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{meta['model']}: {meta['tokens']} tokens, {meta['samples']} samples, {meta['steps']} steps "
                 f"({report['device']})", fontsize=9)  # fmt: skip
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
        rec = np.array([[np.nan if v is None else v for v in row] for row in r["recall_per_step_layer"]], float)
        axes[0].plot(np.arange(rec.shape[0]), rec[:, sparse_layers].mean(axis=1), label=name, lw=1.2)
    axes[0].set_title("mean over sparse layers", fontsize=9)
    r = by.get("hilbert3d/default")
    if r is not None:
        rec = np.array([[np.nan if v is None else v for v in row] for row in r["recall_per_step_layer"]], float)
        for layer in range(rec.shape[1]):
            axes[1].plot(np.arange(rec.shape[0]), rec[:, layer], label=f"layer {layer}" + (" (dense)" if layer not in sparse_layers else ""), lw=1.2)
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
# Driver


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    size = args.size or ("smoke" if args.quick else "full")
    steps = args.steps or (10 if args.quick else 50)
    num_samples = args.samples or (2 if args.quick else 8)
    model, conditioner, config, source = load_setup(args)
    cfg = config.wan
    smoke = size == "smoke"
    small_grid = math.prod(config.token_grid) < 4096  # CPU sizes: 32-token blocks of 8-token tiles
    block = 32 if small_grid else 128
    tile = 8 if small_grid else 16
    other_tiles = args.tiles if args.tiles is not None else ((4, 16) if small_grid else (8, 32))
    tile_schedules = _tile_schedules(args.tile_densities or ("default" if args.quick else "default,0.1"))
    densities = args.densities or ((0.2, 0.05) if args.quick else (0.3, 0.2, 0.1, 0.05))
    base = default_schedule(steps, DFSConfig(block_size=block, tile_size=tile))
    variants = Q.default_variants(
        orders=args.orders, densities=densities, tile_size=tile, block_size=block, other_tiles=other_tiles,
        tile_densities=tile_schedules, window_orders=args.window_orders,
    )  # fmt: skip
    if "hilbert3d" not in args.orders:
        raise ValueError("--orders must include hilbert3d (the tile, window and refresh comparisons refer to it)")
    latent_shape = config.latent_shape
    grid = config.token_grid
    tokens = math.prod(grid)
    nk = -(-tokens // block)
    plans = {v.name: Q.variant_plan(v, steps, nk, base) for v in variants}
    max_blocks = max([p.max_blocks for p in plans.values() if p is not None] + [1])
    tiles = tuple(dict.fromkeys((tile, *other_tiles, block)))
    runner = Q.QualityRunner(
        model, latent_shape, block_size=block, tile_sizes=tiles, dense_layers=base.dense_layers,
        max_blocks=max_blocks, num_query_samples=args.query_samples, solver=args.solver, shift=config.sample_shift,
    )  # fmt: skip
    photo, motion = clip_classes(num_samples)
    classes = [f"{BACKGROUND_PHOTOS[p]}/{MOTIONS[m]}" for p, m in zip(photo, motion)]
    noise = jax.random.normal(jax.random.key(args.seed), (num_samples,) + latent_shape, jnp.float32)
    text = conditioner(jnp.asarray(photo), jnp.asarray(motion))
    negative = conditioner.unconditional(num_samples)
    guidance = config.guidance_scale
    device = device_name()
    resized = "" if smoke or source.get("trained_clip", dataclasses.asdict(SMALL_DIT_CONFIG.clip)) == dataclasses.asdict(config.clip) \
        else f"_{config.clip.frames}x{config.clip.height}x{config.clip.width}"  # fmt: skip
    tag = args.tag or (device_slug() + ("_smoke" if smoke else "") + ("_random" if source["random"] and not smoke else "") + resized)
    print(f"[quality] {device}: {cfg.name} ({'random' if source['random'] else 'shipped'} weights), grid {grid} = "
          f"{tokens} tokens, {nk} blocks of {block}; {num_samples} samples x {steps} steps; {len(variants)} variants; "
          f"tiles {tiles}, K_max {max_blocks}", flush=True)  # fmt: skip

    compile_s = runner.warmup(noise, text, negative, num_steps=steps)
    print(f"[quality] compiled in {compile_s:.1f} s", flush=True)
    window_cache: dict = {}
    capacity = runner.capacity(steps)
    records: list[dict] = []
    outputs: dict[str, Q.RunOutput] = {}
    dense_video = dense_latents = None
    error_floor = float("nan")
    keep_cache = {"raster/default", "hilbert3d/default"}
    timing = {"none": set(), "all": {v.name for v in variants}}.get(args.timing)
    if timing is None:
        timing = {v.name for v in variants if v.group in ("dense", "refresh") or (v.group == "order" and v.order == "hilbert3d")
                  or (v.group in ("tile", "window") and v.density is None)}  # fmt: skip
    skipped_timing: list[str] = []
    skipped_variants: list[str] = []
    os.makedirs(args.out_dir, exist_ok=True)
    partial_json = os.path.join(args.out_dir, f"quality_{tag}.json")
    # The comparisons the claims rest on run first, so that a run cut by --max-s keeps them.
    first = ["dense", "hilbert3d/default", "raster/default", "hilbert3d/default/refresh-every-step",
             "window-hilbert3d/default", f"hilbert3d/tile{block}/default"]  # fmt: skip
    canonical = {v.name: i for i, v in enumerate(variants)}
    run_order = sorted(variants, key=lambda v: (first.index(v.name) if v.name in first else len(first), canonical[v.name]))
    for v in run_order:
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
                      static_scores=static, guidance_scale=guidance)  # fmt: skip
        out = runner(noise, text, negative, measure=True, **kwargs)
        video = latents_to_video(out.latents, config.codec)
        if dense_video is None:
            if v.sparse:
                raise ValueError("the first variant must be the dense reference")
            dense_video, dense_latents = video, out.latents
            error_floor = float(np.mean(out.error))  # the dense kernel's own rounding against float32
        scores = Q.video_scores(video, dense_video)
        rec = summarize(v, out, scores, dense_latents, runner.sparse_layers, cfg.num_layers, base.dense_layers)
        if v.name in timing:
            if time.perf_counter() - t_start < args.budget_s:
                rec["time_s"] = runner(noise, text, negative, measure=False, **kwargs).time_s
            else:
                skipped_timing.append(v.name)
        records.append(rec)
        if v.name in keep_cache:
            outputs[v.name] = out
        # what is done so far survives a killed run
        write_json(partial_json, {"complete": False, "device": device, "variants": records})
        print(f"[quality] {v.name:<40} sparsity {rec['sparsity']:.3f}  PSNR {_fmt(rec['psnr_mean']):>6} dB  "
              f"SSIM {rec['ssim_mean']:.4f}  recall {_fmt(rec['recall_mean'], '.4f')}  attn err "
              f"{_fmt(rec['attn_error_mean'], '.4f')}  ({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip

    records.sort(key=lambda r: canonical[r["name"]])
    mid = cfg.num_layers // 2
    mask_layer = mid if mid in runner.sparse_layers else runner.sparse_layers[0]
    setup = {
        "model": cfg.name, "random": source["random"], "weights": source["weights"], "sha256": source["sha256"],
        "num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "dim": cfg.dim,
        "clip": dataclasses.asdict(config.clip), "latent_shape": list(latent_shape), "token_grid": list(grid), "tokens": tokens, "num_key_blocks": nk,
        "block_size": block, "tile_size": tile, "tiles": list(tiles), "max_blocks": max_blocks,
        "samples": num_samples, "classes": classes, "seed": args.seed, "steps": steps, "solver": args.solver,
        "guidance_scale": guidance, "shift": config.sample_shift, "default_schedule": dataclasses.asdict(base),
        "dense_layers": list(base.dense_layers), "sparse_layers": list(runner.sparse_layers),
        "orders": list(args.orders), "densities": list(densities), "tile_densities": list(tile_schedules),
        "window_orders": list(args.window_orders), "query_samples": int(runner.rows.shape[0]),
        "lpips": "not measured: LPIPS needs pretrained network weights that cannot be installed without a download",
    }  # fmt: skip
    report: dict[str, Any] = {
        "device": device, "backend": jax.default_backend(), "jax_version": jax.__version__,
        "python": platform.python_version(), "dtype": str(model.dtype), "setup": setup,
        "compile_s": compile_s, "compiles": runner.trace_count, "attn_error_floor": error_floor, "variants": records,
    }  # fmt: skip
    report["claims"] = check_claims(report)
    report["timing_skipped_over_budget"] = skipped_timing
    report["variants_skipped_over_max_s"] = skipped_variants
    report["complete"] = not skipped_variants
    if skipped_timing:
        print(f"[quality] over --budget-s: timing re-runs skipped for {skipped_timing}", flush=True)
    if skipped_variants:
        print(f"[quality] over --max-s: variants NOT run: {skipped_variants}", flush=True)
    paths = {
        "json": os.path.join(args.out_dir, f"quality_{tag}.json"),
        "markdown": os.path.join(args.out_dir, f"quality_{tag}.md"),
        "density_png": os.path.join(args.out_dir, f"quality_density_{tag}.png"),
        "recall_png": os.path.join(args.out_dir, f"quality_recall_{tag}.png"),
        "masks_png": os.path.join(args.out_dir, f"quality_masks_{tag}.png"),
    }
    plot_density(report, paths["density_png"])
    plot_recall_steps(report, paths["recall_png"], ["hilbert3d/default", "raster/default", "hilbert3d/default/refresh-every-step",
                                                    "window-hilbert3d/default", f"hilbert3d/tile{block}/default"])  # fmt: skip
    if all(n in outputs for n in keep_cache):
        from models.evaluation.compare import plot_block_masks

        slot = runner.sparse_layers.index(mask_layer)
        last = outputs["hilbert3d/default"].refresh_steps[-1]
        density = float(outputs["hilbert3d/default"].plan.density[last])
        masks = {o: cache_masks(outputs[f"{o}/default"].cache, slot, nk) for o in ("raster", "hilbert3d")}
        plot_block_masks(masks, paths["masks_png"], heads=min(4, cfg.num_heads),
                         title=f"{cfg.name}: layer {mask_layer} block masks of the last refresh\n(step {last}, density "
                               f"{density:g}, {nk} key blocks), sample 0 ({classes[0]})")  # fmt: skip
    else:
        paths["masks_png"] = None
    report["total_s"] = time.perf_counter() - t_start
    report["files"] = paths
    write_json(paths["json"], {**report, "files": {k: _portable_path(p) for k, p in paths.items()}})
    with open(paths["markdown"], "w") as f:
        f.write(markdown(report))
    print(f"[quality] done in {report['total_s']:.1f} s ({runner.trace_count} compiled program); wrote "
          + ", ".join(p for p in paths.values() if p), flush=True)  # fmt: skip
    for c in report["claims"]:
        print(f"[quality] claim: {c['claim']}: {'holds' if c['holds'] else 'does NOT hold'} ({c['detail']})")
    return report


if __name__ == "__main__":
    main()
