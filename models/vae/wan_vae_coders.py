"""The Wan VAE's encoder and decoder (diffusers' ``WanEncoder3d`` / ``WanDecoder3d``) in Flax
NNX, channel-last, each called on one chunk of frames with an explicit cache (see
:mod:`models.vae.wan_vae_layers`). Wan2.1's structure is described first; ``is_residual``
(Wan2.2) replaces the level blocks, as the end of this docstring says.

Encoder (``dims = base_dim * [1] + dim_mult``): ``conv_in`` 3 -> ``dims[0]``; ``down_blocks``, a
flat list: for each level ``num_res_blocks`` residual blocks, then (except at the last level) a
``downsample3d`` when ``temporal_downsample[level]`` else a ``downsample2d``; ``mid_block``;
``norm_out``, SiLU, ``conv_out`` -> ``2 z_dim`` (mean and log-variance).

Decoder (``dims = decoder_base_dim * [dim_mult[-1]] + reversed(dim_mult)``): ``conv_in``
``z_dim`` -> ``dims[0]``; ``mid_block``; ``up_blocks``: ``num_res_blocks + 1`` residual blocks
per level, the input of every level but the first halved (the resampler before it outputs
``dim // 2``), then (except at the last level) an ``upsample3d`` when the reversed
``temporal_downsample[level]`` else an ``upsample2d``; ``norm_out``, SiLU, ``conv_out`` ->
``out_channels``.

With ``is_residual`` (Wan2.2, :mod:`models.vae.wan22_blocks`): the encoder's ``down_blocks``
are one :class:`~models.vae.wan22_blocks.WanResidualDownBlock` per level (space halved at every
level but the last, time where ``temporal_downsample`` says); the decoder's ``up_blocks`` are
:class:`~models.vae.wan22_blocks.WanResidualUpBlock` s whose inputs are not halved (the
upsamplers keep their width).

Each ``__call__(x, cache=None)`` returns ``(y, new_cache)``; ``cache=None`` starts a video.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jaxtyping import Array, Float

from models.vae.wan22_blocks import WanResidualDownBlock, WanResidualUpBlock
from models.vae.wan_vae_layers import (
    CausalConv3d,
    WanMidBlock,
    WanResample,
    WanResidualBlock,
    WanRMSNorm,
)

__all__ = ["WanDecoder3d", "WanEncoder3d", "WanUpBlock"]


class WanEncoder3d(nnx.Module):
    """Video ``[B, T, H, W, in_channels]`` -> ``[B, T', H/8, W/8, 2 z_dim]`` (``T = 1`` at the
    start of a video or a multiple of 4 after it; ``T' = 1`` or ``T / 4``)."""

    def __init__(self, *, in_channels: int, dim: int, z_dim: int, dim_mult, num_res_blocks: int,
                 temporal_downsample, is_residual: bool = False, dtype, param_dtype, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [dim * m for m in (1,) + tuple(dim_mult)]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1, **kw)
        blocks = []
        last = len(dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if is_residual:
                factor_t = 2 if level != last and temporal_downsample[level] else 1
                factor_s = 1 if level == last else 2
                blocks.append(WanResidualDownBlock(in_dim, out_dim, num_res_blocks, factor_t, factor_s, **kw))
                continue
            for _ in range(num_res_blocks):
                blocks.append(WanResidualBlock(in_dim, out_dim, **kw))
                in_dim = out_dim
            if level != last:
                mode = "downsample3d" if temporal_downsample[level] else "downsample2d"
                blocks.append(WanResample(out_dim, mode, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = WanMidBlock(dims[-1], **kw)
        self.norm_out = WanRMSNorm(dims[-1], param_dtype=param_dtype)
        self.conv_out = CausalConv3d(dims[-1], z_dim, 3, padding=1, **kw)

    def __call__(self, x: Float[Array, "b t h w c"], cache: dict[str, Any] | None = None) -> tuple[Array, dict]:
        cache = cache or {}
        x, conv_in = self.conv_in(x, cache.get("conv_in"))
        down = []
        old = cache.get("down_blocks") or [None] * len(self.down_blocks)
        for block, c in zip(self.down_blocks, old):
            x, c = block(x, c)
            down.append(c)
        x, mid = self.mid_block(x, cache.get("mid_block"))
        x, conv_out = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.get("conv_out"))
        return x, {"conv_in": conv_in, "down_blocks": down, "mid_block": mid, "conv_out": conv_out}


class WanUpBlock(nnx.Module):
    """``num_res_blocks + 1`` residual blocks, then ``upsamplers[0]`` (absent at the last level)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *,
                 dtype, param_dtype, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        resnets = []
        for _ in range(num_res_blocks + 1):
            resnets.append(WanResidualBlock(in_dim, out_dim, **kw))
            in_dim = out_dim
        self.resnets = nnx.List(resnets)
        self.upsamplers = None if upsample_mode is None else nnx.List([WanResample(out_dim, upsample_mode, **kw)])

    def __call__(self, x: Float[Array, "b t h w c"], cache: Any = None) -> tuple[Array, Any]:
        res_cache, up_cache = (None, None) if cache is None else cache
        res_cache = res_cache or [None] * len(self.resnets)
        new = []
        for block, c in zip(self.resnets, res_cache):
            x, c = block(x, c)
            new.append(c)
        if self.upsamplers is not None:
            x, up_cache = self.upsamplers[0](x, up_cache)
        return x, (new, up_cache)


class WanDecoder3d(nnx.Module):
    """Latents ``[B, T, h, w, z_dim]`` -> video ``[B, T', 8h, 8w, out_channels]`` (``T' = 1 +
    4 (T - 1)`` at the start of a video, ``4 T`` after it), not clamped (and, for Wan2.2, still
    patchified)."""

    def __init__(self, *, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temporal_upsample,
                 out_channels: int, is_residual: bool = False, dtype, param_dtype, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [dim * m for m in (dim_mult[-1],) + tuple(dim_mult[::-1])]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1, **kw)
        self.mid_block = WanMidBlock(dims[0], **kw)
        blocks = []
        last = len(dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if is_residual:
                factor_t = 2 if level != last and temporal_upsample[level] else 1
                blocks.append(WanResidualUpBlock(in_dim, out_dim, num_res_blocks, factor_t, level != last, **kw))
                continue
            if level > 0:
                in_dim //= 2
            mode = None
            if level != last:
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
            blocks.append(WanUpBlock(in_dim, out_dim, num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = WanRMSNorm(dims[-1], param_dtype=param_dtype)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1, **kw)

    def __call__(self, x: Float[Array, "b t h w c"], cache: dict[str, Any] | None = None) -> tuple[Array, dict]:
        cache = cache or {}
        x, conv_in = self.conv_in(x, cache.get("conv_in"))
        x, mid = self.mid_block(x, cache.get("mid_block"))
        up = []
        old = cache.get("up_blocks") or [None] * len(self.up_blocks)
        for block, c in zip(self.up_blocks, old):
            x, c = block(x, c)
            up.append(c)
        x, conv_out = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.get("conv_out"))
        return x, {"conv_in": conv_in, "mid_block": mid, "up_blocks": up, "conv_out": conv_out}
