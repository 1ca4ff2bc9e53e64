"""The two ends of ``dfsattn-generate --prompt ... --out video.mp4`` for Wan2.1, in JAX alone.

- :class:`PromptEncoder`: ``--prompt`` / ``--negative-prompt`` to the transformer's context, with the
  checkpoint's ``tokenizer/`` and ``text_encoder/`` (:func:`models.pipelines.wan.encode_prompts`).
  :meth:`PromptEncoder.check` reads only what is cheap (the tokenizer, the encoder's
  ``config.json``) and checks it against the transformer, before any weight is read;
  :meth:`PromptEncoder.encode` then reads UMT5, encodes and lets it go, on the text encoder's
  progress bar (a tick per shard read, one for the encoding).
- :func:`check_video_out` / :func:`write_wan_video`: ``--out *.mp4|*.gif``: the checkpoint's
  ``vae/`` decodes the latents (:func:`models.pipelines.wan.decode_frames`, on the decoder's
  progress bar: a tick per decoded chunk) and the frames are written as an H.264 MP4
  (imageio-ffmpeg) or a GIF (:mod:`models.common.video`); an MP4 asked for with no encoder
  installed becomes a GIF beside it, and the command says so.

The bars go to stderr; the time of each part is printed apart on stdout ("encoded the prompt in
...", "decoded N frames ... in ...").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

import jax
import numpy as np

from models.common.video import mp4_encoder, to_uint8_frames, write_gif, write_mp4
from models.pipelines.wan import check_text_width, decode_frames, encode_prompts, make_decode_bar, make_text_bar
from models.text_encoders.prompts import PromptTokenizer
from models.text_encoders.umt5 import UMT5Config
from models.text_encoders.umt5_loading import load_umt5, read_umt5_config, umt5_shard_count
from models.vae import load_wan_vae, read_wan_vae_config

__all__ = ["VIDEO_FPS", "PromptEncoder", "check_video_out", "write_wan_video"]

#: Frames per second of the written video (diffusers' ``export_to_video`` in the Wan examples).
VIDEO_FPS = 16


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class PromptEncoder:
    """``--prompt`` (and, with guidance, ``--negative-prompt``) to be encoded once the weights may
    be read.

    Attributes:
      checkpoint: the Wan repository (``tokenizer/``, ``text_encoder/``).
      prompt, negative_prompt: the texts (``negative_prompt`` ``None``: no guidance).
      max_sequence_length: text tokens.
      dtype: the text encoder's dtype (``None``: bf16 on accelerators, float32 on CPU).
      tokenizer: the checkpoint's tokenizer (read by :meth:`check`).
      config: the text encoder's config (read by :meth:`check`).
    """

    checkpoint: str
    prompt: str
    negative_prompt: str | None
    max_sequence_length: int
    dtype: str | None
    tokenizer: PromptTokenizer
    config: UMT5Config

    @classmethod
    def check(cls, args: argparse.Namespace, text_dim: int, guided: bool) -> PromptEncoder:
        """Reads the tokenizer and the text encoder's ``config.json`` (no weights) and checks the
        encoder's width against the transformer's ``text_dim``.

        Raises:
          ValueError: naming ``--checkpoint`` and the folder or value that is wrong.
        """
        try:
            tokenizer = PromptTokenizer.from_pretrained(pathlib.Path(args.checkpoint) / "tokenizer")
            config = read_umt5_config(pathlib.Path(args.checkpoint) / "text_encoder")
        except ValueError as err:
            raise ValueError(f"--prompt needs the checkpoint's tokenizer/ and text_encoder/: {err}") from None
        try:
            check_text_width(config, text_dim)
        except ValueError as err:
            raise ValueError(f"--checkpoint: {err}") from None
        negative = (args.negative_prompt or "") if guided else None
        return cls(args.checkpoint, args.prompt, negative, args.max_sequence_length, args.dtype, tokenizer, config)

    def encode(self) -> tuple[jax.Array, jax.Array | None]:
        """``(cond [1, L, d], negative [1, L, d] or None)``: reads UMT5, encodes, lets it go (on
        the text encoder's bar: the shards read, then the encoding); prints the time taken."""
        t0 = time.perf_counter()
        folder = pathlib.Path(self.checkpoint) / "text_encoder"
        prompts = [self.prompt] if self.negative_prompt is None else [self.prompt, self.negative_prompt]
        bar = make_text_bar()
        bar.open(umt5_shard_count(folder) + 1)
        try:
            encoder = load_umt5(folder, dtype=self.dtype, config=self.config, progress=lambda _name: bar.tick())
            text = encode_prompts(self.tokenizer, encoder, prompts, self.max_sequence_length, encoder.dtype, bar)
            del encoder  # its device memory is freed before the transformer is read
        finally:
            bar.close()
        print(f"encoded the prompt{'s' if len(prompts) > 1 else ''} in {time.perf_counter() - t0:.1f} s "
              f"({self.max_sequence_length} tokens, UMT5 in JAX)")  # fmt: skip
        return text[:1], (text[1:] if self.negative_prompt is not None else None)


def check_video_out(checkpoint: str, out: pathlib.Path) -> None:
    """What ``--out *.mp4|*.gif`` needs before any weight is read: the checkpoint's ``vae/`` with a
    readable Wan2.1 VAE config.

    Raises:
      ValueError: naming ``--out`` and what is missing.
    """
    try:
        read_wan_vae_config(checkpoint)
    except ValueError as err:
        raise ValueError(f"--out {out.name}: decoding needs the checkpoint's vae/: {err}") from None


def write_wan_video(latents: np.ndarray, checkpoint: str, out: pathlib.Path, *, dtype: str | None) -> str:
    """Decodes ``latents [1, 16, f, h, w]`` with the checkpoint's VAE and writes ``out`` (.mp4 or
    .gif; an .mp4 becomes a .gif beside it when no MP4 encoder is installed), the decode on its
    progress bar; prints the time taken. Returns the path written."""
    t0 = time.perf_counter()
    vae = load_wan_vae(checkpoint, dtype=dtype, progress=lambda name: _say(f"reading {name}"))
    frames = decode_frames(vae, latents, bar=make_decode_bar())[0]
    print(f"decoded {frames.shape[0]} frames of {frames.shape[1]}x{frames.shape[2]} in {time.perf_counter() - t0:.1f} s")
    images = to_uint8_frames(frames)
    if out.suffix.lower() == ".gif":
        return write_gif(images, out, frame_ms=round(1000 / VIDEO_FPS))
    encoder = mp4_encoder()
    if encoder is None:
        gif = out.with_suffix(".gif")
        _say(f"no MP4 encoder installed (pip install imageio imageio-ffmpeg): writing {os.fspath(gif)} instead")
        return write_gif(images, gif, frame_ms=round(1000 / VIDEO_FPS))
    return write_mp4(images, out, fps=VIDEO_FPS, encoder=encoder)
