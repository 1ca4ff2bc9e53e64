"""Harness models side by side (models/evaluation/quality_compare.py): the committed page is
regenerated from the committed results of both models, and the fidelity budget adds up."""

from __future__ import annotations

import json

import pytest

from models.evaluation.quality_compare import compare_markdown, fidelity_budget
from helpers import ROOT

RESULTS = ROOT / "benchmarks" / "results"


def _reports() -> dict[str, dict]:
    return {m: json.loads((RESULTS / f"quality_{m}_nvidia_h200.json").read_text()) for m in ("v2", "v1")}


def test_committed_comparison_is_regenerated_from_the_committed_json():
    assert compare_markdown(_reports()) == (RESULTS / "quality_compare_nvidia_h200.md").read_text()


def test_fidelity_budget_from_the_stored_means():
    report = _reports()["v2"]
    by = {r["name"]: r for r in report["variants"]}
    budget = fidelity_budget(report)
    assert budget["dfs"] == by["hilbert3d/default"]["psnr_mean"]
    assert budget["oracle"] == by["oracle-hilbert3d/default"]["psnr_mean"]
    assert budget["every_step"] == by["hilbert3d/default/refresh-every-step"]["psnr_mean"]
    assert budget["scoring_cost"] == pytest.approx(budget["oracle"] - budget["dfs"])
    assert budget["caching_cost"] == pytest.approx(budget["every_step"] - budget["dfs"])
    at_02 = fidelity_budget(report, "d=0.2")
    assert at_02["dfs"] == by["hilbert3d/d=0.2"]["psnr_mean"] and at_02["every_step"] == by["hilbert3d/d=0.2/refresh-every-step"]["psnr_mean"]
    without = {**report, "variants": [r for r in report["variants"] if not r["name"].startswith("oracle-")]}
    assert fidelity_budget(without)["oracle"] is None and fidelity_budget(without)["scoring_cost"] is None
    identical = {**report, "variants": [{**r, "psnr_mean": "inf"} if r["name"] == "hilbert3d/default" else r
                                        for r in report["variants"]]}  # fmt: skip
    assert fidelity_budget(identical)["dfs"] is None and fidelity_budget(identical)["caching_cost"] is None


def test_a_model_without_a_claim_shows_a_dash():
    reports = _reports()
    reports["v1"] = {**reports["v1"], "claims": reports["v1"]["claims"][1:], "complete": False, "missing_variants": ["x"]}
    text = compare_markdown(reports)
    first = reports["v2"]["claims"][0]
    assert f"| {first['claim']} | **{first['verdict']}** ({first['detail']}) | – |" in text
    assert "; **incomplete**: 1 variants not run" in text
