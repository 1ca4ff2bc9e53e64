"""A Flax NNX HunyuanVideo text-to-video transformer with dense or DFSAttn joint attention.

Mirrors diffusers' ``HunyuanVideoTransformer3DModel`` (T2V path, ``image_condition_type=None``)
numerically and in module naming, so that a diffusers state dict maps 1:1 onto this model's
state (the rule of :mod:`models.common.checkpoint`: the NNX path joined by dots is the diffusers
name, ``kernel`` written ``weight``; linear weights transposed, the Conv3d patch embedding
``x_embedder.proj`` permuted to ``[pt, ph, pw, C, dim]``).

The forward pass, in diffusers' order:

1. ``temb = time_text_embed(t, pooled, guidance)``: ``timestep_embedder(sin(t)) +
   guidance_embedder(sin(guidance)) + text_embedder(pooled CLIP)`` (SiLU MLPs; sinusoids in
   float32, ``guidance`` in diffusers' units, i.e. 1000 x the pipeline's guidance scale).
2. Video tokens: the Conv3d patch embedding ``x_embedder``; text tokens: the token refiner
   ``context_embedder`` (``proj_in`` of the LLM embeddings, then ``num_refiner_layers`` blocks
   of affine LayerNorm + always-dense self-attention over the valid text + SiLU MLP, gated by
   ``time_text_embed(t, masked mean of the raw text)``).
3. ``num_dual_layers`` dual-stream blocks (separate weights per stream: AdaLN-Zero modulation,
   one joint attention over ``[video; text]`` with per-head RMSNorm of q and k and 3D RoPE on the
   video tokens only, GELU-tanh MLPs), then ``num_single_layers`` single-stream blocks on the
   concatenated ``[video; text]`` (AdaLN-Zero with one gate; joint attention and MLP in parallel,
   one output projection).
4. ``norm_out`` (continuous AdaLN: ``(scale, shift)``), ``proj_out``, unpatchify with features
   ordered ``(C, pt, ph, pw)``.

Every dual- and single-stream block's joint attention (layers ``0 .. num_layers - 1``, dual
first) goes through :func:`models.common.processor.self_attention` with the spans
``JointTokens(video_len=L_v, text_len=T)`` and per-sample valid key lengths ``kv_lengths = L_v +
valid text``: padded text is never a key, as diffusers' key-padding mask does. The video tokens
are permuted into the backend's token order once (as patch vectors, before ``x_embedder``) with
the RoPE tables built in that order, and restored before unpatchify; the text stays last, in its
own order. The text rows of the RoPE tables are the identity rotation (cos 1, sin 0), so RoPE is
applied to the whole joint q and k and leaves the text exactly as it is.

With ``backend.parallel`` (:mod:`models.common.parallel`), every joint attention runs
head-parallel (Ulysses) over the whole joint sequence ``L_v + T``, which the ``heads`` axis must
divide (``Parallelism.check`` names the sizes otherwise), with ``kv_lengths`` split like the
batch; the joint tokens of the single-stream blocks are split over ``heads`` between the
attentions. The model has no cross-attention (its text takes part in the joint attention), so
it takes no ``cross_attend``; the token refiner's small text self-attention runs dense on every
device.

Parameters are created in ``param_dtype`` and activations run in ``dtype`` (both default to
bfloat16 on accelerators and float32 on CPU); diffusers keeps no HunyuanVideo module in float32.
LayerNorms, RMSNorms, RoPE, modulations and residual updates are computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from dfsattn_jax.attention import dense_attention
from dfsattn_jax.cache import MaskCache
from dfsattn_jax.joint import JointTokens
from models.common.layers import (
    ACTIVATIONS,
    FeedForward,
    FP32LayerNorm,
    Identity,
    PatchEmbedding,
    RMSNorm,
    TextProjection,
    TimestepEmbedding,
    linear,
    patchify,
    resolve_dtypes,
    timestep_embedding,
    unpatchify,
)
from models.common.grid import check_latents
from models.common.parallel import shard_tokens
from models.common.processor import (
    AttentionBackend,
    AttentionState,
    StepControl,
    check_state,
    TokenPermutation,
    make_backend,
    self_attention,
    token_permutation,
)
from models.common.rope import apply_rope, rope_tables
from models.hunyuan_video.config import HunyuanConfig, get_config

__all__ = [
    "GUIDANCE_UNITS",
    "HunyuanConditioning",
    "HunyuanVideoTransformer3DModel",
    "Prepared",
    "joint_rope_tables",
]

# diffusers' transformer embeds ``guidance = guidance_scale * 1000`` (the pipeline multiplies).
GUIDANCE_UNITS = 1000.0
# The token refiner's MLP ratio: diffusers builds the refiner with its default 4.0 whatever the
# model's ``mlp_ratio``.
_REFINER_MLP_RATIO = 4.0

# A joint attention: ``attend(q, k, v, state) -> (out, state)``, q, k, v, out ``[B, L_v + T, N, D]``.
JointAttend = Callable[[Array, Array, Array, Any], tuple[Array, Any]]


class HunyuanConditioning(NamedTuple):
    """The text conditioning of one HunyuanVideo evaluation (a pytree).

    Attributes:
      prompt_embeds: ``[B, T, text_dim]`` LLM text embeddings (valid tokens first, then padding).
      prompt_attention_mask: ``[B, T]`` int32 or bool, 1 for valid tokens (right-padded: each
        row is ones then zeros, with at least one 1).
      pooled_prompt_embeds: ``[B, pooled_dim]`` pooled CLIP text embedding.
      guidance: ``[B]`` float32 embedded guidance *scale* as the pipeline takes it (e.g. 6.0);
        the model embeds ``1000 * guidance`` as diffusers' pipeline passes it. ``None`` for a
        model without guidance embedding. The embedding of ~6000 rad is sensitive to one ulp:
        make the scale on the host (not by dividing diffusers' value inside a traced function,
        where XLA may multiply by a rounded reciprocal: 6000 / 1000 -> 6.0000005).
    """

    prompt_embeds: Float[Array, "b t e"]
    prompt_attention_mask: Int[Array, "b t"]
    pooled_prompt_embeds: Float[Array, "b p"]
    guidance: Float[Array, " b"] | None = None


def _modulate(x_norm: Float[Array, "b l d"], shift: Array, scale: Array, dtype) -> Float[Array, "b l d"]:
    """``x_norm * (1 + scale) + shift`` in float32 (``shift``/``scale`` ``[B, D]``), cast to ``dtype``."""
    scale = scale.astype(jnp.float32)[:, None]
    shift = shift.astype(jnp.float32)[:, None]
    return (x_norm.astype(jnp.float32) * (1.0 + scale) + shift).astype(dtype)


def _gated(x: Float[Array, "b l d"], update: Float[Array, "b l d"], gate: Array) -> Float[Array, "b l d"]:
    """``x + update * gate`` in float32 (``gate`` ``[B, D]``), in ``x.dtype``."""
    out = x.astype(jnp.float32) + update.astype(jnp.float32) * gate.astype(jnp.float32)[:, None]
    return out.astype(x.dtype)


def _heads(x: Float[Array, "b l dim"], heads: int) -> Float[Array, "b l n d"]:
    return x.reshape(x.shape[0], x.shape[1], heads, -1)


def _merge_heads(x: Float[Array, "b l n d"]) -> Float[Array, "b l dim"]:
    return x.reshape(x.shape[0], x.shape[1], -1)


def joint_rope_tables(
    config: HunyuanConfig, grid: tuple[int, int, int], perm: Int[Array, " l"] | np.ndarray | None, text_len: int
) -> tuple[Float[Array, "lj d2"], Float[Array, "lj d2"]]:
    """RoPE ``(cos, sin)`` ``[L_v + T, D/2]`` of a joint sequence: the video tokens in the order
    ``perm`` (``None``: raster) as diffusers' ``HunyuanVideoRotaryPosEmbed`` rotates them, then
    ``T`` identity rows (cos 1, sin 0) for the text, which RoPE leaves exactly unchanged."""
    cos, sin = rope_tables(
        config.head_dim, grid, perm, theta=config.rope_theta, max_seq_len=config.rope_max_seq_len,
        axis_dims=config.rope_axes_dim,
    )  # fmt: skip
    half = config.head_dim // 2
    cos = jnp.concatenate([cos, jnp.ones((text_len, half), jnp.float32)], axis=0)
    sin = jnp.concatenate([sin, jnp.zeros((text_len, half), jnp.float32)], axis=0)
    return cos, sin


# ----------------------------------------------------------------------------------------------
# Embeddings and the token refiner
# ----------------------------------------------------------------------------------------------


class ConditionEmbedding(nnx.Module):
    """``timestep_embedder(sin(t)) [+ guidance_embedder(sin(g))] + text_embedder(pooled)``.

    diffusers' ``HunyuanVideoConditionEmbedding`` (``time_text_embed``, with guidance) and
    ``CombinedTimestepTextProjEmbeddings`` (the refiner's ``time_text_embed``, without).
    """

    def __init__(self, dim: int, pooled_dim: int, freq_dim: int, guidance: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        self.dtype = dtype
        self.timestep_embedder = TimestepEmbedding(freq_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_embedder = TextProjection(
            pooled_dim, dim, activation="silu", dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.guidance_embedder = (
            TimestepEmbedding(freq_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if guidance else None
        )

    def _embed(self, embedder: TimestepEmbedding, value: Float[Array, " b"]) -> Float[Array, "b d"]:
        return embedder(timestep_embedding(value, self.freq_dim).astype(self.dtype))

    def __call__(
        self, timestep: Float[Array, " b"], pooled: Float[Array, "b p"], guidance: Float[Array, " b"] | None = None
    ) -> Float[Array, "b d"]:
        """``temb [B, dim]``; ``guidance`` in diffusers' units (used when the module has a
        guidance embedder)."""
        emb = self._embed(self.timestep_embedder, timestep)
        if self.guidance_embedder is not None:
            emb = emb + self._embed(self.guidance_embedder, guidance)
        return emb + self.text_embedder(pooled.astype(self.dtype))


class Attention(nnx.Module):
    """Projections of one attention layer (diffusers ``Attention``) with heads of ``head_dim``.

    Always ``to_q``, ``to_k``, ``to_v``; ``qk_norm`` adds the per-head RMSNorms ``norm_q``,
    ``norm_k``; ``added`` adds the text stream's ``add_{q,k,v}_proj``, ``norm_added_{q,k}`` and
    ``to_add_out``; ``out`` adds ``to_out[0]`` (single-stream blocks have none).
    """

    def __init__(
        self, dim: int, heads: int, eps: float, *, qk_norm: bool, added: bool, out: bool, dtype, param_dtype, rngs: nnx.Rngs
    ):
        head_dim = dim // heads
        self.heads = heads
        make = lambda: linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        norm = lambda: RMSNorm(head_dim, eps, param_dtype=param_dtype) if qk_norm else None  # noqa: E731
        self.to_q, self.to_k, self.to_v = make(), make(), make()
        self.norm_q, self.norm_k = norm(), norm()
        self.to_out = nnx.List([make(), Identity()]) if out else None
        if added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = make(), make(), make()
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.to_add_out = make()

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (_heads(f(x), self.heads) for f in (to_q, to_k, to_v))
        if norm_q is not None:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def qkv(self, x: Float[Array, "b l dim"]):
        """``q, k, v [B, L, N, D]`` of ``x`` (q and k normalized per head when ``qk_norm``)."""
        return self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)

    def added_qkv(self, x: Float[Array, "b t dim"]):
        """``q, k, v [B, T, N, D]`` of the text stream (``add_*_proj``, ``norm_added_*``)."""
        return self._qkv(x, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k)


class RefinerGates(nnx.Module):
    """``(gate_msa, gate_mlp) = linear(silu(temb))`` (diffusers ``HunyuanVideoAdaNorm``)."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.linear = linear(dim, 2 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, temb: Float[Array, "b d"]) -> tuple[Array, Array]:
        return tuple(jnp.split(self.linear(jax.nn.silu(temb)), 2, axis=-1))


class RefinerBlock(nnx.Module):
    """One token-refiner block: affine LayerNorm, dense masked self-attention, gated residual;
    affine LayerNorm, SiLU MLP, gated residual (diffusers ``HunyuanVideoIndividualTokenRefinerBlock``)."""

    def __init__(self, config: HunyuanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim = config.dim
        self.dtype = dtype
        self.norm1 = FP32LayerNorm(dim, config.eps, elementwise_affine=True, param_dtype=param_dtype)
        self.attn = Attention(
            dim, config.num_heads, config.eps, qk_norm=False, added=False, out=True,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.norm2 = FP32LayerNorm(dim, config.eps, elementwise_affine=True, param_dtype=param_dtype)
        self.ff = FeedForward(
            dim, int(dim * _REFINER_MLP_RATIO), activation="silu", dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.norm_out = RefinerGates(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x: Float[Array, "b t d"], temb: Float[Array, "b d"], kv_lengths: Int[Array, " b"], dense_implementation
    ) -> Float[Array, "b t d"]:
        gate_msa, gate_mlp = self.norm_out(temb)
        q, k, v = self.attn.qkv(self.norm1(x).astype(self.dtype))
        o = dense_attention(q, k, v, kv_lengths=kv_lengths, implementation=dense_implementation)
        x = _gated(x, self.attn.to_out[0](_merge_heads(o)), gate_msa)
        return _gated(x, self.ff(self.norm2(x).astype(self.dtype)), gate_mlp)


class RefinerStack(nnx.Module):
    """``refiner_blocks`` (diffusers ``HunyuanVideoIndividualTokenRefiner``)."""

    def __init__(self, config: HunyuanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.refiner_blocks = nnx.List([
            RefinerBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_refiner_layers)
        ])


class TokenRefiner(nnx.Module):
    """The text path ``context_embedder`` (diffusers ``HunyuanVideoTokenRefiner``)."""

    def __init__(self, config: HunyuanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.time_text_embed = ConditionEmbedding(
            config.dim, config.text_dim, config.freq_dim, False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.proj_in = linear(config.text_dim, config.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_refiner = RefinerStack(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        text: Float[Array, "b t e"],
        timestep: Float[Array, " b"],
        mask: Int[Array, "b t"],
        dense_implementation: str | None = None,
    ) -> Float[Array, "b t d"]:
        """The refined text ``[B, T, dim]`` (rows of padded tokens attend to the valid tokens;
        they never reach a valid output)."""
        text = text.astype(self.dtype)
        weights = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(text.astype(jnp.float32) * weights, axis=1) / jnp.sum(weights, axis=1)
        temb = self.time_text_embed(timestep, pooled.astype(self.dtype))
        x = self.proj_in(text)
        # diffusers masks keys and queries and keeps key 0 for every row; the valid rows see
        # exactly the valid prefix, which key lengths give (at least 1, as key 0 always is).
        kv_lengths = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=-1), 1)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, temb, kv_lengths, dense_implementation)
        return x


class PatchEmbed(nnx.Module):
    """``x_embedder``: holds the Conv3d patch embedding as ``proj``."""

    def __init__(self, config: HunyuanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = PatchEmbedding(
            config.in_channels, config.dim, config.patch_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, patches: Float[Array, "b l p"]) -> Float[Array, "b l d"]:
        return self.proj(patches)


# ----------------------------------------------------------------------------------------------
# Transformer blocks
# ----------------------------------------------------------------------------------------------


class AdaLayerNorm(nnx.Module):
    """``linear(silu(temb))`` chunked in ``chunks`` ``[B, dim]`` modulations, and a LayerNorm
    without affine parameters (diffusers ``AdaLayerNormZero`` (6 chunks),
    ``AdaLayerNormZeroSingle`` (3), ``AdaLayerNormContinuous`` (2))."""

    def __init__(self, dim: int, chunks: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = linear(dim, chunks * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)

    def modulations(self, temb: Float[Array, "b d"]) -> tuple[Array, ...]:
        return tuple(jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1))


class DualStreamBlock(nnx.Module):
    """A dual-stream (MMDiT) block (diffusers ``HunyuanVideoTransformerBlock``): video and text
    keep their own weights and meet in one joint attention."""

    def __init__(self, config: HunyuanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim, eps = config.dim, config.eps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.norm1 = AdaLayerNorm(dim, 6, eps, **kw)
        self.norm1_context = AdaLayerNorm(dim, 6, eps, **kw)
        self.attn = Attention(dim, config.num_heads, eps, qk_norm=True, added=True, out=True, **kw)
        self.norm2 = FP32LayerNorm(dim, eps)
        self.ff = FeedForward(dim, config.mlp_dim, activation="gelu_tanh", **kw)
        self.norm2_context = FP32LayerNorm(dim, eps)
        self.ff_context = FeedForward(dim, config.mlp_dim, activation="gelu_tanh", **kw)

    def __call__(
        self,
        video: Float[Array, "b l d"],
        text: Float[Array, "b t d"],
        temb: Float[Array, "b d"],
        rope: tuple[Array, Array],
        *,
        attend: JointAttend,
        state: Any,
    ) -> tuple[Float[Array, "b l d"], Float[Array, "b t d"], Any]:
        """One block; ``attend(q, k, v, state)`` is its joint attention over ``[video; text]``."""
        dtype, video_len = self.dtype, video.shape[1]
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1.modulations(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.modulations(temb)
        vq, vk, vv = self.attn.qkv(_modulate(self.norm1.norm(video), shift, scale, dtype))
        tq, tk, tv = self.attn.added_qkv(_modulate(self.norm1_context.norm(text), c_shift, c_scale, dtype))
        q = apply_rope(jnp.concatenate([vq, tq], axis=1), *rope)
        k = apply_rope(jnp.concatenate([vk, tk], axis=1), *rope)
        o, state = attend(q, k, jnp.concatenate([vv, tv], axis=1), state)
        o = _merge_heads(o)
        video = _gated(video, self.attn.to_out[0](o[:, :video_len]), gate)
        text = _gated(text, self.attn.to_add_out(o[:, video_len:]), c_gate)
        video = _gated(video, self.ff(_modulate(self.norm2(video), shift_mlp, scale_mlp, dtype)), gate_mlp)
        text = _gated(text, self.ff_context(_modulate(self.norm2_context(text), c_shift_mlp, c_scale_mlp, dtype)), c_gate_mlp)
        return video, text, state


class SingleStreamBlock(nnx.Module):
    """A single-stream block (diffusers ``HunyuanVideoSingleTransformerBlock``) on the joint
    tokens ``[video; text]``: joint attention (no output projection of its own) and a GELU-tanh
    MLP in parallel, one ``proj_out`` of both, one gate."""

    def __init__(self, config: HunyuanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim, eps = config.dim, config.eps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.attn = Attention(dim, config.num_heads, eps, qk_norm=True, added=False, out=False, **kw)
        self.norm = AdaLayerNorm(dim, 3, eps, **kw)
        self.proj_mlp = linear(dim, config.mlp_dim, **kw)
        self.proj_out = linear(dim + config.mlp_dim, dim, **kw)

    def __call__(
        self,
        x: Float[Array, "b lj d"],
        temb: Float[Array, "b d"],
        rope: tuple[Array, Array],
        *,
        attend: JointAttend,
        state: Any,
    ) -> tuple[Float[Array, "b lj d"], Any]:
        """One block on the joint tokens ``x = [video; text]``."""
        shift, scale, gate = self.norm.modulations(temb)
        h = _modulate(self.norm.norm(x), shift, scale, self.dtype)
        mlp = ACTIVATIONS["gelu_tanh"](self.proj_mlp(h))
        q, k, v = self.attn.qkv(h)
        o, state = attend(apply_rope(q, *rope), apply_rope(k, *rope), v, state)
        return _gated(x, self.proj_out(jnp.concatenate([_merge_heads(o), mlp], axis=-1)), gate), state


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class Prepared(NamedTuple):
    """Inputs of the transformer blocks (see :meth:`HunyuanVideoTransformer3DModel.prepare`).

    Attributes:
      video: ``[B, L_v, dim]`` patch embeddings in the backend's token order.
      text: ``[B, T, dim]`` refined text tokens.
      temb: ``[B, dim]`` conditioning vector.
      rope: ``(cos, sin)`` ``[L_v + T, D/2]``: the video rows in the token order, identity rows
        for the text.
      kv_lengths: ``int32[B]`` valid joint key lengths ``L_v + valid text``.
      joint: the static spans ``JointTokens(L_v, T)``.
      grid: token grid ``(F, H, W)``.
      order: the video token permutation.
    """

    video: Array
    text: Array
    temb: Array
    rope: tuple[Array, Array]
    kv_lengths: Array
    joint: JointTokens
    grid: tuple[int, int, int]
    order: TokenPermutation


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known now (not traced), else ``None``."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


class HunyuanVideoTransformer3DModel(nnx.Module):
    """The HunyuanVideo T2V transformer (diffusers' ``HunyuanVideoTransformer3DModel``) in Flax NNX.

    Args:
      config: a :class:`HunyuanConfig` or a config name (``"hunyuan-video-13b"``, ``"tiny"``).
      rngs: ``nnx.Rngs`` for the random initialization (PyTorch's default init; norm weights 1).
      dtype: activation dtype (default: bf16 on accelerators, float32 on CPU).
      param_dtype: parameter dtype (default: same rule).
    """

    def __init__(self, config: str | HunyuanConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=None):
        config = get_config(config)
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dim = config.dim
        self.x_embedder = PatchEmbed(config, **kw)
        self.context_embedder = TokenRefiner(config, **kw)
        self.time_text_embed = ConditionEmbedding(dim, config.pooled_dim, config.freq_dim, config.guidance_embeds, **kw)
        self.transformer_blocks = nnx.List([DualStreamBlock(config, **kw) for _ in range(config.num_dual_layers)])
        self.single_transformer_blocks = nnx.List(
            [SingleStreamBlock(config, **kw) for _ in range(config.num_single_layers)]
        )
        self.norm_out = AdaLayerNorm(dim, 2, config.eps, **kw)
        self.proj_out = linear(dim, config.out_channels * config.patch_features, **kw)

    # ------------------------------------------------------------------ shapes

    def check_inputs(
        self, hidden_states, timestep, cond: HunyuanConditioning, *, embedded_guidance=None
    ) -> tuple[int, int, int]:
        """Validates input shapes (and, when not traced, the text mask's values); returns the
        token grid. Raises ``ValueError`` naming the argument."""
        cfg = self.config
        shape = tuple(hidden_states.shape)
        grid = check_latents(shape, cfg.in_channels, cfg.patch_size, cfg.rope_max_seq_len)
        batch = shape[0]
        t_shape = tuple(jnp.shape(timestep))
        if t_shape not in ((), (batch,)):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},), got shape {t_shape}")
        if not isinstance(cond, HunyuanConditioning):
            raise ValueError(f"cond must be a HunyuanConditioning, got {type(cond).__name__}")
        text = tuple(jnp.shape(cond.prompt_embeds))
        if len(text) != 3 or text[0] != batch or text[2] != cfg.text_dim or text[1] < 1:
            raise ValueError(f"prompt_embeds must have shape [{batch}, T, {cfg.text_dim}] (T >= 1), got shape {text}")
        mask_shape = tuple(jnp.shape(cond.prompt_attention_mask))
        if mask_shape != text[:2]:
            raise ValueError(f"prompt_attention_mask must have shape {text[:2]}, got shape {mask_shape}")
        if not (jnp.issubdtype(cond.prompt_attention_mask.dtype, jnp.integer) or cond.prompt_attention_mask.dtype == bool):
            raise ValueError(
                f"prompt_attention_mask must be int or bool (1 = valid), got dtype {cond.prompt_attention_mask.dtype}"
            )
        mask = _concrete(cond.prompt_attention_mask)
        if mask is not None:
            valid = mask.astype(np.int64).sum(axis=-1)
            prefix = np.arange(mask.shape[1])[None, :] < valid[:, None]
            if (valid < 1).any() or not np.array_equal(mask.astype(np.int64), prefix.astype(np.int64)):
                raise ValueError(
                    "prompt_attention_mask must be 0/1 rows of ones then zeros (right-padded) with at least "
                    f"one valid token per sample, got rows with valid counts {valid.tolist()} that are not"
                )
        pooled = tuple(jnp.shape(cond.pooled_prompt_embeds))
        if pooled != (batch, cfg.pooled_dim):
            raise ValueError(f"pooled_prompt_embeds must have shape {(batch, cfg.pooled_dim)}, got shape {pooled}")
        if cfg.guidance_embeds:
            guidance = cond.guidance if embedded_guidance is None else embedded_guidance
            name = "cond.guidance" if embedded_guidance is None else "guidance"
            if guidance is None:
                raise ValueError(f"{name} is required: this model embeds the guidance scale (guidance_embeds=True)")
            g_shape = tuple(jnp.shape(guidance))
            if g_shape not in ((), (batch,)):
                raise ValueError(f"{name} must be a scalar or have shape ({batch},), got shape {g_shape}")
        return grid

    def joint_tokens(self, grid: tuple[int, int, int], cond: HunyuanConditioning) -> JointTokens:
        """The spans of the joint attention: ``JointTokens(prod(grid), T)`` (static ints)."""
        return JointTokens(video_len=int(math.prod(int(g) for g in grid)), text_len=int(cond.prompt_embeds.shape[1]))

    def attention_length(self, grid: tuple[int, int, int], cond: HunyuanConditioning) -> int:
        """Tokens of each joint attention, ``L_v + T`` (the mask cache's sequence length)."""
        return self.joint_tokens(grid, cond).length

    # ------------------------------------------------------------------ forward

    def __call__(
        self,
        hidden_states: Float[Array, "b c f h w"],
        timestep: Float[Array, " b"] | float,
        encoder_hidden_states: Float[Array, "b t e"],
        encoder_attention_mask: Int[Array, "b t"],
        pooled_projections: Float[Array, "b p"],
        guidance: Float[Array, " b"] | float | None = None,
        *,
        backend: AttentionBackend | str = "dense",
        control: StepControl | None = None,
        cache: MaskCache | None = None,
    ) -> tuple[Float[Array, "b c f h w"], MaskCache | None]:
        """One denoiser evaluation with diffusers' ``forward`` arguments (:meth:`forward` does the work).

        Args:
          hidden_states: latents ``[B, C_in, F, H, W]`` (F, H, W divisible by the patch).
          timestep: ``[B]`` or a scalar, diffusion timestep in [0, 1000].
          encoder_hidden_states: LLM text embeddings ``[B, T, text_dim]``.
          encoder_attention_mask: ``[B, T]`` int or bool, 1 for valid tokens (right-padded).
          pooled_projections: pooled CLIP embedding ``[B, pooled_dim]``.
          guidance: ``[B]`` or a scalar in diffusers' units (``1000 * guidance_scale``, e.g.
            6000.0); required when the model embeds guidance.
          backend: self-attention backend (``"dense"``, ``"dfs"`` or an :class:`AttentionBackend`).
          control: this step's :class:`StepControl` (``None``: dense attention everywhere).
          cache: the mask cache of the ``dfs`` backend (see
            :func:`models.common.processor.init_cache`, with :meth:`attention_length` tokens).

        Returns:
          ``(prediction [B, C_out, F, H, W] in the activation dtype, updated cache)``.
        """
        cond = HunyuanConditioning(encoder_hidden_states, encoder_attention_mask, pooled_projections, None)
        out, state = self.forward(
            hidden_states, timestep, cond, backend=backend, state=AttentionState(control=control, cache=cache),
            embedded_guidance=guidance,
        )  # fmt: skip
        return out, state.cache

    def forward(
        self,
        hidden_states: Float[Array, "b c f h w"],
        timestep: Float[Array, " b"] | float,
        cond: HunyuanConditioning,
        *,
        backend: AttentionBackend | str = "dense",
        state: AttentionState = AttentionState(),
        order: TokenPermutation | None = None,
        num_layers: int | None = None,
        embedded_guidance: Float[Array, " b"] | float | None = None,
    ) -> tuple[Float[Array, "b c f h w"] | None, AttentionState]:
        """The model's one forward pass, threading the attention state through the joint attentions.

        Args:
          hidden_states: latents ``[B, C_in, F, H, W]``.
          timestep: ``[B]`` or a scalar, diffusion timestep in [0, 1000].
          cond: the :class:`HunyuanConditioning` (``cond.guidance`` is the guidance scale).
          backend: self-attention backend.
          state: the :class:`AttentionState` (step controls, mask cache, hook inputs).
          order: the video token permutation to run in (NumPy or traced arrays); ``None``:
            ``backend.token_order``.
          num_layers: run only the first ``num_layers`` joint attentions (dual blocks first) and
            return ``(None, state)``; ``None``: the whole model.
          embedded_guidance: the guidance in diffusers' units, overriding ``1000 * cond.guidance``.

        Returns:
          ``(prediction [B, C_out, F, H, W] or None, state)``.
        """
        cfg = self.config
        backend = make_backend(backend)
        if num_layers is not None and not (isinstance(num_layers, int) and 0 <= num_layers <= cfg.num_layers):
            raise ValueError(f"num_layers must be an int in [0, {cfg.num_layers}] or None, got {num_layers!r}")
        check_state(backend, state, cfg.num_layers)
        prep = self.prepare(
            hidden_states, timestep, cond, backend=backend, order=order, embedded_guidance=embedded_guidance
        )
        stop = cfg.num_layers if num_layers is None else num_layers
        video, text = prep.video, prep.text
        for i in range(min(stop, cfg.num_dual_layers)):
            video, text, state = self.transformer_blocks[i](
                video, text, prep.temb, prep.rope, attend=self._attend(i, prep, backend), state=state
            )
        # With backend.parallel, the joint tokens are split over the heads axis between the
        # attentions, as Wan's tokens are (the joint length divides it: Parallelism.check).
        x = shard_tokens(jnp.concatenate([video, text], axis=1), backend.parallel)
        for i in range(cfg.num_dual_layers, stop):
            x, state = self.single_transformer_blocks[i - cfg.num_dual_layers](
                x, prep.temb, prep.rope, attend=self._attend(i, prep, backend), state=state
            )
            x = shard_tokens(x, backend.parallel)
        if num_layers is not None:
            return None, state
        x = self.proj_out(self.output_norm(x[:, : prep.joint.video_len], prep.temb))
        x = prep.order.restore(x)
        return unpatchify(x, prep.grid, cfg.patch_size, cfg.out_channels, channels_first=True), state

    def output_norm(self, video: Float[Array, "b l d"], temb: Float[Array, "b d"]) -> Float[Array, "b l d"]:
        """``norm_out``: LayerNorm of the video tokens modulated by ``(scale, shift)`` of ``temb``
        (diffusers ``AdaLayerNormContinuous``), before ``proj_out``."""
        scale, shift = self.norm_out.modulations(temb)
        return _modulate(self.norm_out.norm(video), shift, scale, self.dtype)

    def _attend(self, layer: int, prep: Prepared, backend: AttentionBackend) -> JointAttend:
        def attend(q, k, v, state):
            return self_attention(
                q, k, v, backend=backend, layer=layer, num_layers=self.config.num_layers, state=state,
                joint=prep.joint, kv_lengths=prep.kv_lengths,
            )  # fmt: skip

        return attend

    def prepare(
        self,
        hidden_states: Float[Array, "b c f h w"],
        timestep: Float[Array, " b"] | float,
        cond: HunyuanConditioning,
        *,
        backend: AttentionBackend | str = "dense",
        order: TokenPermutation | None = None,
        embedded_guidance: Float[Array, " b"] | float | None = None,
    ) -> Prepared:
        """Everything before the first block: validated inputs, video tokens in the backend's
        order (or ``order``) patch-embedded, joint RoPE tables, the conditioning vector, the
        refined text and the valid key lengths."""
        cfg = self.config
        backend = make_backend(backend)
        grid = self.check_inputs(hidden_states, timestep, cond, embedded_guidance=embedded_guidance)
        batch = hidden_states.shape[0]
        joint = self.joint_tokens(grid, cond)
        if order is None:
            order = token_permutation(backend.token_order, grid)
        # Permute the narrow patch vectors (pt*ph*pw*C wide), not the embedded tokens.
        video = self.x_embedder(order.apply(patchify(hidden_states.astype(self.dtype), cfg.patch_size)))
        rope = joint_rope_tables(cfg, grid, order.perm, joint.text_len)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        guidance = None
        if cfg.guidance_embeds:
            if embedded_guidance is None:
                embedded_guidance = GUIDANCE_UNITS * jnp.asarray(cond.guidance, jnp.float32)
            guidance = jnp.broadcast_to(jnp.asarray(embedded_guidance, jnp.float32), (batch,))
        temb = self.time_text_embed(timestep, cond.pooled_prompt_embeds, guidance)
        mask = cond.prompt_attention_mask
        text = self.context_embedder(cond.prompt_embeds, timestep, mask, backend.dense_implementation)
        kv_lengths = joint.video_len + jnp.sum(mask.astype(jnp.int32), axis=-1)
        return Prepared(video, text, temb, rope, kv_lengths.astype(jnp.int32), joint, grid, order)
