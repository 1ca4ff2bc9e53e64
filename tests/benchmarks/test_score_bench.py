"""``python -m benchmarks.score_bench`` at its tiny CPU shape (the kernel in the Pallas interpreter)."""

from __future__ import annotations

import json

from benchmarks import score_bench


def test_score_bench_smoke_on_cpu(tmp_path):
    """Every stage runs and the JSON says so: timings, synthetic and small-DiT agreement."""
    out = tmp_path / "score.json"
    argv = ["--shapes", "tiny", "--precisions", "bf16,tf32", "--tilings", "q128dot", "--warmup", "0",
            "--repeats", "1", "--target-s", "0.001", "--harness-steps", "1", "--harness-samples", "1",
            "--harness-clip", "4,16,16", "--out", str(out)]  # fmt: skip
    assert score_bench.main(argv) == 0
    data = json.loads(out.read_text())
    # The command names the output by its file name alone: results carry no machine paths.
    command = "python -m benchmarks.score_bench " + " ".join(argv[:-1] + ["score.json"])
    assert data["meta"]["device"] == "cpu" and data["meta"]["command"] == command
    variants = {r["variant"]: r for r in data["records"]}
    assert set(variants) >= {"xla", "jnp", "triton/bf16", "triton/tf32", "triton/bf16/q128dot", "kernel only/bf16"}
    assert all("error" not in r and r["ms"] > 0 for r in data["records"]), data["records"]
    for precision in ("bf16", "tf32"):
        assert min(data["agreement"]["tiny"][precision].values()) >= 0.999
    harness = data["harness_agreement"]
    assert harness["grid"] == [4, 8, 8] and harness["decisions_per_density"] > 0
    assert all(harness[f"bf16@{d}"]["min"] >= 0.99 for d in (0.3, 0.2, 0.1)), harness
