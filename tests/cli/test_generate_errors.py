"""The `dfsattn-generate` command line's user errors, checks, help, flow shift and reports.

* a user error prints one line and exits 2 (``--debug``: the traceback);
* every option is checked before any weight is read, with a message naming the option (also
  where the library entry point makes the check: ``DFSConfig``, the video size);
* ``--help`` shows every default and choice; abbreviations of options are refused;
* ``--shift`` follows the resolution unless given;
* the DFS plan is printed before sampling, with a WARNING when DFS cannot sparsify anything;
* compile time and per-step time are reported separately; ``--guidance`` must be finite.

Every test drives :func:`models.generate.main` on the tiny diffusers-format fixture checkpoint
(tests/fixtures/wan_tiny: 2 layers, text_dim 48). Where a test is about *when* a check happens,
the weight loader is replaced by one that records its call and stops the run: a check that fires
first leaves it uncalled.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import models.generate as generate
from dfsattn_jax.schedule import DFSConfig
from models.cli_args import DFS_OPTIONS, PROG, build_parser, default_shift, option_error
from models.generate import main
from models.io import load_latents
from helpers import FIXTURES

FIXTURE = FIXTURES / "wan_tiny"
ERROR_PREFIX = f"{PROG}: error: "


class WeightsRead(Exception):
    """Raised by the stand-in weight loader: the run got as far as reading weights."""


@pytest.fixture
def embeds(tmp_path) -> pathlib.Path:
    text = load_file(FIXTURE / "io.safetensors")["encoder_hidden_states"]  # [2, T, 48]
    path = tmp_path / "prompt.safetensors"
    save_file({"cond": text[0], "uncond": text[1]}, str(path))
    return path


@pytest.fixture
def weights_calls(monkeypatch) -> list:
    """Replaces the weight loader (and the sampler) with stand-ins that record and stop."""
    calls: list = []

    def load(*args, **kwargs):
        calls.append(("load_wan", args))
        raise WeightsRead

    def sampler(*args, **kwargs):
        calls.append(("Sampler", args))
        raise WeightsRead

    monkeypatch.setattr(generate, "load_wan", load)
    monkeypatch.setattr(generate, "Sampler", sampler)
    return calls


def small_args(embeds, tmp_path, *extra: str) -> list[str]:
    """A valid tiny run: 9 frames of 96 x 128 (144 tokens = 2 blocks), 3 steps, DFS from step 1."""
    return [
        "--checkpoint", str(FIXTURE), "--prompt-embeds", str(embeds),
        "--out", str(tmp_path / "out" / "lat.safetensors"),
        "--frames", "9", "--height", "96", "--width", "128", "--steps", "3", "--dense-steps", "1",
        "--refresh-interval", "1", "--density", "0.5", "--density-decrement", "0", "--dtype", "float32",
        "--seed", "3", *extra,
    ]  # fmt: skip


def assert_one_line_error(capsys, rc: int, *fragments: str) -> str:
    """rc 2 and exactly one stderr line ``dfsattn-generate: error: ...`` holding the fragments."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# A user error: one line, exit 2; --debug shows the traceback.


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (["--checkpoint", "/nonexistent/wan"], "is not a diffusers Wan checkpoint"),
        (["--prompt-embeds", "/nonexistent/prompt.safetensors"], "does not exist"),
        (["--frames", "eight"], "--frames"),
        (["--no-such-option"], "--no-such-option"),
    ],
)
def test_user_error_prints_one_line_and_exits_2(embeds, tmp_path, capsys, weights_calls, bad, fragment):
    rc = main(small_args(embeds, tmp_path) + bad)
    assert_one_line_error(capsys, rc, fragment)
    assert weights_calls == []


def test_user_error_missing_required_option_is_one_line(capsys):
    assert_one_line_error(capsys, main(["--checkpoint", str(FIXTURE)]), "--prompt-embeds")


def test_user_error_debug_flag_shows_the_traceback(embeds, tmp_path, weights_calls):
    with pytest.raises(ValueError, match="--height must be a positive multiple of 16"):
        main(small_args(embeds, tmp_path, "--height", "100", "--debug"))
    assert weights_calls == []


# ---------------------------------------------------------------------------------------------
# Every option is checked before any weight is read.


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (["--frames", "8"], "--frames must be 4*k + 1"),
        (["--frames", "0"], "--frames"),
        (["--height", "100"], "--height must be a positive multiple of 16"),
        (["--width", "8"], "--width must be a positive multiple of 16"),
        (["--order", "zigzag"], "--order"),
        (["--solver", "heun"], "--solver"),
        (["--backend", "flash"], "--backend"),
        (["--density", "0"], "--density must be in (0, 1]"),
        (["--density", "1.5"], "--density must be in (0, 1]"),
        (["--density", "nan"], "--density"),
        (["--density-decrement", "-0.1"], "--density-decrement"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--dense-steps", "-1"], "--dense-steps"),
        (["--refresh-interval", "0"], "--refresh-interval"),
        (["--shift", "0"], "--shift"),
        (["--shift", "inf"], "--shift"),
        (["--seed", "-1"], "--seed"),
        (["--dtype", "float16"], "--dtype"),
    ],
)
def test_options_validated_before_weights_are_read(embeds, tmp_path, capsys, weights_calls, bad, fragment):
    rc = main(small_args(embeds, tmp_path) + bad)
    assert_one_line_error(capsys, rc, fragment)
    assert weights_calls == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["dfs", "dense"])
@pytest.mark.parametrize(
    "option, field, value",
    [
        ("--density", "density", "1.5"),
        ("--density-decrement", "density_decrement", "-0.1"),
        ("--dense-steps", "dense_steps", "-1"),
        ("--refresh-interval", "refresh_interval", "0"),
    ],
)
def test_schedule_options_are_checked_by_dfsconfig_naming_the_option(
    embeds, tmp_path, capsys, weights_calls, backend, option, field, value
):
    """The message is DFSConfig's own, its field name replaced by the option, with either backend."""
    with pytest.raises(ValueError) as library:
        DFSConfig(**{field: type(getattr(DFSConfig(), field))(value)})
    expected = option + str(library.value).removeprefix(field)
    rc = main(small_args(embeds, tmp_path, option, value, "--backend", backend))
    assert assert_one_line_error(capsys, rc, expected) == ERROR_PREFIX + expected
    assert weights_calls == []


def test_option_error_maps_field_names_to_options():
    assert set(DFS_OPTIONS) == {f.name for f in dataclasses.fields(DFSConfig)}
    mapped = option_error(ValueError("density must be in (0, 1], got 1.5"), DFS_OPTIONS)
    assert str(mapped) == "--density must be in (0, 1], got 1.5"
    assert str(option_error(ValueError("latent frames (3) must be even"), {"frames": "--frames"}, "--frames")) == (
        "--frames: latent frames (3) must be even"
    )
    assert str(option_error(ValueError("densities differ"), DFS_OPTIONS)) == "densities differ"


def test_options_validated_before_weights_out_under_a_regular_file(embeds, tmp_path, capsys, weights_calls):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    rc = main(small_args(embeds, tmp_path, "--out", str(afile / "latents.safetensors")))
    assert_one_line_error(capsys, rc, "--out", "not a folder")
    assert weights_calls == []
    assert afile.read_text() == "not a folder"


def test_options_validated_before_weights_out_is_a_folder(embeds, tmp_path, capsys, weights_calls):
    rc = main(small_args(embeds, tmp_path, "--out", str(tmp_path)))
    assert_one_line_error(capsys, rc, "--out")
    assert weights_calls == []


def test_options_validated_before_weights_mp4_needs_the_vae_extra(embeds, tmp_path, capsys, weights_calls, monkeypatch):
    monkeypatch.setattr(generate, "VAE_MODULES", ("torch", "dfsattn_no_such_module_for_test"))
    rc = main(small_args(embeds, tmp_path, "--mp4", str(tmp_path / "v.mp4")))
    assert_one_line_error(capsys, rc, "--mp4", "dfsattn_no_such_module_for_test", 'pip install -e ".[vae]"')
    assert weights_calls == []


def test_options_validated_before_weights_mp4_needs_a_vae_folder(embeds, tmp_path, capsys, weights_calls, monkeypatch):
    monkeypatch.setattr(generate, "VAE_MODULES", ("numpy",))  # pretend the extra is installed
    rc = main(small_args(embeds, tmp_path, "--mp4", str(tmp_path / "v.mp4")))  # the fixture has no vae/
    assert_one_line_error(capsys, rc, "--mp4", "holds no diffusers VAE")
    assert weights_calls == []


def test_options_validated_before_weights_prompt_width_against_config_json(tmp_path, capsys, weights_calls):
    wrong = tmp_path / "wide.safetensors"
    rng = np.random.default_rng(0)
    save_file({"cond": rng.standard_normal((5, 64), np.float32),
               "uncond": rng.standard_normal((5, 64), np.float32)}, str(wrong))  # fmt: skip
    rc = main(small_args(wrong, tmp_path))
    assert_one_line_error(capsys, rc, "width 64", "text_dim=48")
    assert weights_calls == []


def test_options_validated_before_weights_noise_shape(embeds, tmp_path, capsys, weights_calls):
    noise = tmp_path / "noise.safetensors"
    save_file({"latents": np.ones((1, 16, 2, 12, 16), np.float32)}, str(noise))
    rc = main(small_args(embeds, tmp_path, "--noise", str(noise)))
    assert_one_line_error(capsys, rc, "--noise must have shape [1, 16, 3, 12, 16]")
    assert weights_calls == []


def test_options_validated_before_weights_valid_run_reaches_the_loader(embeds, tmp_path, weights_calls):
    with pytest.raises(WeightsRead):
        main(small_args(embeds, tmp_path))
    assert [name for name, _ in weights_calls] == ["load_wan"]


# ---------------------------------------------------------------------------------------------
# --help shows every default and choice.


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_shows_every_default_and_choice(capsys):
    text = _help_text(capsys)
    # One entry per option: from its line ("  --name ...") to the next option or section.
    entries = re.findall(r"^  (--[\w-]+)(.*?)(?=^  --|^\S|\Z)", text, flags=re.M | re.S)
    options = {name: " ".join(body.split()) for name, body in entries}
    parser = build_parser()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        body = options[action.option_strings[0]]
        assert "(default: " in body or "(required)" in body, (action.option_strings, body)
        if action.choices:
            assert body.startswith("{" + ",".join(action.choices) + "}"), (action.option_strings, body)
    for shown in ("(default: 81 for wan2.1, 129 for hunyuan-video)", "(default: 480 for wan2.1,", "(default: 832 for wan2.1,",
                  "(default: 50)", "(default: unipc for wan2.1, euler for hunyuan-", "{wan2.1,hunyuan-video}",
                  "(default: dfs)", "(default: hilbert3d)", "(default: 0)", "{euler,unipc}", "{dense,dfs}",
                  "{raster,hilbert3d,morton3d,hilbert2d,block3d}", "{bfloat16,float32}"):  # fmt: skip
        assert shown in text, shown


# ---------------------------------------------------------------------------------------------
# --shift follows the resolution (3.0 below 720p, 5.0 from 720p) unless given.


@pytest.mark.parametrize(
    "size, given, expected",
    [
        (["--height", "96", "--width", "128"], [], 3.0),
        (["--height", "480", "--width", "16"], [], 3.0),
        (["--height", "720", "--width", "16"], [], 5.0),
        (["--height", "96", "--width", "128"], ["--shift", "4.5"], 4.5),
    ],
)
def test_shift_follows_resolution_unless_given(embeds, tmp_path, capsys, weights_calls, size, given, expected):
    args = small_args(embeds, tmp_path, *size, *given, "--frames", "1")
    with pytest.raises(WeightsRead):
        main(args)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("flow shift"))
    assert line.startswith(f"flow shift {expected} ")
    assert ("given" in line) == bool(given)


def test_shift_default_rule():
    assert default_shift(480) == 3.0 and default_shift(719) == 3.0
    assert default_shift(720) == 5.0 and default_shift(1280) == 5.0
    assert build_parser().parse_args(["--checkpoint", "c", "--prompt-embeds", "p"]).shift is None


# ---------------------------------------------------------------------------------------------
# Abbreviations of options (--prompt-emb for --prompt-embeds) are refused.


@pytest.mark.parametrize("abbrev", ["--negative", "--prompt-emb", "--dens"])
def test_prompt_abbreviation_is_rejected(embeds, tmp_path, capsys, weights_calls, abbrev):
    args = ["--checkpoint", str(FIXTURE), "--prompt-embeds", str(embeds), "--out", str(tmp_path / "o.safetensors"),
            abbrev, "0.5" if abbrev == "--dens" else str(embeds)]  # fmt: skip
    rc = main(args)
    assert_one_line_error(capsys, rc, "unrecognized arguments", abbrev)
    assert weights_calls == []


# ---------------------------------------------------------------------------------------------
# The DFS plan is printed before sampling, with a WARNING line when DFS cannot sparsify anything
# (under two blocks, steps <= dense steps, density 1).


def test_dfs_plan_printed_before_sampling(embeds, tmp_path, capsys, weights_calls):
    with pytest.raises(WeightsRead):  # printed before the weights are even read
        main(small_args(embeds, tmp_path))
    captured = capsys.readouterr()
    out = captured.out
    assert "DFS plan: 3 steps over 144 tokens = 2 key blocks of 128" in out
    assert "dense steps:   0 (1 of 3)" in out
    assert "refresh steps: 1 (density 0.50: 1 of 2 blocks), 2 (density 0.50: 1 of 2 blocks)" in out
    # half of the 2 key blocks skipped at the 2 sparse steps, in 1 of 2 layers (layer 0 is dense)
    assert "expected sparsity: 25.00%" in out
    assert "WARNING" not in captured.err + out


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["--frames", "1", "--height", "32", "--width", "32"], "under two attention blocks"),  # 4 tokens
        (["--steps", "3", "--dense-steps", "3"], "--steps 3 <= --dense-steps 3"),
        (["--density", "1.0"], "--density 1.0 keeps all 2 key blocks"),
    ],
)
def test_dfs_plan_warns_when_nothing_to_sparsify(embeds, tmp_path, capsys, weights_calls, extra, reason):
    with pytest.raises(WeightsRead):
        main(small_args(embeds, tmp_path, *extra))
    captured = capsys.readouterr()
    assert "expected sparsity: 0.00%" in captured.out
    warnings = [l for l in captured.err.splitlines() if "WARNING" in l]
    assert len(warnings) == 1 and "DFS cannot sparsify anything" in warnings[0] and reason in warnings[0]


def test_dfs_plan_not_printed_for_dense_backend(embeds, tmp_path, capsys, weights_calls):
    with pytest.raises(WeightsRead):
        main(small_args(embeds, tmp_path, "--backend", "dense"))
    captured = capsys.readouterr()
    assert "DFS plan" not in captured.out and "WARNING" not in captured.err
    assert "attention: dense over 144 tokens" in captured.out


# ---------------------------------------------------------------------------------------------
# Compile time and per-step time are reported separately after sampling (values injected:
# behaviour, not timings).


def test_compile_and_step_time_reported_separately(embeds, tmp_path, capsys, monkeypatch):
    real_call = generate.Sampler.__call__
    seen = {}

    def call(self, *args, **kwargs):
        seen["progress"] = self.progress
        result = real_call(self, *args, **kwargs)
        return dataclasses.replace(result, compile_s=12.5, time_s=0.75)

    monkeypatch.setattr(generate.Sampler, "__call__", call)
    out_file = tmp_path / "out" / "lat.safetensors"
    assert main(small_args(embeds, tmp_path)) == 0
    captured = capsys.readouterr()
    assert seen["progress"] is True  # the bar stays on (it opens once the loop starts)
    assert "compiled in 12.5 s; sampled 3 steps in 0.75 s (0.250 s/step); measured sparsity 25.00%" in captured.out
    assert "3/3" in captured.err  # the bar counted the 3 steps
    latents, meta = load_latents(out_file)
    assert latents.shape == (1, 16, 3, 12, 16) and np.all(np.isfinite(latents))
    assert meta["shift"] == "3.0" and float(meta["sparsity"]) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# --guidance must be finite (nan would run unguided).


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_guidance_nan_is_rejected(embeds, tmp_path, capsys, weights_calls, value):
    rc = main(small_args(embeds, tmp_path, f"--guidance={value}"))
    assert_one_line_error(capsys, rc, "--guidance must be a finite number")
    assert weights_calls == []
    assert not (tmp_path / "out").exists()


def test_a_two_expert_repository_is_refused_before_weights(embeds, tmp_path, capsys, weights_calls):
    """A Wan2.2 A14B repository (transformer_2/ and boundary_ratio) is not run with one transformer
    for every step: the command names it and points to WanPipeline."""
    checkpoint = tmp_path / "a14b"
    shutil.copytree(FIXTURE, checkpoint)
    (checkpoint / "transformer_2").mkdir()
    index = {"boundary_ratio": 0.875, "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    (checkpoint / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"} | index))
    args = small_args(embeds, tmp_path)
    args[args.index("--checkpoint") + 1] = str(checkpoint)
    rc = main(args)
    assert_one_line_error(capsys, rc, "is a Wan2.2 A14B repository", "models.WanPipeline")
    assert weights_calls == []
