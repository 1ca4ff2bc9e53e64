"""The paper's claims checked on stored quality results (models/evaluation/quality_claims.py)."""

from __future__ import annotations

import json

import pytest

from models.evaluation.quality_claims import check_claims, verdict
from helpers import ROOT

RESULTS = ROOT / "benchmarks" / "results"


def test_verdict_rule():
    assert verdict([{"mean": 0.1, "ci95": 0.5}, {"mean": 0.0, "ci95": None}]) == "holds"
    assert verdict([{"mean": 0.1, "ci95": 0.5}, {"mean": -0.3, "ci95": 0.5}]) == "inconclusive"  # within its interval
    assert verdict([{"mean": 0.1, "ci95": 0.5}, {"mean": -0.6, "ci95": 0.5}]) == "does not hold"
    assert verdict([{"mean": -0.2, "ci95": None}]) == "does not hold"  # no interval: the mean decides
    assert verdict([{"mean": -0.9, "ci95": 0.1}], margin=1.0) == "holds"
    assert verdict([{"mean": -1.2, "ci95": 0.5}], margin=1.0) == "inconclusive"
    assert verdict([{"mean": -1.6, "ci95": 0.5}], margin=1.0) == "does not hold"


@pytest.mark.parametrize("model", ["v2", "v1"])
def test_stored_claims_are_recomputed_from_the_stored_records(model):
    report = json.loads((RESULTS / f"quality_{model}_nvidia_h200.json").read_text())
    claims = check_claims(report)
    assert claims == report["claims"] and len(claims) >= 8
    assert {c["verdict"] for c in claims} <= {"holds", "does not hold", "inconclusive"}
    assert all(c["holds"] == (c["verdict"] == "holds") for c in claims)


def test_claims_of_missing_variants_are_left_out():
    report = json.loads((RESULTS / "quality_v2_nvidia_h200.json").read_text())
    kept = [r for r in report["variants"] if not r["name"].startswith(("window-", "oracle-"))]
    claims = check_claims({**report, "variants": kept})
    texts = [c["claim"] for c in claims]
    assert not any("static window" in t or "oracle" in t for t in texts)
    assert len(claims) == len(report["claims"]) - 2
    assert [c for c in claims] == [c for c in report["claims"] if c["claim"] in texts]
