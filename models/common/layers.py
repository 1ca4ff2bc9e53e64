"""Layers shared by the model families (as diffusers defines them), in Flax NNX.

PyTorch's default initialisation for linear and convolution weights, the float32 LayerNorm, the
RMSNorm, an identity stand-in for parameter-free torch modules, a Conv3d patch embedding as a
matmul, patchify/unpatchify of ``[B, C, F, H, W]`` latents, the sinusoidal timestep embedding and
the small MLPs built on it (diffusers' ``TimestepEmbedding``, ``PixArtAlphaTextProjection``,
``FeedForward``), and the default dtype policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from dfsattn_jax.checks import lookup

__all__ = [
    "ACTIVATIONS",
    "ActivationProjection",
    "FP32LayerNorm",
    "FeedForward",
    "Identity",
    "PatchEmbedding",
    "RMSNorm",
    "TextProjection",
    "TimestepEmbedding",
    "default_dtype",
    "linear",
    "patchify",
    "resolve_dtypes",
    "sinusoid_frequencies",
    "timestep_embedding",
    "uniform_init",
    "unpatchify",
]

# Activations of diffusers' MLPs by name: ``GELU(approximate="tanh")`` and ``SiLU``.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def default_dtype() -> jnp.dtype:
    """bfloat16 on accelerators, float32 on CPU (params and activations)."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(jnp.bfloat16)


def resolve_dtypes(dtype, param_dtype) -> tuple[jnp.dtype, jnp.dtype]:
    """``(dtype, param_dtype)`` of a model, each :func:`default_dtype` when ``None``."""
    return tuple(jnp.dtype(d) if d is not None else default_dtype() for d in (dtype, param_dtype))


def _activation(name: str) -> Callable[[Array], Array]:
    return lookup(ACTIVATIONS, name, "activation")


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

    With ``elementwise_affine`` it holds ``weight`` and ``bias`` ``[dim]`` in ``param_dtype``
    (float32 by default, as diffusers keeps Wan's; the affine step runs in float32).
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, *, param_dtype=jnp.float32):
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.elementwise_affine:
            y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
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


def unpatchify(
    x: Float[Array, "b l p"], grid, patch_size, channels: int, *, channels_first: bool = False
) -> Float[Array, "b c f h w"]:
    """``[B, L, pt*ph*pw*C] -> [B, C, F*pt, H*ph, W*pw]`` (diffusers' output order), tokens in
    raster order.

    The features of a token are ordered ``(pt, ph, pw, C)`` (Wan), or ``(C, pt, ph, pw)`` with
    ``channels_first`` (HunyuanVideo).
    """
    b = x.shape[0]
    f, h, w = grid
    pt, ph, pw = patch_size
    if channels_first:
        x = x.reshape(b, f, h, w, channels, pt, ph, pw).transpose(0, 4, 1, 5, 2, 6, 3, 7)
    else:
        x = x.reshape(b, f, h, w, pt, ph, pw, channels).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, f * pt, h * ph, w * pw)


def timestep_embedding(timesteps: Float[Array, "*b"], dim: int, max_period: float = 10000.0) -> Float[Array, "*b dim"]:
    """Sinusoidal embedding ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period ** (-i / (dim/2))``
    (diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``), float32, of
    each timestep (any leading shape: ``[B]``, or ``[B, L]`` per token)."""
    args = timesteps.astype(jnp.float32)[..., None] * jnp.asarray(sinusoid_frequencies(dim, max_period))[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sinusoid_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
    """float32 ``[dim/2]`` frequencies ``exp(-log(max_period) * i / (dim/2))`` of
    :func:`timestep_embedding`: the exponent rounded to float32 as PyTorch computes it, its
    exponential correctly rounded to float32 (computed on the host in float64).

    The rounding matters: HunyuanVideo embeds guidance 6000, where one ulp of a frequency near
    0.4 moves the angle by 2e-4 rad; PyTorch's float32 ``exp`` (and XLA's) may be one ulp off.
    """
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


class TimestepEmbedding(nnx.Module):
    """``linear_2(silu(linear_1(x)))`` (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_features: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(in_features, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "... i"]) -> Float[Array, "... d"]:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TextProjection(nnx.Module):
    """``linear_2(act(linear_1(x)))`` (diffusers ``PixArtAlphaTextProjection``; ``act`` is
    GELU-tanh for Wan's text, SiLU for HunyuanVideo's pooled text)."""

    def __init__(self, in_features: int, dim: int, *, activation: str = "gelu_tanh", dtype, param_dtype, rngs: nnx.Rngs):
        _activation(activation)
        self.activation = activation
        self.linear_1 = linear(in_features, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "... i"]) -> Float[Array, "... d"]:
        return self.linear_2(ACTIVATIONS[self.activation](self.linear_1(x)))


class ActivationProjection(nnx.Module):
    """``act(proj(x))`` (diffusers ``GELU(approximate="tanh")`` or ``LinearActivation("silu")``)."""

    def __init__(self, dim: int, inner: int, *, activation: str = "gelu_tanh", dtype, param_dtype, rngs: nnx.Rngs):
        _activation(activation)
        self.activation = activation
        self.proj = linear(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... i"]:
        return ACTIVATIONS[self.activation](self.proj(x))


class FeedForward(nnx.Module):
    """``net[2](net[0](x))`` (diffusers ``FeedForward``); ``net[1]`` is diffusers' (inactive)
    dropout. ``activation``: ``"gelu_tanh"`` (``"gelu-approximate"``) or ``"silu"``
    (``"linear-silu"``)."""

    def __init__(self, dim: int, inner: int, *, activation: str = "gelu_tanh", dtype, param_dtype, rngs: nnx.Rngs):
        self.net = nnx.List([
            ActivationProjection(dim, inner, activation=activation, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
            Identity(),
            linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        ])

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return self.net[2](self.net[1](self.net[0](x)))
