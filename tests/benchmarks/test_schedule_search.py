"""Named schedule presets (API, sampler, CLI), the composed Wan2.1 speed model and the schedule search.

The preset "fast" is the winner of benchmarks/schedule_search.py on the GPU: a test checks that it
is the schedule recorded as the winner in the committed search results.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import models.generate as generate
from benchmarks import schedule_search as search
from dfsattn_jax.schedule import SCHEDULE_PRESETS, DFSConfig, SchedulePreset, default_schedule, get_schedule_preset, plan_schedule
from models.evaluation.speed import StepTimes, compose, compose_schedule
from models.sampling import Sampler
from models.common.processor import make_backend
from models.wan.config import get_config
from models.wan.transformer import WanTransformer3DModel
from helpers import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "wan_tiny"
#: The measured Wan2.1-1.3B per-step times on the H200 (benchmarks/e2e_bench.py), the search's default.
E2E = ROOT / "benchmarks" / "results" / "e2e_nvidia_h200.json"


# ---------------------------------------------------------------------------------------------
# Presets


def test_presets_registry_and_lookup():
    assert {"wan2.1", "hunyuan-video", "fast"} <= set(SCHEDULE_PRESETS)
    assert get_schedule_preset("wan2.1") == DFSConfig()  # the default
    # The reference's HunyuanVideo schedule: Wan2.1's steps and densities, no always-dense layer.
    assert get_schedule_preset("hunyuan-video") == DFSConfig(dense_layers=())
    for name, preset in SCHEDULE_PRESETS.items():
        assert isinstance(preset, SchedulePreset) and preset.name == name and preset.description
        assert get_schedule_preset(name) is preset.config
        assert get_schedule_preset(name, 20) == default_schedule(20, preset.config)
    with pytest.raises(ValueError, match=r"schedule preset must be one of \['fast', 'hunyuan-video', 'wan2.1'\], got 'fastest'"):
        get_schedule_preset("fastest")


def test_fast_preset_is_the_recorded_search_winner():
    """"fast" is the schedule the H200 search chose (benchmarks/results/schedule_search_v2_nvidia_h200.json):
    within 0.2 dB of the default on both seed sets, and faster than the default composed."""
    path = ROOT / "benchmarks/results/schedule_search_v2_nvidia_h200.json"
    state = json.loads(path.read_text())
    winner = state["winner"]
    chosen = state["configs"][winner]
    assert get_schedule_preset("fast") == DFSConfig(**{**chosen, "dense_layers": tuple(chosen["dense_layers"])})
    tolerance = state["setup"]["tolerance"]
    for set_name in ("choose", "report"):
        assert state[set_name][winner]["psnr_mean"] >= state[set_name]["default"]["psnr_mean"] - tolerance
    assert state["speed"][winner]["speedup"] > state["speed"]["default"]["speedup"]
    assert compose(get_schedule_preset("fast"), StepTimes.from_e2e(E2E))["speedup"] == pytest.approx(
        state["speed"][winner]["speedup"])


@pytest.mark.parametrize("name", sorted(SCHEDULE_PRESETS))
def test_preset_plugs_into_the_sampler(name):
    cfg = get_config("tiny")
    model = WanTransformer3DModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    preset = dataclasses.replace(get_schedule_preset(name, 10), block_size=32, tile_size=8)
    sampler = Sampler(model, make_backend("dfs", preset), progress=False)
    noise = jax.random.normal(jax.random.key(1), (1, cfg.in_channels, 2, 16, 16), jnp.float32)  # 2x8x8 = 128 tokens
    text = jax.random.normal(jax.random.key(2), (1, 4, cfg.text_dim), jnp.float32)
    result = sampler(noise, text, 0.0 * text, num_steps=10, guidance_scale=2.0)
    plan = plan_schedule(preset, 10, 4)
    assert result.refresh_steps == plan.refresh_steps and np.isfinite(np.asarray(result.latents)).all()
    assert result.sparsity > 0


@pytest.fixture
def embeds(tmp_path) -> pathlib.Path:
    text = load_file(FIXTURE / "io.safetensors")["encoder_hidden_states"]
    path = tmp_path / "prompt.safetensors"
    save_file({"cond": text[0], "uncond": text[1]}, str(path))
    return path


def _cli(embeds, tmp_path, *extra: str) -> list[str]:
    return ["--checkpoint", str(FIXTURE), "--prompt-embeds", str(embeds), "--out", str(tmp_path / "lat.safetensors"),
            "--frames", "9", "--height", "96", "--width", "128", "--dtype", "float32", *extra]  # fmt: skip


def test_cli_schedule_option_runs_the_preset(embeds, tmp_path, capsys):
    from models.io import load_latents

    preset = get_schedule_preset("fast")
    assert generate.main(_cli(embeds, tmp_path, "--schedule", "fast", "--steps", "12")) == 0
    out = capsys.readouterr().out
    lines, _ = generate.describe_plan(plan_schedule(preset, 12, 2), preset, 2, 144)
    for line in lines:
        assert line in out
    _, meta = load_latents(tmp_path / "lat.safetensors")
    assert meta["schedule"] == "fast" and int(meta["dense_steps"]) == preset.dense_steps
    assert float(meta["density"]) == preset.density and meta["dense_layers"] == ",".join(map(str, preset.dense_layers))


def test_cli_schedule_refuses_schedule_options(embeds, tmp_path, capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights must not be read")

    monkeypatch.setattr(generate, "load_wan", no_weights)
    assert generate.main(_cli(embeds, tmp_path, "--schedule", "fast", "--density", "0.2", "--dense-steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--schedule fast sets the schedule; drop --density, --dense-steps" in err[0]
    assert generate.main(_cli(embeds, tmp_path, "--schedule", "fastest")) == 2
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The speed model


def test_composition_reproduces_the_e2e_benchmark():
    results = json.loads(E2E.read_text())
    times = StepTimes.from_e2e(results)
    default = compose(DFSConfig(), times)
    # At the measured densities the composition is e2e_bench's own, step for step.
    assert default["dfs_s"] == pytest.approx(results["schedule"]["composed_dfs_s"], rel=1e-12)
    assert default["speedup"] == pytest.approx(results["schedule"]["composed_speedup"], rel=1e-12)
    assert default["sparsity"] == pytest.approx(results["schedule"]["reported_sparsity"], rel=1e-12)
    per = results["per_step_s"]
    # The one composition: compose_schedule (e2e_bench's and hunyuan_bench's, times at the plan's
    # densities) gives the same per-step times as the interpolated model at the measured points.
    plan = plan_schedule(DFSConfig(), 50, times.num_key_blocks)
    measured = compose_schedule(plan, times.dfs_dense, {round(float(d), 6): t for d, t in per["sparse"].items()},
                                {round(float(d), 6): t for d, t in per["refresh"].items()})  # fmt: skip
    assert measured == pytest.approx(default["steps_s"], rel=1e-12)
    assert sum(measured) == pytest.approx(results["schedule"]["composed_dfs_s"], rel=1e-12)
    for density, kept in results["kept_blocks"].items():
        assert times.step(kept, refresh=False, dense_layers=1) == pytest.approx(per["sparse"][density], rel=1e-12)
        assert times.step(kept, refresh=True, dense_layers=1) == pytest.approx(per["refresh"][density], rel=1e-12)


def test_interpolation_extrapolation_and_dense_layers():
    times = StepTimes(dense=1.0, dfs_dense=1.0, sparse={10: 0.5, 20: 0.6}, refresh={10: 0.55, 20: 0.65},
                      num_key_blocks=100, num_layers=5, measured_dense_layers=1)  # fmt: skip
    assert times.step(15, refresh=False, dense_layers=1) == pytest.approx(0.55)  # linear between 10 and 20
    assert times.step(60, refresh=False, dense_layers=1) == pytest.approx(0.6 + 40 / 80 * 0.4)  # towards the dense step
    assert times.step(5, refresh=False, dense_layers=1) == pytest.approx(0.45)  # extrapolated along 10-20
    assert times.step(100, refresh=True, dense_layers=1) == pytest.approx(1.05)  # dense step + refresh overhead
    # 4 sparse layers measured: each saves (1.0 - 0.5) / 4 at 10 blocks
    assert times.step(10, refresh=False, dense_layers=0) == pytest.approx(0.5 - 0.125)
    assert times.step(10, refresh=False, dense_layers=3) == pytest.approx(0.5 + 0.25)
    config = DFSConfig(density=0.1, density_decrement=0.0, dense_steps=2, refresh_interval=4)
    composed = compose(config, times, num_steps=6)
    assert composed["steps_s"] == pytest.approx([1.0, 1.0, 0.55, 0.5, 0.5, 0.5])  # refresh at 2, reuse after
    plan = plan_schedule(config, 6, 100)
    assert compose_schedule(plan, 2.0, {0.1: 0.3}, {0.1: 0.4}) == [2.0, 2.0, 0.4, 0.3, 0.3, 0.3]
    assert composed["speedup"] == pytest.approx(6.0 / 4.05)
    with pytest.raises(ValueError, match="same kept-block counts"):
        StepTimes(1.0, 1.0, {10: 0.5}, {20: 0.6}, 100, 5, 1)
    with pytest.raises(ValueError, match="kept"):
        times.step(0, refresh=False, dense_layers=1)


# ---------------------------------------------------------------------------------------------
# The search


def test_search_helpers():
    assert search.E2E_RESULTS == E2E and search.parse_args([]).e2e == str(E2E)
    config = DFSConfig()
    near = search.neighbours(config, ((0,), ()))
    names = {search.candidate_name(c) for c in near}
    assert search.candidate_name(config) == "dense12-d0.3-dec0.1-every12-layers0"
    assert {"dense10-d0.3-dec0.1-every12-layers0", "dense14-d0.3-dec0.1-every12-layers0",
            "dense12-d0.25-dec0.1-every12-layers0", "dense12-d0.3-dec0.075-every12-layers0",
            "dense12-d0.3-dec0.1-every10-layers0", "dense12-d0.3-dec0.1-every12-layersnone"} <= names  # fmt: skip
    assert all(sum(a != b for a, b in zip(dataclasses.astuple(c), dataclasses.astuple(config))) == 1 for c in near)
    speed = lambda c: compose(c, StepTimes.from_e2e(E2E))["speedup"]  # noqa: E731
    swaps = search.trades(config, ((0,), ()), speed)
    assert "dense10-d0.35-dec0.1-every12-layers0" in {search.candidate_name(c) for c in swaps}
    for c in swaps:  # two axes changed: one step faster than the default, one step not faster
        changed = [f.name for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(config, f.name)]
        assert len(changed) == 2
        alone = [speed(dataclasses.replace(config, **{f: getattr(c, f)})) > speed(config) for f in changed]
        assert sorted(alone) == [False, True]
    points = [("a", 30.0, 1.5), ("b", 29.0, 2.0), ("c", 28.0, 1.9), ("d", 31.0, 1.2), ("e", 29.0, 1.8)]
    assert search.pareto_front(points) == ["d", "a", "b"]
    assert search._layers("0;none;0,3") == ((0,), (), (0, 3))


def test_search_quick_run_chooses_and_reports(tmp_path):
    args = ["--quick", "--samples", "1", "--steps", "4", "--max-candidates", "4", "--report-front", "1",
            "--out-dir", str(tmp_path)]  # fmt: skip
    state = search.main(args)
    assert set(state["choose"]) >= {"default", "preset:fast"} and len(state["choose"]) <= 4
    winner = state["winner"]
    base = state["choose"]["default"]["psnr_mean"]
    qualifying = [n for n, r in state["choose"].items() if r["psnr_mean"] >= base - 0.2]
    assert winner == max(qualifying, key=lambda n: state["speed"][n]["speedup"])
    assert {"default", winner} <= set(state["report"])
    for name, speed in state["speed"].items():
        cfg = state["configs"][name]
        expected = compose(DFSConfig(**{**cfg, "dense_layers": tuple(cfg["dense_layers"])}), StepTimes.from_e2e(E2E))
        assert speed["speedup"] == pytest.approx(expected["speedup"])
    files = [tmp_path / f"schedule_search_smoke_cpu.{ext}" for ext in ("json", "md", "png")]
    assert all(f.is_file() for f in files) and "Preset line" in files[1].read_text()
    again = search.main(args)  # resumes: nothing new to evaluate
    assert again["choose"] == state["choose"] and again["report"] == state["report"]


def test_committed_search_markdown_is_regenerated_from_the_committed_json():
    results = ROOT / "benchmarks" / "results"
    state = json.loads((results / "schedule_search_v2_nvidia_h200.json").read_text())
    assert search.markdown(state) == (results / "schedule_search_v2_nvidia_h200.md").read_text()
