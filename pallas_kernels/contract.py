"""The kernels' input contract (docs/spec.md §4–§5): the block layout, its rules, and the checks of
q, k, v and the key lengths.

Every block-sparse attention implementation (the Pallas kernels here, the method's XLA oracle)
takes the same inputs, so their contract lives beside the kernels, as JAX's splash attention keeps
its mask metadata beside its kernel: ``dfsattn_jax`` re-exports what users name
(``dfsattn_jax.BlockLayout``). This module imports nothing of the project.

- :class:`BlockLayout`: per (batch, head, query block) a count ``c`` and the key blocks to visit;
  the first ``c`` entries of a row are distinct, in ``[0, nk)`` and ascending (§4).
- Checks, each raising at a public entry point, naming the argument: :func:`check_attention_inputs`
  (``[B, L, N, D]`` arrays), :func:`check_kv_lengths`, :func:`check_layout` (shapes),
  :func:`validate_layout` (a concrete layout's rows), and :func:`check_block_sparse_inputs`, all of
  them for one call. ``TypeError`` for a wrong type (not an array, not a ``BlockLayout``, a
  non-floating or non-integer dtype), ``ValueError`` for a wrong shape or value.
- Rules the kernels apply to traced layouts, whatever they hold: :func:`clip_kv_lengths`,
  :func:`visible_counts` (blocks with no visible key are dropped) and :func:`partial_block_last`
  (only a row's last visited block is partial).
- The integer rule of the whole project (:func:`check_positive_int`, :func:`check_nonnegative_int`):
  Python or NumPy integers, never a bool or a float, even a whole one.
"""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "BlockLayout",
    "check_attention_inputs",
    "check_block_sparse_inputs",
    "check_kv_lengths",
    "check_layout",
    "check_nonnegative_int",
    "check_positive_int",
    "checkify_layout",
    "clip_kv_lengths",
    "kernel_rows",
    "layout_is_valid",
    "num_blocks",
    "partial_block_last",
    "validate_layout",
    "visible_counts",
]


# ---------------------------------------------------------------------------------------------
# The integer rule


def _check_int(value: int, name: str, minimum: int, what: str) -> int:
    """``value`` as a Python int when it is an integer (a Python or NumPy int, not a bool, not a
    float even if whole) of at least ``minimum``; else a ``ValueError`` naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def check_positive_int(value: int, name: str) -> int:
    """Returns ``value`` as a Python int if it is an integer ≥ 1 (not a bool), else raises ``ValueError``."""
    return _check_int(value, name, 1, "a positive integer")


def check_nonnegative_int(value: int, name: str) -> int:
    """Returns ``value`` as a Python int if it is an integer ≥ 0 (not a bool), else raises ``ValueError``."""
    return _check_int(value, name, 0, "a non-negative integer")


def num_blocks(length: int, block_size: int) -> int:
    """``ceil(L / block_size)``: the query (= key) blocks of a sequence of ``L`` tokens."""
    return -(-length // block_size)


# ---------------------------------------------------------------------------------------------
# The block layout


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each (batch, head, query block) attends to.

    Attributes:
      kv_indices: int32[B, N, nq, K_max]; row ``(b, n, u)`` lists key-block indices, the first
        ``kv_counts[b, n, u]`` of which are visited: distinct, in ``[0, nk)`` and sorted ascending
        (docs/spec.md §4; :func:`validate_layout` checks it); entries beyond the count are padding
        (ignored; ``dfsattn_jax.select_blocks`` fills them with valid indices).
      kv_counts: int32[B, N, nq]; how many entries of each row are visited (``0 ≤ c ≤ K_max``; a
        row with ``c = 0`` attends to nothing and gives zeros).
      num_key_blocks: static number of key blocks ``nk`` (= ceil(L / block_size)).

    ``K_max`` (the last axis of ``kv_indices``) is static so that one compiled program serves
    every density of a schedule; the counts may change at run time.
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


def check_layout(layout: BlockLayout, *, batch: int, heads: int, num_blocks: int, name: str = "layout") -> None:
    """Checks that ``layout`` fits self-attention over ``num_blocks`` blocks of a ``[B, L, N, D]`` input.

    Raises:
      TypeError: if ``layout`` is not a :class:`BlockLayout` or its arrays have no integer dtype.
      ValueError: naming ``name`` unless the layout has shape ``[batch, heads, num_blocks, K_max]``
        with ``num_key_blocks == num_blocks`` and ``1 <= K_max <= num_blocks``.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"{name} must be a BlockLayout, got {type(layout).__name__}")
    shape = tuple(layout.kv_indices.shape)
    if len(shape) != 4 or shape[:3] != (batch, heads, num_blocks):
        raise ValueError(
            f"{name}.kv_indices must have shape [B={batch}, N={heads}, nq={num_blocks}, K_max], got {shape}"
        )
    if tuple(layout.kv_counts.shape) != (batch, heads, num_blocks):
        raise ValueError(
            f"{name}.kv_counts must have shape {(batch, heads, num_blocks)}, got {tuple(layout.kv_counts.shape)}"
        )
    if layout.num_key_blocks != num_blocks:
        raise ValueError(f"{name}.num_key_blocks must be {num_blocks}, got {layout.num_key_blocks}")
    if not 1 <= shape[3] <= num_blocks:
        raise ValueError(f"{name}.max_blocks must be in [1, {num_blocks}], got {shape[3]}")
    for field in ("kv_indices", "kv_counts"):
        dtype = getattr(layout, field).dtype
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"{name}.{field} must have an integer dtype, got {dtype}")


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
    ascending = jnp.concatenate([jnp.ones(idx.shape[:-1] + (1,), bool), idx[..., 1:] > idx[..., :-1]], axis=-1)
    rows_ok = jnp.all(~visited | (in_range & ascending), axis=-1)
    return jnp.all(rows_ok & (counts >= 0) & (counts <= kmax))


def _first_row(where: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(where)[0])


def validate_layout(layout: BlockLayout, name: str = "layout") -> None:
    """Checks the contract of docs/spec.md §4 on a concrete layout; does nothing while tracing.

    Inside ``jit`` (traced layouts) use :func:`checkify_layout` under ``jax.experimental.checkify``.

    Raises:
      ValueError: naming the first offending row and what is wrong with it.
    """
    if isinstance(layout.kv_indices, jax.core.Tracer) or isinstance(layout.kv_counts, jax.core.Tracer):
        return
    idx = np.asarray(layout.kv_indices)
    counts = np.asarray(layout.kv_counts)
    kmax, nk = idx.shape[-1], layout.num_key_blocks
    bad = (counts < 0) | (counts > kmax)
    if bad.any():
        row = _first_row(bad)
        raise ValueError(f"{name}.kv_counts{list(row)} = {int(counts[row])} must lie in [0, K_max={kmax}]")
    visited = np.arange(kmax) < counts[..., None]
    out_of_range = visited & ((idx < 0) | (idx >= nk))
    if out_of_range.any():
        row = _first_row(out_of_range)[:-1]
        raise ValueError(
            f"{name}.kv_indices{list(row)} lists {idx[row][: counts[row]].tolist()}: block indices must lie in [0, {nk})"
        )
    not_ascending = visited[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
    if not_ascending.any():
        row = _first_row(not_ascending)[:-1]
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


# ---------------------------------------------------------------------------------------------
# q, k, v and the key lengths


def check_attention_inputs(**arrays: Array) -> tuple[int, int, int, int]:
    """Checks that named ``[B, L, N, D]`` arrays agree in shape and have one floating dtype.

    Call as ``check_attention_inputs(q=q, k=k, v=v)``; the keyword names appear in errors.

    Returns:
      ``(B, L, N, D)``.

    Raises:
      TypeError: naming the argument that is not an array or whose dtype is not floating or
        differs from the first's.
      ValueError: naming the argument whose rank or shape is wrong, or an empty axis.
    """
    first_name, first = next(iter(arrays.items()))
    for name, x in arrays.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array of shape [B, L, N, D], got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, L, N, D], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
        if x.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {first.shape}, got {x.shape}")
        if x.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {x.dtype}")
    empty = [axis for axis, size in zip("BLND", first.shape) if size < 1]
    if empty:
        raise ValueError(
            f"{first_name} must not be empty, got shape {first.shape} (axis {', '.join(empty)} of [B, L, N, D] is 0)"
        )
    return tuple(first.shape)  # type: ignore[return-value]


def check_kv_lengths(kv_lengths, *, batch: int, length: int, name: str = "kv_lengths") -> None:
    """Checks per-sample valid key lengths (docs/spec.md §6.1): ``None``, or an integer array of
    shape ``[batch]`` whose values, when known at trace time, lie in ``[0, length]`` (traced
    values are clipped by :func:`clip_kv_lengths` where they are used).

    Raises:
      TypeError: for a non-array or a non-integer dtype.
      ValueError: for another shape, or a concrete value outside ``[0, length]``.
    """
    if kv_lengths is None:
        return
    dtype = getattr(kv_lengths, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array of shape [B={batch}], got dtype {dtype}")
    if tuple(kv_lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape [B={batch}], got {tuple(kv_lengths.shape)}")
    if isinstance(kv_lengths, jax.core.Tracer):
        return
    values = np.asarray(kv_lengths)
    if ((values < 0) | (values > length)).any():
        raise ValueError(f"{name} must lie in [0, L={length}], got {values.tolist()}")


def clip_kv_lengths(kv_lengths: Int[Array, " b"] | None, batch: int, length: int) -> Int[Array, " b"]:
    """The key lengths the kernels read: ``int32[B]`` clipped to ``[0, L]`` (``None``: all ``L``).

    The one place where key lengths are clipped: a traced value is never range-checked, and a
    kernel must never read past the sequence whatever it holds.
    """
    if kv_lengths is None:
        return jnp.full((batch,), length, jnp.int32)
    return jnp.clip(jnp.asarray(kv_lengths).astype(jnp.int32), 0, length)


def kernel_rows(
    kv_indices: Int[Array, "b n nq kmax"],
    kv_counts: Int[Array, "b n nq"],
    kv_lengths: Int[Array, " b"] | None,
    *,
    seq_len: int,
    block_size: int,
) -> tuple[Int[Array, "b n nq kmax"], Int[Array, "b n nq"], Int[Array, " b"]]:
    """The layout rows and key lengths a kernel reads, safe whatever a traced layout holds.

    Indices are clipped to ``[0, nq)`` and counts to ``[0, K_max]`` (``int32``), so a kernel never
    reads a block outside the sequence or an entry outside the row; the key lengths are clipped
    (:func:`clip_kv_lengths`: ``None`` gives all ``L``) and, when given, the counts drop the
    blocks that hold no visible key (:func:`visible_counts`); with a partial last block
    (``L % block_size``) that block moves to the end of each row listing it
    (:func:`partial_block_last`), the one entry a kernel masks.

    Returns:
      ``(kv_indices int32[B, N, nq, K_max], kv_counts int32[B, N, nq], kv_lengths int32[B])``.
    """
    nq, k_max = kv_counts.shape[-1], kv_indices.shape[-1]
    indices = jnp.clip(kv_indices.astype(jnp.int32), 0, nq - 1)
    counts = jnp.clip(kv_counts.astype(jnp.int32), 0, k_max)
    lengths = clip_kv_lengths(kv_lengths, kv_counts.shape[0], seq_len)
    if kv_lengths is not None:
        counts = visible_counts(indices, counts, lengths, block_size)
    if seq_len % block_size:
        indices = partial_block_last(indices, counts, nq - 1)
    return indices, counts, lengths


def check_block_sparse_inputs(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    layout: BlockLayout,
    *,
    block_size: int,
    kv_lengths: Int[Array, " b"] | None,
) -> tuple[int, int, int, int]:
    """Every check of one block-sparse attention call, made once at its public entry point:
    q/k/v, ``block_size`` (a positive int), the layout's shape and, when concrete, its rows
    (docs/spec.md §4), and the key lengths.

    Returns:
      ``(B, L, N, D)``.

    Raises:
      TypeError, ValueError: as :func:`check_attention_inputs`, :func:`check_layout`,
        :func:`validate_layout` and :func:`check_kv_lengths`, naming the argument.
    """
    batch, length, heads, head_dim = check_attention_inputs(q=q, k=k, v=v)
    block_size = check_positive_int(block_size, "block_size")
    check_layout(layout, batch=batch, heads=heads, num_blocks=num_blocks(length, block_size))
    validate_layout(layout)
    check_kv_lengths(kv_lengths, batch=batch, length=length)
    return batch, length, heads, head_dim


# ---------------------------------------------------------------------------------------------
# Rules the kernels apply to traced layouts


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
