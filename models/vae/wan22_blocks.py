"""The blocks the Wan2.2 VAE adds to Wan2.1's (diffusers' ``AutoencoderKLWan`` with
``is_residual=True`` and ``patch_size=2``), channel-last ``[B, T, H, W, C]``, with the causal
cache of :mod:`models.vae.wan_vae_layers`.

- :func:`patchify` / :func:`unpatchify`: the 2 x 2 space-to-channel move before the encoder and
  its inverse after the decoder; channel ``c * p^2 + w_off * p + h_off`` (diffusers' order: the
  width offset before the height offset).
- :func:`avg_down` (diffusers' ``AvgDown3D``, no parameters): time front-padded with zero frames to
  a multiple of ``factor_t``; each ``factor_t x factor_s x factor_s`` block folded into channels
  (index ``c * f + t_off * f_s^2 + h_off * f_s + w_off``, ``f = f_t f_s^2``), then groups of
  ``C f / C_out`` consecutive channels averaged.
- :func:`dup_up` (``DupUp3D``, no parameters): each channel repeated ``C_out f / C`` times, the
  channels unfolded into ``factor_t x factor_s x factor_s`` blocks (the inverse order); at the
  start of a video the first ``factor_t - 1`` frames are dropped.
- :class:`WanResidualDownBlock`: ``num_res_blocks`` residual blocks and a ``downsampler``
  (absent at the last level) plus ``avg_down`` of the block's input.
- :class:`WanResidualUpBlock`: ``num_res_blocks + 1`` residual blocks and an ``upsampler``
  (``WanResample`` to ``out_dim`` channels, singular name) plus ``dup_up`` of the block's input,
  both absent at the last level.

Chunking: ``avg_down``'s front padding groups frames the same in a first chunk of one frame
followed by even chunks as in one pass over ``1 + 2k`` frames, and ``dup_up``'s drop happens
once, in the chunk that starts a video (``cache=None``), so chunked and one-pass runs agree.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.vae.wan_vae_layers import WanResample, WanResidualBlock

__all__ = ["WanResidualDownBlock", "WanResidualUpBlock", "avg_down", "dup_up", "patchify", "unpatchify"]


def patchify(x: Float[Array, "b t h w c"], p: int) -> Float[Array, "b t h/p w/p cpp"]:
    """``[B, T, H, W, C] -> [B, T, H/p, W/p, C p^2]``, channel ``c p^2 + w_off p + h_off``."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c)
    x = jnp.transpose(x, (0, 1, 2, 4, 6, 5, 3))  # b t h' w' c w_off h_off
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: Float[Array, "b t h w cpp"], p: int) -> Float[Array, "b t hp wp c"]:
    """The inverse of :func:`patchify`."""
    if p == 1:
        return x
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p)  # ... c w_off h_off
    x = jnp.transpose(x, (0, 1, 2, 6, 3, 5, 4))  # b t h h_off w w_off c
    return x.reshape(b, t, h * p, w * p, cpp // (p * p))


def avg_down(x: Float[Array, "b t h w c"], out_dim: int, factor_t: int, factor_s: int) -> Float[Array, "b t2 h2 w2 o"]:
    """diffusers' ``AvgDown3D`` (see the module docstring); the identity for factors 1, 1 and
    ``out_dim == C``."""
    b, t, h, w, c = x.shape
    factor = factor_t * factor_s * factor_s
    if factor == 1 and out_dim == c:
        return x
    pad = (-t) % factor_t
    if pad:
        x = jnp.concatenate([jnp.zeros((b, pad, h, w, c), x.dtype), x], axis=1)
        t += pad
    x = x.reshape(b, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
    x = jnp.transpose(x, (0, 1, 3, 5, 7, 2, 4, 6))  # b t' h' w' c t_off h_off w_off
    x = x.reshape(b, t // factor_t, h // factor_s, w // factor_s, out_dim, c * factor // out_dim)
    return jnp.mean(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def dup_up(
    x: Float[Array, "b t h w c"], out_dim: int, factor_t: int, factor_s: int, first_chunk: bool
) -> Float[Array, "b t2 h2 w2 o"]:
    """diffusers' ``DupUp3D`` (see the module docstring); ``first_chunk``: drop the first
    ``factor_t - 1`` output frames (the start of a video)."""
    b, t, h, w, c = x.shape
    repeats = out_dim * factor_t * factor_s * factor_s // c
    x = jnp.repeat(x, repeats, axis=-1)
    x = x.reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s)
    x = jnp.transpose(x, (0, 1, 5, 2, 6, 3, 7, 4))  # b t t_off h h_off w w_off o
    x = x.reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
    return x[:, factor_t - 1 :] if first_chunk else x


class WanResidualDownBlock(nnx.Module):
    """diffusers' ``WanResidualDownBlock``: ``resnets``, ``downsampler`` (``downsample3d`` when
    ``factor_t`` is 2, ``downsample2d`` when only space halves, absent at the last level) plus
    the parameter-free :func:`avg_down` shortcut. Cache: ``(resnets' caches, downsampler's)``."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, factor_t: int, factor_s: int, *,
                 dtype, param_dtype, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out_dim = out_dim
        self.factors = (factor_t, factor_s)
        resnets = []
        for _ in range(num_res_blocks):
            resnets.append(WanResidualBlock(in_dim, out_dim, **kw))
            in_dim = out_dim
        self.resnets = nnx.List(resnets)
        mode = "downsample3d" if factor_t == 2 else "downsample2d"
        self.downsampler = WanResample(out_dim, mode, **kw) if factor_s == 2 else None

    def __call__(self, x: Float[Array, "b t h w c"], cache: Any = None) -> tuple[Array, Any]:
        res_cache, down_cache = (None, None) if cache is None else cache
        res_cache = res_cache or [None] * len(self.resnets)
        shortcut = avg_down(x, self.out_dim, *self.factors)
        new = []
        for block, c in zip(self.resnets, res_cache):
            x, c = block(x, c)
            new.append(c)
        if self.downsampler is not None:
            x, down_cache = self.downsampler(x, down_cache)
        return x + shortcut.astype(x.dtype), (new, down_cache)


class WanResidualUpBlock(nnx.Module):
    """diffusers' ``WanResidualUpBlock``: ``resnets`` (``num_res_blocks + 1``), ``upsampler``
    (``upsample3d`` when ``factor_t`` is 2 else ``upsample2d``, to ``out_dim`` channels) plus the
    :func:`dup_up` shortcut, both absent when ``upsample`` is false (the last level). Cache:
    ``(resnets' caches, upsampler's)``; ``cache=None`` starts a video (``dup_up`` drops frames)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, factor_t: int, upsample: bool, *,
                 dtype, param_dtype, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out_dim = out_dim
        self.factor_t = factor_t
        resnets = []
        for _ in range(num_res_blocks + 1):
            resnets.append(WanResidualBlock(in_dim if not resnets else out_dim, out_dim, **kw))
        self.resnets = nnx.List(resnets)
        mode = "upsample3d" if factor_t == 2 else "upsample2d"
        self.upsampler = WanResample(out_dim, mode, upsample_out_dim=out_dim, **kw) if upsample else None

    def __call__(self, x: Float[Array, "b t h w c"], cache: Any = None) -> tuple[Array, Any]:
        first_chunk = cache is None
        res_cache, up_cache = (None, None) if cache is None else cache
        res_cache = res_cache or [None] * len(self.resnets)
        shortcut = None
        if self.upsampler is not None:
            shortcut = dup_up(x, self.out_dim, self.factor_t, 2, first_chunk)
        new = []
        for block, c in zip(self.resnets, res_cache):
            x, c = block(x, c)
            new.append(c)
        if self.upsampler is not None:
            x, up_cache = self.upsampler(x, up_cache)
            x = x + shortcut.astype(x.dtype)
        return x, (new, up_cache)
