"""The block-sparse attention oracle (docs/spec.md §5) and the input checks shared by the core.

:func:`reference_block_sparse_attention` expands a :class:`BlockLayout` to a dense token mask
``bool[B, N, L, L]`` and calls ``jax.nn.dot_product_attention(implementation="xla")``. It is
an *oracle* for tests and small demos: its memory is quadratic in ``L`` and it does no less
work than dense attention. Production code uses ``dfsattn_jax.attention.block_sparse_attention``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from dfsattn_jax.checks import check_positive_int
from dfsattn_jax.layout import BlockLayout, check_layout, validate_layout

__all__ = [
    "check_attention_inputs",
    "check_block_size",
    "check_kv_lengths",
    "reference_block_sparse_attention",
    "token_mask",
]


def check_attention_inputs(**arrays: Array) -> tuple[int, int, int, int]:
    """Checks that named ``[B, L, N, D]`` arrays agree in shape and have one floating dtype.

    Call as ``check_attention_inputs(q=q, k=k, v=v)``; the keyword names appear in errors.

    Returns:
      ``(B, L, N, D)``.

    Raises:
      ValueError: naming the argument whose rank, shape or dtype is wrong.
    """
    first_name, first = next(iter(arrays.items()))
    for name, x in arrays.items():
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must have shape [B, L, N, D], got shape {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
        if x.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {first.shape}, got {x.shape}")
        if x.dtype != first.dtype:
            raise ValueError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {x.dtype}")
    empty = [axis for axis, size in zip("BLND", first.shape) if size < 1]
    if empty:
        raise ValueError(
            f"{first_name} must not be empty, got shape {first.shape} (axis {', '.join(empty)} of [B, L, N, D] is 0)"
        )
    return tuple(first.shape)  # type: ignore[return-value]


def check_block_size(block_size: int, name: str = "block_size") -> int:
    """Validates a positive integer block (or tile) size."""
    return check_positive_int(block_size, name)


def check_kv_lengths(kv_lengths, *, batch: int, length: int, name: str = "kv_lengths") -> None:
    """Checks per-sample valid key lengths (docs/spec.md §6.1): ``None``, or an integer array of
    shape ``[batch]`` whose values, when known at trace time, lie in ``[0, length]``.

    Raises:
      ValueError: naming ``name`` and what is wrong.
    """
    if kv_lengths is None:
        return
    shape = getattr(kv_lengths, "shape", None)
    dtype = getattr(kv_lengths, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape [B={batch}], got dtype {dtype}")
    if tuple(shape) != (batch,):
        raise ValueError(f"{name} must have shape [B={batch}], got {tuple(shape)}")
    if isinstance(kv_lengths, jax.core.Tracer):
        return
    values = np.asarray(kv_lengths)
    bad = (values < 0) | (values > length)
    if bad.any():
        raise ValueError(f"{name} must lie in [0, L={length}], got {values.tolist()}")


def token_mask(layout: BlockLayout, length: int, block_size: int) -> jax.Array:
    """Expands a layout to ``bool[B, N, L, L]``: query ``i`` may see key ``j`` iff their blocks are kept.

    Only the ``L`` valid keys get a column, so padding keys are never attended.
    """
    blocks = jnp.arange(length, dtype=jnp.int32) // block_size
    block_mask = layout.to_dense_mask()
    return block_mask[:, :, blocks[:, None], blocks[None, :]]


def reference_block_sparse_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    layout: BlockLayout,
    *,
    block_size: int = 128,
    scale: float | None = None,
    kv_lengths: Int[Array, " b"] | None = None,
) -> Float[Array, "b l n d"]:
    """Block-sparse attention by masking dense XLA attention (the oracle of docs/spec.md §5).

    ``out[b, i, n] = sum_j softmax_j(q[b,i,n] . k[b,j,n] * scale) v[b,j,n]`` over the valid keys
    ``j < L`` (and ``j < kv_lengths[b]`` when given) of the key blocks that ``layout`` lists for
    the block of ``i``; a query that sees no valid key (count 0, or every listed key past
    ``kv_lengths[b]``) gives zeros. Memory is ``O(B * N * L**2)``: use it as a test oracle only.

    Args:
      q, k, v: ``[B, L, N, D]`` in attention order, one floating dtype.
      layout: ``BlockLayout`` of shape ``[B, N, ceil(L / block_size), K_max]``.
      block_size: tokens per block.
      scale: logit scale, default ``1 / sqrt(D)``.
      kv_lengths: optional ``int[B]`` valid key lengths in ``[0, L]`` (docs/spec.md §6.1): keys
        at or past ``kv_lengths[b]`` are never attended; default ``L``.

    Returns:
      ``[B, L, N, D]`` in the dtype of ``q``.
    """
    batch, length, heads, _ = check_attention_inputs(q=q, k=k, v=v)
    block_size = check_block_size(block_size)
    num_blocks = -(-length // block_size)
    check_layout(layout, batch=batch, heads=heads, num_blocks=num_blocks)
    validate_layout(layout)
    check_kv_lengths(kv_lengths, batch=batch, length=length)
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths).astype(jnp.int32)
    return _masked_attention(
        q, k, v, layout, kv_lengths, block_size=block_size, scale=None if scale is None else float(scale)
    )


@functools.partial(jax.jit, static_argnames=("block_size", "scale"))
def _masked_attention(q, k, v, layout, kv_lengths, *, block_size, scale):
    mask = token_mask(layout, q.shape[1], block_size)
    if kv_lengths is not None:
        visible = jnp.arange(q.shape[1], dtype=jnp.int32)[None, :] < kv_lengths[:, None]  # [B, L] keys
        mask = mask & visible[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    # A query that sees no key (count 0, or all its keys past kv_lengths) attends to nothing: 0.
    sees_any = jnp.transpose(jnp.any(mask, axis=-1), (0, 2, 1))[..., None]  # [B, L, N, 1]
    return jnp.where(sees_any, out, jnp.zeros_like(out))
