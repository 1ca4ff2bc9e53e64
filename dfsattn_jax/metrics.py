"""Quality measures of a layout and of a sparse attention output (docs/spec.md §9)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from typing import NamedTuple

from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.checks import check_positive_int
from dfsattn_jax.layout import blocks_for_density, select_blocks
from pallas_kernels.contract import BlockLayout, check_attention_inputs, check_layout

__all__ = [
    "DISTANCE_CLASS_NAMES",
    "LayerStats",
    "attention_error",
    "block_attention_mass",
    "distance_classes",
    "layout_recall",
    "sampled_row_stats",
    "selection_agreement",
]

_HIGHEST = jax.lax.Precision.HIGHEST
#: Peak elements of one batch of sampled softmax rows (float32: 128 MiB).
_ROW_BUDGET = 1 << 25


def layout_recall(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    layout: BlockLayout,
    *,
    block_size: int = 128,
    num_query_samples: int = 256,
    key: jax.Array | None = None,
    scale: float | None = None,
) -> Float[Array, "b n"]:
    """Fraction of the dense softmax mass that the layout covers, per (batch, head).

    For each sampled query row ``i`` the exact dense probabilities
    ``A_ij = softmax_j(q_i . k_j * scale)`` over the ``L`` valid keys are summed over the key
    blocks that ``layout`` keeps for the block of ``i``; the result is averaged over the
    sampled rows (each row has mass 1, so this is ``sum A*M / sum A`` over the sample).

    Args:
      q, k: ``[B, L, N, D]`` in attention order.
      layout: ``[B, N, ceil(L / block_size), K_max]``.
      block_size: tokens per block.
      num_query_samples: query rows sampled (without replacement, the same rows for every
        batch element and head); all rows when ``>= L``.
      key: PRNG key of the sample; default ``jax.random.key(0)``.
      scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
      float32[B, N] recall in [0, 1].
    """
    batch, length, heads, dim = check_attention_inputs(q=q, k=k)
    block_size = check_positive_int(block_size, "block_size")
    num_blocks = -(-length // block_size)
    check_layout(layout, batch=batch, heads=heads, num_blocks=num_blocks)
    samples = check_positive_int(num_query_samples, "num_query_samples")
    scale = 1.0 / dim**0.5 if scale is None else float(scale)

    if samples >= length:
        rows = jnp.arange(length, dtype=jnp.int32)
    else:
        key = jax.random.key(0) if key is None else key
        rows = jnp.sort(jax.random.choice(key, length, (samples,), replace=False)).astype(jnp.int32)
    return _recall(q, k, layout, rows, block_size=block_size, scale=scale)


@functools.partial(jax.jit, static_argnames=("block_size", "scale"))
def _recall(q, k, layout: BlockLayout, rows, *, block_size: int, scale: float):
    batch, length, heads, _ = q.shape
    num_blocks = -(-length // block_size)
    block_mask = layout.to_dense_mask()  # [B, N, nq, nk]
    row_mask = block_mask[:, :, rows // block_size, :].astype(jnp.float32)  # [B, N, S, nk]
    q_rows = jnp.transpose(q[:, rows].astype(jnp.float32), (2, 0, 1, 3))  # [N, B, S, D]
    k_heads = jnp.transpose(k.astype(jnp.float32), (2, 0, 1, 3))  # [N, B, L, D]
    m_heads = jnp.moveaxis(row_mask, 1, 0)  # [N, B, S, nk]
    key_pad = num_blocks * block_size - length

    def one_head(args):
        q_h, k_h, m_h = args
        logits = jnp.einsum("bsd,bld->bsl", q_h, k_h, precision=_HIGHEST) * scale
        probs = jax.nn.softmax(logits, axis=-1)
        probs = jnp.pad(probs, ((0, 0), (0, 0), (0, key_pad)))
        block_mass = jnp.sum(probs.reshape(batch, rows.shape[0], num_blocks, block_size), axis=-1)
        return jnp.mean(jnp.sum(block_mass * m_h, axis=-1), axis=-1)  # [B]

    heads_per_batch = max(1, min(heads, _ROW_BUDGET // (batch * rows.shape[0] * length)))
    recall = jax.lax.map(one_head, (q_rows, k_heads, m_heads), batch_size=heads_per_batch)  # [N, B]
    return jnp.transpose(recall)


def block_attention_mass(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    *,
    block_size: int = 128,
    scale: float | None = None,
) -> Float[Array, "b n nq nk"]:
    """The exact dense attention mass of every (query block, key block) pair: for query block
    ``I`` and key block ``J``, the mean over the rows ``i`` of ``I`` of ``Σ_{j ∈ J} softmax_j(q_i ·
    k_j · scale)`` (float32 softmax over all ``L`` keys).

    Each row ``[b, n, I, :]`` sums to 1. Its top-``k`` entries are the ``k`` key blocks that keep
    the most of block ``I``'s dense mass, so ``select_blocks(block_attention_mass(q, k), k)`` is
    the recall-optimal layout of that count (an oracle for the scoring: it needs the full
    ``L × L`` attention, which the scoring exists to avoid). A last partial block averages only
    its valid rows; keys past ``L`` hold no mass.

    Args:
      q, k: ``[B, L, N, D]`` in attention order.
      block_size: tokens per block.
      scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
      float32[B, N, nq, nk] with ``nq = nk = ceil(L / block_size)``.

    Memory: one query block at a time (``lax.map``): ``B·N·block_size·L`` float32 logits.
    """
    batch, length, heads, dim = check_attention_inputs(q=q, k=k)
    block_size = check_positive_int(block_size, "block_size")
    scale = 1.0 / dim**0.5 if scale is None else float(scale)
    nb = -(-length // block_size)
    pad = nb * block_size - length
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_blocks = jnp.moveaxis(qf.reshape(batch, nb, block_size, heads, dim), 1, 0)  # [nq, B, T, N, D]
    kf = k.astype(jnp.float32)
    valid = (jnp.arange(nb * block_size) < length).reshape(nb, block_size)  # [nq, T]

    def one_block(args):
        q_blk, rows_valid = args  # [B, T, N, D], [T]
        logits = jnp.einsum("btnd,blnd->bntl", q_blk, kf, precision=_HIGHEST) * scale
        probs = jax.nn.softmax(logits, axis=-1)
        probs = jnp.pad(probs, ((0, 0), (0, 0), (0, 0), (0, pad))).reshape(batch, heads, block_size, nb, block_size)
        per_row = probs.sum(axis=-1)  # [B, N, T, nk]
        weights = rows_valid.astype(jnp.float32) / jnp.sum(rows_valid)
        return jnp.einsum("bntk,t->bnk", per_row, weights, precision=_HIGHEST)

    mass = jax.lax.map(one_block, (q_blocks, valid))  # [nq, B, N, nk]
    return jnp.moveaxis(mass, 0, 2)


def selection_agreement(
    scores: Float[Array, "b n nq nk"], reference: Float[Array, "b n nq nk"], num_blocks: int
) -> Float[Array, ""]:
    """Share of the (row, key block) keep/drop decisions of top-``num_blocks`` selection
    (docs/spec.md §3.5) on which ``scores`` agree with ``reference`` scores.

    Every (batch, head, query block, key block) is one decision; a swapped pair of blocks in
    one row counts as two disagreements.

    Raises:
      ValueError: if the shapes differ.
    """
    if scores.shape != reference.shape or scores.ndim != 4:
        raise ValueError(
            f"scores and reference must have one shape [B, N, nq, nk], got {scores.shape} and {reference.shape}"
        )
    kept = select_blocks(scores, num_blocks).to_dense_mask()
    kept_ref = select_blocks(reference, num_blocks).to_dense_mask()
    return jnp.mean((kept == kept_ref).astype(jnp.float32))


def attention_error(out: Float[Array, "..."], ref: Float[Array, "..."]) -> Float[Array, ""]:
    """Relative L2 error ``||out - ref|| / ||ref||``, computed in float32."""
    if getattr(out, "shape", None) != getattr(ref, "shape", None):
        raise ValueError(f"out must have the shape of ref {getattr(ref, 'shape', None)}, got {getattr(out, 'shape', None)}")
    for name, x in (("out", out), ("ref", ref)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    diff = out.astype(jnp.float32) - ref.astype(jnp.float32)
    return jnp.linalg.norm(diff.ravel()) / jnp.linalg.norm(ref.astype(jnp.float32).ravel())


#: Names of the distance classes of :func:`distance_classes`, in class order: the key token's
#: frame distance ``Δf`` to the query (``0`` = same frame) and its spatial Chebyshev distance
#: ``ds = max(|Δh|, |Δw|)`` in tokens.
DISTANCE_CLASS_NAMES: tuple[str, ...] = (
    "same frame, ds<=1",
    "same frame, ds 2-7",
    "same frame, ds>=8",
    "other frames, ds<=1",
    "other frames, ds 2-7",
    "other frames, ds>=8",
)


def distance_classes(query_coords: Int[Array, "s 3"], key_coords: Int[Array, "l 3"]) -> Int[Array, "s l"]:
    """The distance class (index into :data:`DISTANCE_CLASS_NAMES`) of every (query, key) pair.

    Args:
      query_coords, key_coords: ``(frame, row, column)`` of each token, int.

    Returns:
      int32 ``[S, L]``: ``3 * (Δf > 0) + (0 if ds <= 1 else 1 if ds <= 7 else 2)``.
    """
    d = jnp.abs(query_coords[:, None, :].astype(jnp.int32) - key_coords[None, :, :].astype(jnp.int32))
    spatial = jnp.maximum(d[..., 1], d[..., 2])
    near = jnp.where(spatial <= 1, 0, jnp.where(spatial <= 7, 1, 2))
    return (3 * (d[..., 0] > 0) + near).astype(jnp.int32)


class LayerStats(NamedTuple):
    """What :func:`sampled_row_stats` measures on one layer's attention (float32).

    Attributes:
      recall: ``[]`` covered dense softmax mass, mean over rows, batch and heads.
      error: ``[]`` relative L2 error of the output.
      head_recall: ``[N]`` recall per head (mean over rows and batch).
      top_mass: ``[N]`` per head, the dense softmax mass of each row's ``top_blocks`` heaviest key
        blocks (mean over rows and batch): how concentrated the attention is, block-wise.
      mass_by_class: ``[C]`` dense softmax mass by distance class of the key (mean over rows,
        batch and heads; sums to 1), ``C = 0`` without coordinates.
      missed_by_class: ``[C]`` the part of it the block mask misses (sums to ``1 - recall``).
    """

    recall: Float[Array, ""]
    error: Float[Array, ""]
    head_recall: Float[Array, " n"]
    top_mass: Float[Array, " n"]
    mass_by_class: Float[Array, " c"]
    missed_by_class: Float[Array, " c"]


def sampled_row_stats(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    out: Float[Array, "b l n d"],
    block_mask: Bool[Array, "b n nq nk"],
    rows: Int[Array, " s"],
    *,
    block_size: int,
    scale: float | None = None,
    row_budget: int = _ROW_BUDGET,
    top_blocks: int | None = None,
    coords: Int[Array, "l 3"] | None = None,
) -> LayerStats:
    """Recall of ``block_mask``, relative error of ``out`` and where the attention mass lies, on the
    query rows ``rows``.

    For each sampled row ``i`` (in attention order) the exact dense probabilities
    ``p_ij = softmax_j(q_i · k_j · scale)`` over all ``L`` keys (float32) give

    * recall: ``Σ_j p_ij M[block(i), block(j)]``, averaged over rows, batch and heads
      (equals :func:`dfsattn_jax.metrics.layout_recall` averaged, for the same rows), and per head;
    * error: ``sqrt(Σ ‖out_i − Σ_j p_ij v_j‖² / Σ ‖Σ_j p_ij v_j‖²)`` pooled over rows, batch and
      heads (equals :func:`dfsattn_jax.metrics.attention_error` against dense attention when
      every row is sampled);
    * top_mass: the mass of the row's ``top_blocks`` heaviest key blocks (default
      ``blocks_for_density(0.2, nk)``, the blocks density 0.2 keeps), per head;
    * with ``coords`` (``int[L, 3]``: frame, row, column of each token in attention order): the
      mass and the missed mass (``p_ij (1 - M)``) per distance class (:func:`distance_classes`).

    Memory: ``row_budget`` float32 elements of probabilities at a time (``lax.map`` over heads).
    """
    batch, length, heads, dim = q.shape
    nq, nk = block_mask.shape[-2:]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    num_rows = rows.shape[0]
    groups = batch * heads
    top = blocks_for_density(0.2, nk) if top_blocks is None else int(top_blocks)
    if not 1 <= top <= nk:
        raise ValueError(f"top_blocks must be in [1, {nk}], got {top_blocks!r}")
    if coords is not None and tuple(coords.shape) != (length, 3):
        raise ValueError(f"coords must have shape ({length}, 3), got {tuple(coords.shape)}")
    num_classes = 0 if coords is None else len(DISTANCE_CLASS_NAMES)
    classes = None if coords is None else distance_classes(coords[rows], coords)  # [S, L]

    def per_head(x):  # [B, L', N, D] -> [B*N, L', D]
        return jnp.transpose(x, (0, 2, 1, 3)).reshape(groups, x.shape[1], dim)

    q_rows = per_head(q[:, rows])
    o_rows = per_head(out[:, rows])
    k_heads = per_head(k)
    v_heads = per_head(v)
    m_rows = block_mask[:, :, rows // block_size, :].reshape(groups, num_rows, nk)
    key_pad = nk * block_size - length

    def one(args):
        q_h, k_h, v_h, o_h, m_h = args
        logits = jnp.einsum("sd,ld->sl", q_h.astype(jnp.float32), k_h.astype(jnp.float32), precision=_HIGHEST)
        probs = jax.nn.softmax(logits * scale, axis=-1)
        dense = jnp.einsum("sl,ld->sd", probs, v_h.astype(jnp.float32), precision=_HIGHEST)
        mass = jnp.sum(jnp.pad(probs, ((0, 0), (0, key_pad))).reshape(num_rows, nk, block_size), axis=-1)
        kept = m_h.astype(jnp.float32)
        recall = jnp.mean(jnp.sum(mass * kept, axis=-1))
        top_mass = jnp.mean(jnp.sum(jax.lax.top_k(mass, top)[0], axis=-1))
        diff = o_h.astype(jnp.float32) - dense
        out = (recall, jnp.sum(diff * diff), jnp.sum(dense * dense), top_mass)
        if classes is None:
            return out
        missed_probs = probs * (1.0 - jnp.repeat(kept, block_size, axis=-1)[:, :length])
        by_class = jnp.stack([jnp.sum(jnp.where(classes == c, probs, 0.0)) for c in range(num_classes)]) / num_rows
        missed = jnp.stack([jnp.sum(jnp.where(classes == c, missed_probs, 0.0)) for c in range(num_classes)]) / num_rows
        return out + (by_class, missed)

    per_batch = max(1, min(groups, int(row_budget) // max(1, num_rows * length)))
    results = jax.lax.map(one, (q_rows, k_heads, v_heads, o_rows, m_rows), batch_size=per_batch)
    recall, num, den, top_mass = results[:4]
    if classes is None:
        by_class = missed = jnp.zeros((0,), jnp.float32)
    else:
        by_class, missed = (jnp.mean(x, axis=0) for x in results[4:])
    error = jnp.sqrt(jnp.sum(num) / jnp.maximum(jnp.sum(den), jnp.finfo(jnp.float32).tiny))
    return LayerStats(
        recall=jnp.mean(recall),
        error=error,
        head_recall=jnp.mean(recall.reshape(batch, heads), axis=0),
        top_mass=jnp.mean(top_mass.reshape(batch, heads), axis=0),
        mass_by_class=by_class,
        missed_by_class=missed,
    )
