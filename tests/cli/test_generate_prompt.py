"""``dfsattn-generate --prompt ... --out video.mp4``: prompt to video with Wan2.1 in JAX alone, on the
tiny whole diffusers pipeline of ``tests/fixtures/wan_pipeline_tiny`` (text_encoder/, tokenizer/,
vae/, transformer/, scheduler/)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import FIXTURES, ROOT, rel_l2
from safetensors.numpy import load_file

from models.common import video
from models.generate import main
from models.pipelines import WanPipeline
from models.pipelines.wan import DECODE_BAR, TEXT_BAR

CHECKPOINT = FIXTURES / "wan_pipeline_tiny" / "pipeline"
PROMPT = "A small red ball rolls across a wooden table"
SIZE = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "3", "--backend", "dense"]


def run(tmp_path, *extra: str) -> list[str]:
    return ["--checkpoint", str(CHECKPOINT), *SIZE, *extra]


def test_prompt_to_latents_equals_the_pipeline(tmp_path, capsys):
    """The command's latents for --prompt/--negative-prompt are the pipeline's for the same noise."""
    out = tmp_path / "latents.safetensors"
    assert main(run(tmp_path, "--prompt", PROMPT, "--negative-prompt", "blurry", "--seed", "3", "--out", str(out))) == 0
    assert "encoded the prompts" in capsys.readouterr().out
    got = load_file(str(out))["latents"]
    pipe = WanPipeline.from_pretrained(CHECKPOINT, dtype="float32", attention="dense", progress=False)
    import jax

    noise = jax.random.normal(jax.random.key(3), got.shape, np.float32)  # the command's --seed noise
    want = pipe(PROMPT, "blurry", height=32, width=32, num_frames=5, num_inference_steps=3, latents=noise,
                output_type="latent").frames  # fmt: skip
    assert rel_l2(got, want) < 1e-5


def test_prompt_to_mp4(tmp_path, capsys):
    if video.mp4_encoder() is None:
        pytest.skip("no MP4 encoder installed (imageio-ffmpeg is a dependency: pip install -e .)")
    out = tmp_path / "video.mp4"
    assert main(run(tmp_path, "--prompt", PROMPT, "--out", str(out))) == 0
    assert out.is_file() and out.read_bytes()[4:8] == b"ftyp" and out.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "decoded 5 frames of 32x32" in printed and f"video -> {out}" in printed


def test_prompt_to_gif_and_the_fallback_without_an_encoder(tmp_path, capsys, monkeypatch):
    gif = tmp_path / "video.gif"
    assert main(run(tmp_path, "--prompt", PROMPT, "--out", str(gif))) == 0
    assert gif.read_bytes()[:6] == b"GIF89a"
    # Three bars on stderr (tqdm writes there even when it is no terminal): the text encoder's
    # (its one shard, then the encoding), the sampler's, the decoder's (frame 0, then one chunk);
    # the text encoder's shard is no "reading" line; the times are printed apart on stdout.
    printed = capsys.readouterr()
    for label, ticks in ((TEXT_BAR, 2), ("sampling (dense)", 3), (DECODE_BAR, 2)):
        assert re.search(rf"{re.escape(label)}: 100%\|[^|]*\| {ticks}/{ticks} ", printed.err), printed.err
    assert "reading model.safetensors" not in printed.err
    assert "encoded the prompts in" in printed.out and "decoded 5 frames of 32x32 in" in printed.out
    from models import prompt_video

    monkeypatch.setattr(prompt_video, "mp4_encoder", lambda: None)
    assert main(run(tmp_path, "--prompt", PROMPT, "--out", str(tmp_path / "b.mp4"))) == 0
    assert (tmp_path / "b.gif").is_file() and not (tmp_path / "b.mp4").exists()
    assert "no MP4 encoder installed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "x.safetensors"], "give one of --prompt TEXT and --prompt-embeds FILE"),
        (["--prompt", "a", "--prompt-embeds", "e.safetensors"], "give one of --prompt TEXT and --prompt-embeds FILE"),
        (["--prompt-embeds", "e.safetensors", "--negative-prompt", "n"], "--negative-prompt goes with --prompt"),
        (["--prompt", "a", "--model", "hunyuan-video"], "for --model hunyuan-video give --prompt-embeds"),
        (["--prompt", "a", "--max-sequence-length", "0"], "--max-sequence-length must be >= 1"),
        (["--prompt", "a", "--out", "x.npz"], "--out must end in one of"),
    ],
)
def test_option_errors_are_one_line_before_any_weight(tmp_path, capsys, args, message):
    assert main(["--checkpoint", str(CHECKPOINT), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfsattn-generate: error:") and message in err and "\n" not in err


def test_a_checkpoint_without_text_encoder_or_vae_is_named(tmp_path, capsys):
    wan_only = FIXTURES / "wan_tiny"  # transformer/ only
    assert main(["--checkpoint", str(wan_only), "--prompt", "a", "--out", str(tmp_path / "l.safetensors"),
                 "--frames", "5", "--height", "32", "--width", "32"]) == 2  # fmt: skip
    assert "--prompt needs the checkpoint's tokenizer/ and text_encoder/" in capsys.readouterr().err
    embeds = tmp_path / "e.safetensors"
    from models.io import save_prompt_embeds

    rng = np.random.default_rng(0)
    save_prompt_embeds(embeds, rng.normal(size=(4, 48)).astype(np.float32), rng.normal(size=(4, 48)).astype(np.float32))
    assert main(["--checkpoint", str(wan_only), "--prompt-embeds", str(embeds), "--out", str(tmp_path / "v.mp4"),
                 "--frames", "5", "--height", "32", "--width", "32"]) == 2  # fmt: skip
    assert "--out v.mp4: decoding needs the checkpoint's vae/" in capsys.readouterr().err


def test_prompt_to_video_imports_no_pytorch(tmp_path):
    code = (
        "import sys\nfrom models.generate import main\n"
        f"rc = main({run(tmp_path, '--prompt', PROMPT, '--out', str(tmp_path / 'v.gif'))!r})\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "0 False", done.stdout + done.stderr
