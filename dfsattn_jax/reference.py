"""The block-sparse attention oracle (docs/spec.md §5).

:func:`reference_block_sparse_attention` expands a :class:`~pallas_kernels.contract.BlockLayout`
to a dense token mask ``bool[B, N, L, L]`` and calls
``jax.nn.dot_product_attention(implementation="xla")``. It is an *oracle* for tests and small
demos: its memory is quadratic in ``L`` and it does no less work than dense attention. It holds no
checks of its own: its public entry point makes the contract's (:mod:`pallas_kernels.contract`),
and :mod:`dfsattn_jax.dispatch` runs :func:`masked_attention` after the method's entry point made
them. Production code uses ``dfsattn_jax.attention.block_sparse_attention``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels.contract import BlockLayout, check_block_sparse_inputs

__all__ = ["masked_attention", "reference_block_sparse_attention", "token_mask"]


def token_mask(layout: BlockLayout, length: int, block_size: int) -> Bool[Array, "b n l l"]:
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
    check_block_sparse_inputs(q, k, v, layout, block_size=block_size, kv_lengths=kv_lengths)
    return masked_attention(q, k, v, layout, block_size=block_size, scale=scale, kv_lengths=kv_lengths)


def masked_attention(q, k, v, layout, *, block_size, scale, kv_lengths) -> Float[Array, "b l n d"]:
    """:func:`reference_block_sparse_attention` without the checks, same arguments (the dispatch's ``"xla"``)."""
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
