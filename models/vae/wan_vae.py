"""The Wan video VAEs (diffusers' ``AutoencoderKLWan``) in Flax NNX: encode and decode.

Wan2.1's VAE maps a video ``[B, 3, F, H, W]`` in [-1, 1] with ``F = 4k + 1`` frames to a latent
``[B, 16, k + 1, H/8, W/8]`` and back; Wan2.2's (config ``"wan2.2"``, TI2V-5B) to
``[B, 48, k + 1, H/16, W/16]``: it patchifies the video 2 x 2 into 12 channels before its encoder
and back after its decoder (:mod:`models.vae.wan22_blocks`), and its levels are residual blocks
with parameter-free shortcuts. The configs are in :mod:`models.vae.wan_vae_config`.

Both directions run causally, chunk by chunk, as diffusers does: the encoder takes frame 0 alone
and then chunks of 4 frames; the decoder takes latent frame 0 alone (one output frame) and then
one latent frame at a time (four output frames each). The first chunk runs on its own; the others
run in one ``lax.scan`` whose carry is the causal cache (a pytree of the last frames each causal
conv saw; see :mod:`models.vae.wan_vae_layers`). ``chunk_size`` groups more frames per scan step and ``None``
runs the whole video in one pass: the results are the same (up to float rounding), only time and
memory change. A decode can report each chunk as it is computed (``progress``, a host function
called through ``jax.debug.callback``; :func:`decode_ticks` calls in all), for a progress bar.

Parameters and activations use ``param_dtype`` / ``dtype``; the RMS norms and the tile blending
compute in float32. ``decode`` and ``encode`` are traceable: wrap them in ``nnx.jit`` (with
``tiling`` and ``chunk_size`` static) or call :func:`decode_video` / :func:`encode_video`.

The pipeline's latent normalization (``latents_mean`` / ``latents_std`` of the config) is not part
of ``decode``/``encode``, as in diffusers: :func:`denormalize_latents` before decoding,
:func:`normalize_latents` after encoding (image-to-video conditioning).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from dfsattn_jax.checks import check_positive_int
from models.common.layers import resolve_dtypes
from models.common.progress import done_marker
from models.vae.wan22_blocks import patchify, unpatchify
from models.vae.wan_vae_coders import WanDecoder3d, WanEncoder3d
from models.vae.wan_vae_config import (
    CONFIGS,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAEConfig,
    get_vae_config,
)
from models.vae.wan_vae_layers import CausalConv3d
from models.vae.wan_vae_tiling import WanVAETiling, tile_starts, tiled_apply

__all__ = [
    "CONFIGS",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "WanVAE",
    "WanVAEConfig",
    "WanVAEPosterior",
    "WanVAETiling",
    "decode_ticks",
    "decode_video",
    "denormalize_latents",
    "encode_video",
    "get_vae_config",
    "normalize_latents",
]

# diffusers' clamp of the posterior's log-variance.
_LOGVAR_RANGE = (-30.0, 20.0)
#: A host function a decode reports to: called with one scalar per decoded chunk.
Tick = Callable[[Array], None]


class WanVAEPosterior(NamedTuple):
    """The encoder's diagonal Gaussian: ``mean`` and ``logvar`` (clamped to [-30, 20]), both
    ``[B, z_dim, F', H/s, W/s]`` (``s`` the spatial factor, 8 or 16)."""

    mean: Array
    logvar: Array

    def mode(self) -> Array:
        """The mean (what image-to-video conditioning uses)."""
        return self.mean

    def sample(self, key: jax.Array) -> Array:
        """``mean + exp(logvar / 2) * noise`` with standard normal noise drawn from ``key``."""
        noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.logvar) * noise


def _stats(config: WanVAEConfig, dtype) -> tuple[Array, Array]:
    shape = (1, config.z_dim, 1, 1, 1)
    mean = np.asarray(config.latents_mean, np.float32).reshape(shape)
    inv_std = (np.float32(1.0) / np.asarray(config.latents_std, np.float32)).reshape(shape)
    return jnp.asarray(mean, dtype), jnp.asarray(inv_std, dtype)


def denormalize_latents(latents: Float[Array, "b c f h w"], config: WanVAEConfig) -> Float[Array, "b c f h w"]:
    """The sampler's latents as :meth:`WanVAE.decode` takes them: ``latents / (1 / std) + mean``
    (WanPipeline's arithmetic, in the latents' dtype)."""
    mean, inv_std = _stats(config, latents.dtype)
    return latents / inv_std + mean


def normalize_latents(latents: Float[Array, "b c f h w"], config: WanVAEConfig) -> Float[Array, "b c f h w"]:
    """:meth:`WanVAE.encode`'s mean as the transformer takes it: ``(latents - mean) * (1 / std)``
    (the image-to-video pipeline's arithmetic, in the latents' dtype)."""
    mean, inv_std = _stats(config, latents.dtype)
    return (latents - mean) * inv_std


def _check_5d(name: str, x: Any, channels: int, channel_name: str) -> None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 5 or shape[1] != channels:
        raise ValueError(f"{name} must be [B, {channels}, F, H, W] ({channel_name}), got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if min(shape) < 1:
        raise ValueError(f"{name} must not be empty, got shape {shape}")


def _check_tiling(tiling: Any, factor: int) -> None:
    if tiling is not None:
        if not isinstance(tiling, WanVAETiling):
            raise ValueError(f"tiling must be a WanVAETiling or None, got {type(tiling).__name__}")
        tiling.check(factor)


def _chunks(x: Array, first: int, size: int) -> Array:
    """``x[:, first:]`` ``[B, T, ...]`` as ``[T / size, B, size, ...]``."""
    rest = x[:, first:]
    b, t = rest.shape[:2]
    return jnp.moveaxis(rest.reshape((b, t // size, size) + rest.shape[2:]), 1, 0)


def _unchunk(y: Array) -> Array:
    """``[N, B, S, ...] -> [B, N * S, ...]``."""
    n, b, s = y.shape[:3]
    return jnp.moveaxis(y, 0, 1).reshape((b, n * s) + y.shape[3:])


def _causal_scan(fn, x: Array, first: int, chunk_size: int | None, tick: Tick | None = None) -> Array:
    """``fn(chunk, cache) -> (y, cache)`` over ``x``'s frames: the first ``first`` frames with no
    cache, then chunks of ``chunk_size`` frames in a ``lax.scan`` (``None``: all at once).

    ``tick``: a host function called (``jax.debug.callback``) once the first frames' output and
    then each chunk's output is computed (with its :func:`done_marker`): ``1 + (T - first) /
    chunk_size`` calls, one with ``chunk_size=None``."""

    def reported(y: Array) -> Array:
        if tick is not None:
            jax.debug.callback(tick, done_marker(y))
        return y

    if chunk_size is None:
        return reported(fn(x, None)[0])
    y0, cache = fn(x[:, :first], None)
    y0 = reported(y0)
    if x.shape[1] == first:
        return y0

    def step(cache, chunk):
        y, cache = fn(chunk, cache)
        return cache, reported(y)

    _, ys = jax.lax.scan(step, cache, _chunks(x, first, chunk_size))
    return jnp.concatenate([y0, _unchunk(ys).astype(y0.dtype)], axis=1)


def _decodes_in_tiles(tiling: WanVAETiling | None, h: int, w: int, factor: int) -> bool:
    """Whether a latent of ``h x w`` is decoded in tiles: ``tiling`` given and the decoded size
    (``factor`` pixels per latent) exceeds its tile on either axis (diffusers' rule)."""
    return tiling is not None and (
        w > tiling.tile_sample_min_width // factor or h > tiling.tile_sample_min_height // factor
    )


def decode_ticks(
    latent_shape: tuple[int, ...],
    tiling: WanVAETiling | None = None,
    chunk_size: int | None = 1,
    *,
    spatial_factor: int = 8,
) -> int:
    """How many times :meth:`WanVAE.decode` calls its ``progress`` for latents of
    ``latent_shape`` ``[B, z_dim, F, h, w]``, ``tiling`` and ``chunk_size`` (arguments it
    accepts): per tile, once for frame 0 and once per chunk of the ``F - 1`` frames after it (once
    in all with ``chunk_size=None``), times the tiles (``tile_starts`` rows x columns when the
    latent is decoded in tiles, else 1). ``spatial_factor``: the config's pixels per latent (8;
    16 for Wan2.2: pass ``vae.config.spatial_factor``).

    Raises:
      ValueError: for a shape that is not 5-d (the other arguments are checked by ``decode``).
    """
    if len(latent_shape) != 5:
        raise ValueError(f"latent_shape must be [B, z_dim, F, h, w], got {tuple(latent_shape)}")
    frames, h, w = latent_shape[2:5]
    per_tile = 1 if chunk_size is None else 1 + (frames - 1) // chunk_size
    if not _decodes_in_tiles(tiling, h, w, spatial_factor):
        return per_tile
    rows = tile_starts(h, tiling.tile_sample_stride_height // spatial_factor)
    cols = tile_starts(w, tiling.tile_sample_stride_width // spatial_factor)
    return per_tile * len(rows) * len(cols)


class WanVAE(nnx.Module):
    """diffusers' ``AutoencoderKLWan`` (Wan2.1, or Wan2.2 with its config): ``encoder``,
    ``quant_conv``, ``post_quant_conv``, ``decoder``, with the checkpoint's module names (see
    :mod:`models.vae.wan_vae_loading`)."""

    def __init__(self, config: WanVAEConfig | str = "wan2.1", *, dtype=None, param_dtype=None,
                 rngs: nnx.Rngs | None = None):  # fmt: skip
        config = get_vae_config(config)
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.dtype = dtype
        levels = len(config.dim_mult) - 1
        temporal = config.temporal_downsample[:levels]
        self.encoder = WanEncoder3d(
            in_channels=config.in_channels, dim=config.base_dim, z_dim=2 * config.z_dim, dim_mult=config.dim_mult,
            num_res_blocks=config.num_res_blocks, temporal_downsample=temporal, is_residual=config.is_residual, **kw,
        )  # fmt: skip
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1, **kw)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1, **kw)
        self.decoder = WanDecoder3d(
            dim=config.decoder_dim, z_dim=config.z_dim, dim_mult=config.dim_mult,
            num_res_blocks=config.num_res_blocks, temporal_upsample=temporal[::-1],
            out_channels=config.out_channels, is_residual=config.is_residual, **kw,
        )  # fmt: skip

    # ------------------------------------------------------------------------------- decoding

    def decode(
        self,
        latents: Float[Array, "b z f h w"],
        *,
        tiling: WanVAETiling | None = None,
        chunk_size: int | None = 1,
        progress: Tick | None = None,
    ) -> Float[Array, "b c f2 h2 w2"]:
        """Video ``[B, video_out_channels, 4 (F - 1) + 1, s h, s w]`` clamped to [-1, 1], ``s`` the
        config's ``spatial_factor`` (8; Wan2.2 16) (diffusers' ``decode(latents).sample``;
        ``latents`` as diffusers takes them, i.e. after :func:`denormalize_latents`).

        Args:
          latents: ``[B, z_dim, F, h, w]``.
          tiling: spatial tiling (diffusers' ``enable_tiling``), used when ``s h`` or ``s w``
            exceeds the tile size; ``None``: one tile. With a patch size ``p`` (Wan2.2) the
            tiles are blended before unpatchifying, over ``(tile - stride) / p`` pixels.
          chunk_size: latent frames per scan step after frame 0 (must divide ``F - 1``);
            ``None``: the whole video in one pass.
          progress: a host function called through ``jax.debug.callback`` (with a scalar
            :func:`~models.common.progress.done_marker`) as each tile's frame 0 and then each
            of its chunks is decoded, :func:`decode_ticks` times in all (``TickBar.tick`` fits).
            The program is the same with or without it (``None`` reports to a no-op), so the
            frames are bitwise the same.

        Raises:
          ValueError: for a wrong shape or dtype, a ``chunk_size`` that does not divide
            ``F - 1``, or a bad ``tiling``.
        """
        cfg = self.config
        _check_5d("latents", latents, cfg.z_dim, "z_dim channels")
        _check_tiling(tiling, cfg.spatial_factor)
        frames = latents.shape[2]
        if chunk_size is not None:
            check_positive_int(chunk_size, "chunk_size")
            if (frames - 1) % chunk_size:
                raise ValueError(f"chunk_size ({chunk_size}) must divide the latent frames after the first ({frames - 1})")
        z = jnp.moveaxis(latents, 1, -1)
        h, w = z.shape[2:4]
        f, p = cfg.spatial_factor, cfg.patch_size

        # No callback without ``progress``: the program stays pure (no host round trip per
        # chunk, and it runs where JAX has no CPU device for callbacks). With one, XLA may
        # compile a one-step scan as a loop rather than inline it: the frames can then differ
        # from a decode without a bar in the last bit of float32 (the tests bound it).
        def run(tile):
            return self._decode_frames(tile, chunk_size, progress)

        if _decodes_in_tiles(tiling, h, w, f):
            # diffusers' tiled_decode: latent tiles, blended in the decoder's (patchified) pixels.
            th, tw = tiling.tile_sample_min_height, tiling.tile_sample_min_width
            sh, sw = tiling.tile_sample_stride_height, tiling.tile_sample_stride_width
            video = tiled_apply(
                run, z, tile=(th // f, tw // f), stride=(sh // f, sw // f),
                out_blend=(th // p - sh // p, tw // p - sw // p), out_stride=(sh // p, sw // p),
                out_size=(h * f // p, w * f // p),
            )  # fmt: skip
        else:
            video = run(z)
        return jnp.moveaxis(jnp.clip(unpatchify(video, p), -1.0, 1.0), -1, 1)

    def _decode_frames(
        self, z: Float[Array, "b f h w c"], chunk_size: int | None, progress: Tick | None
    ) -> Float[Array, "b t hh ww o"]:
        x = self.post_quant_conv(z)[0]
        return _causal_scan(self.decoder, x, 1, chunk_size, progress)

    # ------------------------------------------------------------------------------- encoding

    def encode(
        self,
        video: Float[Array, "b c f h w"],
        *,
        tiling: WanVAETiling | None = None,
        chunk_size: int | None = 4,
    ) -> WanVAEPosterior:
        """The posterior of ``video`` ``[B, video_in_channels, F, H, W]`` (values in [-1, 1],
        ``F = 4k + 1``): mean and clamped log-variance ``[B, z_dim, k + 1, H/s, W/s]``, ``s`` the
        spatial factor (diffusers' ``encode(video).latent_dist``'s ``mean`` / ``logvar``). A
        Wan2.2 (residual) VAE needs ``H`` and ``W`` to be multiples of ``s`` (16), where diffusers
        fails in a reshape.

        Args:
          video: the frames.
          tiling: spatial tiling (diffusers' ``enable_tiling``), used when ``H`` or ``W``
            exceeds the tile size; ``None``: one tile. With a patch size ``p`` (Wan2.2) the
            tiles are cut from the patchified video with the same sizes and strides, as
            diffusers' ``tiled_encode`` does (so a tile covers ``p`` times as many pixels).
          chunk_size: frames per scan step after frame 0, a multiple of the temporal factor (4)
            that divides ``F - 1``; ``None``: the whole video in one pass.

        Raises:
          ValueError: for a wrong shape or dtype, a frame count that is not ``4k + 1`` (diffusers
            silently drops the extra frames), a size a Wan2.2 VAE cannot fold, a bad
            ``chunk_size`` or ``tiling``.
        """
        cfg = self.config
        _check_5d("video", video, cfg.video_in_channels, "video_in_channels")
        _check_tiling(tiling, cfg.spatial_factor)
        # The residual levels fold 2 x 2 pixels at every level, the patchify p x p.
        f = cfg.spatial_factor if cfg.is_residual else cfg.patch_size
        if f > 1:
            if video.shape[3] % f or video.shape[4] % f:
                raise ValueError(f"video height and width must be multiples of {f}, got shape {video.shape}")
        frames, tf = video.shape[2], cfg.temporal_factor
        if (frames - 1) % tf:
            raise ValueError(f"video must have {tf}k + 1 frames, got {frames}")
        if chunk_size is not None:
            check_positive_int(chunk_size, "chunk_size")
            if chunk_size % tf or (frames - 1) % chunk_size:
                raise ValueError(
                    f"chunk_size ({chunk_size}) must be a multiple of {tf} that divides the frames after the "
                    f"first ({frames - 1})"
                )
        x = jnp.moveaxis(video, 1, -1)
        h, w = x.shape[2:4]
        x = patchify(x, cfg.patch_size)
        # The encoder's own factor: the patchified video's pixels per latent.
        f = cfg.spatial_factor // cfg.patch_size

        def run(tile):
            return self.quant_conv(_causal_scan(self.encoder, tile, 1, chunk_size))[0]

        # diffusers tests the video's size against the tile, then tiles the patchified video.
        if tiling is not None and (w > tiling.tile_sample_min_width or h > tiling.tile_sample_min_height):
            th, tw = tiling.tile_sample_min_height // f, tiling.tile_sample_min_width // f
            sh, sw = tiling.tile_sample_stride_height // f, tiling.tile_sample_stride_width // f
            moments = tiled_apply(
                run, x, tile=(tiling.tile_sample_min_height, tiling.tile_sample_min_width),
                stride=(tiling.tile_sample_stride_height, tiling.tile_sample_stride_width),
                out_blend=(th - sh, tw - sw), out_stride=(sh, sw), out_size=(x.shape[2] // f, x.shape[3] // f),
            )  # fmt: skip
        else:
            moments = run(x)
        moments = jnp.moveaxis(moments, -1, 1)
        mean, logvar = jnp.split(moments, 2, axis=1)
        return WanVAEPosterior(mean, jnp.clip(logvar, *_LOGVAR_RANGE))


@nnx.jit(static_argnames=("tiling", "chunk_size", "progress"))
def decode_video(
    vae: WanVAE,
    latents: Float[Array, "b z f h w"],
    tiling: WanVAETiling | None = None,
    chunk_size: int | None = 1,
    progress: Tick | None = None,
) -> Float[Array, "b c f2 h2 w2"]:
    """``vae.decode(latents, tiling=..., chunk_size=..., progress=...)``, compiled (one program
    per shape and static argument). ``progress`` is static and keyed by equality: a bar's bound
    ``tick`` compares by the bar's identity, so a caller that keeps one bar compiles once (a new
    lambda each call compiles each call)."""
    return vae.decode(latents, tiling=tiling, chunk_size=chunk_size, progress=progress)


@nnx.jit(static_argnames=("tiling", "chunk_size"))
def encode_video(vae: WanVAE, video: Array, tiling: WanVAETiling | None = None, chunk_size: int | None = 4) -> WanVAEPosterior:
    """``vae.encode(video, tiling=..., chunk_size=...)``, compiled (one program per shape)."""
    return vae.encode(video, tiling=tiling, chunk_size=chunk_size)
