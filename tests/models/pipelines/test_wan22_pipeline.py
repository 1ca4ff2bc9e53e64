"""models.pipelines.WanPipeline on a Wan2.2 A14B-style repository (two experts) against diffusers'
``WanPipeline`` with ``transformer_2`` and ``boundary_ratio`` (the fixture
``tests/fixtures/wan22_pipeline_tiny``, made by ``make_wan22_pipeline_fixture.py`` with diffusers
0.42.1: ``transformer_2/`` and ``model_index.json`` added to ``wan_pipeline_tiny/pipeline``).

Six UniPC steps at shift 3 (timesteps 999, 937, 857, 750, 600, 376) with boundary_ratio 0.857:
the boundary falls on a timestep, which ``t >= boundary`` gives to the high-noise expert, so each
expert runs three steps, with guidance 5.0 then 2.5. Tolerance as the Wan2.1 pipeline test:
float32 end to end, observed ~2e-6 absolute on the frames; the bound is 1e-4."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import FIXTURES, assemble_wan22_repository, rel_l2, watch_tensor_reads
from safetensors.numpy import load_file

from models.pipelines import WanPipeline, read_boundary_ratio
from models.wan.config import get_config

FIXTURE = FIXTURES / "wan22_pipeline_tiny"
BASE = FIXTURES / "wan_pipeline_tiny" / "pipeline"
METADATA = json.loads((FIXTURE / "metadata.json").read_text())
CALL = METADATA["call"]


def assemble(folder):
    """The whole two-expert repository, as the fixture script assembles it."""
    return assemble_wan22_repository(folder, BASE, FIXTURE)


def _edit_index(folder, **changes) -> None:
    file = folder / "model_index.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return assemble(tmp_path_factory.mktemp("wan22") / "pipeline")


@pytest.fixture(scope="module")
def io():
    return load_file(str(FIXTURE / "io.safetensors"))


@pytest.fixture(scope="module")
def pipe(repo):
    return WanPipeline.from_pretrained(repo, dtype="float32", attention="dense", progress=False)


def test_the_repository_is_read_with_both_experts(pipe, repo):
    assert read_boundary_ratio(repo) == pipe.boundary_ratio == METADATA["boundary_ratio"]
    assert pipe.transformer_2 is not None and pipe.sampler.model_2 is pipe.transformer_2
    assert pipe.sampler.boundary == METADATA["boundary_ratio"] * 1000
    assert read_boundary_ratio(BASE) is None
    # Each A14B expert has Wan2.1-14B's shape.
    assert get_config("wan2.2-t2v-a14b").replace(name="wan2.1-14b") == get_config("wan2.1-14b")


def test_the_switch_step_equals_diffusers(pipe, io):
    """diffusers' forward hooks counted the steps each expert ran; the sampler runs as many."""
    steps = CALL["num_inference_steps"]
    assert pipe.sampler.switch_step(steps) == METADATA["high_noise_steps"] == 3
    assert steps - pipe.sampler.switch_step(steps) == METADATA["low_noise_steps"]


def test_the_frames_equal_diffusers(pipe, io):
    out = pipe(**CALL, latents=io["latents"], output_type="np")
    assert out.frames.shape == io["frames"].shape
    assert np.abs(out.frames - io["frames"]).max() < 1e-4
    assert rel_l2(out.frames, io["frames"]) < 1e-4
    latents = pipe(**CALL, latents=io["latents"], output_type="latent").frames
    assert rel_l2(latents, io["latents_out"]) < 1e-4
    # Without guidance_scale_2 the low-noise expert takes guidance_scale, as in diffusers.
    one = pipe(**{k: v for k, v in CALL.items() if k != "guidance_scale_2"}, latents=io["latents"])
    assert np.abs(one.frames - io["frames_one_scale"]).max() < 1e-4
    assert pipe.sampler.trace_count == 1  # scales and the switch are inputs of one program


def test_dfs_runs_both_experts(repo, io):
    """At the tiny size the default schedule's dense steps cover the run: DFS gives the dense frames."""
    dfs = WanPipeline.from_pretrained(repo, dtype="float32", attention="dfs", progress=False, expert_cache="carry")
    assert dfs.sampler.expert_cache == "carry"
    assert rel_l2(dfs(**CALL, latents=io["latents"]).frames, io["frames"]) < 1e-4
    with pytest.raises(ValueError, match="expert_cache must be one of"):
        WanPipeline.from_pretrained(repo, dtype="float32", expert_cache="shared", progress=False)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(boundary_ratio=1.5), r"boundary_ratio must be a number in \(0, 1\), got 1.5"),
        (dict(boundary_ratio=0), r"boundary_ratio must be a number in \(0, 1\), got 0"),
        (dict(boundary_ratio="0.875"), r"boundary_ratio must be a number in \(0, 1\)"),
        (dict(boundary_ratio=None), "lists transformer_2 without a boundary_ratio"),
        (dict(transformer_2=[None, None]), "sets boundary_ratio=0.857 but the repository has no transformer_2"),
        (dict(expand_timesteps=True), "expand_timesteps"),
        (dict(_class_name="WanImageToVideoPipeline"), "WanImageToVideoPipeline"),
    ],
)
def test_a_bad_model_index_is_named_before_any_weight_is_read(tmp_path, monkeypatch, changes, match):
    folder = assemble(tmp_path / "pipeline")
    _edit_index(folder, **changes)
    reads = []
    watch_tensor_reads(monkeypatch, reads.append)
    with pytest.raises(ValueError, match=match):
        WanPipeline.from_pretrained(folder, dtype="float32", keep_text_encoder=True, progress=False)
    assert reads == []


def test_a_second_expert_of_another_shape_is_named_before_any_weight_is_read(tmp_path, monkeypatch):
    folder = assemble(tmp_path / "pipeline")
    config = folder / "transformer_2" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"num_layers": 3}))
    reads = []
    watch_tensor_reads(monkeypatch, reads.append)
    with pytest.raises(ValueError, match="transformer_2's config .* must have transformer's shape"):
        WanPipeline.from_pretrained(folder, dtype="float32", keep_text_encoder=True, progress=False)
    shutil.rmtree(folder / "transformer_2")
    with pytest.raises(ValueError, match="no transformer_2"):
        WanPipeline.from_pretrained(folder, dtype="float32", keep_text_encoder=True, progress=False)
    assert reads == []


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(guidance_scale_2=float("nan")), "guidance_scale_2 must be a finite number"),
        (dict(guidance_scale_2=float("inf")), "guidance_scale_2 must be a finite number"),
    ],
)
def test_a_bad_guidance_scale_2_is_named_before_any_work(pipe, io, change, match):
    before = pipe.sampler.trace_count
    with pytest.raises(ValueError, match=match):
        pipe(**(CALL | change), latents=io["latents"])
    assert pipe.sampler.trace_count == before


def test_guidance_scale_2_needs_a_boundary_ratio_as_in_diffusers(io):
    one = WanPipeline.from_pretrained(BASE, dtype="float32", attention="dense", progress=False)
    assert one.transformer_2 is None and one.sampler.model_2 is None
    with pytest.raises(ValueError, match="guidance_scale_2 is only supported when the pipeline's boundary_ratio"):
        one(**CALL, latents=io["latents"])
