"""Block layouts: which key blocks each (batch, head, query block) visits (docs/spec.md §3.5, §4).

A :class:`BlockLayout` is what the block-sparse kernel consumes: per (batch, head, query
block) a count ``c`` and the indices of the key blocks to visit; only the first ``c``
entries of a row are meaningful. ``K_max`` (the last axis of ``kv_indices``) is static so
that one compiled program serves every density of a schedule; the counts may change at run
time.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import jax
import numpy as np
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.checks import check_positive_int

__all__ = [
    "BlockLayout",
    "blocks_for_density",
    "check_density",
    "check_layout",
    "checkify_layout",
    "full_layout",
    "layout_is_valid",
    "partial_block_last",
    "select_blocks",
    "sorted_layout",
    "validate_layout",
    "visible_counts",
]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each (batch, head, query block) attends to.

    Attributes:
      kv_indices: int32[B, N, nq, K_max]; row ``(b, n, u)`` lists key-block indices, the
        first ``kv_counts[b, n, u]`` of which are visited: distinct, in ``[0, nk)`` and sorted
        ascending (docs/spec.md §4; :func:`validate_layout` checks it); entries beyond the
        count are padding (ignored; :func:`select_blocks` fills them with valid indices).
      kv_counts: int32[B, N, nq]; how many entries of each row are visited
        (``0 ≤ c ≤ K_max``; a row with ``c = 0`` attends to nothing and gives zeros).
      num_key_blocks: static number of key blocks ``nk`` (= ceil(L / block_size)).
    """

    kv_indices: Int[Array, "b n nq kmax"]
    kv_counts: Int[Array, "b n nq"]
    num_key_blocks: int = dataclasses.field(metadata=dict(static=True))

    @property
    def max_blocks(self) -> int:
        """``K_max``, the static capacity of each row."""
        return self.kv_indices.shape[-1]

    @property
    def num_query_blocks(self) -> int:
        return self.kv_indices.shape[-2]

    def to_dense_mask(self) -> Bool[Array, "b n nq nk"]:
        """Expands the layout to a boolean block mask ``[B, N, nq, nk]``.

        A scatter of the visited entries (memory ``O(B*N*nq*nk)``, never ``K_max * nk`` per row).
        """
        batch, heads, nq, kmax = self.kv_indices.shape
        visited = jnp.arange(kmax, dtype=jnp.int32) < self.kv_counts[..., None]
        b = jnp.arange(batch)[:, None, None, None]
        n = jnp.arange(heads)[None, :, None, None]
        u = jnp.arange(nq)[None, None, :, None]
        # Entries past the count are sent out of range and dropped by the scatter.
        columns = jnp.where(visited, self.kv_indices, self.num_key_blocks)
        mask = jnp.zeros((batch, heads, nq, self.num_key_blocks), dtype=jnp.bool_)
        return mask.at[b, n, u, columns].set(True, mode="drop")

    def density(self) -> Float[Array, ""]:
        """Mean fraction of key blocks visited over all rows."""
        return jnp.mean(self.kv_counts.astype(jnp.float32)) / self.num_key_blocks


jax.tree_util.register_dataclass(
    BlockLayout, data_fields=["kv_indices", "kv_counts"], meta_fields=["num_key_blocks"]
)


def check_density(density: float, name: str = "density") -> float:
    """Validates a kept fraction in (0, 1] and returns it as a Python float."""
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {density!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, 1], got {density!r}")
    return value


def blocks_for_density(density: float, num_key_blocks: int) -> int:
    """Number of key blocks kept per query block: ``max(1, int(density * num_key_blocks))``.

    Python float semantics, the reference's rule (docs/spec.md §3.5): density 0.3, 0.2, 0.1 of 591
    key blocks keep 177, 118, 59.
    """
    density = check_density(density)
    num_key_blocks = check_positive_int(num_key_blocks, "num_key_blocks")
    return max(1, int(density * num_key_blocks))


def _concrete_count(num_blocks) -> int | None:
    """``num_blocks`` as a Python int when its value is known at trace time, else ``None``.

    Raises:
      ValueError: if ``num_blocks`` is not an integer scalar.
    """
    if isinstance(num_blocks, bool):
        raise ValueError(f"num_blocks must be an integer, got {num_blocks!r}")
    if isinstance(num_blocks, (int, np.integer)):
        return int(num_blocks)
    dtype = getattr(num_blocks, "dtype", None)
    shape = getattr(num_blocks, "shape", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or shape != ():
        raise ValueError(f"num_blocks must be an integer scalar, got {num_blocks!r}")
    try:
        return int(num_blocks)
    except jax.errors.ConcretizationTypeError:
        return None
    except jax.errors.TracerIntegerConversionError:
        return None


def select_blocks(
    scores: Float[Array, "b n nq nk"],
    num_blocks: int | Int[Array, ""],
    *,
    max_blocks: int | None = None,
) -> BlockLayout:
    """Keeps the ``num_blocks`` highest-scoring key blocks of every row (docs/spec.md §3.5).

    Args:
      scores: float[B, N, nq, nk] block scores (e.g. from :func:`block_scores`).
      num_blocks: how many key blocks each row keeps. May be a traced int32 scalar so that one
        compiled program serves every density; a traced value is clipped to ``[1, max_blocks]``
        at run time (it cannot raise), a value known at trace time must lie in that range.
      max_blocks: static row capacity ``K_max``; defaults to ``num_blocks`` when that is a
        Python int, and must be given when ``num_blocks`` is traced.

    Returns:
      A :class:`BlockLayout` whose rows list the top-``num_blocks`` key blocks (ties broken
      towards the lower index) sorted ascending, as docs/spec.md §4 requires, followed by the
      next-best blocks as padding up to ``K_max``. A NaN score is never selected: a row keeps
      at most as many blocks as it has non-NaN scores (0 if all are NaN).
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 4:
        raise ValueError(f"scores must have shape [B, N, nq, nk], got shape {scores.shape}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    nk = scores.shape[-1]
    count = _concrete_count(num_blocks)
    if count is not None and count < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {count}")
    if max_blocks is None:
        if count is None:
            raise ValueError("max_blocks must be given when num_blocks is a traced value")
        max_blocks = count
    try:
        max_blocks = operator.index(max_blocks)
    except TypeError:
        raise ValueError(f"max_blocks must be a Python int, got {max_blocks!r}") from None
    if not 1 <= max_blocks <= nk:
        raise ValueError(f"max_blocks must be in [1, {nk}] (the number of key blocks), got {max_blocks}")
    if count is not None:
        if not 1 <= count <= max_blocks:
            raise ValueError(f"num_blocks must be in [1, max_blocks={max_blocks}], got {count}")
        counts = jnp.full(scores.shape[:-1], count, dtype=jnp.int32)
    else:
        count_arr = jnp.clip(jnp.asarray(num_blocks, jnp.int32), 1, max_blocks)
        counts = jnp.broadcast_to(count_arr, scores.shape[:-1]).astype(jnp.int32)
    scores = scores.astype(jnp.float32)
    nan = jnp.isnan(scores)
    counts = jnp.minimum(counts, jnp.sum(~nan, axis=-1, dtype=jnp.int32))
    _, indices = jax.lax.top_k(jnp.where(nan, -jnp.inf, scores), max_blocks)
    return sorted_layout(BlockLayout(kv_indices=indices.astype(jnp.int32), kv_counts=counts, num_key_blocks=nk))


def sorted_layout(layout: BlockLayout) -> BlockLayout:
    """``layout`` with the first ``count`` entries of every row sorted ascending (docs/spec.md §4)
    and the padding after them; jit-able. Rows keep their sets of visited blocks."""
    nk = layout.num_key_blocks
    idx = jnp.asarray(layout.kv_indices)
    visited = jnp.arange(idx.shape[-1], dtype=jnp.int32) < jnp.asarray(layout.kv_counts)[..., None]
    keys = jnp.sort(jnp.where(visited, idx, idx + nk), axis=-1)  # an offset of nk sorts padding last
    return dataclasses.replace(layout, kv_indices=jnp.where(keys >= nk, keys - nk, keys).astype(idx.dtype))


def full_layout(batch: int, heads: int, num_query_blocks: int, num_key_blocks: int) -> BlockLayout:
    """The layout that visits every key block (dense attention through the sparse path)."""
    idx = jnp.broadcast_to(
        jnp.arange(num_key_blocks, dtype=jnp.int32), (batch, heads, num_query_blocks, num_key_blocks)
    )
    counts = jnp.full((batch, heads, num_query_blocks), num_key_blocks, dtype=jnp.int32)
    return BlockLayout(kv_indices=idx, kv_counts=counts, num_key_blocks=num_key_blocks)


def check_layout(
    layout: BlockLayout, *, batch: int, heads: int, num_blocks: int, name: str = "layout"
) -> None:
    """Checks that ``layout`` fits self-attention over ``num_blocks`` blocks of a ``[B, L, N, D]`` input.

    Raises:
      ValueError: naming ``name`` if the layout is not a :class:`BlockLayout` of shape
        ``[batch, heads, num_blocks, K_max]`` with ``num_key_blocks == num_blocks`` and
        ``K_max <= num_blocks``; ``name=""`` names the fields alone (``kv_indices``: a kernel
        whose arguments are the layout's arrays).
    """
    prefix = f"{name}." if name else ""
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"{name} must be a BlockLayout, got {type(layout).__name__}")
    shape = tuple(layout.kv_indices.shape)
    if len(shape) != 4 or shape[:3] != (batch, heads, num_blocks):
        raise ValueError(
            f"{prefix}kv_indices must have shape [B={batch}, N={heads}, nq={num_blocks}, K_max], got {shape}"
        )
    if tuple(layout.kv_counts.shape) != (batch, heads, num_blocks):
        raise ValueError(
            f"{prefix}kv_counts must have shape {(batch, heads, num_blocks)}, got {tuple(layout.kv_counts.shape)}"
        )
    if layout.num_key_blocks != num_blocks:
        raise ValueError(f"{prefix}num_key_blocks must be {num_blocks}, got {layout.num_key_blocks}")
    if shape[3] > num_blocks:
        raise ValueError(f"{prefix}max_blocks must be <= {num_blocks}, got {shape[3]}")
    for field in ("kv_indices", "kv_counts"):
        dtype = getattr(layout, field).dtype
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"{prefix}{field} must have an integer dtype, got {dtype}")


def layout_is_valid(layout: BlockLayout) -> Bool[Array, ""]:
    """Whether ``layout`` keeps the contract of docs/spec.md §4 (jit-able; a traced bool).

    Every row's count lies in ``[0, K_max]`` and its first ``count`` indices lie in
    ``[0, num_key_blocks)`` and increase strictly (so they are distinct).
    """
    idx = jnp.asarray(layout.kv_indices)
    counts = jnp.asarray(layout.kv_counts)
    kmax = idx.shape[-1]
    visited = jnp.arange(kmax) < counts[..., None]
    in_range = (idx >= 0) & (idx < layout.num_key_blocks)
    ascending = jnp.concatenate(
        [jnp.ones(idx.shape[:-1] + (1,), bool), idx[..., 1:] > idx[..., :-1]], axis=-1
    )
    rows_ok = jnp.all(~visited | (in_range & ascending), axis=-1)
    return jnp.all(rows_ok & (counts >= 0) & (counts <= kmax))


def validate_layout(layout: BlockLayout, name: str = "layout") -> None:
    """Checks the contract of docs/spec.md §4 on a concrete layout; does nothing while tracing.

    Every attention entry point calls it. Inside ``jit`` (traced layouts) use
    :func:`checkify_layout` under ``jax.experimental.checkify`` instead.

    Raises:
      ValueError: naming the first offending row and what is wrong with it.
    """
    if isinstance(layout.kv_indices, jax.core.Tracer) or isinstance(layout.kv_counts, jax.core.Tracer):
        return
    idx = np.asarray(layout.kv_indices)
    counts = np.asarray(layout.kv_counts)
    kmax, nk = idx.shape[-1], layout.num_key_blocks
    bad = np.argwhere((counts < 0) | (counts > kmax))
    if bad.size:
        row = tuple(int(i) for i in bad[0])
        raise ValueError(f"{name}.kv_counts{list(row)} = {int(counts[row])} must lie in [0, K_max={kmax}]")
    visited = np.arange(kmax) < counts[..., None]
    out_of_range = visited & ((idx < 0) | (idx >= nk))
    if out_of_range.any():
        row = tuple(int(i) for i in np.argwhere(out_of_range)[0][:-1])
        raise ValueError(
            f"{name}.kv_indices{list(row)} lists {idx[row][: counts[row]].tolist()}: block indices must lie in [0, {nk})"
        )
    not_ascending = visited[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
    if not_ascending.any():
        row = tuple(int(i) for i in np.argwhere(not_ascending)[0][:-1])
        raise ValueError(
            f"{name}.kv_indices{list(row)} lists {idx[row][: counts[row]].tolist()}: the first count "
            "indices of a row must be distinct and sorted ascending"
        )


def checkify_layout(layout: BlockLayout, name: str = "layout") -> None:
    """:func:`layout_is_valid` as a ``checkify.check``: under ``checkify.checkify(f)`` an invalid
    traced layout becomes an error the caller can ``throw()``; outside it, a concrete invalid
    layout raises at once."""
    from jax.experimental import checkify

    checkify.check(layout_is_valid(layout), f"{name} breaks the block layout contract (docs/spec.md §4)")


def partial_block_last(
    kv_indices: Int[Array, "b n nq kmax"], kv_counts: Int[Array, "b n nq"], last: int
) -> Int[Array, "b n nq kmax"]:
    """Moves key block ``last`` (the partial one), where a row lists it, to that row's last
    visited entry, swapping it with the block found there; other rows stay as they are.

    A no-op for rows sorted ascending (docs/spec.md §4). The kernels apply it to every traced
    layout so that only the partial block runs with masked loads, whatever the row order: an
    unvalidated layout can give wrong numbers but never a read past the sequence.
    """
    pos = jnp.arange(kv_indices.shape[-1], dtype=jnp.int32)
    tail = jnp.maximum(kv_counts - 1, 0)[..., None]
    listed = (kv_indices == last) & (pos < kv_counts[..., None])
    has = jnp.any(listed, axis=-1, keepdims=True)
    where = jnp.argmax(listed, axis=-1)[..., None]
    at_tail = jnp.take_along_axis(kv_indices, tail, axis=-1)
    swapped = jnp.where(pos == where, at_tail, kv_indices)
    swapped = jnp.where(pos == tail, last, swapped)
    return jnp.where(has, swapped, kv_indices)


def visible_counts(
    kv_indices: Int[Array, "b n nq kmax"], kv_counts: Int[Array, "b n nq"], kv_lengths: Int[Array, " b"], block_size: int
) -> Int[Array, "b n nq"]:
    """Counts with the listed blocks that hold no visible key (every key at or past
    ``kv_lengths[b]``) dropped. Rows sorted ascending (docs/spec.md §4) list such blocks as their
    tail, so the kept entries stay a prefix and only the last kept block can hold invisible keys;
    a row left empty gives zeros."""
    visible_blocks = (kv_lengths + block_size - 1) // block_size
    listed = jnp.arange(kv_indices.shape[-1], dtype=jnp.int32) < kv_counts[..., None]
    keep = listed & (kv_indices < visible_blocks[:, None, None, None])
    return jnp.sum(keep, axis=-1, dtype=jnp.int32)
