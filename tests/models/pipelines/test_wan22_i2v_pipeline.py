"""models.pipelines.WanImageToVideoPipeline on a Wan2.2 I2V-A14B-style repository against diffusers'
``WanImageToVideoPipeline`` (the fixture ``tests/fixtures/wan22_i2v_pipeline_tiny``, made by
``make_wan22_i2v_pipeline_fixture.py`` with diffusers 0.42.1: two 36-channel experts and
``model_index.json`` replacing ``wan_pipeline_tiny/pipeline``'s, no CLIP).

Six UniPC steps at shift 3 with boundary_ratio 0.9: the high-noise expert runs 2 steps (999,
937), the low-noise one 4, with guidance 5.0 then 2.5. Float32 end to end: observed ~6e-7 on the
conditioning channels and ~1.4e-6 absolute on the frames; the bound is 1e-4 (1e-5 for the
conditioning)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import FIXTURES, assemble_wan22_repository, rel_l2, watch_tensor_reads
from safetensors.numpy import load_file

from models.pipelines import WanImageToVideoPipeline, WanPipeline, image_condition
from models.pipelines.wan_i2v import check_image
from models.wan.config import get_config

FIXTURE = FIXTURES / "wan22_i2v_pipeline_tiny"
BASE = FIXTURES / "wan_pipeline_tiny" / "pipeline"
METADATA = json.loads((FIXTURE / "metadata.json").read_text())
CALL = METADATA["call"]


def assemble(folder):
    """The whole I2V repository, as the fixture script assembles it."""
    return assemble_wan22_repository(folder, BASE, FIXTURE, experts=("transformer", "transformer_2"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return assemble(tmp_path_factory.mktemp("wan22_i2v") / "pipeline")


@pytest.fixture(scope="module")
def io():
    return load_file(str(FIXTURE / "io.safetensors"))


@pytest.fixture(scope="module")
def pipe(repo):
    return WanImageToVideoPipeline.from_pretrained(repo, dtype="float32", attention="dense", progress=False)


def test_the_conditioning_channels_equal_diffusers(pipe, io):
    """The mask and the normalized VAE mode of the image and its zero frames (``prepare_latents``)."""
    got = np.asarray(image_condition(pipe.vae, check_image(io["image"], 32, 32), io["latents"].shape))
    assert got.shape == io["condition"].shape == (1, 20, 2, 4, 4)
    assert np.abs(got - io["condition"]).max() < 1e-5
    # The same image as floats in [0, 1] gives the same pixels.
    np.testing.assert_array_equal(check_image(io["image"] / np.float32(255), 32, 32), check_image(io["image"], 32, 32))


def test_the_frames_equal_diffusers(pipe, io):
    steps = CALL["num_inference_steps"]
    assert pipe.sampler.switch_step(steps) == METADATA["high_noise_steps"] == 2
    assert steps - pipe.sampler.switch_step(steps) == METADATA["low_noise_steps"]
    out = pipe(io["image"], **CALL, latents=io["latents"])
    assert out.frames.shape == io["frames"].shape
    assert np.abs(out.frames - io["frames"]).max() < 1e-4
    assert rel_l2(out.frames, io["frames"]) < 1e-4
    # The experts' shape is I2V-A14B's but for the size.
    assert get_config("wan2.2-i2v-a14b").in_channels == pipe.transformer.config.in_channels == 36


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((16, 32, 3), np.uint8), r"image must be \[height, width, 3\] = \[32, 32, 3\]"),
        (np.full((32, 32, 3), 1.5, np.float32), r"image must hold values in \[0, 1\]"),
        (np.zeros((32, 32, 3), np.int32), "image must be uint8 or floating point"),
    ],
)
def test_a_bad_image_is_named_before_any_work(pipe, io, image, match):
    before = pipe.sampler.trace_count
    with pytest.raises(ValueError, match=match):
        pipe(image, **CALL, latents=io["latents"])
    assert pipe.sampler.trace_count == before


def test_the_pipeline_class_and_the_channels_are_checked_before_any_weight_is_read(tmp_path, monkeypatch, repo):
    reads = []
    watch_tensor_reads(monkeypatch, reads.append)
    with pytest.raises(ValueError, match="reads a WanImageToVideoPipeline repository, got 'WanPipeline'"):
        WanImageToVideoPipeline.from_pretrained(BASE, dtype="float32", progress=False)
    with pytest.raises(ValueError, match="reads a WanPipeline repository, got 'WanImageToVideoPipeline'"):
        WanPipeline.from_pretrained(repo, dtype="float32", progress=False)
    # Text-to-video experts (16 channels in) under an image-to-video model_index.json.
    folder = tmp_path / "mixed"
    shutil.copytree(BASE, folder)
    shutil.copytree(BASE / "transformer", folder / "transformer_2")
    shutil.copy(FIXTURE / "model_index.json", folder / "model_index.json")
    with pytest.raises(ValueError, match="in_channels=16 .* must be 36"):
        WanImageToVideoPipeline.from_pretrained(folder, dtype="float32", keep_text_encoder=True, progress=False)
    assert reads == []
