"""`dfsattn-generate --model hunyuan-video` on the tiny diffusers-format HunyuanVideo fixture
(CPU, no torch), and the HunyuanVideo prompt-embeddings file."""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import FIXTURES, rel_l2

from dfsattn_jax.joint import JointTokens
from dfsattn_jax.schedule import get_schedule_preset, plan_schedule, reported_sparsity
from models import generate
from models.generate import main
from models.hunyuan_video.loading import load_hunyuan_video
from models.hunyuan_video.transformer import HunyuanConditioning
from models.io import load_hunyuan_prompt_embeds, load_latents, save_hunyuan_prompt_embeds, save_latents
from models.sampling import Sampler

FIXTURE = FIXTURES / "hunyuan_tiny"
IO = load_file(FIXTURE / "io.safetensors")
VALID = int(IO["encoder_attention_mask"][0].sum())  # 38 of 64
# 9 frames of 256 x 256: 3 x 16 x 16 = 768 video + 64 text tokens = 7 blocks of 128 (6 video-only).
SIZE = ["--frames", "9", "--height", "256", "--width", "256"]


def prompt_file(tmp_path, suffix=".safetensors", **changes) -> pathlib.Path:
    """Sample 0 of the fixture's inputs as a prompt file (``changes`` replace or drop keys)."""
    tensors = {
        "prompt_embeds": IO["encoder_hidden_states"][0],
        "prompt_attention_mask": IO["encoder_attention_mask"][0].astype(np.int32),
        "pooled_prompt_embeds": IO["pooled_projections"][0],
    }
    tensors.update(changes)
    tensors = {k: v for k, v in tensors.items() if v is not None}
    path = tmp_path / f"prompt{suffix}"
    if suffix == ".npz":
        np.savez(path, **tensors)
    else:
        save_file(tensors, str(path))
    return path


def run(tmp_path, *extra, suffix=".safetensors", size=SIZE) -> tuple[int, pathlib.Path]:
    out = tmp_path / "latents.safetensors"
    args = [
        "--model", "hunyuan-video", "--checkpoint", str(FIXTURE), "--prompt-embeds",
        str(prompt_file(tmp_path, suffix)), "--out", str(out), *size, "--steps", "3", "--dtype", "float32",
        "--seed", "3", *extra,
    ]  # fmt: skip
    return main(args), out


def test_generate_hunyuan_dfs_writes_latents_and_reports_the_plan(tmp_path, capsys):
    rc, out = run(tmp_path, "--dense-steps", "1", "--refresh-interval", "1", "--density", "0.5",
                  "--density-decrement", "0", suffix=".npz")  # fmt: skip
    assert rc == 0
    latents, meta = load_latents(out)
    assert latents.shape == (1, 16, 3, 32, 32)
    assert np.all(np.isfinite(latents)) and float(np.std(latents)) > 0.1
    assert (meta["model"], meta["solver"], meta["shift"], meta["guidance"]) == ("hunyuan-video", "euler", "7.0", "6.0")
    # The plan over the joint sequence, no always-dense layer, counted as the reference counts it.
    joint = JointTokens(768, 64)
    dfs = dataclasses.replace(
        get_schedule_preset("hunyuan-video"), density=0.5, density_decrement=0.0, dense_steps=1, refresh_interval=1
    )
    plan = plan_schedule(dfs, 3, joint.num_blocks(128))
    expected = reported_sparsity(plan, 4, (), joint=joint)
    assert float(meta["sparsity"]) == pytest.approx(expected, abs=1e-4)
    assert expected > 0.2
    text = capsys.readouterr().out
    assert "flow shift 7.0 (default for hunyuan-video)" in text
    assert "768 video + 64 text tokens" in text and "dense layers none of 4" in text
    assert f"expected sparsity: {expected:.2%}" in text


def test_generate_hunyuan_schedule_presets(tmp_path, capsys, monkeypatch):
    """--schedule works for HunyuanVideo too: the named preset's 50-step schedule as it is and its
    dense layers (here "fast": layer 0 dense, dense steps 0-9, so 14 steps leave 4 sparse ones);
    without it, the hunyuan-video preset with the options."""
    preset = get_schedule_preset("fast")
    steps = preset.dense_steps + 4
    rc, out = run(tmp_path, "--schedule", "fast", "--steps", str(steps))
    assert rc == 0
    _, meta = load_latents(out)
    assert (meta["schedule"], meta["dense_layers"], int(meta["dense_steps"])) == ("fast", "0", preset.dense_steps)
    joint = JointTokens(768, 64)
    plan = plan_schedule(preset, steps, joint.num_blocks(128))
    expected = reported_sparsity(plan, 4, (0,), joint=joint)
    assert expected > 0 and float(meta["sparsity"]) == pytest.approx(expected, abs=1e-4)
    assert "dense layers [0] of 4" in capsys.readouterr().out
    # The family's default is the hunyuan-video preset: no always-dense layer.
    rc, out = run(tmp_path, "--steps", "2")
    _, meta = load_latents(out)
    assert rc == 0 and (meta["schedule"], meta["dense_layers"]) == ("options", "")
    assert "dense layers none of 4" in capsys.readouterr().out
    # And it is refused together with the options it replaces, before any weight is read.
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights must not be read")

    monkeypatch.setattr(generate, "load_hunyuan_video", no_weights)
    assert run(tmp_path, "--schedule", "hunyuan-video", "--refresh-interval", "3")[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--schedule hunyuan-video sets the schedule; drop --refresh-interval" in err[0]


def test_generate_hunyuan_equals_the_sampler(tmp_path):
    """The command's latents are the Sampler's with the file's conditioning and embedded guidance 6."""
    noise = np.random.default_rng(11).standard_normal((1, 16, 2, 8, 8)).astype(np.float32)
    save_latents(tmp_path / "noise.safetensors", noise)
    small = ["--frames", "5", "--height", "64", "--width", "64"]
    rc, out = run(tmp_path, "--backend", "dense", "--noise", str(tmp_path / "noise.safetensors"), "--guidance", "4.5",
                  size=small)  # fmt: skip
    assert rc == 0
    model = load_hunyuan_video(FIXTURE, dtype="float32")
    cond = HunyuanConditioning(
        jnp.asarray(IO["encoder_hidden_states"][:1]), jnp.asarray(IO["encoder_attention_mask"][:1]).astype(jnp.int32),
        jnp.asarray(IO["pooled_projections"][:1]), jnp.asarray([4.5], jnp.float32),
    )  # fmt: skip
    sampler = Sampler(model, "dense", shift=7.0, schedule="flow-match-euler", progress=False)
    want = sampler(jnp.asarray(noise), cond, num_steps=3).latents
    assert rel_l2(load_latents(out)[0], want) < 1e-6


def test_prompt_file_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    embeds, pooled = rng.standard_normal((12, 40)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    mask = (np.arange(12) < 5).astype(np.int64)
    for suffix in (".safetensors", ".npz"):
        path = save_hunyuan_prompt_embeds(tmp_path / f"p{suffix}", embeds[None], mask[None], pooled[None])
        got = load_hunyuan_prompt_embeds(path, text_dim=40, pooled_dim=24)
        np.testing.assert_array_equal(got.prompt_embeds, embeds)
        np.testing.assert_array_equal(got.prompt_attention_mask, mask.astype(np.int32))
        np.testing.assert_array_equal(got.pooled_prompt_embeds, pooled)
        assert got.prompt_attention_mask.dtype == np.int32


def test_prompt_file_of_any_float_dtype_reads_as_float32(tmp_path):
    # A hand-made .npz keeps NumPy's float64 (and a safetensors file may hold float16): both read as float32.
    rng = np.random.default_rng(3)
    embeds, pooled = rng.standard_normal((6, 40)), rng.standard_normal(24)
    mask = (np.arange(6) < 2).astype(np.int64)
    np.savez(tmp_path / "p64.npz", prompt_embeds=embeds, prompt_attention_mask=mask, pooled_prompt_embeds=pooled)
    got = load_hunyuan_prompt_embeds(tmp_path / "p64.npz", text_dim=40, pooled_dim=24)
    assert got.prompt_embeds.dtype == np.float32 and got.pooled_prompt_embeds.dtype == np.float32
    np.testing.assert_array_equal(got.prompt_embeds, embeds.astype(np.float32))
    np.testing.assert_array_equal(got.pooled_prompt_embeds, pooled.astype(np.float32))
    np.testing.assert_array_equal(got.prompt_attention_mask, mask.astype(np.int32))


MASK = IO["encoder_attention_mask"][0].astype(np.int32)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(pooled_prompt_embeds=None), "has no 'pooled_prompt_embeds' tensor"),
        (dict(prompt_embeds=IO["encoder_hidden_states"][0][:, :39]), "'prompt_embeds' must have shape [T, 40], got [64, 39]"),
        (dict(prompt_attention_mask=MASK[:63]), "'prompt_attention_mask' must have shape [T=64]"),
        (dict(pooled_prompt_embeds=np.zeros(23, np.float32)), "'pooled_prompt_embeds' must have shape [24], got [23]"),
        (dict(prompt_attention_mask=MASK[::-1].copy()), "'prompt_attention_mask' must be 1 for the valid tokens then 0"),
        (dict(prompt_attention_mask=np.zeros(64, np.int32)), "at least one valid token"),
        (dict(prompt_attention_mask=MASK.astype(np.float32)), "'prompt_attention_mask' must be integer or bool"),
        (dict(prompt_embeds=np.full((64, 40), np.nan, np.float32)), "'prompt_embeds' holds non-finite values"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, capsys, changes, fragment):
    path = prompt_file(tmp_path, **changes)
    args = ["--model", "hunyuan-video", "--checkpoint", str(FIXTURE), "--prompt-embeds", str(path),
            "--out", str(tmp_path / "o.safetensors"), *SIZE, "--steps", "1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dfsattn-generate: error: prompt embeddings"), err
    assert fragment in err[0], err[0]


def test_bad_options_for_hunyuan(tmp_path, capsys):
    base = ["--model", "hunyuan-video", "--checkpoint", str(FIXTURE), "--prompt-embeds", str(prompt_file(tmp_path)),
            "--out", str(tmp_path / "o.safetensors"), *SIZE]  # fmt: skip
    assert main([*base, "--solver", "unipc"]) == 2
    assert "--solver must be one of ('euler',) for --model hunyuan-video" in capsys.readouterr().err
    txt = tmp_path / "prompt.txt"
    txt.write_text("x")
    assert main([*base[:4], "--prompt-embeds", str(txt), *base[6:]]) == 2
    assert "must be a .safetensors or .npz file" in capsys.readouterr().err
    # A Wan checkpoint is not a HunyuanVideo one.
    wan = FIXTURES / "wan_tiny"
    assert main([*base[:2], "--checkpoint", str(wan), *base[4:]]) == 2
    assert "dfsattn-generate: error:" in capsys.readouterr().err
