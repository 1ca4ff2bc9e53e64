"""Harness models side by side: the quality benchmark's stored results of several models in one Markdown page.

:func:`compare_markdown` puts the reports (the results files' JSON, one per model) next to each
other: the claims' verdicts, PSNR per order and density, the default schedule's fidelity budget
(:func:`fidelity_budget`) and the dense attention's concentration.
"""

from __future__ import annotations

import math

from models.evaluation.quality_markdown import fmt_value, fmt_with_ci, order_grid_table
from models.evaluation.quality_summary import as_float
from models.evaluation.tables import markdown_table

__all__ = ["compare_markdown", "fidelity_budget"]


def fidelity_budget(report: dict, schedule: str = "default") -> dict[str, float | None]:
    """Where the PSNR of hilbert3d at ``schedule`` goes, from the stored mean PSNRs (dB):
    ``oracle`` (what density and caching leave with a perfect choice of blocks), ``dfs``,
    ``scoring_cost`` = oracle − DFS (what the scoring's estimate costs), ``caching_cost`` =
    every-step refresh − cached (what reusing the mask costs); ``None`` where a variant is
    missing or a PSNR infinite."""
    by = {r["name"]: r for r in report["variants"]}
    orders = report["setup"].get("oracle_orders") or ["hilbert3d"]

    def psnr(name: str) -> float | None:
        value = as_float((by.get(name) or {}).get("psnr_mean"))  # NaN when missing, "inf" when identical
        return value if math.isfinite(value) else None

    dfs, oracle = psnr(f"hilbert3d/{schedule}"), psnr(f"oracle-{orders[0]}/{schedule}")
    every = psnr(f"hilbert3d/{schedule}/refresh-every-step")
    return {"dfs": dfs, "oracle": oracle, "every_step": every,
            "scoring_cost": None if dfs is None or oracle is None else oracle - dfs,
            "caching_cost": None if dfs is None or every is None else every - dfs}  # fmt: skip


def _claims_table(reports: dict[str, dict]) -> list[str]:
    """One row per claim (in the order first seen), one column of verdicts per model."""
    labels = list(reports)
    verdicts: dict[str, dict[str, str]] = {}  # claim -> label -> verdict; insertion order = row order
    for label, rep in reports.items():
        for c in rep.get("claims", []):
            # the same text on both models (same schedule, steps and densities)
            verdicts.setdefault(c["claim"], {})[label] = f"**{c['verdict']}** ({c['detail']})"
    return markdown_table(["claim", *labels], [[k, *(v.get(lb, "–") for lb in labels)] for k, v in verdicts.items()])


def compare_markdown(reports: dict[str, dict]) -> str:
    """Markdown: the models of ``reports`` (label → the benchmark's report, the first leads) side
    by side: the claims' verdicts, PSNR per order and density, the default schedule's fidelity
    budget and the attention's concentration."""
    lines = ["# DFSAttn fidelity on the harness models, side by side", ""]
    for label, rep in reports.items():
        meta = rep["setup"]
        lines.append(f"- **{label}**: {meta['model']}, token grid {meta['token_grid']} = {meta['tokens']} tokens "
                     f"({meta['num_key_blocks']} blocks of {meta['block_size']}), {meta['num_layers']} layers × "
                     f"{meta['num_heads']} heads; {meta['samples']} samples × {meta['steps']} steps on {rep['device']}"
                     + ("" if rep.get("complete") else f"; **incomplete**: {len(rep.get('missing_variants', []))} variants not run"))  # fmt: skip
    lines += ["", "## The paper's claims", ""] + _claims_table(reports)
    lines += ["", "## PSNR vs dense (dB, mean ± 95% CI), DFS scoring", ""]
    for label, rep in reports.items():
        meta = rep["setup"]
        by = {r["name"]: r for r in rep["variants"]}
        cols = [f"d={d:g}" for d in meta["densities"]] + ["default"]
        lines += [f"**{label}**", ""] + order_grid_table(by, meta["orders"], cols, lambda r: fmt_with_ci(r, "psnr"))
        lines.append("")
    lines += ["## Where the default schedule's PSNR goes (hilbert3d)", "",
              "The oracle keeps the recall-optimal blocks (top-k of the exact dense block mass) and caches them like "
              "DFS: its PSNR is what the density and the caching allow; oracle − DFS is what the scoring's estimate "
              "costs; every-step refresh − cached is what reusing the mask costs.", ""]  # fmt: skip
    budgets = {label: fidelity_budget(rep) for label, rep in reports.items()}
    lines += markdown_table(["model", "DFS", "oracle", "every-step refresh", "scoring cost", "caching cost"],
                            [[label, fmt_value(b["dfs"]), fmt_value(b["oracle"]), fmt_value(b["every_step"]),
                              fmt_value(b["scoring_cost"], "+.2f"), fmt_value(b["caching_cost"], "+.2f")]
                             for label, b in budgets.items()])  # fmt: skip
    lines += ["", "## Concentration of the dense attention (mass of each row's top 20% key blocks, raster blocks)", ""]
    rows = []
    for label, rep in reports.items():
        dense = next((r for r in rep["variants"] if r["name"] == "dense"), None)
        mass = dense.get("top_mass_per_layer") if dense else None
        rows.append([label, ", ".join(fmt_value(x, ".3f") for x in mass) if mass else "–"])
    return "\n".join(lines + markdown_table(["model", "per layer"], rows)) + "\n"
