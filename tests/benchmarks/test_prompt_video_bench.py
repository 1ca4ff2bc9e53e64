"""benchmarks.prompt_video_bench on CPU: its JAX stages at tiny sizes, and the stage names."""

from __future__ import annotations

import math

import pytest

from benchmarks import prompt_video_bench as bench


def _args(tmp_path, *extra: str):
    return bench.parse_args(["--smoke", "--repeats", "2", "--video-dir", str(tmp_path), *extra])


@pytest.mark.parametrize("spec", ["umt5:jax", "vae:jax:480p:tiled", "vae:jax:720p:untiled"])
def test_component_stages_time_their_call(tmp_path, spec):
    result = bench.run_stage(_args(tmp_path), spec)
    assert result["device"] == "cpu"
    assert len(result["times_s"]) >= 2 and result["median_s"] > 0 and result["first_s"] > 0
    if spec.startswith("vae"):
        h, w = bench.SMOKE_SIZES[spec.split(":")[2]]
        assert result["shape"] == [1, 3, bench.SMOKE_FRAMES, h, w]
    else:
        assert result["finite"]


def test_e2e_stage_splits_the_run_and_writes_the_video(tmp_path):
    result = bench.run_stage(_args(tmp_path), "e2e:tiny:480p:2")
    parts = ("text_s", "steps_s", "decode_s", "write_s")
    assert all(result[p] > 0 for p in parts) and result["compile_s"] > 0
    assert math.isclose(result["wall_s"], sum(result[p] for p in parts))
    assert math.isclose(result["wall_over_steps"], result["wall_s"] / result["steps_s"])
    h, w = bench.SMOKE_SIZES["480p"]
    assert result["frames_shape"] == [1, bench.SMOKE_FRAMES, h, w, 3]
    assert result["file_bytes"] > 0 and any(tmp_path.iterdir())


@pytest.mark.parametrize("spec", ["umt5", "umt5:tf", "vae:jax:1080p:tiled", "vae:jax:480p:maybe", "e2e:tiny:480p:x"])
def test_unknown_stages_are_named(tmp_path, spec):
    with pytest.raises(ValueError, match="unknown stage"):
        bench.run_stage(_args(tmp_path), spec)


def test_report_lists_failed_stages_with_dashes():
    results = {"run": {"device": "cpu"}, "stages": {
        "umt5:torch": {"status": "failed (exit 1)"},
        "e2e:tiny:480p:2": {"status": "timeout after 5 s"},
    }}  # fmt: skip
    text = "\n".join(bench.report(results))
    assert "| umt5:torch | failed (exit 1) | — | — | — |" in text
    assert "| e2e:tiny:480p:2 | timeout after 5 s | — |" in text
