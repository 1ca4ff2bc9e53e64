"""The UMT5 text encoder (transformers' ``UMT5EncoderModel``) in Flax NNX.

Wan2.1 and Wan2.2 condition on the last hidden state of UMT5-XXL's encoder. This module computes
what ``transformers.UMT5EncoderModel`` computes, in this order:

1. token embedding ``shared`` (no scaling, no absolute positions);
2. ``num_layers`` pre-norm blocks, each ``x + SelfAttention(norm(x))`` then
   ``x + GatedFF(norm(x))``:

   * the norms are T5's RMSNorm (mean of squares, no mean subtraction, no bias, eps 1e-6);
   * attention logits are ``q . k`` **without** the ``1/sqrt(d_kv)`` scale, plus a relative
     position bias that **every layer** looks up in its own ``[num_buckets, num_heads]`` table
     (T5 shares block 0's table; UMT5 does not), plus the key mask;
   * the feed-forward network is ``wo(gelu_tanh(wi_0 x) * wi_1 x)``;

3. a final RMSNorm (``encoder.final_layer_norm``).

Parameter names are transformers' (``shared.weight``,
``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}``,
``encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight``,
``encoder.block.{i}.layer.{0,1}.layer_norm.weight``,
``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}``, ``encoder.final_layer_norm.weight``)
with ``kernel`` ``[in, out]`` for a linear ``weight`` ``[out, in]``, so that
:mod:`models.common.checkpoint` maps a checkpoint onto the model one to one.

Dtypes: parameters are created in ``param_dtype`` and the matrix products run in ``dtype``
(float32 or bfloat16; both default to bfloat16 on accelerators and float32 on CPU). The norms,
the attention logits (with the position bias and the mask) and the softmax run in float32 in
every case; the residual stream is kept in ``dtype``, as transformers keeps it in the model's
dtype. float16 is refused: T5 activations overflow it (transformers patches that with clamps).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.checks import check_int_fields, lookup
from models.common.layers import RMSNorm, resolve_dtypes

__all__ = [
    "CONFIGS",
    "UMT5Config",
    "UMT5EncoderModel",
    "get_config",
    "relative_position_bucket",
    "relative_position_buckets",
]

_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Shape hyper-parameters of a UMT5 encoder (transformers' ``UMT5Config`` field names).

    Attributes:
      name: the config's name.
      vocab_size: rows of the token embedding (UMT5-XXL pads it past the tokenizer's vocabulary).
      d_model: width of the residual stream and of the output.
      d_kv: width of one attention head (the attention's inner width is ``num_heads * d_kv``,
        which need not equal ``d_model``).
      num_heads: attention heads.
      d_ff: hidden width of the gated feed-forward network.
      num_layers: encoder blocks.
      relative_attention_num_buckets: rows of each layer's relative-position table (half for
        keys before the query, half for keys after it).
      relative_attention_max_distance: distance from which every key falls in the last bucket of
        its side.
      layer_norm_epsilon: epsilon of every RMSNorm.
    """

    name: str
    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        check_int_fields(self, ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
                                "relative_attention_num_buckets", "relative_attention_max_distance"))  # fmt: skip
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"relative_attention_num_buckets must be at least 4, got {self.relative_attention_num_buckets}"
            )
        exact = self.relative_attention_num_buckets // 4
        if self.relative_attention_max_distance <= exact:
            raise ValueError(
                f"relative_attention_max_distance must exceed relative_attention_num_buckets // 4 = {exact}, "
                f"got {self.relative_attention_max_distance}"
            )
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"layer_norm_epsilon must be a positive number, got {eps!r}")
        object.__setattr__(self, "layer_norm_epsilon", float(eps))

    @property
    def inner_dim(self) -> int:
        """Width of q, k and v: ``num_heads * d_kv``."""
        return self.num_heads * self.d_kv

    def replace(self, **changes) -> "UMT5Config":
        return dataclasses.replace(self, **changes)


CONFIGS: dict[str, UMT5Config] = {
    # google/umt5-xxl's encoder, as the Wan2.1 / Wan2.2 diffusers checkpoints ship it in text_encoder/.
    "umt5-xxl": UMT5Config(
        name="umt5-xxl", vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24
    ),
    # The CPU test config (tests/fixtures/umt5_tiny): heads * d_kv = 48 differs from d_model = 64.
    "tiny": UMT5Config(name="tiny", vocab_size=1024, d_model=64, d_kv=16, num_heads=3, d_ff=96, num_layers=3),
}


def get_config(name: str | UMT5Config) -> UMT5Config:
    """The named config (``"umt5-xxl"``, ``"tiny"``); a :class:`UMT5Config` is returned unchanged.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    return name if isinstance(name, UMT5Config) else lookup(CONFIGS, name, "config")


# --------------------------------------------------------------------------------------------
# Relative position buckets
# --------------------------------------------------------------------------------------------


def _distance_buckets(max_distance_seen: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket (within one side) of each distance ``0 .. max_distance_seen``, as int32.

    One side has ``n = num_buckets // 2`` buckets. Distances below ``e = n // 2`` are their own
    bucket; a larger distance ``d`` goes to ``e + floor(m * log(d / e) / log(M / e))`` with
    ``m = n - e`` and ``M = max_distance``, at most ``n - 1``. The floor is evaluated exactly, in
    integers: ``floor(m * log(d / e) / log(M / e)) >= k``  iff  ``d**m * e**k >= M**k * e**m``.
    (transformers takes the log in float32; for the Wan config, 32 buckets and distance 128, it
    lands on the exact values, also at d = 16, 32 and 64 where the quotient is a whole number.)
    """
    n = num_buckets // 2
    exact = n // 2
    m = n - exact
    out = np.empty(max_distance_seen + 1, np.int32)
    for d in range(max_distance_seen + 1):
        if d < exact:
            out[d] = d
        elif d >= max_distance:
            out[d] = n - 1
        else:
            k = 0
            while k + 1 < m and d**m * exact ** (k + 1) >= max_distance ** (k + 1) * exact**m:
                k += 1
            out[d] = exact + k
    out.flags.writeable = False
    return out


def relative_position_bucket(
    relative_position, *, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """The bidirectional T5 bucket of each ``relative_position = key_position - query_position``.

    Keys before (or at) the query use buckets ``0 .. n-1`` and keys after it ``n .. 2n-1``, with
    ``n = num_buckets // 2``; within a side, distances below ``n // 2`` get a bucket each and
    larger ones share logarithmically wider buckets up to ``max_distance``, from which on all fall
    in the side's last bucket (see :func:`_distance_buckets`).

    Args:
      relative_position: integers (a NumPy array or anything ``np.asarray`` takes).
      num_buckets, max_distance: the config's ``relative_attention_num_buckets`` and
        ``relative_attention_max_distance``.

    Returns:
      int32 buckets, the shape of ``relative_position``.
    """
    rel = np.asarray(relative_position)
    if not np.issubdtype(rel.dtype, np.integer):
        raise ValueError(f"relative_position must hold integers, got dtype {rel.dtype}")
    distance = np.abs(rel.astype(np.int64))
    table = _distance_buckets(int(distance.max(initial=0)), num_buckets, max_distance)
    return (table[distance] + np.where(rel > 0, num_buckets // 2, 0)).astype(np.int32)


def relative_position_buckets(length: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """int32 ``[length, length]``: the bucket of key ``j`` for query ``i`` (see
    :func:`relative_position_bucket`); the same for every layer, computed once per forward (on the
    host, at trace time: a few milliseconds at 512 tokens)."""
    positions = np.arange(length)
    out = relative_position_bucket(
        positions[None, :] - positions[:, None], num_buckets=num_buckets, max_distance=max_distance
    )
    out.flags.writeable = False
    return out


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _linear(in_features: int, out_features: int, std: float, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free linear layer with N(0, std^2) weights (transformers' UMT5 initialisation)."""
    return nnx.Linear(
        in_features, out_features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=jax.nn.initializers.normal(std), rngs=rngs,
    )  # fmt: skip


class Embedding(nnx.Module):
    """A lookup table ``weight [num, dim]`` (torch ``nn.Embedding``), initialised N(0, std^2)."""

    def __init__(self, num: int, dim: int, std: float, *, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.nn.initializers.normal(std)(rngs.params(), (num, dim), param_dtype))

    def __call__(self, indices: Int[Array, "..."]) -> Float[Array, "... dim"]:
        return jnp.take(self.weight[...], indices, axis=0)


class UMT5Attention(nnx.Module):
    """Self-attention with its own relative-position table (``SelfAttention``): ``q``, ``k``,
    ``v``, ``o`` and ``relative_attention_bias``."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, inner, h = config.d_model, config.inner_dim, config.num_heads
        self.num_heads = h
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = _linear(d, inner, (d * config.d_kv) ** -0.5, **kw)
        self.k = _linear(d, inner, d**-0.5, **kw)
        self.v = _linear(d, inner, d**-0.5, **kw)
        self.o = _linear(inner, d, inner**-0.5, **kw)
        self.relative_attention_bias = Embedding(
            config.relative_attention_num_buckets, h, d**-0.5, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(
        self, x: Float[Array, "b l d"], buckets: Int[Array, "l l"], key_valid: Bool[Array, "b l"]
    ) -> Float[Array, "b l d"]:
        b, length, _ = x.shape
        split = lambda t: t.reshape(b, length, self.num_heads, -1)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        # Unscaled logits, position bias and mask, softmax: all float32.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        bias = self.relative_attention_bias(buckets).astype(jnp.float32)  # [l, l, h]
        logits = logits + jnp.transpose(bias, (2, 0, 1))[None]
        logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(self.dtype))
        return self.o(out.reshape(b, length, -1))


class UMT5SelfAttentionLayer(nnx.Module):
    """``x + SelfAttention(layer_norm(x))`` (``layer.0`` of a block)."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)
        self.SelfAttention = UMT5Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, buckets, key_valid):
        return x + self.SelfAttention(self.layer_norm(x), buckets, key_valid).astype(x.dtype)


class UMT5GatedFeedForward(nnx.Module):
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)`` (``DenseReluDense``)."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, ff = config.d_model, config.d_ff
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = _linear(d, ff, d**-0.5, **kw)
        self.wi_1 = _linear(d, ff, d**-0.5, **kw)
        self.wo = _linear(ff, d, ff**-0.5, **kw)

    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class UMT5FeedForwardLayer(nnx.Module):
    """``x + DenseReluDense(layer_norm(x))`` (``layer.1`` of a block)."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)
        self.DenseReluDense = UMT5GatedFeedForward(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x)).astype(x.dtype)


class UMT5Block(nnx.Module):
    """One encoder block: ``layer[0]`` self-attention, ``layer[1]`` feed-forward."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer = nnx.List([UMT5SelfAttentionLayer(config, **kw), UMT5FeedForwardLayer(config, **kw)])

    def __call__(self, x, buckets, key_valid):
        return self.layer[1](self.layer[0](x, buckets, key_valid))


class UMT5Stack(nnx.Module):
    """The encoder stack (``encoder``): ``block[0..num_layers-1]`` and ``final_layer_norm``."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.block = nnx.List([
            UMT5Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_layers)
        ])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, param_dtype=param_dtype)

    def __call__(self, x, buckets, key_valid):
        for block in self.block:
            x = block(x, buckets, key_valid)
        return self.final_layer_norm(x)


class UMT5EncoderModel(nnx.Module):
    """The UMT5 encoder (transformers' ``UMT5EncoderModel``) in Flax NNX.

    Args:
      config: a :class:`UMT5Config` or a config name (``"umt5-xxl"``, ``"tiny"``).
      rngs: ``nnx.Rngs`` for the random initialization (transformers' UMT5 initialization:
        normal weights scaled by fan-in, q by ``1/sqrt(d_model * d_kv)``, norms at 1).
      dtype: activation dtype, ``float32`` or ``bfloat16`` (default: bf16 on accelerators,
        float32 on CPU).
      param_dtype: parameter dtype, same choices (default: same rule).

    Raises:
      ValueError: for an unknown config name or a dtype other than float32 / bfloat16.
    """

    def __init__(self, config: str | UMT5Config, *, rngs: nnx.Rngs, dtype=None, param_dtype=None):
        config = get_config(config)
        for arg, value in (("dtype", dtype), ("param_dtype", param_dtype)):
            if value is not None and _dtype_name(value) not in _DTYPES:
                raise ValueError(
                    f"{arg} must be one of {list(_DTYPES)} (or None for the default), got {value!r}"
                    + ("; UMT5 activations overflow float16" if _dtype_name(value) == "float16" else "")
                )
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.shared = Embedding(config.vocab_size, config.d_model, 1.0, param_dtype=param_dtype, rngs=rngs)
        self.encoder = UMT5Stack(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def check_inputs(self, input_ids, attention_mask) -> None:
        """Validates the inputs' shapes and dtypes (a ``ValueError`` naming the argument)."""
        shape = tuple(jnp.shape(input_ids))
        if len(shape) != 2 or 0 in shape:
            raise ValueError(f"input_ids must have shape [B, L] with B, L >= 1, got shape {shape}")
        if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
            raise ValueError(f"input_ids must hold integers, got dtype {jnp.result_type(input_ids)}")
        if attention_mask is not None:
            mask_shape = tuple(jnp.shape(attention_mask))
            if mask_shape != shape:
                raise ValueError(f"attention_mask must have the shape of input_ids {shape}, got shape {mask_shape}")
            mask_dtype = jnp.result_type(attention_mask)
            if not (jnp.issubdtype(mask_dtype, jnp.integer) or jnp.issubdtype(mask_dtype, jnp.bool_)):
                raise ValueError(f"attention_mask must hold booleans or 0/1 integers, got dtype {mask_dtype}")

    def __call__(
        self, input_ids: Int[Array, "b l"], attention_mask: Int[Array, "b l"] | Bool[Array, "b l"] | None = None
    ) -> Float[Array, "b l d"]:
        """The encoder's last hidden state (transformers' ``last_hidden_state``).

        Args:
          input_ids: token ids ``[B, L]`` in ``[0, vocab_size)`` (an id out of range gives NaN
            rows, as ``jnp.take`` fills them).
          attention_mask: ``[B, L]``, nonzero / True for the prompt's tokens (keys elsewhere are
            masked out for every query); ``None``: every token is valid.

        Returns:
          ``[B, L, d_model]`` in the activation dtype; rows at masked positions are computed as
          transformers computes them (each attends to the sample's valid keys).
        """
        self.check_inputs(input_ids, attention_mask)
        cfg = self.config
        ids = jnp.asarray(input_ids).astype(jnp.int32)
        length = ids.shape[1]
        key_valid = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
        buckets = jnp.asarray(
            relative_position_buckets(length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        )
        x = self.shared(ids).astype(self.dtype)
        return self.encoder(x, buckets, key_valid).astype(self.dtype)


def _dtype_name(value) -> str | None:
    try:
        return jnp.dtype(value).name
    except (TypeError, ValueError):
        return None
