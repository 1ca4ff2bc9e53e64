"""Hierarchical block scoring (docs/spec.md §3): tile means, tile softmax, block sums.

For q, k of shape ``[B, L, N, D]`` (attention order, after QK normalization and RoPE):

1. ``L`` is padded to a multiple of the block size ``b``; padding is never attended.
2. Tile means over ``t`` consecutive tokens, averaging the valid tokens only. Only the
   ``T = ceil(L / t)`` tiles that hold a valid token exist; tiles made only of padding are
   neither keys (step 3) nor queries (step 4).
3. Per head, ``A_ij = softmax_j(q̄_i · k̄_j / sqrt(D))`` over the ``T`` valid key tiles.
4. ``S_uv = Σ_{i in query block u} Σ_{j in key block v} A_ij`` (a sum, not a mean).

With per-sample key lengths ``kv_lengths`` (docs/spec.md §3.6), keys at or past
``kv_lengths[b]`` are not keys: key tile means average the valid keys only, key tiles without
one get probability 0, and a row with no valid key tile is all zeros. Queries are unaffected.

Two implementations (:mod:`dfsattn_jax.tiles`), chosen by :func:`dfsattn_jax.dispatch.resolve`
(``kind="scoring"``):

``"jnp"``
  plain JAX, everything in float32 (logits at ``Precision.HIGHEST``): the reference, and the path
  off GPU. The tile matrix has ``T**2`` entries per (batch, head); when that is large, rows are
  computed in chunks of query blocks with ``lax.map`` so that peak memory stays near
  ``tile_budget`` elements, far below ``L**2``.
``"triton"``
  the fused Pallas kernel of :mod:`pallas_kernels.block_scores_triton` (NVIDIA GPUs): tile
  means first (q and k are read once), then softmax and block sums in one kernel that never
  writes the tile matrix; its logits' precision is the ``precision`` argument.

This module holds the public entry points; each validates its inputs once.
"""

from __future__ import annotations

from typing import Literal

from jaxtyping import Array, Float, Int

from dfsattn_jax import dispatch
from dfsattn_jax.checks import check_positive_int, check_tile_size
from dfsattn_jax.tiles import tile_means, tile_softmax, valid_key_tiles
from pallas_kernels.contract import check_attention_inputs, check_kv_lengths, clip_kv_lengths

__all__ = ["DEFAULT_TILE_BUDGET", "block_scores", "tile_means", "tile_probabilities", "valid_key_tiles"]

ScoringImpl = Literal["jnp", "triton"]

#: Default peak size (elements) of one chunk of tile probabilities (float32: 128 MiB).
DEFAULT_TILE_BUDGET = 1 << 25


def tile_probabilities(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    *,
    tile_size: int = 16,
    block_size: int = 128,
    kv_lengths: Int[Array, " b"] | None = None,
) -> Float[Array, "b n t t"]:
    """The full tile probability matrix ``A`` (docs/spec.md §3.3), ``float32[B, N, T, T]``.

    ``T = ceil(L / tile_size)`` tiles; every row sums to 1 (0 for a row of a sample whose
    ``kv_lengths`` is 0; key tiles past ``kv_lengths[b]`` get 0, docs/spec.md §3.6). Memory
    ``O(T**2)``: meant for tests and analysis; :func:`block_scores` never materializes it
    whole when large.
    """
    batch, length, _, _ = check_attention_inputs(q=q, k=k)
    tile_size, _ = check_tile_size(tile_size, block_size)
    check_kv_lengths(kv_lengths, batch=batch, length=length)
    if kv_lengths is None:
        return tile_softmax(tile_means(q, tile_size), tile_means(k, tile_size))
    lengths = clip_kv_lengths(kv_lengths, batch, length)
    key_valid = valid_key_tiles(lengths, -(-length // tile_size), tile_size)
    return tile_softmax(tile_means(q, tile_size), tile_means(k, tile_size, lengths), key_valid)


def block_scores(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    *,
    tile_size: int = 16,
    block_size: int = 128,
    kv_lengths: Int[Array, " b"] | None = None,
    implementation: ScoringImpl | None = None,
    precision: str | None = None,
    interpret: bool = False,
    query_blocks_per_chunk: int | None = None,
    tile_budget: int = DEFAULT_TILE_BUDGET,
) -> Float[Array, "b n nq nk"]:
    """Hierarchical block scores ``S[b, n, u, v]`` (docs/spec.md §3), ``float32[B, N, nq, nk]``.

    Args:
      q, k: ``[B, L, N, D]`` in attention order, any floating dtype, any ``L``.
      tile_size: tokens per tile ``t`` (default 16).
      block_size: tokens per block ``b`` (default 128), a multiple of ``tile_size``.
      kv_lengths: optional ``int[B]`` valid key lengths in ``[0, L]`` (docs/spec.md §3.6): keys
        at or past ``kv_lengths[b]`` are not keys. Key tile means average the valid keys only;
        key tiles without one get probability 0, so key blocks wholly past the length score 0;
        a sample with length 0 gets all-zero scores. Queries are unaffected. ``None``: all
        ``L`` keys (the same results, bit for bit, as without the argument). Concrete values
        are range-checked; traced ones are clipped to ``[0, L]``.
      implementation: ``"jnp"``, ``"triton"`` or ``None`` for this device's default (the
        kernel on GPU when it supports the input, else ``"jnp"``; see
        :func:`dfsattn_jax.dispatch.resolve`).
      precision: the kernel's logit precision (``pallas_kernels.block_scores_triton.PRECISIONS``,
        default its ``DEFAULT_PRECISION``); the jnp scorer always computes in float32 and
        ignores it.
      interpret: run a Pallas kernel in the Pallas interpreter (any backend; slow, for tests);
        the jnp scorer ignores it.
      query_blocks_per_chunk: (jnp) query blocks whose tile rows are computed together;
        default: as many as fit ``tile_budget`` elements of tile probabilities (all when they
        fit).
      tile_budget: (jnp) peak elements of one chunk of tile probabilities when
        ``query_blocks_per_chunk`` is not given.

    Returns:
      ``S`` with ``nq = nk = ceil(L / block_size)``. Each row of tile probabilities sums to
      one (zero when ``kv_lengths[b] == 0``), so ``S[b, n, u].sum()`` is the number of valid
      query tiles of block ``u``.

    Raises:
      TypeError: for a non-array or non-floating ``q``/``k``, or a non-integer ``kv_lengths``.
      ValueError: for mismatched ``q``/``k``, a ``tile_size`` that does not divide
        ``block_size``, ``kv_lengths`` of the wrong shape or range, or an unknown
        ``implementation``.
      NotImplementedError: for a kernel asked for that cannot score this input.
    """
    batch, length, heads, _ = check_attention_inputs(q=q, k=k)
    tile_size, block_size = check_tile_size(tile_size, block_size)
    check_kv_lengths(kv_lengths, batch=batch, length=length)
    impl = dispatch.SCORING[
        dispatch.resolve("scoring", q, implementation, block_size=block_size, tile_size=tile_size).name
    ]
    lengths = None if kv_lengths is None else clip_kv_lengths(kv_lengths, batch, length)
    if impl.pallas:
        return impl.run(
            q, k, lengths, tile_size=tile_size, block_size=block_size, precision=precision, interpret=interpret
        )
    num_blocks = -(-length // block_size)
    if query_blocks_per_chunk is None:
        per_block = batch * heads * (block_size // tile_size) * -(-length // tile_size)
        chunk = max(1, min(num_blocks, check_positive_int(tile_budget, "tile_budget") // per_block))
    else:
        chunk = min(check_positive_int(query_blocks_per_chunk, "query_blocks_per_chunk"), num_blocks)
    return impl.run(q, k, lengths, tile_size=tile_size, block_size=block_size, chunk=chunk)
