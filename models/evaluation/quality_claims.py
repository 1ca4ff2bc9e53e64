"""The paper's claims and the quality benchmark's targets, checked on one model's stored results.

Each claim compares variants by their per-sample PSNRs against the dense videos (the same noise
for every variant, so the differences are paired): the claim **holds** when every mean difference
is at least ``-margin`` dB, **does not hold** when one is below by more than its 95 % interval,
and is **inconclusive** otherwise. Claims whose variants did not run are left out.
"""

from __future__ import annotations

from models.evaluation.fidelity import paired_spread

__all__ = ["check_claims", "verdict"]


def _paired(by: dict, a: str, b: str) -> dict | None:
    """Per-sample PSNR difference ``a - b`` (dB): its spread, or ``None`` when either is missing or infinite."""
    ra, rb = by.get(a), by.get(b)
    return None if ra is None or rb is None else paired_spread(ra["psnr"], rb["psnr"])


def _diff_text(d: dict) -> str:
    ci = "" if d["ci95"] is None else f" ± {d['ci95']:.2f}"
    return f"{d['mean']:+.2f}{ci} dB"


def verdict(diffs: list[dict], margin: float = 0.0) -> str:
    """``holds`` when every mean difference (``{"mean", "ci95"}`` in dB) is ≥ ``-margin``;
    ``does not hold`` when one is below by more than its 95% interval; else ``inconclusive``."""
    if all(d["mean"] >= -margin for d in diffs):
        return "holds"
    if any(d["mean"] + (d["ci95"] or 0.0) < -margin for d in diffs):
        return "does not hold"
    return "inconclusive"


def _threshold_claims(by: dict, meta: dict) -> list[dict]:
    """The default schedule's PSNR target and the dense attention's concentration (no pairing)."""
    claims = []
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


def check_claims(report: dict) -> list[dict]:
    """The paper's claims and the issue's targets, on the measured per-sample PSNRs (paired
    differences with their 95% intervals).

    Args:
      report: the quality benchmark's report (``setup`` and the ``variants`` records).

    Returns:
      ``[{"claim", "verdict", "holds", "detail"}]`` in a fixed order, for the claims whose
      variants are present.
    """
    by = {r["name"]: r for r in report["variants"]}
    meta = report["setup"]
    claims = []

    def add(claim: str, pairs: list[tuple[str, str, str]], margin: float = 0.0):
        diffs = [(label, _paired(by, a, b)) for label, a, b in pairs]
        diffs = [(label, d) for label, d in diffs if d is not None]
        if diffs:
            outcome = verdict([d for _, d in diffs], margin)
            claims.append(dict(claim=claim, verdict=outcome, holds=outcome == "holds",
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
    return claims + _threshold_claims(by, meta)
