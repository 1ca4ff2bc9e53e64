"""Block layouts: which key blocks each (batch, head, query block) visits (SPEC §3.5, §4).

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

__all__ = ["BlockLayout", "blocks_for_density", "select_blocks", "full_layout", "check_density", "check_layout"]


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each (batch, head, query block) attends to.

    Attributes:
      kv_indices: int32[B, N, nq, K_max]; row ``(b, n, u)`` lists key-block indices, the
        first ``kv_counts[b, n, u]`` of which are visited (order does not matter; entries
        beyond the count are ignored but always hold valid block indices).
      kv_counts: int32[B, N, nq]; how many entries of each row are visited (1 ≤ c ≤ K_max).
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

    Python float semantics, the reference's rule (SPEC §3.5): density 0.3, 0.2, 0.1 of 591
    key blocks keep 177, 118, 59.
    """
    density = check_density(density)
    num_key_blocks = operator.index(num_key_blocks)
    if num_key_blocks < 1:
        raise ValueError(f"num_key_blocks must be a positive integer, got {num_key_blocks}")
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
    """Keeps the ``num_blocks`` highest-scoring key blocks of every row (SPEC §3.5).

    Args:
      scores: float[B, N, nq, nk] block scores (e.g. from :func:`block_scores`).
      num_blocks: how many key blocks each row keeps. May be a traced int32 scalar so that one
        compiled program serves every density; a traced value is clipped to ``[1, max_blocks]``
        at run time (it cannot raise), a value known at trace time must lie in that range.
      max_blocks: static row capacity ``K_max``; defaults to ``num_blocks`` when that is a
        Python int, and must be given when ``num_blocks`` is traced.

    Returns:
      A :class:`BlockLayout` whose rows list the top-``num_blocks`` key blocks in decreasing
      score order (ties broken towards the lower index), followed by the next-best blocks as
      unused filler up to ``K_max``.
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
    _, indices = jax.lax.top_k(scores.astype(jnp.float32), max_blocks)
    return BlockLayout(kv_indices=indices.astype(jnp.int32), kv_counts=counts, num_key_blocks=nk)


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
        ``K_max <= num_blocks``.
    """
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"{name} must be a BlockLayout, got {type(layout).__name__}")
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
    if shape[3] > num_blocks:
        raise ValueError(f"{name}.max_blocks must be <= {num_blocks}, got {shape[3]}")
