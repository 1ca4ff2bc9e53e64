"""Layers shared by the model families (as diffusers defines them), in Flax NNX.

PyTorch's default initialisation for linear and convolution weights, the float32 LayerNorm, the
RMSNorm, an identity stand-in for parameter-free torch modules, a Conv3d patch embedding as a
matmul, patchify/unpatchify of ``[B, C, F, H, W]`` latents, and the sinusoidal timestep embedding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

__all__ = [
    "FP32LayerNorm",
    "Identity",
    "PatchEmbedding",
    "RMSNorm",
    "linear",
    "patchify",
    "timestep_embedding",
    "uniform_init",
    "unpatchify",
]


def uniform_init(bound: float):
    """PyTorch's default ``nn.Linear``/``nn.Conv`` init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def linear(in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=True,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=uniform_init(bound),
        bias_init=uniform_init(bound),
        rngs=rngs,
    )


class Identity(nnx.Module):
    """Stands for a parameter-free torch module (dropout) to keep diffusers' list indices."""

    def __call__(self, x):
        return x


class FP32LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (diffusers' ``FP32LayerNorm``); returns float32.

    With ``elementwise_affine`` it holds float32 ``weight`` and ``bias`` ``[dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
            self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.elementwise_affine:
            y = y * self.weight[...] + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned ``weight`` (torch ``nn.RMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class PatchEmbedding(nnx.Module):
    """Conv3d with kernel = stride = patch, as a reshape + matmul.

    ``kernel`` has the ``nnx.Conv`` layout ``[pt, ph, pw, C, dim]``; ``bias`` is ``[dim]``.
    """

    def __init__(self, in_channels: int, dim: int, patch_size, *, dtype, param_dtype, rngs: nnx.Rngs):
        pt, ph, pw = patch_size
        bound = 1.0 / math.sqrt(in_channels * pt * ph * pw)
        self.kernel = nnx.Param(uniform_init(bound)(rngs.params(), (pt, ph, pw, in_channels, dim), param_dtype))
        self.bias = nnx.Param(uniform_init(bound)(rngs.params(), (dim,), param_dtype))
        self.dtype = dtype

    def __call__(self, patches: Float[Array, "b l p"]) -> Float[Array, "b l dim"]:
        """Projects patch vectors from :func:`patchify` (features ordered ``(pt, ph, pw, C)``)."""
        kernel = self.kernel[...]
        w = kernel.reshape(-1, kernel.shape[-1]).astype(self.dtype)
        return patches.astype(self.dtype) @ w + self.bias[...].astype(self.dtype)


def patchify(x: Float[Array, "b c f h w"], patch_size) -> Float[Array, "b l p"]:
    """``[B, C, F, H, W] -> [B, L, pt*ph*pw*C]``, tokens in raster order of the token grid."""
    b, c, f, h, w = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1)  # b, F, H, W, pt, ph, pw, c
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(x: Float[Array, "b l p"], grid, patch_size, channels: int) -> Float[Array, "b c f h w"]:
    """``[B, L, pt*ph*pw*C] -> [B, C, F*pt, H*ph, W*pw]`` (diffusers' output order)."""
    b = x.shape[0]
    f, h, w = grid
    pt, ph, pw = patch_size
    x = x.reshape(b, f, h, w, pt, ph, pw, channels)
    x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, f * pt, h * ph, w * pw)


def timestep_embedding(timesteps: Float[Array, " b"], dim: int, max_period: float = 10000.0) -> Float[Array, "b dim"]:
    """Sinusoidal embedding ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period ** (-i / (dim/2))``
    (diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``), float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
