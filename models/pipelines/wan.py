"""Prompt to video with Wan2.1 and Wan2.2 A14B in JAX alone: :class:`WanPipeline`, diffusers'
``WanPipeline`` without PyTorch.

    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
    out = pipe("A cat walks on the grass, realistic", seed=0)
    out.frames  # float32 [1, 81, 480, 832, 3] in [0, 1]

The steps, each in JAX: the prompts are cleaned and tokenized (:mod:`models.text_encoders.prompts`,
the ``tokenizers`` package on the checkpoint's ``tokenizer/``), encoded by UMT5
(:mod:`models.text_encoders.umt5`), trimmed to each prompt's tokens and zero-padded; the latents
are denoised in one jit program by :class:`models.sampling.loop.Sampler` (UniPC with the flow shift
of ``scheduler/scheduler_config.json``, classifier-free guidance as one batch, DFSAttn with its
mask cache); the Wan VAE (:mod:`models.vae`) decodes them. The call takes diffusers'
``WanPipeline.__call__`` argument names and defaults; with the same initial ``latents`` it gives
diffusers' frames (the whole-pipeline test checks it at a tiny config).

A Wan2.2 A14B repository (``transformer_2/`` and ``boundary_ratio`` in ``model_index.json``,
:mod:`models.pipelines.wan_repository`) runs two experts in the one sampling program: the
high-noise ``transformer`` with ``guidance_scale`` while ``t >= boundary_ratio *
num_train_timesteps``, then the low-noise ``transformer_2`` with ``guidance_scale_2``
(:mod:`models.sampling.experts`; its DFS layouts are recomputed at its first sparse step).

The text encoder (11 GB in bf16 for UMT5-XXL) can leave device memory after each encoding
(``keep_text_encoder=False``, the default on GPUs), so that the 14B transformer fits beside the
rest; it is read again from the checkpoint for the next call.

Three progress bars (``progress=True``), their times kept apart in
:attr:`WanPipelineOutput.timings`: the text encoder's (a tick per shard read when it is read
again, and one for the encoding; :func:`make_text_bar`), the sampler's (a tick per step), and the
VAE's (a tick per decoded chunk of each tile, reported from inside the jit program;
:func:`make_decode_bar`). The pipeline keeps one bar of each for its lifetime, so the decoder
compiles once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from dfsattn_jax.checks import check_nonnegative_int, check_positive_int
from dfsattn_jax.schedule import get_schedule_preset
from models.common.backend import make_backend
from models.common.progress import TickBar, host_callbacks_available
from models.pipelines.wan_repository import (
    check_channels,
    check_text_width,
    read_boundary_ratio,
    read_expert_config,
    read_scheduler,
)
from models.sampling import Sampler
from models.sampling.experts import check_expert_cache
from models.text_encoders.prompts import DEFAULT_MAX_SEQUENCE_LENGTH, PromptTokenizer, trim_and_pad
from models.text_encoders.umt5 import UMT5Config
from models.text_encoders.umt5_loading import load_umt5, read_umt5_config, umt5_shard_count
from models.vae import (
    WanVAE,
    WanVAETiling,
    decode_ticks,
    decode_video,
    denormalize_latents,
    load_wan_vae,
    read_wan_vae_config,
)
from models.wan.loading import load_wan, read_wan_config

__all__ = [
    "DECODE_BAR",
    "OUTPUT_TYPES",
    "TEXT_BAR",
    "WanPipeline",
    "WanPipelineOutput",
    "check_text_width",
    "decode_frames",
    "encode_prompts",
    "make_decode_bar",
    "make_text_bar",
    "read_scheduler",
]

#: What ``output_type`` takes: diffusers' ``"np"`` (frames in [0, 1]) and ``"latent"``.
OUTPUT_TYPES = ("np", "latent")
#: The labels of the text encoder's and the VAE decoder's progress bars.
TEXT_BAR = "text encoder"
DECODE_BAR = "VAE decode"


@dataclasses.dataclass(frozen=True)
class WanPipelineOutput:
    """What :meth:`WanPipeline.__call__` returns.

    Attributes:
      frames: ``output_type="np"``: float32 ``[B, F, H, W, 3]`` in [0, 1] (diffusers' frames);
        ``"latent"``: the final latents ``[B, 16, f, h, w]``.
      timings: seconds spent on ``text`` (tokenizing and encoding), ``compile`` (the sampling
        program's first compile, NaN when it was already compiled), ``sampling`` (the steps),
        ``decode`` (the VAE, its compile included).
      sparsity: the skipped block fraction DFSAttn measured over the run (0 for dense attention).
    """

    frames: np.ndarray
    timings: dict[str, float]
    sparsity: float


@nnx.jit
def _encode(encoder, input_ids, attention_mask):
    return encoder(input_ids, attention_mask)


def make_text_bar(show: bool = True) -> TickBar:
    """The text encoder's bar (:data:`TEXT_BAR`): a tick per checkpoint shard read (its total
    from :func:`~models.text_encoders.umt5_loading.umt5_shard_count`), one for the encoding."""
    return TickBar(TEXT_BAR, unit="step", show=show)


def make_decode_bar(show: bool = True) -> TickBar:
    """The VAE's bar (:data:`DECODE_BAR`), for :func:`decode_frames`: a tick per decoded chunk of
    each tile."""
    return TickBar(DECODE_BAR, unit="chunk", show=show)


def encode_prompts(
    tokenizer: PromptTokenizer,
    encoder: nnx.Module,
    prompts: Sequence[str],
    max_sequence_length: int,
    dtype: Any,
    bar: TickBar | None = None,
) -> Float[Array, "b l d"]:
    """The Wan transformer's context for ``prompts`` (WanPipeline's ``encode_prompt``): cleaned,
    tokenized, encoded by UMT5, each prompt's rows then zeros, ``[B, max_sequence_length, d]`` in
    ``dtype``. ``bar``: an open bar ticked once the context is computed (the call then waits for
    it)."""
    tokens = tokenizer(list(prompts), max_sequence_length=max_sequence_length)
    mask = jnp.asarray(tokens.attention_mask)
    hidden = _encode(encoder, jnp.asarray(tokens.input_ids), mask)
    text = trim_and_pad(hidden.astype(dtype), mask)
    if bar is not None:
        jax.block_until_ready(text)
        bar.tick()
    return text


def decode_frames(
    vae: WanVAE,
    latents: Float[Array, "b c f h w"],
    tiling: WanVAETiling | None = None,
    bar: TickBar | None = None,
) -> np.ndarray:
    """The sampler's latents as frames: denormalized, decoded by the VAE, mapped from [-1, 1] to
    [0, 1]: float32 ``[B, F, H, W, 3]`` (diffusers' ``output_type="np"``).

    ``bar``: opened with the decode's tick total (:func:`~models.vae.wan_vae.decode_ticks`),
    ticked from the jit program as each chunk of each tile is decoded, closed at the end. The
    decoder is compiled per bar: keep one bar (:func:`make_decode_bar`) for many calls. The
    frames do not depend on it."""
    z = denormalize_latents(jnp.asarray(latents).astype(vae.dtype), vae.config)
    if bar is None:
        return _to_frames(decode_video(vae, z, tiling=tiling))
    bar.open(decode_ticks(z.shape, tiling, spatial_factor=vae.config.spatial_factor))
    try:
        if host_callbacks_available():
            frames = _to_frames(decode_video(vae, z, tiling=tiling, progress=bar.tick))
            jax.effects_barrier()  # every tick has reached the bar
        else:  # no CPU device for callbacks (JAX_PLATFORMS without cpu): the bar fills at the end
            frames = _to_frames(decode_video(vae, z, tiling=tiling))
            bar.complete()
    finally:
        bar.close()
    return frames


def _to_frames(video: Float[Array, "b c f h w"]) -> np.ndarray:
    """``video`` in [-1, 1] as float32 ``[B, F, H, W, C]`` in [0, 1], on the host."""
    frames = jnp.clip(video.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0)
    return np.asarray(jnp.transpose(frames, (0, 2, 3, 4, 1)))


class WanPipeline:
    """Wan2.1 and Wan2.2 A14B text to video: prompt in, frames out (see the module docstring).

    Build it with :meth:`from_pretrained`; the constructor takes the loaded parts.
    :data:`PIPELINE_CLASS` is the diffusers class ``model_index.json`` names;
    :data:`IMAGE_TO_VIDEO` says which channels the transformer takes (:func:`check_channels`).

    Attributes:
      transformer_2: the low-noise expert of a Wan2.2 A14B repository (``None``: Wan2.1).
      boundary_ratio: where it takes over (``None`` without it).
      text_bar: the text encoder's bar (:func:`make_text_bar`), opened by each
        :meth:`encode_prompt`: the shards read (when the encoder was let go) plus 1.
      decode_bar: the VAE's bar (:func:`make_decode_bar`), opened by each :meth:`decode`.
      Both count their ticks (``count`` of ``total``) even when not shown (``progress=False``).
    """

    PIPELINE_CLASS = "WanPipeline"
    IMAGE_TO_VIDEO = False

    def __init__(
        self,
        *,
        transformer: nnx.Module,
        tokenizer: PromptTokenizer,
        vae: WanVAE,
        sampler: Sampler,
        text_encoder: nnx.Module | None = None,
        text_encoder_path: str | os.PathLike | None = None,
        text_encoder_config: UMT5Config | None = None,
        keep_text_encoder: bool = True,
        dtype: Any = None,
        vae_tiling: WanVAETiling | None = None,
        progress: bool = True,
        transformer_2: nnx.Module | None = None,
        boundary_ratio: float | None = None,
    ):
        if text_encoder is None and text_encoder_path is None:
            raise ValueError("give text_encoder or text_encoder_path")
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("give transformer_2 and boundary_ratio together (Wan2.2 A14B) or neither")
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_ratio = boundary_ratio
        self.tokenizer = tokenizer
        self.vae = vae
        self.sampler = sampler
        self._text_encoder = text_encoder
        self._text_encoder_path = text_encoder_path
        self._text_encoder_config = text_encoder_config
        self.keep_text_encoder = bool(keep_text_encoder)
        self.dtype = dtype
        self.vae_tiling = vae_tiling
        self.text_bar = make_text_bar(progress)
        self.decode_bar = make_decode_bar(progress)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: Any = None,
        attention: str = "dfs",
        schedule: str = "wan2.1",
        keep_text_encoder: bool | None = None,
        vae_tiling: WanVAETiling | None = None,
        progress: bool = True,
        expert_cache: str = "refresh",
    ) -> WanPipeline:
        """Reads a diffusers Wan2.1 repository: ``text_encoder/``, ``tokenizer/``, ``vae/``,
        ``transformer/`` and ``scheduler/``; a Wan2.2 A14B one also ``transformer_2/``, with
        ``boundary_ratio`` from ``model_index.json``
        (:func:`~models.pipelines.wan_repository.read_boundary_ratio`).

        Args:
          path: the repository folder.
          dtype: the transformer's and the text encoder's dtype (default: bf16 on accelerators,
            float32 on CPU); the VAE decodes in float32 on CPU and bf16 on accelerators likewise.
          attention: ``"dfs"`` (DFSAttn) or ``"dense"``.
          schedule: the DFS schedule preset (:data:`dfsattn_jax.schedule.SCHEDULE_PRESETS`).
          keep_text_encoder: keep UMT5 on the device between calls (default: only off GPU).
          vae_tiling: decode in spatial tiles (diffusers' ``enable_tiling``; ``None``: no tiling).
          progress: progress bars (the text encoder, the sampling steps, the VAE decode) and
            the names of the files read.
          expert_cache: with two experts, how DFSAttn's mask cache crosses the switch
            (:data:`~models.sampling.experts.EXPERT_CACHE_MODES`; ``"refresh"``: the low-noise
            expert's first sparse step recomputes the layouts).

        Raises:
          ValueError: naming the folder or file that is missing or malformed, before any weight
            is read (every config is read first, then the tokenizer, then the weights).
        """
        root = pathlib.Path(path)
        if not root.is_dir():
            raise ValueError(f"path {str(path)!r} is not a folder (a diffusers Wan repository)")
        missing = [p for p in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler") if not (root / p).is_dir()]
        if missing:
            raise ValueError(f"checkpoint {str(path)!r} lacks the folders {missing} of a diffusers Wan repository")
        if attention not in ("dfs", "dense"):
            raise ValueError(f"attention must be 'dfs' or 'dense', got {attention!r}")
        check_expert_cache(expert_cache)
        dfs = get_schedule_preset(schedule) if attention == "dfs" else None
        shift, train_steps = read_scheduler(root)
        boundary_ratio = read_boundary_ratio(root, cls.PIPELINE_CLASS)
        # Every config, and the tokenizer, before any weight.
        wan_config = read_wan_config(root)
        expert_config = None if boundary_ratio is None else read_expert_config(root, wan_config)
        text_config = read_umt5_config(root / "text_encoder")
        check_text_width(text_config, wan_config.text_dim)
        vae_config = read_wan_vae_config(root)
        check_channels(wan_config, vae_config, image_to_video=cls.IMAGE_TO_VIDEO)
        tokenizer = PromptTokenizer.from_pretrained(root / "tokenizer")
        if keep_text_encoder is None:
            keep_text_encoder = jax.default_backend() != "gpu"
        say = (lambda name: print(f"reading {name}", flush=True)) if progress else None
        text_encoder = (
            load_umt5(root / "text_encoder", dtype=dtype, config=text_config, progress=say) if keep_text_encoder else None
        )
        transformer = load_wan(root, dtype=dtype, config=wan_config, progress=say)
        transformer_2 = None
        if expert_config is not None:
            transformer_2 = load_wan(root / "transformer_2", dtype=dtype, config=expert_config, progress=say)
        vae = load_wan_vae(root, dtype=dtype, config=vae_config, progress=say)
        sampler = Sampler(
            transformer, make_backend(attention, dfs), solver="unipc", shift=shift, schedule="unipc",
            num_train_timesteps=train_steps, progress=progress, model_2=transformer_2,
            boundary=None if boundary_ratio is None else boundary_ratio * train_steps, expert_cache=expert_cache,
        )  # fmt: skip
        return cls(
            transformer=transformer, tokenizer=tokenizer, vae=vae, sampler=sampler, text_encoder=text_encoder,
            text_encoder_path=root / "text_encoder", text_encoder_config=text_config,
            keep_text_encoder=keep_text_encoder, dtype=dtype, vae_tiling=vae_tiling, progress=progress,
            transformer_2=transformer_2, boundary_ratio=boundary_ratio,
        )  # fmt: skip

    # -- the text ---------------------------------------------------------------------

    def _text_encoder_model(self) -> nnx.Module:
        """UMT5, read from the checkpoint (a tick of :attr:`text_bar` per shard) if it was let go."""
        if self._text_encoder is None:
            self._text_encoder = load_umt5(
                self._text_encoder_path, dtype=self.dtype, config=self._text_encoder_config,
                progress=lambda _name: self.text_bar.tick(),
            )  # fmt: skip
        return self._text_encoder

    def encode_prompt(
        self, prompts: Sequence[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    ) -> Float[Array, "b l d"]:
        """The transformer's context for ``prompts``: UMT5's output, each prompt's rows then
        zeros, ``[B, max_sequence_length, d_model]`` in the transformer's dtype. Shown on
        :attr:`text_bar`: the shards read (when UMT5 was let go), then the encoding."""
        reads = umt5_shard_count(self._text_encoder_path) if self._text_encoder is None else 0
        self.text_bar.open(reads + 1)
        try:
            return encode_prompts(
                self.tokenizer, self._text_encoder_model(), prompts, max_sequence_length, self.transformer.dtype,
                self.text_bar,
            )  # fmt: skip
        finally:
            self.text_bar.close()

    def _release_text_encoder(self) -> None:
        if not self.keep_text_encoder:
            self._text_encoder = None  # its device arrays are freed; read again on the next call

    # -- the call ---------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        latents: Float[Array, "b c f h w"] | np.ndarray | None = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        output_type: str = "np",
        seed: int | None = None,
    ) -> WanPipelineOutput:
        """A video per prompt (and per ``num_videos_per_prompt``), with diffusers' arguments.

        Args:
          prompt: one prompt or a list (a batch).
          negative_prompt: one or one per prompt; ``None``: diffusers' default, the empty prompt.
            Used when ``guidance_scale > 1`` (classifier-free guidance, one batch of 2B).
          height, width: the video size, multiples of 16.
          num_frames: frames; not of the form 4k + 1, it is rounded down to one (a warning says
            so), as diffusers does.
          num_inference_steps: denoising steps.
          guidance_scale: classifier-free guidance scale (of the high-noise expert with two).
          guidance_scale_2: the low-noise expert's scale (``None``: ``guidance_scale``); only for
            a two-expert (Wan2.2 A14B) pipeline. As in diffusers, ``guidance_scale > 1`` alone
            turns guidance on.
          num_videos_per_prompt: videos per prompt, from different noise.
          latents: the initial noise ``[B, 16, (F - 1) / 4 + 1, H / 8, W / 8]`` (diffusers'
            ``latents``); ``None``: standard normal from ``seed``.
          max_sequence_length: text tokens (512 for Wan).
          output_type: ``"np"`` (frames) or ``"latent"``.
          seed: the noise's seed when ``latents`` is not given (default 0).

        Raises:
          ValueError: naming the argument, before any work.
        """
        return self._generate(
            prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale, guidance_scale_2,
            num_videos_per_prompt, latents, max_sequence_length, output_type, seed,
        )  # fmt: skip

    def _generate(
        self, prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
        guidance_scale_2, num_videos_per_prompt, latents, max_sequence_length, output_type, seed,
        condition: Callable[[tuple[int, ...]], Array] | None = None,
    ) -> WanPipelineOutput:
        """:meth:`__call__`'s work; ``condition(shape)``, called once the arguments are checked,
        gives the latent channels the transformer takes after the noise's (image to video)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        negatives = self._negatives(negative_prompt, len(prompts))
        shape = self._latent_shape(height, width, num_frames, len(prompts), num_videos_per_prompt)
        steps = check_positive_int(num_inference_steps, "num_inference_steps")
        check_positive_int(max_sequence_length, "max_sequence_length")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if guidance_scale_2 is not None:
            if self.boundary_ratio is None:
                raise ValueError("guidance_scale_2 is only supported when the pipeline's boundary_ratio is not None")
            if not math.isfinite(float(guidance_scale_2)):
                raise ValueError(f"guidance_scale_2 must be a finite number, got {guidance_scale_2!r}")
        noise = self._noise(latents, shape, seed)
        guided = float(guidance_scale) > 1.0
        extra = None if condition is None else condition(shape)

        t0 = time.perf_counter()
        text = self.encode_prompt(prompts + (negatives if guided else []), max_sequence_length)
        self._release_text_encoder()
        text = jnp.repeat(text, num_videos_per_prompt, axis=0) if num_videos_per_prompt > 1 else text
        cond, uncond = (text[: shape[0]], text[shape[0] :]) if guided else (text, None)
        jax.block_until_ready(text)
        text_s = time.perf_counter() - t0
        scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        result = self.sampler(
            noise, cond, uncond, num_steps=steps, guidance_scale=float(guidance_scale), guidance_scale_2=scale_2,
            condition=extra,
        )
        timings = {"text": text_s, "compile": result.compile_s, "sampling": result.time_s, "decode": 0.0}
        if output_type == "latent":
            return WanPipelineOutput(np.asarray(result.latents), timings, float(result.sparsity))
        t0 = time.perf_counter()
        frames = self.decode(result.latents)
        timings["decode"] = time.perf_counter() - t0
        return WanPipelineOutput(frames, timings, float(result.sparsity))

    def decode(self, latents: Float[Array, "b c f h w"]) -> np.ndarray:
        """:func:`decode_frames` with this pipeline's VAE, tiling and :attr:`decode_bar`."""
        return decode_frames(self.vae, latents, self.vae_tiling, self.decode_bar)

    # -- argument checks --------------------------------------------------------------

    @staticmethod
    def _negatives(negative_prompt, count: int) -> list[str]:
        if negative_prompt is None:
            return [""] * count
        negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != count or not all(isinstance(p, str) for p in negatives):
            raise ValueError(
                f"negative_prompt must be a string or a list of {count} strings (one per prompt), got {negative_prompt!r}"
            )
        return negatives

    def _latent_shape(self, height, width, num_frames, prompts: int, per_prompt) -> tuple[int, ...]:
        height = check_positive_int(height, "height")
        width = check_positive_int(width, "width")
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height} and {width}")
        frames = check_positive_int(num_frames, "num_frames")
        spatial, temporal = self.vae.config.spatial_factor, self.vae.config.temporal_factor
        if frames % temporal != 1:
            rounded = frames // temporal * temporal + 1
            warnings.warn(f"num_frames - 1 must be a multiple of {temporal}: {frames} rounded to {rounded}", stacklevel=3)
            frames = rounded
        per_prompt = check_positive_int(per_prompt, "num_videos_per_prompt")
        channels = self.transformer.config.out_channels  # the noise's: I2V's transformer takes more
        return (prompts * per_prompt, channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)

    @staticmethod
    def _noise(latents, shape: tuple[int, ...], seed: int | None) -> Array:
        if latents is not None:
            latents = jnp.asarray(latents)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {list(shape)} for these sizes, got {list(latents.shape)}")
            if not jnp.issubdtype(latents.dtype, jnp.floating):
                raise ValueError(f"latents must be floating point, got {latents.dtype}")
            return latents.astype(jnp.float32)
        seed = 0 if seed is None else check_nonnegative_int(seed, "seed")
        return jax.random.normal(jax.random.key(seed), shape, jnp.float32)
