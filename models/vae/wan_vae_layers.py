"""The layers of the Wan2.1 VAE in Flax NNX, channel-last, with an explicit causal cache.

Activations are ``[B, T, H, W, C]`` (frames on axis 1, channels last). Module and parameter names
follow diffusers' ``AutoencoderKLWan`` so that its state dict maps 1:1 onto the NNX state (see
:mod:`models.vae.wan_vae_loading`):

- Conv3d (:class:`CausalConv3d`): ``kernel [kt, kh, kw, C_in, C_out]`` (the checkpoint's
  ``weight [C_out, C_in, kt, kh, kw]``, transposed on load) and ``bias [C_out]``.
- Conv2d (:class:`FrameConv2d`, applied to each frame): ``weight [C_out, C_in, kh, kw]`` stored as
  the checkpoint holds it, and ``bias``.
- RMS norm (:class:`WanRMSNorm`): ``gamma`` with the checkpoint's shape ``[C, 1, 1, 1]`` (residual
  blocks, the output head) or ``[C, 1, 1]`` (attention).

**The causal cache.** A causal conv pads time with ``2 p_t`` frames in front only (and ``p_h``,
``p_w`` zeros on each spatial side). Run chunk by chunk, the front padding of every chunk after
the first is the last ``2 p_t`` frames of the conv's input seen so far; that tail is the conv's
cache. A module called with ``cache=None`` starts a video (zero front padding) and always returns
the cache a next chunk needs, with a shape that does not depend on the chunk's length, so the
chunks after the first can run in a ``lax.scan`` with the cache as carry. The two temporal
resamplers are the exceptions to "one causal pass over the whole video":

- ``upsample3d`` gives frame 0 of a video no time conv (one output frame); the later frames go
  through a causal time conv over the frames from 1 on (frame 0 is never their context) and
  give two output frames each, interleaved (frame ``2t`` takes channels ``[0:C]``, ``2t+1``
  channels ``[C:2C]``).
- ``downsample3d`` passes frame 0 through (after the spatial downsampling); output frame
  ``j >= 1`` is a stride-2 valid time conv over frames ``2j-2, 2j-1, 2j``. Its cache is the last
  frame.

With these rules, the chunks in any split that keeps the downsamplers' frame counts even give
the same result as one pass over the whole video (``cache=None`` on all frames).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from models.common.layers import Identity, uniform_init

__all__ = [
    "RESAMPLE_MODES",
    "CausalConv3d",
    "FrameConv2d",
    "WanAttentionBlock",
    "WanMidBlock",
    "WanRMSNorm",
    "WanResample",
    "WanResidualBlock",
    "interleave_time",
]

#: The modes of :class:`WanResample`.
RESAMPLE_MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")
# F.normalize's floor on the L2 norm.
_NORM_EPS = 1e-12


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class CausalConv3d(nnx.Module):
    """diffusers' ``WanCausalConv3d``: a Conv3d padded ``2 p_t`` frames in front (zeros, or the
    cache), ``p_h``/``p_w`` zeros on each spatial side.

    ``__call__(x, cache)`` returns ``(y, new_cache)``: ``new_cache`` is the last ``2 p_t`` frames
    of ``[cache or zeros, x]`` (``None`` when the conv has no time padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0,
                 dtype, param_dtype, rngs: nnx.Rngs):  # fmt: skip
        kt, kh, kw = _triple(kernel_size)
        self.stride = _triple(stride)
        pt, ph, pw = _triple(padding)
        self.time_pad = 2 * pt
        self.spatial_pad = (ph, pw)
        self.dtype = dtype
        bound = 1.0 / math.sqrt(in_channels * kt * kh * kw)
        init = uniform_init(bound)
        self.kernel = nnx.Param(init(rngs.params(), (kt, kh, kw, in_channels, out_channels), param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,), param_dtype))

    def __call__(
        self, x: Float[Array, "b t h w c"], cache: Float[Array, "b p h w c"] | None = None
    ) -> tuple[Float[Array, "b t2 h2 w2 o"], Float[Array, "b p h w c"] | None]:
        x = x.astype(self.dtype)
        new_cache = None
        if self.time_pad:
            if cache is None:
                cache = jnp.zeros((x.shape[0], self.time_pad) + x.shape[2:], x.dtype)
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
            new_cache = x[:, -self.time_pad:]
        ph, pw = self.spatial_pad
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(self.dtype),
            window_strides=self.stride,
            padding=((0, 0), (ph, ph), (pw, pw)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(self.dtype), new_cache


class FrameConv2d(nnx.Module):
    """A Conv2d applied to each frame; ``weight`` keeps PyTorch's ``[C_out, C_in, kh, kw]``.

    ``padding`` is ``((top, bottom), (left, right))``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding=((0, 0), (0, 0)), dtype, param_dtype, rngs: nnx.Rngs):  # fmt: skip
        self.stride = (stride, stride)
        self.padding = tuple(tuple(p) for p in padding)
        self.dtype = dtype
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        init = uniform_init(bound)
        self.weight = nnx.Param(init(rngs.params(), (out_channels, in_channels, kernel_size, kernel_size), param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (out_channels,), param_dtype))

    def __call__(self, x: Float[Array, "b t h w c"]) -> Float[Array, "b t h2 w2 o"]:
        b, t = x.shape[:2]
        frames = x.astype(self.dtype).reshape((b * t,) + x.shape[2:])
        weight = self.weight[...].astype(self.dtype)
        if weight.shape[2:] == (1, 1) and self.stride == (1, 1) and self.padding == ((0, 0), (0, 0)):
            y = jnp.einsum("nhwc,oc->nhwo", frames, weight[:, :, 0, 0])
        else:
            y = jax.lax.conv_general_dilated(
                frames, weight, window_strides=self.stride, padding=self.padding,
                dimension_numbers=("NHWC", "OIHW", "NHWC"),
            )  # fmt: skip
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape((b, t) + y.shape[1:])


class WanRMSNorm(nnx.Module):
    """diffusers' ``WanRMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels.

    An L2 normalization (its epsilon floors the norm, unlike RMSNorm's), computed in float32 and
    returned in the input's dtype. ``gamma`` keeps the checkpoint's shape: ``[C, 1, 1, 1]``, or
    ``[C, 1, 1]`` with ``images=True`` (attention).
    """

    def __init__(self, dim: int, *, images: bool = False, param_dtype):
        self.dim = dim
        self.gamma = nnx.Param(jnp.ones((dim,) + (1,) * (2 if images else 3), param_dtype))

    def __call__(self, x: Float[Array, "... c"]) -> Float[Array, "... c"]:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, _NORM_EPS)
        y = y * np.float32(math.sqrt(self.dim)) * self.gamma[...].reshape(self.dim).astype(jnp.float32)
        return y.astype(x.dtype)


class WanResidualBlock(nnx.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` (dropout is inactive at
    inference). ``conv_shortcut`` is a 1x1x1 conv when the channel count changes, else absent.

    Cache: ``(conv1's, conv2's)``, each the last two frames of that conv's (post-activation) input.
    """

    def __init__(self, in_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = WanRMSNorm(in_dim, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, **kw)
        self.norm2 = WanRMSNorm(out_dim, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, **kw)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, **kw) if in_dim != out_dim else None

    def __call__(self, x: Float[Array, "b t h w c"], cache: Any = None) -> tuple[Array, Any]:
        c1, c2 = (None, None) if cache is None else cache
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), c2)
        return h + shortcut.astype(h.dtype), (c1, c2)


class WanAttentionBlock(nnx.Module):
    """Single-head self-attention within each frame (over its ``H * W`` positions, no mask,
    scale ``1/sqrt(C)``), after an RMS norm, with 1x1 Conv2d projections ``to_qkv`` (q, k, v in
    channel order) and ``proj``, plus the residual. No cache: frames do not see each other."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim = dim
        self.norm = WanRMSNorm(dim, images=True, param_dtype=param_dtype)
        self.to_qkv = FrameConv2d(dim, 3 * dim, 1, **kw)
        self.proj = FrameConv2d(dim, dim, 1, **kw)

    def __call__(self, x: Float[Array, "b t h w c"]) -> Float[Array, "b t h w c"]:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        o = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))
        return self.proj(o.reshape(b, t, h, w, c)) + x.astype(self.proj.dtype)


class WanMidBlock(nnx.Module):
    """``resnets[1](attentions[0](resnets[0](x)))``. Cache: the two residual blocks' caches."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([WanResidualBlock(dim, dim, **kw), WanResidualBlock(dim, dim, **kw)])
        self.attentions = nnx.List([WanAttentionBlock(dim, **kw)])

    def __call__(self, x: Float[Array, "b t h w c"], cache: Any = None) -> tuple[Array, Any]:
        c0, c1 = (None, None) if cache is None else cache
        x, c0 = self.resnets[0](x, c0)
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, c1)
        return x, (c0, c1)


def interleave_time(y: Float[Array, "b t h w two_c"]) -> Float[Array, "b t2 h w c"]:
    """``[B, T, H, W, 2C] -> [B, 2T, H, W, C]``: frame ``2t`` takes channels ``[0:C]``, frame
    ``2t + 1`` channels ``[C:2C]`` (``upsample3d``'s time conv output)."""
    b, t, h, w, c2 = y.shape
    y = y.reshape(b, t, h, w, 2, c2 // 2)
    return jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c2 // 2)


class WanResample(nnx.Module):
    """diffusers' ``WanResample``: ``resample`` is ``[Identity, Conv2d]`` (the identity stands for
    the parameter-free nearest upsampling or zero padding, to keep the checkpoint's index 1).

    - ``upsample2d``: nearest x2, Conv2d 3x3 (padding 1) to ``upsample_out_dim`` channels
      (default ``dim // 2``; Wan2.2's residual up blocks keep ``dim``).
    - ``upsample3d``: ``time_conv`` (causal (3, 1, 1), ``dim -> 2 dim``, frames interleaved; not
      on a video's frame 0, see the module docstring), then the 2D path.
    - ``downsample2d``: one zero row at the bottom and column at the right, Conv2d 3x3 stride 2.
    - ``downsample3d``: the 2D path, then ``time_conv`` ((3, 1, 1), stride 2, no padding) over
      ``[cached last frame, chunk]`` (frame 0 of a video passes through).

    Cache: ``upsample3d`` the time conv's (last two input frames, frame 0 of a video excluded),
    ``downsample3d`` the last frame after the 2D path, the 2D modes ``None``.
    """

    def __init__(self, dim: int, mode: str, *, upsample_out_dim: int | None = None, dtype, param_dtype,
                 rngs: nnx.Rngs):  # fmt: skip
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"mode must be one of {list(RESAMPLE_MODES)}, got {mode!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode = mode
        self.dim = dim
        if mode.startswith("upsample"):
            out_dim = dim // 2 if upsample_out_dim is None else upsample_out_dim
            conv = FrameConv2d(dim, out_dim, 3, padding=((1, 1), (1, 1)), **kw)
        else:
            conv = FrameConv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        self.resample = nnx.List([Identity(), conv])
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)
        else:
            self.time_conv = None

    def __call__(self, x: Float[Array, "b t h w c"], cache: Any = None) -> tuple[Array, Any]:
        new_cache = None
        if self.mode == "upsample3d":
            x, new_cache = self._time_upsample(x, cache)
        if self.mode.startswith("upsample"):
            # Nearest-neighbour x2 (diffusers upsamples in float32; exact in any dtype).
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        x = self.resample[1](x)
        if self.mode == "downsample3d":
            x, new_cache = self._time_downsample(x, cache)
        return x, new_cache

    def _time_upsample(self, x, cache):
        if cache is not None:
            y, cache = self.time_conv(x, cache)
            return interleave_time(y).astype(x.dtype), cache
        # The start of a video: frame 0 alone, the rest causal from frame 1 on.
        b, t, h, w, c = x.shape
        if t == 1:
            return x, jnp.zeros((b, self.time_conv.time_pad, h, w, c), x.dtype)
        y, cache = self.time_conv(x[:, 1:], None)
        return jnp.concatenate([x[:, :1], interleave_time(y).astype(x.dtype)], axis=1), cache

    def _time_downsample(self, x, cache):
        t = x.shape[1]
        if cache is None:
            if (t - 1) % 2:
                raise ValueError(f"downsample3d needs an odd frame count at the start of a video, got {t}")
            out = x[:, :1] if t == 1 else jnp.concatenate([x[:, :1], self.time_conv(x)[0]], axis=1)
        else:
            if t % 2:
                raise ValueError(f"downsample3d needs an even frame count after the first chunk, got {t}")
            out = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))[0]
        return out, x[:, -1:]
