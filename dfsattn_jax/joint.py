"""Joint text + video sequences (docs/spec.md §6.1): HunyuanVideo-style DFSAttn.

Models such as HunyuanVideo attend over one joint sequence ``[video; text]``: the ``L_v`` video
tokens (in the backend's token order, e.g. hilbert3d) come first, then all ``T`` text tokens in
their own order, the valid ones first and the padded ones last. Each sample's valid key length
``kv_lengths[b] = L_v + valid_text[b]`` says where its keys end: padded text keys are never
attended, in the dense path, the kernels and the scorer.

With block size ``b``, ``vs = L_v // b`` blocks hold video only, ``nk = ceil((L_v + T) / b)``
blocks cover the sequence and ``n_text = nk − vs`` blocks hold text (the first of them also the
last ``L_v mod b`` video tokens when ``b`` does not divide ``L_v``). The rule, the reference's:

- **video query blocks** ``u < vs`` visit their top-scoring video key blocks (among ``[0, vs)``)
  plus every key block ``≥ vs`` that holds a valid key: the text blocks, always on. The budget
  ``k`` of a density is computed over the joint ``nk`` (docs/spec.md §3.5) and the video part
  gets ``max(1, k − n_text)`` blocks;
- **query blocks that hold text** ``u ≥ vs`` (including the mixed block) attend densely to
  every valid key;
- key blocks made only of padded text are never visited.

In the :class:`~dfsattn_jax.layout.BlockLayout` of a joint attention (:func:`select_joint_blocks`,
shape ``[B, N, nk, K_max]`` like any self-attention layout, so the mask cache and both kernels
take it unchanged) a video row lists its video blocks, ascending, then its valid text blocks;
the ``n_text`` dense rows have count 0: :func:`joint_attention` runs the block-sparse kernel on
the whole sequence (the dense rows cost nothing there) and overwrites the rows from
``vs · b`` on with a dense attention of those rows against all valid keys.

Why dense tail rows rather than full rows in the layout: the tail is ``(nk − vs) · b`` query rows
(272 of 119,056 at 720p×129, 0.23% of the attention), one small dense call per layer, whereas
full rows need ``K_max = nk`` in every row of the mask cache (3.3× the cache at density 0.3) or
a kernel that loops over every block for some rows.

Density is counted as the reference counts it (:func:`joint_kept_blocks`): a video row keeps its
video blocks plus all ``n_text`` text blocks (padded ones included), a dense row keeps ``nk``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.attention import attend, check_dense_implementation, dense
from dfsattn_jax.checks import check_nonnegative_int, check_positive_int, concrete_count
from dfsattn_jax.layout import BlockLayout, top_blocks
from pallas_kernels.contract import check_block_sparse_inputs, check_kv_lengths, clip_kv_lengths

__all__ = [
    "JointTokens",
    "joint_attention",
    "joint_block_mask",
    "joint_density",
    "joint_kept_blocks",
    "select_joint_blocks",
    "valid_key_blocks",
    "video_budget",
]


class JointTokens(NamedTuple):
    """The spans of a joint sequence ``[video (L_v tokens); text (T tokens)]`` (static ints).

    Attributes:
      video_len: ``L_v``, the video tokens, first in the sequence.
      text_len: ``T``, the text tokens (valid first, then padding), after the video.
    """

    video_len: int
    text_len: int

    @property
    def length(self) -> int:
        """``L_v + T``: the joint sequence length."""
        return int(self.video_len) + int(self.text_len)

    def check(self, length: int | None = None) -> "JointTokens":
        """Returns ``self`` after checking the spans (non-negative ints, ``L_v ≥ 1``, summing to
        ``length`` when given).

        Raises:
          ValueError: naming the field and the expected value.
        """
        for name, value in (("video_len", self.video_len), ("text_len", self.text_len)):
            check_nonnegative_int(value, f"JointTokens.{name}")
        if self.video_len < 1:
            raise ValueError(f"JointTokens.video_len must be >= 1, got {self.video_len}")
        if length is not None and self.length != length:
            raise ValueError(
                f"JointTokens(video_len={self.video_len}, text_len={self.text_len}) spans {self.length} "
                f"tokens, the attention has {length}"
            )
        return self

    def video_blocks(self, block_size: int) -> int:
        """``vs = L_v // b``: the blocks that hold video tokens only (the sparse query rows)."""
        return int(self.video_len) // check_positive_int(block_size, "block_size")

    def num_blocks(self, block_size: int) -> int:
        """``nk = ceil((L_v + T) / b)``: the blocks of the joint sequence."""
        return max(1, math.ceil(self.length / check_positive_int(block_size, "block_size")))

    def text_blocks(self, block_size: int) -> int:
        """``n_text = nk − vs``: the blocks that hold a text token (or the mixed tail of the
        video); their query rows run dense, their key blocks are always on (when valid)."""
        return self.num_blocks(block_size) - self.video_blocks(block_size)

    def dense_from(self, block_size: int) -> int:
        """``vs · b``: the first query token of the dense rows."""
        return self.video_blocks(block_size) * check_positive_int(block_size, "block_size")

    def min_capacity(self, block_size: int) -> int:
        """The smallest layout row capacity ``K_max`` that holds one video block and every text
        block: ``min(nk, n_text + 1)``."""
        return min(self.num_blocks(block_size), self.text_blocks(block_size) + 1)

    def check_capacity(self, max_blocks: int, block_size: int) -> int:
        """Returns ``max_blocks`` (an int) after checking it is a row capacity ``K_max`` of this
        joint layout: an int in ``[min_capacity, nk]`` (:meth:`min_capacity`, :meth:`num_blocks`).
        The one check of the mask cache (:func:`models.common.processor.init_cache`), the layout
        (:func:`select_joint_blocks`) and the sampler's capacity.

        Raises:
          ValueError: naming ``max_blocks`` and the expected range.
        """
        max_blocks = check_positive_int(max_blocks, "max_blocks")
        least, nk = self.min_capacity(block_size), self.num_blocks(block_size)
        if not least <= max_blocks <= nk:
            raise ValueError(
                f"max_blocks must be in [{least}, {nk}] (one video block and every text block of {self}, "
                f"at most nk={nk} at block_size={block_size}), got {max_blocks}"
            )
        return int(max_blocks)


def valid_key_blocks(kv_lengths: Int[Array, " b"], num_key_blocks: int, block_size: int) -> Bool[Array, "b nk"]:
    """``bool[B, nk]``: whether key block ``v`` holds a key before ``kv_lengths[b]``."""
    visible = (jnp.asarray(kv_lengths).astype(jnp.int32) + block_size - 1) // block_size
    return jnp.arange(num_key_blocks, dtype=jnp.int32)[None, :] < visible[:, None]


def video_budget(num_blocks: int | Int[Array, ""], joint: JointTokens, block_size: int, max_blocks: int) -> Int[Array, ""]:
    """Video key blocks a video row keeps for a joint budget ``k``: ``max(1, k − n_text)``, at
    most ``max_blocks − n_text`` (the row also holds the text blocks), int32 (jit-able)."""
    n_text = joint.text_blocks(block_size)
    return jnp.clip(jnp.asarray(num_blocks, jnp.int32) - n_text, 1, max(1, max_blocks - n_text))


def select_joint_blocks(
    scores: Float[Array, "b n nq nk"],
    num_blocks: int | Int[Array, ""],
    *,
    joint: JointTokens,
    block_size: int,
    max_blocks: int,
    kv_lengths: Int[Array, " b"] | None = None,
) -> BlockLayout:
    """The joint layout (module docstring): top video blocks plus the valid text blocks per video
    row, count 0 for the dense rows.

    Args:
      scores: ``float[B, N, nq, nk]`` block scores of the joint sequence (e.g.
        :func:`~dfsattn_jax.scoring.block_scores` with ``kv_lengths``); ``nq`` is ``nk`` or ``vs``
        (rows from ``vs`` on are not read). Only the video columns ``[0, vs)`` are ranked.
      num_blocks: the joint budget ``k`` (e.g. ``blocks_for_density(d, nk)``), an int or a traced
        int32 scalar; the video part is ``clip(k − n_text, 1, max_blocks − n_text)``.
      joint: the spans of the sequence.
      block_size: tokens per block.
      max_blocks: static row capacity ``K_max``, in ``[min_capacity, nk]``
        (:meth:`JointTokens.check_capacity`).
      kv_lengths: ``int[B]`` valid key lengths (``None``: every key is valid).

    Returns:
      A :class:`BlockLayout` ``[B, N, nk, K_max]``: row ``u < vs`` lists its ``c_v`` best video
      blocks ascending (ties to the lower index, NaN never selected), then the key blocks
      ``vs, vs+1, …`` that hold a valid key; rows ``u ≥ vs`` have count 0 (run densely by
      :func:`joint_attention`). Entries past the count are valid indices (padding).
    """
    joint = joint.check()
    block_size = check_positive_int(block_size, "block_size")
    vs, nk, n_text = joint.video_blocks(block_size), joint.num_blocks(block_size), joint.text_blocks(block_size)
    scores = jnp.asarray(scores)
    if scores.ndim != 4 or scores.shape[-1] != nk or scores.shape[2] not in (vs, nk):
        raise ValueError(
            f"scores must have shape [B, N, nq in ({vs}, {nk}), nk={nk}] for {joint} at block_size={block_size}, "
            f"got {scores.shape}"
        )
    batch, heads = scores.shape[:2]
    max_blocks = joint.check_capacity(max_blocks, block_size)
    count = concrete_count(num_blocks)
    if count is not None and count < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {count}")
    check_kv_lengths(kv_lengths, batch=batch, length=joint.length)
    lengths = clip_kv_lengths(kv_lengths, batch, joint.length)
    indices = jnp.zeros((batch, heads, nk, max_blocks), jnp.int32)
    counts = jnp.zeros((batch, heads, nk), jnp.int32)
    if vs == 0:  # no video-only block: every row is dense
        return BlockLayout(kv_indices=indices, kv_counts=counts, num_key_blocks=nk)

    kv = max_blocks - n_text  # static capacity of the video part, in [1, vs]
    video = top_blocks(scores[:, :, :vs, :vs], video_budget(num_blocks, joint, block_size, max_blocks), kv)
    c_v = video.kv_counts[..., None]  # [B, N, vs, 1]
    n_valid = jnp.clip((lengths + block_size - 1) // block_size - vs, 0, n_text)  # [B]
    pos = jnp.arange(max_blocks, dtype=jnp.int32)
    # Position p < c_v: the video entry p; c_v <= p < c_v + n_text: text block vs + p - c_v;
    # later positions: the video padding entries that follow (valid indices).
    from_video = jnp.take_along_axis(
        video.kv_indices, jnp.clip(jnp.where(pos < c_v, pos, pos - n_text), 0, kv - 1), axis=-1
    )
    is_text = (pos >= c_v) & (pos < c_v + n_text)
    rows = jnp.where(is_text, vs + pos - c_v, from_video).astype(jnp.int32)
    row_counts = video.kv_counts + n_valid[:, None, None]
    indices = indices.at[:, :, :vs].set(rows)
    counts = counts.at[:, :, :vs].set(row_counts.astype(jnp.int32))
    return BlockLayout(kv_indices=indices, kv_counts=counts, num_key_blocks=nk)


def joint_block_mask(
    layout: BlockLayout, *, joint: JointTokens, block_size: int, kv_lengths: Int[Array, " b"] | None = None
) -> Bool[Array, "b n nk nk"]:
    """The key blocks each query block of a joint attention visits, ``bool[B, N, nk, nk]``: the
    layout's rows for the video query blocks, every block holding a valid key for the dense rows
    (and no block past ``kv_lengths`` anywhere)."""
    block_size = check_positive_int(block_size, "block_size")
    vs, nk = joint.video_blocks(block_size), joint.num_blocks(block_size)
    batch = layout.kv_counts.shape[0]
    valid = valid_key_blocks(clip_kv_lengths(kv_lengths, batch, joint.length), nk, block_size)  # [B, nk]
    dense_row = (jnp.arange(nk) >= vs)[None, None, :, None]
    return (layout.to_dense_mask() | dense_row) & valid[:, None, None, :]


def joint_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    layout: BlockLayout,
    *,
    joint: JointTokens,
    block_size: int = 128,
    kv_lengths: Int[Array, " b"] | None = None,
    implementation: str | None = None,
    dense_implementation: str | None = None,
    interpret: bool = False,
) -> Float[Array, "b l n d"]:
    """Joint block-sparse attention: ``layout`` (from :func:`select_joint_blocks`) for the video
    query blocks, dense attention over the valid keys for the rows from ``vs · b`` on.

    Args:
      q, k, v: ``[B, L_v + T, N, D]``, video (attention order) then text.
      layout: ``[B, N, nk, K_max]``; the rows ``≥ vs`` are not used (count 0 costs nothing).
      joint: the spans; block_size: tokens per block.
      kv_lengths: ``int[B]`` valid key lengths (``None``: all keys).
      implementation: the block-sparse implementation (:func:`~dfsattn_jax.attention.block_sparse_attention`).
      dense_implementation: the dense one for the tail rows (:func:`~dfsattn_jax.attention.dense_attention`).
      interpret: run a Pallas kernel in its interpreter.

    Returns:
      ``[B, L_v + T, N, D]``.

    Raises:
      TypeError, ValueError: for inputs that break the contract (as
        :func:`~dfsattn_jax.attention.block_sparse_attention`), spans that do not sum to ``L`` or
        an unknown implementation.
    """
    check_block_sparse_inputs(q, k, v, layout, block_size=block_size, kv_lengths=kv_lengths)
    joint = joint.check(q.shape[1])
    check_dense_implementation(dense_implementation, "dense_implementation")
    out = attend(
        q, k, v, layout, block_size=block_size, scale=None, kv_lengths=kv_lengths,
        implementation=implementation, interpret=interpret,
    )  # fmt: skip
    start = joint.dense_from(block_size)
    if start >= q.shape[1]:
        return out
    tail = dense(q[:, start:], k, v, scale=None, kv_lengths=kv_lengths, implementation=dense_implementation)
    # A concatenation, not an in-place update: XLA cannot fuse a dynamic-update-slice into the
    # output of a Mosaic GPU custom call (it copies L·N·D once, ≈ 0.3 ms at 720p×129).
    return jnp.concatenate([out[:, :start], tail.astype(out.dtype)], axis=1)


def joint_kept_blocks(
    kv_indices: Int[Array, "... nk kmax"], kv_counts: Int[Array, "... nk"], *, joint: JointTokens, block_size: int
) -> Float[Array, "..."]:
    """Mean key blocks kept per query block as the reference counts them, over the last axis of
    ``kv_counts`` (any leading axes, e.g. a mask cache's ``[S, B, N]``), float32: a video row
    counts its listed video blocks plus all ``n_text`` text blocks (padded ones included), a
    dense row counts ``nk``. Reads only the last ``n_text`` listed entries of each row (the
    text blocks of a :func:`select_joint_blocks` row)."""
    block_size = check_positive_int(block_size, "block_size")
    vs, nk, n_text = joint.video_blocks(block_size), joint.num_blocks(block_size), joint.text_blocks(block_size)
    counts = jnp.asarray(kv_counts, jnp.int32)
    tail = counts[..., None] - 1 - jnp.arange(n_text, dtype=jnp.int32)  # [..., nk, n_text]
    listed = jnp.take_along_axis(jnp.asarray(kv_indices), jnp.clip(tail, 0, kv_indices.shape[-1] - 1), axis=-1)
    text_listed = jnp.sum((tail >= 0) & (listed >= vs), axis=-1, dtype=jnp.int32)
    kept = jnp.where(jnp.arange(nk) < vs, counts - text_listed + n_text, nk)
    return jnp.mean(kept.astype(jnp.float32), axis=-1)


def joint_density(num_blocks: int, joint: JointTokens, block_size: int) -> float:
    """The density of a joint layout with budget ``k = num_blocks`` as the reference counts it:
    ``(vs · (max(1, k − n_text) + n_text) + n_text · nk) / nk²``. At 720p×129 (``nk = 931``,
    ``vs = 928``), ``k = 279, 186, 93`` give 0.3019, 0.2024, 0.1028."""
    block_size = check_positive_int(block_size, "block_size")
    vs, nk, n_text = joint.video_blocks(block_size), joint.num_blocks(block_size), joint.text_blocks(block_size)
    if vs == 0:
        return 1.0
    k_v = min(max(1, int(num_blocks) - n_text), vs)
    return (vs * (k_v + n_text) + n_text * nk) / nk**2

