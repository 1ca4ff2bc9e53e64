"""The quality benchmark's results of one model as Markdown: the setup, the tables and the claims checked.

:func:`report_markdown` reads only the results file's JSON (the report the benchmark writes, with
its ``setup``, ``variants`` records of :func:`~models.evaluation.quality_summary.summarize` and
``claims`` of :func:`~models.evaluation.quality_claims.check_claims`), so the Markdown can be
regenerated from a stored results file. Every table goes through
:func:`~models.evaluation.tables.markdown_table`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from dfsattn_jax.metrics import DISTANCE_CLASS_NAMES
from models.evaluation.quality_summary import as_matrix, nanmean
from models.evaluation.tables import markdown_table

__all__ = ["VARIANT_COLUMNS", "fmt_value", "fmt_with_ci", "order_grid_table", "report_markdown", "variant_table"]

#: Columns of the per-variant tables.
VARIANT_COLUMNS = ("variant", "sparsity", "PSNR (± 95% CI)", "PSNR min–max", "SSIM (± 95% CI)", "SSIM min–max",
                   "recall", "attn err", "refreshes")  # fmt: skip


def fmt_value(x, spec: str = ".2f", missing: str = "–") -> str:
    """A stored number formatted with ``spec``; ``missing`` for ``None``, ``∞`` for an infinity
    (``"inf"`` as stored), other strings as they are."""
    if x is None:
        return missing
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if math.isinf(x):
        return "∞"
    return format(x, spec)


def fmt_with_ci(r: dict | None, key: str, spec: str = ".2f") -> str:
    """``"<mean> ± <ci95>"`` of ``r[key + "_mean"]`` (``–`` when the record or the mean is missing)."""
    if r is None or r.get(f"{key}_mean") is None:
        return "–"
    ci = r.get(f"{key}_ci95")
    text = fmt_value(r[f"{key}_mean"], spec)
    return text if ci is None else f"{text} ± {fmt_value(ci, spec)}"


def order_grid_table(by: dict[str, dict], orders: Sequence[str], cols: Sequence[str],
                     cell: Callable[[dict | None], str]) -> list[str]:  # fmt: skip
    """A table of one row per order and one column per schedule label (``d=0.2``, ``default``):
    ``cell(by.get("<order>/<label>"))``."""
    return markdown_table(["order", *cols], [[o, *(cell(by.get(f"{o}/{c}")) for c in cols)] for o in orders])


def _variant_cells(r: dict) -> list:
    return [r["name"], fmt_value(r["sparsity"], ".4f"), fmt_with_ci(r, "psnr"),
            f"{fmt_value(r['psnr_min'])}–{fmt_value(r['psnr_max'])}", fmt_with_ci(r, "ssim", ".3f"),
            f"{fmt_value(r['ssim_min'], '.3f')}–{fmt_value(r['ssim_max'], '.3f')}",
            fmt_value(r.get("recall_mean"), ".4f"), fmt_value(r.get("attn_error_mean"), ".4f"), r["num_refreshes"]]  # fmt: skip


def variant_table(records: Sequence[dict]) -> list[str]:
    """One row of :data:`VARIANT_COLUMNS` per variant record."""
    return markdown_table(VARIANT_COLUMNS, [_variant_cells(r) for r in records])


def _schedule_text(schedule: dict, steps: int) -> str:
    d0, dec, dense, every = (schedule[k] for k in ("density", "density_decrement", "dense_steps", "refresh_interval"))
    if dec == 0:
        return f"dense steps 0–{dense - 1}, then sparse at density {d0:g}, mask refreshed every {every} steps, {steps} steps"
    return (f"dense steps 0–{dense - 1}, then sparse; mask refreshed every {every} steps from step {dense} "
            f"at density {d0:g} minus {dec:g} per refresh (down to {max(d0 - dec * (math.ceil(d0 / dec) - 1), 0):g}), "
            f"{steps} steps")  # fmt: skip


def _setup_lines(report: dict) -> list[str]:
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
        f"layers; floor of the error (dense attention in {report['dtype']} vs exact): {fmt_value(report['attn_error_floor'], '.2e')}.",
        "- sparsity: docs/spec.md §6 (mean skipped block fraction over the sparse steps and all layers, dense layers 0).",
        f"- calls: {len(report.get('calls', []))}; jax {report['jax_version']}",
    ]  # fmt: skip
    if not report.get("complete", False):
        lines.append(f"- **incomplete**: not run yet: {', '.join(report.get('missing_variants', [])) or '–'}")
    if report.get("dense_mismatch"):
        lines.append(f"- **warning**: the dense reference differed between calls ({report['dense_mismatch']})")
    return lines + [""]


def _comparison_sections(report: dict, by: dict, cols: list[str]) -> list[str]:
    """The tile, baseline, oracle and refresh comparisons, one variant table each (where run)."""
    meta = report["setup"]

    def section(title: str, rows: list[dict | None]) -> list[str]:
        rows = [r for r in rows if r]
        return [f"## {title}", ""] + variant_table(rows) + [""] if rows else []

    tiles = sorted(meta["tiles"])
    tile_rows = []
    for sched in [None] + [d for d in meta["tile_densities"] if d is not None]:
        label = "default" if sched is None else f"d={sched:g}"
        for t in tiles:
            tile_rows.append(by.get(f"hilbert3d/{label}" if t == meta["tile_size"] else f"hilbert3d/tile{t}/{label}"))
    lines = section(f"Scoring: tile size (hilbert3d; tile {meta['tile_size']} is DFS, tile {meta['block_size']} = block "
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
    return lines


def report_markdown(report: dict) -> str:
    """The results of one model (the benchmark's report: ``setup``, ``variants``, ``claims``, ...)
    as Markdown tables, with the paper's claims checked."""
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    orders = meta["orders"]
    cols = [f"d={d:g}" for d in meta["densities"]] + ["default"]

    def grid(title: str, cell: Callable[[dict | None], str]) -> list[str]:
        return [f"### {title}", ""] + order_grid_table(by, orders, cols, cell) + [""]

    lines = _setup_lines(report)
    lines += ["## Token orders (DFS scoring)", ""]
    lines += grid("PSNR (dB) vs dense, mean ± 95% CI", lambda r: fmt_with_ci(r, "psnr"))
    lines += grid("SSIM vs dense, mean ± 95% CI", lambda r: fmt_with_ci(r, "ssim", ".3f"))
    lines += grid("Recall", lambda r: fmt_value(r and r.get("recall_mean"), ".4f"))
    lines += grid("Attention error", lambda r: fmt_value(r and r.get("attn_error_mean"), ".4f"))
    lines += _comparison_sections(report, by, cols)
    lines += _attention_tables(report, by)
    lines += ["## Claims of the paper, checked on this model", ""]
    lines += [f"- {c['claim']}: **{c['verdict']}** ({c['detail']})" for c in report["claims"]]
    lines += ["", "## All variants", ""] + variant_table(report["variants"]) + [""]
    return "\n".join(lines)


def _concentration_tables(meta: dict, by: dict, dense: dict) -> list[str]:
    """The dense attention's concentration per layer and order, and its mass by distance class."""
    layers = list(range(meta["num_layers"]))
    rows = [["raster (dense run, all steps)", *(fmt_value(x, ".3f") for x in dense["top_mass_per_layer"])]]
    for o in meta["orders"]:
        r = by.get(f"{o}/default")
        if r:
            rows.append([f"{o} (dense steps)", *(fmt_value(x, ".3f") for x in r["top_mass_dense_steps_per_layer"])])
    mass = nanmean(as_matrix(dense["mass_by_class_per_layer"]), axis=0)
    return ([f"Concentration: the dense softmax mass of each query row's top 20% key blocks "
             f"({max(1, int(0.2 * meta['num_key_blocks']))} of {meta['num_key_blocks']}), mean over rows, heads and "
             "the measured steps; the dense run is in raster order, the order rows use the dense steps of each "
             "order's default-schedule run (identical dense trajectory, blocks of that order).", ""]
            + markdown_table(["blocks of", *(f"layer {i}" for i in layers)], rows)
            + ["", "Where the dense mass lies, by distance class of the key (dense run, mean over layers):", ""]
            + markdown_table(DISTANCE_CLASS_NAMES, [[fmt_value(x, ".3f") for x in mass]]) + [""])  # fmt: skip


def _attention_tables(report: dict, by: dict) -> list[str]:
    """Per-layer concentration, recall per layer and order, per-head recall, missed mass by distance."""
    meta = report["setup"]
    sparse_layers = meta["sparse_layers"]
    lines = ["## The model's attention", ""]
    dense = by.get("dense")
    if dense:
        lines += _concentration_tables(meta, by, dense)
    density = next((f"d={d:g}" for d in meta["densities"] if abs(d - 0.2) < 1e-9), None) or "default"
    rows = [(o, by.get(f"{o}/{density}")) for o in meta["orders"]] + [(f"random ({o})", by.get(f"random-{o}/{density}"))
                                                                         for o in meta["random_orders"]]  # fmt: skip
    rows += [(f"oracle ({o})", by.get(f"oracle-{o}/{density}")) for o in meta.get("oracle_orders", [])]
    rows = [(o, r) for o, r in rows if r and r.get("recall_per_layer")]
    if rows:
        recall = [[o, *(fmt_value(r["recall_per_layer"][i], ".3f") for i in sparse_layers)] for o, r in rows]
        missed = [[o, *(fmt_value(x, ".4f") for x in nanmean(as_matrix(r["missed_by_class_per_layer"])[sparse_layers], axis=0))]
                  for o, r in rows]  # fmt: skip
        lines += [f"Recall per layer at {density} (mean over sparse steps):", ""]
        lines += markdown_table(["order", *(f"layer {i}" for i in sparse_layers)], recall)
        lines += ["", f"Missed mass by distance class at {density} (mean over sparse steps and sparse layers; the "
                  "columns sum to 1 − recall):", ""]  # fmt: skip
        lines += markdown_table(["order", *DISTANCE_CLASS_NAMES], missed) + [""]
    r = by.get("hilbert3d/default")
    if r and r.get("recall_per_layer_head"):
        heads = len(r["recall_per_layer_head"][0])
        lines += ["Recall per layer and head, hilbert3d/default (mean over sparse steps):", ""]
        lines += markdown_table(["layer", *(f"h{h}" for h in range(heads))],
                                [[i, *(fmt_value(x, ".3f") for x in r["recall_per_layer_head"][i])] for i in sparse_layers])  # fmt: skip
        lines.append("")
    return lines
