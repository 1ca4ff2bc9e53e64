"""The quality results of one model as Markdown (models/evaluation/quality_markdown.py): the committed
pages are regenerated from the committed results, byte for byte."""

from __future__ import annotations

import json

import pytest

from models.evaluation.quality_markdown import fmt_value, fmt_with_ci, report_markdown
from helpers import ROOT

RESULTS = ROOT / "benchmarks" / "results"


@pytest.mark.parametrize("model", ["v2", "v1"])
def test_committed_markdown_is_regenerated_from_the_committed_json(model):
    report = json.loads((RESULTS / f"quality_{model}_nvidia_h200.json").read_text())
    assert report_markdown(report) == (RESULTS / f"quality_{model}_nvidia_h200.md").read_text()


def test_incomplete_and_mismatched_runs_are_flagged():
    report = json.loads((RESULTS / "quality_v2_nvidia_h200.json").read_text())
    kept = [r for r in report["variants"] if not r["name"].startswith("random-")]
    text = report_markdown({**report, "variants": kept, "complete": False, "missing_variants": ["random-hilbert3d/d=0.2"],
                            "dense_mismatch": "call 2: dense latents differ"})  # fmt: skip
    assert "- **incomplete**: not run yet: random-hilbert3d/d=0.2\n" in text
    assert "- **warning**: the dense reference differed between calls (call 2: dense latents differ)\n" in text
    assert "| random-hilbert3d/" not in text and "| hilbert3d/default | " in text
    tables, current = [], []
    for line in text.splitlines() + [""]:  # every row of a table has as many cells as its header
        if line.startswith("|"):
            current.append(line.count("|"))
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= 10 and all(len(set(t)) == 1 and len(t) >= 3 for t in tables)


def test_value_formats():
    assert fmt_value(None) == "–" and fmt_value(None, missing="n/a") == "n/a"
    assert fmt_value("inf") == "∞" and fmt_value(float("inf")) == "∞" and fmt_value("-inf") == "-inf"
    assert fmt_value(1.23456, ".3f") == "1.235" and fmt_value(0.5, "+.2f") == "+0.50"
    record = {"psnr_mean": 31.234, "psnr_ci95": 0.456, "ssim_mean": 0.91, "ssim_ci95": None}
    assert fmt_with_ci(record, "psnr") == "31.23 ± 0.46"
    assert fmt_with_ci(record, "ssim", ".3f") == "0.910"
    assert fmt_with_ci(None, "psnr") == "–" and fmt_with_ci({"psnr_mean": None}, "psnr") == "–"
    assert fmt_with_ci({"psnr_mean": "inf", "psnr_ci95": None}, "psnr") == "∞"
