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

Two implementations, chosen like the attention kernels (:func:`resolve_scoring_implementation`):

``"jnp"``
  this module in plain JAX, everything in float32 (logits at ``Precision.HIGHEST``): the
  reference, and the path off GPU. The tile matrix has ``T**2`` entries per (batch, head); when
  that is large, rows are computed in chunks of query blocks with ``lax.map`` so that peak
  memory stays near ``tile_budget`` elements, far below ``L**2``.
``"triton"``
  the fused Pallas kernel of :mod:`pallas_kernels.block_scores_triton` (NVIDIA GPUs): tile
  means here (q and k are read once), then softmax and block sums in one kernel that never
  writes the tile matrix; its logits' precision is the ``precision`` argument.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.attention import Implementation, asked_for, on_gpu
from dfsattn_jax.reference import check_attention_inputs, check_block_size, check_kv_lengths

__all__ = [
    "SCORING_IMPLEMENTATIONS",
    "block_scores",
    "check_tile_size",
    "default_scoring_implementation",
    "resolve_scoring_implementation",
    "tile_means",
    "tile_probabilities",
    "valid_key_tiles",
]

ScoringImpl = Literal["jnp", "triton"]

#: The scorers: ``function`` of a Pallas one takes the tile means (see :func:`_kernel_scores`).
SCORING_IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "jnp", "dfsattn_jax.scoring", "block_scores", False,
            "float32 jnp scorer (any backend; the reference)",
        ),
        Implementation(
            "triton", "pallas_kernels.block_scores_triton", "tile_block_scores", True,
            "fused Pallas Triton kernel (NVIDIA GPUs)",
        ),
    )
}

#: Default peak size (elements) of one chunk of tile probabilities (float32: 128 MiB).
DEFAULT_TILE_BUDGET = 1 << 25

_HIGHEST = jax.lax.Precision.HIGHEST


def check_tile_size(tile_size: int, block_size: int) -> tuple[int, int]:
    """Validates ``tile_size`` and ``block_size`` (positive, ``block_size % tile_size == 0``)."""
    tile_size = check_block_size(tile_size, "tile_size")
    block_size = check_block_size(block_size, "block_size")
    if block_size % tile_size:
        raise ValueError(f"tile_size must divide block_size={block_size}, got tile_size={tile_size}")
    return tile_size, block_size


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


def _tile_softmax(
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
        return _tile_softmax(tile_means(q, tile_size), tile_means(k, tile_size))
    lengths = _clipped_lengths(kv_lengths, length)
    key_valid = valid_key_tiles(lengths, -(-length // tile_size), tile_size)
    return _tile_softmax(tile_means(q, tile_size), tile_means(k, tile_size, lengths), key_valid)


def _clipped_lengths(kv_lengths: Int[Array, " b"], length: int) -> Int[Array, " b"]:
    """``kv_lengths`` as int32 clipped to ``[0, L]`` (traced values are not range-checked)."""
    return jnp.clip(jnp.asarray(kv_lengths).astype(jnp.int32), 0, length)


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
    probs = _tile_softmax(qbar, kbar, key_valid) * weights[:, None]
    key_pad = num_key_blocks * tiles_per_block - kbar.shape[2]
    probs = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, key_pad)))
    probs = probs.reshape(
        batch, heads, rows // tiles_per_block, tiles_per_block, num_key_blocks, tiles_per_block
    )
    return jnp.sum(probs, axis=(3, 5))


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
        :func:`resolve_scoring_implementation`).
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
      ValueError: for mismatched or non-floating ``q``/``k``, a ``tile_size`` that does not
        divide ``block_size``, ``kv_lengths`` of the wrong shape, dtype or range, an unknown
        ``implementation``, or a kernel asked for that cannot score this input.
    """
    batch, length, heads, _ = check_attention_inputs(q=q, k=k)
    tile_size, block_size = check_tile_size(tile_size, block_size)
    check_kv_lengths(kv_lengths, batch=batch, length=length)
    name, _ = resolve_scoring_implementation(
        q, tile_size=tile_size, block_size=block_size, implementation=implementation
    )
    impl = SCORING_IMPLEMENTATIONS[name]
    if impl.pallas:
        why = impl.unsupported(q, block_size, tile_size=tile_size)
        if why is not None:
            raise ValueError(f"implementation {name!r} cannot score this input: {why}")
        lengths = None if kv_lengths is None else _clipped_lengths(kv_lengths, length)
        return _kernel_scores(
            q, k, lengths, kernel=impl.load(), tile_size=tile_size,
            block_size=block_size, precision=precision, interpret=bool(interpret),
        )
    tiles_per_block = block_size // tile_size
    num_blocks = -(-length // block_size)
    num_tiles = -(-length // tile_size)

    per_block = batch * heads * tiles_per_block * num_tiles
    if query_blocks_per_chunk is None:
        chunk = max(1, min(num_blocks, operator.index(tile_budget) // per_block))
    else:
        chunk = check_block_size(query_blocks_per_chunk, "query_blocks_per_chunk")
        chunk = min(chunk, num_blocks)
    lengths = None if kv_lengths is None else _clipped_lengths(kv_lengths, length)
    return _block_scores(q, k, lengths, tile_size=tile_size, block_size=block_size, chunk=chunk)


@functools.partial(jax.jit, static_argnames=("tile_size", "block_size", "chunk"))
def _block_scores(q, k, lengths, *, tile_size: int, block_size: int, chunk: int):
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


def default_scoring_implementation() -> str:
    """``"triton"`` (the fused kernel) on a GPU, ``"jnp"`` elsewhere."""
    return "triton" if on_gpu() else "jnp"


def resolve_scoring_implementation(
    q: Array, *, tile_size: int = 16, block_size: int = 128, implementation: str | None = None
) -> tuple[str, str]:
    """The scorer that :func:`block_scores` runs for ``q``, and why.

    Returns:
      ``(name, reason)``: with ``implementation=None`` the default of this device, falling back
      from the kernel to ``"jnp"`` when the kernel does not support the input (the reason says
      why); otherwise the one asked for.

    Raises:
      ValueError: for an unknown name.
    """
    if implementation is not None:
        return asked_for(implementation, SCORING_IMPLEMENTATIONS)
    name = default_scoring_implementation()
    if name == "jnp":
        return name, "default off GPU"
    why = SCORING_IMPLEMENTATIONS[name].unsupported(q, block_size, tile_size=tile_size)
    if why is not None:
        return "jnp", f"{name} does not support this input ({why})"
    return name, "default on GPUs"


@functools.partial(
    jax.jit, static_argnames=("kernel", "tile_size", "block_size", "precision", "interpret")
)
def _kernel_scores(q, k, lengths, *, kernel, tile_size: int, block_size: int, precision, interpret: bool):
    """Tile means here (docs/spec.md §3.2, §3.6), softmax and block sums in ``kernel``."""
    batch, length = q.shape[:2]
    qbar = tile_means(q, tile_size)
    kbar = tile_means(k, tile_size, lengths)
    if lengths is None:
        lengths = jnp.full((batch,), length, jnp.int32)
    valid_tiles = (lengths + tile_size - 1) // tile_size
    return kernel(
        qbar, kbar, valid_tiles, tiles_per_block=block_size // tile_size, precision=precision,
        interpret=interpret,
    )
