"""A Flax NNX Wan text-to-video diffusion transformer (Wan2.1; Wan2.2-TI2V-5B) with dense or
DFSAttn self-attention.

Mirrors diffusers' ``WanTransformer3DModel`` (T2V path, no image embedding) numerically and in
module naming, so that a diffusers state dict maps 1:1 onto this model's state:

==========================================================  =====================================
diffusers tensor                                            NNX parameter (transform)
==========================================================  =====================================
``patch_embedding.weight`` ``[dim, C, pt, ph, pw]``         ``patch_embedding.kernel``
                                                            ``[pt, ph, pw, C, dim]`` (transpose
                                                            2, 3, 4, 1, 0: ``nnx.Conv`` layout)
``*.weight`` of an ``nn.Linear`` ``[out, in]``              ``*.kernel`` ``[in, out]`` (``.T``)
``*.bias``                                                  ``*.bias``
``blocks.{i}.attn{1,2}.to_out.0.*``                         ``blocks.{i}.attn{1,2}.to_out.0.*``
``blocks.{i}.attn{1,2}.norm_{q,k}.weight``                  same name (RMSNorm ``weight``)
``blocks.{i}.norm2.{weight,bias}``                          same name (LayerNorm)
``blocks.{i}.ffn.net.0.proj.*`` / ``ffn.net.2.*``           same names
``blocks.{i}.scale_shift_table`` ``[1, 6, dim]``            same name and shape
``scale_shift_table`` ``[1, 2, dim]``                       same name and shape
``condition_embedder.{time_embedder,text_embedder}``        same names (``linear_1``,
``.linear_{1,2}.*``, ``condition_embedder.time_proj.*``     ``linear_2``, ``time_proj``)
``proj_out.*``                                              same name
==========================================================  =====================================

Numerics follow diffusers: sinusoidal timestep embedding with ``flip_sin_to_cos=True`` and
``downscale_freq_shift=0``; ``temb`` cast to the activation dtype; modulation
``scale_shift_table + temb`` in float32 in the order (shift, scale, gate) for attention then
FFN; LayerNorms (eps 1e-6) in float32; RMSNorm of q and k over the whole inner dim before
splitting heads; 3D RoPE (:mod:`models.common.rope`); GELU-tanh in the text projection and the FFN;
final ``(shift, scale) = scale_shift_table + temb``; unpatchify ``(B, F, H, W, pt, ph, pw, C)
-> (B, C, F*pt, H*ph, W*pw)``.

Per-token timesteps (Wan2.2-TI2V-5B, diffusers' ``expand_timesteps``): a timestep ``[B, L]``
(one value per patchified token, raster order) gives ``temb [B, L, dim]`` and ``timestep_proj
[B, L, 6, dim]``; each block adds its table as ``(1, 1, 6, dim)`` and splits on axis 2, the
output adds ``(1, 1, 2, dim)`` to ``temb[:, :, None]`` (:func:`modulation`). The timesteps are
permuted into the backend's token order before the embedding. A ``[B]`` timestep traces the
Wan2.1 program unchanged.

Parameters are created in ``param_dtype`` and activations run in ``dtype`` (both default to
bfloat16 on accelerators and float32 on CPU), except the modules diffusers keeps in float32:
``condition_embedder.time_embedder``, every ``scale_shift_table`` and ``norm2``.

Self-attention goes through :mod:`models.common.processor`: with the ``dfs`` backend the
tokens are permuted into the DFS order once after patch embedding (as 64-wide patch vectors,
before the projection) with the RoPE tables built in that order, and restored before
unpatchify (again on the narrow output), so no layer gathers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from dfsattn_jax.attention import dense_attention
from dfsattn_jax.cache import MaskCache
from models.common.processor import (
    AttentionBackend,
    AttentionState,
    StepControl,
    check_state,
    make_backend,
    TokenPermutation,
    cross_attention,
    self_attention,
    token_permutation,
)
from models.common.grid import check_latents
from models.common.parallel import shard_tokens
from models.wan.config import WanConfig, get_config
from models.common.layers import (
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
from models.common.rope import apply_rope, rope_tables

# A block's self-attention: ``attend(q, k, v, state) -> (out, state)`` with q, k, v, out
# ``[B, L, N, D]`` in the block's token order and ``state`` whatever it threads (the mask cache).
SelfAttention = Callable[[Array, Array, Array, Any], tuple[Array, Any]]
# A block's cross-attention: ``cross_attend(q [B, L, N, D], k, v [B, T, N, D]) -> out [B, L, N, D]``.
CrossAttention = Callable[[Array, Array, Array], Array]

__all__ = [
    "WanTransformer3DModel",
    "WanTransformerBlock",
    "Prepared",
    "SelfAttention",
    "CrossAttention",
    "WanAttention",
    "check_timestep_shape",
    "modulation",
    "timestep_embedding",
    "patchify",
    "unpatchify",
]


def check_timestep_shape(shape: tuple[int, ...], batch: int, num_tokens: int) -> None:
    """Checks a ``timestep`` shape: a scalar, ``(B,)``, or ``(B, L)`` per token (``L`` the
    patchified token count of the latents).

    Raises:
      ValueError: naming ``timestep``, the accepted shapes and the shape given.
    """
    if tuple(shape) not in ((), (batch,), (batch, num_tokens)):
        raise ValueError(
            f"timestep must be a scalar, have shape (B,) = ({batch},), or per token (B, L) = ({batch}, {num_tokens}) "
            f"with L the patchified tokens in raster order; got shape {tuple(shape)}"
        )


class WanTimeTextEmbedding(nnx.Module):
    """Timestep and text conditioning (``condition_embedder``)."""

    def __init__(self, config: WanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.freq_dim = config.freq_dim
        self.dtype = dtype
        # diffusers keeps the time embedder in float32.
        self.time_embedder = TimestepEmbedding(
            config.freq_dim, config.dim, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs
        )
        self.time_proj = linear(config.dim, 6 * config.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_embedder = TextProjection(
            config.text_dim, config.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, timestep: Float[Array, "b *l"], text: Float[Array, "b t e"]):
        """Returns ``temb [B, (L,) dim]``, ``timestep_proj [B, (L,) 6*dim]`` and text ``[B, T, dim]``
        for a timestep ``[B]`` or per token ``[B, L]`` (diffusers' ``timestep_seq_len`` path: each
        token's sinusoid goes through the same MLPs)."""
        temb = self.time_embedder(timestep_embedding(timestep, self.freq_dim)).astype(self.dtype)
        timestep_proj = self.time_proj(jax.nn.silu(temb))
        return temb, timestep_proj, self.text_embedder(text.astype(self.dtype))


class WanAttention(nnx.Module):
    """Projections of a Wan attention layer: ``to_q``, ``to_k``, ``to_v``, ``to_out[0]``,
    ``norm_q``/``norm_k`` (RMSNorm across heads, i.e. over the full inner dim)."""

    def __init__(self, dim: int, heads: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.to_q = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_k = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_v = linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_out = nnx.List([linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)])
        self.norm_q = RMSNorm(dim, eps, param_dtype=param_dtype)
        self.norm_k = RMSNorm(dim, eps, param_dtype=param_dtype)

    def qkv(self, x: Float[Array, "b l dim"], context: Float[Array, "b t dim"] | None = None):
        """``q [B, L, N, D]`` and ``k, v [B, T, N, D]`` (``context`` defaults to ``x``), q/k normalized."""
        context = x if context is None else context
        q = self.norm_q(self.to_q(x))
        k = self.norm_k(self.to_k(context))
        v = self.to_v(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1)  # noqa: E731
        return split(q), split(k), split(v)

    def out(self, o: Float[Array, "b l n d"]) -> Float[Array, "b l dim"]:
        return self.to_out[0](o.reshape(o.shape[0], o.shape[1], -1))


def modulation(
    table: Float[Array, "1 n dim"], proj: Float[Array, "b *l n dim"]
) -> tuple[Float[Array, "b l_or_1 dim"], ...]:
    """The ``n`` modulation vectors ``table + proj`` in float32, each broadcastable against the
    tokens ``[B, L, dim]`` (diffusers' ``WanTransformerBlock`` and output modulation).

    ``proj [B, n, dim]`` (one timestep per sample): split on axis 1, each ``[B, 1, dim]``.
    ``proj [B, L, n, dim]`` (per-token timesteps, Wan2.2-TI2V): ``table`` added as
    ``(1, 1, n, dim)``, split on axis 2, each ``[B, L, dim]`` (diffusers' ``temb.ndim == 4`` branch).
    """
    mod = table.astype(jnp.float32) + proj.astype(jnp.float32)
    count = table.shape[-2]
    if proj.ndim == 4:
        return tuple(part[:, :, 0] for part in jnp.split(mod, count, axis=2))
    return tuple(jnp.split(mod, count, axis=1))


class WanTransformerBlock(nnx.Module):
    """Self-attention (modulated), cross-attention to text, modulated GELU-tanh FFN."""

    def __init__(self, config: WanConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim = config.dim
        self.dtype = dtype
        self.norm1 = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, config.num_heads, config.eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn2 = WanAttention(dim, config.num_heads, config.eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = FP32LayerNorm(dim, config.eps, elementwise_affine=True) if config.cross_attn_norm else Identity()
        self.ffn = FeedForward(dim, config.ffn_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm3 = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (1, 6, dim), jnp.float32) / math.sqrt(dim)
        )

    def __call__(
        self,
        x: Float[Array, "b l dim"],
        text: Float[Array, "b t dim"],
        timestep_proj: Float[Array, "b *l six dim"],
        rope: tuple[Array, Array],
        *,
        attend: SelfAttention,
        state: Any,
        cross_attend: CrossAttention = dense_attention,
    ) -> tuple[Float[Array, "b l dim"], Any]:
        """One block; ``attend(q, k, v, state) -> (out, state)`` is its self-attention (dense or
        DFS, see :meth:`WanTransformer3DModel.run_block`), ``state`` what it threads (the mask
        cache) and ``cross_attend(q, k, v) -> out`` its attention to the text. ``timestep_proj``
        is ``[B, 6, dim]`` (one modulation per sample) or ``[B, L, 6, dim]`` (per token, in the
        order of ``x``)."""
        dtype = x.dtype
        mod = modulation(self.scale_shift_table[...], timestep_proj)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mod

        # 1. Self-attention (dense or DFS).
        h = (self.norm1(x) * (1.0 + scale_msa) + shift_msa).astype(dtype)
        q, k, v = self.attn1.qkv(h)
        q = apply_rope(q, *rope)
        k = apply_rope(k, *rope)
        o, state = attend(q, k, v, state)
        x = (x.astype(jnp.float32) + self.attn1.out(o).astype(jnp.float32) * gate_msa).astype(dtype)

        # 2. Cross-attention to the text (always dense).
        h = self.norm2(x).astype(dtype)
        q, k, v = self.attn2.qkv(h, text)
        x = x + self.attn2.out(cross_attend(q, k, v))

        # 3. Feed-forward.
        h = (self.norm3(x) * (1.0 + c_scale) + c_shift).astype(dtype)
        x = (x.astype(jnp.float32) + self.ffn(h).astype(jnp.float32) * c_gate).astype(dtype)
        return x, state


class Prepared(NamedTuple):
    """Inputs of the transformer blocks (see :meth:`WanTransformer3DModel.prepare`).

    Attributes:
      tokens: ``[B, L, dim]`` patch embeddings in the backend's token order.
      text: ``[B, T, dim]`` projected text embeddings.
      temb: ``[B, dim]`` time embedding (activation dtype); ``[B, L, dim]`` for per-token
        timesteps, in the token order.
      timestep_proj: ``[B, 6, dim]`` per-block modulation input; ``[B, L, 6, dim]`` per token.
      rope: ``(cos, sin)`` ``[L, D/2]`` in the token order.
      grid: token grid ``(F, H, W)``.
      order: the static token permutation.
    """

    tokens: Array
    text: Array
    temb: Array
    timestep_proj: Array
    rope: tuple[Array, Array]
    grid: tuple[int, int, int]
    order: TokenPermutation


class WanTransformer3DModel(nnx.Module):
    """The Wan T2V transformer (diffusers' ``WanTransformer3DModel``) in Flax NNX.

    Args:
      config: a :class:`WanConfig` or a config name (``"wan2.1-1.3b"``, ``"wan2.1-14b"``,
        ``"wan2.2-ti2v-5b"``, ``"tiny"``).
      rngs: ``nnx.Rngs`` for the random initialization (PyTorch's default init).
      dtype: activation dtype (default: bf16 on accelerators, float32 on CPU).
      param_dtype: parameter dtype (default: same rule).
    """

    def __init__(self, config: str | WanConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=None):
        config = get_config(config)
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        dim = config.dim
        self.patch_embedding = PatchEmbedding(
            config.in_channels, dim, config.patch_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.condition_embedder = WanTimeTextEmbedding(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([
            WanTransformerBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(config.num_layers)
        ])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = linear(
            dim, config.out_channels * config.patch_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (1, 2, dim), jnp.float32) / math.sqrt(dim))

    def check_inputs(self, hidden_states, timestep, encoder_hidden_states) -> tuple[int, int, int]:
        """Validates input shapes (the timestep by :func:`check_timestep_shape`); returns the token
        grid. Raises ``ValueError`` naming the argument."""
        cfg = self.config
        shape = tuple(hidden_states.shape)
        grid = check_latents(shape, cfg.in_channels, cfg.patch_size, cfg.rope_max_seq_len)
        text = tuple(encoder_hidden_states.shape)
        if len(text) != 3 or text[-1] != cfg.text_dim:
            raise ValueError(f"encoder_hidden_states must have shape [B, T, {cfg.text_dim}], got shape {text}")
        if text[0] != shape[0]:
            raise ValueError(f"encoder_hidden_states batch {text[0]} does not match hidden_states batch {shape[0]}")
        check_timestep_shape(tuple(jnp.shape(timestep)), shape[0], math.prod(grid))
        return grid

    def __call__(
        self,
        hidden_states: Float[Array, "b c f h w"],
        timestep: Float[Array, "b *l"] | float,
        encoder_hidden_states: Float[Array, "b t e"],
        *,
        backend: AttentionBackend | str = "dense",
        control: StepControl | None = None,
        cache: MaskCache | None = None,
    ) -> tuple[Float[Array, "b c f h w"], MaskCache | None]:
        """One denoiser evaluation (diffusers' ``forward`` arguments; :meth:`forward` does the work).

        Args:
          hidden_states: latents ``[B, C_in, F, H, W]`` (F, H, W divisible by the patch).
          timestep: diffusion timestep in [0, 1000]: a scalar, ``[B]``, or ``[B, L]`` per token
            (Wan2.2-TI2V's ``expand_timesteps``: ``L = F/p_t * H/p_h * W/p_w`` patchified tokens
            in raster order, whatever order the backend runs in).
          encoder_hidden_states: text embeddings ``[B, T, text_dim]``.
          backend: self-attention backend (``"dense"``, ``"dfs"`` or an
            :class:`AttentionBackend`).
          control: this step's :class:`StepControl` (``None``: dense attention everywhere).
          cache: the mask cache of the ``dfs`` backend (see
            :func:`models.common.processor.init_cache`).

        Returns:
          ``(prediction [B, C_out, F, H, W] in the activation dtype, updated cache)``.
        """
        out, state = self.forward(
            hidden_states, timestep, encoder_hidden_states,
            backend=backend, state=AttentionState(control=control, cache=cache),
        )  # fmt: skip
        return out, state.cache

    def forward(
        self,
        hidden_states: Float[Array, "b c f h w"],
        timestep: Float[Array, "b *l"] | float,
        encoder_hidden_states: Float[Array, "b t e"],
        *,
        backend: AttentionBackend | str = "dense",
        state: AttentionState = AttentionState(),
        order: TokenPermutation | None = None,
        num_layers: int | None = None,
    ) -> tuple[Float[Array, "b c f h w"] | None, AttentionState]:
        """The model's one forward pass, threading the attention state through the blocks.

        Args:
          hidden_states, timestep, encoder_hidden_states: as :meth:`__call__`.
          backend: self-attention backend.
          state: the :class:`AttentionState` (step controls, mask cache, hook inputs).
          order: the token permutation to run in (NumPy or traced arrays, so one compiled
            program can serve several orders); ``None``: ``backend.token_order``.
          num_layers: run only the first ``num_layers`` blocks and return ``(None, state)``
            (for inspecting one layer's masks); ``None``: the whole model.

        Returns:
          ``(prediction [B, C_out, F, H, W] or None, state)``.
        """
        cfg = self.config
        backend = make_backend(backend)
        check_state(backend, state, cfg.num_layers)
        prep = self.prepare(hidden_states, timestep, encoder_hidden_states, backend=backend, order=order)
        if prep.temb.ndim == 3:  # per-token modulation: sharded like the tokens it modulates
            prep = prep._replace(temb=shard_tokens(prep.temb, backend.parallel),
                                 timestep_proj=shard_tokens(prep.timestep_proj, backend.parallel))  # fmt: skip
        x = shard_tokens(prep.tokens, backend.parallel)
        for i in range(cfg.num_layers if num_layers is None else num_layers):
            x, state = self.run_block(i, x, prep, backend=backend, state=state)
            x = shard_tokens(x, backend.parallel)
        if num_layers is not None:
            return None, state
        shift, scale = modulation(self.scale_shift_table[...], prep.temb.astype(jnp.float32)[..., None, :])
        x = (self.norm_out(x) * (1.0 + scale) + shift).astype(self.dtype)
        x = prep.order.restore(self.proj_out(x))
        return unpatchify(x, prep.grid, cfg.patch_size, cfg.out_channels), state

    def prepare(
        self,
        hidden_states: Float[Array, "b c f h w"],
        timestep: Float[Array, "b *l"] | float,
        encoder_hidden_states: Float[Array, "b t e"],
        *,
        backend: AttentionBackend | str = "dense",
        order: TokenPermutation | None = None,
    ) -> "Prepared":
        """Everything before the first block: validated inputs, tokens in the backend's order
        (or ``order``) patch-embedded, RoPE tables in that order, time and text embeddings
        (per token, in that order too, for a ``[B, L]`` timestep)."""
        cfg = self.config
        backend = make_backend(backend)
        grid = self.check_inputs(hidden_states, timestep, encoder_hidden_states)
        batch = hidden_states.shape[0]
        if order is None:
            order = token_permutation(backend.token_order, grid)
        # Permute the narrow patch vectors (pt*ph*pw*C wide), not the embedded tokens.
        patches = order.apply(patchify(hidden_states.astype(self.dtype), cfg.patch_size))
        tokens = self.patch_embedding(patches)
        rope = rope_tables(cfg.head_dim, grid, order.perm, theta=cfg.rope_theta, max_seq_len=cfg.rope_max_seq_len)
        timestep = jnp.asarray(timestep)
        # Per-token timesteps follow their tokens into the run's order (one scalar each: cheaper
        # to permute before the embedding than the [B, L, 6, dim] modulation after it).
        timestep = order.apply(timestep) if timestep.ndim == 2 else jnp.broadcast_to(timestep, (batch,))
        temb, timestep_proj, text = self.condition_embedder(timestep, encoder_hidden_states)
        timestep_proj = timestep_proj.reshape(*timestep_proj.shape[:-1], 6, cfg.dim)
        return Prepared(tokens, text, temb, timestep_proj, rope, grid, order)

    def run_block(
        self,
        layer: int,
        x: Float[Array, "b l dim"],
        prep: "Prepared",
        *,
        backend: AttentionBackend,
        state: AttentionState,
    ) -> tuple[Float[Array, "b l dim"], AttentionState]:
        """Runs block ``layer`` on tokens ``x`` (in the run's token order)."""

        def attend(q, k, v, state):
            return self_attention(q, k, v, backend=backend, layer=layer, num_layers=self.config.num_layers, state=state)

        return self.blocks[layer](
            x, prep.text, prep.timestep_proj, prep.rope,
            attend=attend, state=state, cross_attend=functools.partial(cross_attention, backend=backend),
        )
