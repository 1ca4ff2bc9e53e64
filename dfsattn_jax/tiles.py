"""The computations of hierarchical block scoring (docs/spec.md §3.2–3.4, §3.6), without checks.

:func:`dfsattn_jax.scoring.block_scores` validates a call once and runs one of the two scorers
here through :mod:`dfsattn_jax.dispatch`:

- :func:`jnp_block_scores`: everything in float32 (logits at ``Precision.HIGHEST``), the
  reference and the path off GPU. The tile matrix has ``T**2`` entries per (batch, head); rows are
  computed in chunks of query blocks with ``lax.map`` so that peak memory stays bounded.
- :func:`kernel_block_scores`: the tile means here (q and k read once), then softmax and block sums
  in the fused Pallas kernel (:mod:`pallas_kernels.block_scores_triton`), which never writes the
  tile matrix.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import block_scores_triton

__all__ = ["jnp_block_scores", "kernel_block_scores", "tile_means", "tile_softmax", "valid_key_tiles"]

_HIGHEST = jax.lax.Precision.HIGHEST


def tile_means(
    x: Float[Array, "b l n d"], tile_size: int, lengths: Int[Array, " b"] | None = None
) -> Float[Array, "b n t d"]:
    """Means over tiles of ``tile_size`` consecutive tokens, valid tokens only, in float32.

    Returns ``[B, N, T, D]`` with ``T = ceil(L / tile_size)``; the last tile averages the
    ``L - (T - 1) * tile_size`` tokens it holds. With ``lengths`` (``int[B]`` in ``[0, L]``),
    tokens at or past ``lengths[b]`` are not valid either; a tile with no valid token gets the
    mean 0 (see :func:`valid_key_tiles`).
    """
    batch, length, heads, dim = x.shape
    num_tiles = -(-length // tile_size)
    pad = num_tiles * tile_size - length
    xf = x.astype(jnp.float32)
    if lengths is not None:
        valid = jnp.arange(length)[None, :] < lengths[:, None]  # [B, L]
        xf = jnp.where(valid[:, :, None, None], xf, 0.0)
    xf = jnp.pad(xf, ((0, 0), (0, pad), (0, 0), (0, 0)))
    sums = jnp.sum(xf.reshape(batch, num_tiles, tile_size, heads, dim), axis=2)
    if lengths is None:
        counts = jnp.minimum(length - jnp.arange(num_tiles) * tile_size, tile_size).astype(jnp.float32)
        means = sums / counts[None, :, None, None]
    else:
        counts = _tile_counts(lengths, num_tiles, tile_size).astype(jnp.float32)  # [B, T]
        means = sums / jnp.maximum(counts, 1.0)[:, :, None, None]
    return jnp.transpose(means, (0, 2, 1, 3))


def _tile_counts(lengths: Int[Array, " b"], num_tiles: int, tile_size: int) -> Int[Array, "b t"]:
    """Valid tokens of each tile: ``clip(lengths[b] - j * tile_size, 0, tile_size)``."""
    return jnp.clip(lengths[:, None] - jnp.arange(num_tiles)[None, :] * tile_size, 0, tile_size)


def valid_key_tiles(lengths: Int[Array, " b"], num_tiles: int, tile_size: int) -> Bool[Array, "b t"]:
    """Which key tiles hold a key before ``lengths[b]`` (the tiles that take part in the softmax)."""
    return _tile_counts(lengths, num_tiles, tile_size) > 0


def tile_softmax(
    qbar: Float[Array, "b n i d"], kbar: Float[Array, "b n j d"], key_valid: Bool[Array, "b j"] | None = None
) -> Float[Array, "b n i j"]:
    """Softmax over key tiles of the scaled tile-mean logits, float32.

    With ``key_valid``, invalid key tiles get probability 0 and a row without any valid key
    tile is all zeros (never NaN).
    """
    scale = 1.0 / math.sqrt(qbar.shape[-1])
    logits = jnp.einsum("bnid,bnjd->bnij", qbar, kbar, precision=_HIGHEST) * scale
    if key_valid is None:
        return jax.nn.softmax(logits, axis=-1)
    valid = key_valid[:, None, None, :]
    logits = jnp.where(valid, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # all-invalid row: exp(-inf) = 0
    unnormalized = jnp.where(valid, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / jnp.where(total > 0.0, total, 1.0)


def _chunk_scores(
    qbar: Float[Array, "b n i d"],
    weights: Float[Array, " i"],
    kbar: Float[Array, "b n tk d"],
    key_valid: Bool[Array, "b tk"] | None,
    tiles_per_block: int,
    num_key_blocks: int,
) -> Float[Array, "b n c nk"]:
    """Block scores of the query tiles ``qbar`` (a whole number of query blocks)."""
    batch, heads, rows, _ = qbar.shape
    probs = tile_softmax(qbar, kbar, key_valid) * weights[:, None]
    key_pad = num_key_blocks * tiles_per_block - kbar.shape[2]
    probs = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, key_pad)))
    probs = probs.reshape(batch, heads, rows // tiles_per_block, tiles_per_block, num_key_blocks, tiles_per_block)
    return jnp.sum(probs, axis=(3, 5))


@functools.partial(jax.jit, static_argnames=("tile_size", "block_size", "chunk"))
def jnp_block_scores(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    lengths: Int[Array, " b"] | None,
    *,
    tile_size: int,
    block_size: int,
    chunk: int,
) -> Float[Array, "b n nq nk"]:
    """Block scores in float32 jnp, ``chunk`` query blocks' tile rows at a time; ``lengths``:
    ``int32[B]`` in ``[0, L]`` or ``None`` (all keys)."""
    batch, length, heads, _ = q.shape
    tiles_per_block = block_size // tile_size
    num_blocks = -(-length // block_size)
    num_tiles = -(-length // tile_size)
    num_chunks = -(-num_blocks // chunk)
    chunk_rows = chunk * tiles_per_block

    qbar = tile_means(q, tile_size)
    kbar = tile_means(k, tile_size, lengths)
    key_valid = None if lengths is None else valid_key_tiles(lengths, num_tiles, tile_size)
    row_pad = num_chunks * chunk_rows - num_tiles
    qbar = jnp.pad(qbar, ((0, 0), (0, 0), (0, row_pad), (0, 0)))
    weights = (jnp.arange(num_chunks * chunk_rows) < num_tiles).astype(jnp.float32)

    if num_chunks == 1:
        return _chunk_scores(qbar, weights, kbar, key_valid, tiles_per_block, num_blocks)[:, :, :num_blocks]

    dim = qbar.shape[-1]
    q_chunks = jnp.moveaxis(qbar.reshape(batch, heads, num_chunks, chunk_rows, dim), 2, 0)
    w_chunks = weights.reshape(num_chunks, chunk_rows)

    def one_chunk(args):
        q_c, w_c = args
        return _chunk_scores(q_c, w_c, kbar, key_valid, tiles_per_block, num_blocks)

    scores = jax.lax.map(one_chunk, (q_chunks, w_chunks))  # [chunks, B, N, chunk, nk]
    scores = jnp.moveaxis(scores, 0, 2).reshape(batch, heads, num_chunks * chunk, num_blocks)
    return scores[:, :, :num_blocks]


@functools.partial(jax.jit, static_argnames=("tile_size", "block_size", "precision", "interpret"))
def kernel_block_scores(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    lengths: Int[Array, " b"] | None,
    *,
    tile_size: int,
    block_size: int,
    precision: str | None,
    interpret: bool,
) -> Float[Array, "b n nq nk"]:
    """Tile means here (docs/spec.md §3.2, §3.6), softmax and block sums in the fused kernel."""
    batch, length = q.shape[:2]
    qbar = tile_means(q, tile_size)
    kbar = tile_means(k, tile_size, lengths)
    if lengths is None:
        lengths = jnp.full((batch,), length, jnp.int32)
    valid_tiles = (lengths + tile_size - 1) // tile_size
    return block_scores_triton.tile_block_scores_unchecked(
        qbar, kbar, valid_tiles, tiles_per_block=block_size // tile_size, precision=precision, interpret=interpret
    )
