"""The `python -m models.generate` command on the tiny diffusers-format fixture checkpoint."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.generate import main
from models.io import load_latents
from helpers import FIXTURES

FIXTURE = FIXTURES / "wan_tiny"


@pytest.mark.parametrize("backend", ["dense", "dfs"])
def test_generate_writes_latents(tmp_path, backend):
    text = load_file(FIXTURE / "io.safetensors")["encoder_hidden_states"]  # [2, T, E]
    embeds = tmp_path / "prompt.safetensors"
    save_file({"cond": text[0], "uncond": text[1]}, str(embeds))
    out = tmp_path / "latents.safetensors"
    args = [
        "--checkpoint", str(FIXTURE), "--prompt-embeds", str(embeds), "--out", str(out),
        "--frames", "9", "--height", "96", "--width", "128", "--steps", "3", "--backend", backend,
        "--dense-steps", "1", "--refresh-interval", "1", "--density", "0.5", "--density-decrement", "0",
        "--dtype", "float32", "--seed", "3",
    ]
    assert main(args) == 0
    latents, meta = load_latents(out)
    assert latents.shape == (1, 16, 3, 12, 16)
    assert np.all(np.isfinite(latents)) and float(np.std(latents)) > 0.1
    assert meta["backend"] == backend and meta["steps"] == "3"
    assert meta["shift"] == "3.0"  # the 480p-and-below default (the size is 96 x 128)
    if backend == "dfs":
        # 144 tokens = 2 blocks of 128; density 0.5 keeps 1 of 2 key blocks at 2 sparse steps
        # in the one sparse layer (layer 0 is dense): skipped 1/2 in half of the 2 layers.
        assert float(meta["sparsity"]) == pytest.approx(0.25)


def test_generate_rejects_wrong_noise_shape(tmp_path, capsys):
    text = load_file(FIXTURE / "io.safetensors")["encoder_hidden_states"]
    embeds = tmp_path / "prompt.safetensors"
    save_file({"cond": text[0], "uncond": text[1]}, str(embeds))
    noise = tmp_path / "noise.safetensors"
    save_file({"latents": np.ones((1, 16, 2, 12, 16), np.float32)}, str(noise))
    args = ["--checkpoint", str(FIXTURE), "--prompt-embeds", str(embeds), "--noise", str(noise),
            "--frames", "9", "--height", "96", "--width", "128", "--steps", "1", "--out", str(tmp_path / "o.safetensors")]
    assert main(args) == 2  # a user error: one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfsattn-generate: error: --noise must have shape")
    with pytest.raises(ValueError, match="--noise"):  # --debug: the exception itself
        main([*args, "--debug"])
