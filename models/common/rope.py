"""3D rotary position embedding (RoPE) of video tokens, in any token order.

The head dimension ``D`` is split into three parts rotated by the frame, row and column index
of a token. Wan's split is ``d_h = d_w = 2 * (D // 6)`` and ``d_t = D - d_h - d_w`` (for
``D = 128``: 44 + 42 + 42; :func:`rope_axis_dims`); HunyuanVideo gives its split explicitly
(``axis_dims=(16, 56, 56)``, base ``theta = 256``). Inside each part, adjacent channel pairs ``(2i, 2i+1)`` are rotated by the angle
``pos * theta ** (-2i / d_part)`` (complex multiplication), exactly as diffusers'
``WanRotaryPosEmbed`` + ``apply_rotary_emb`` do.

Tables are kept per pair (``D/2`` angles per token) and built on device from small per-axis
tables (angles computed in float64 on the host, rounded to float32), so a permuted token order
only gathers indices: the model permutes the tokens once and builds the tables in that order.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = ["rope_axis_dims", "check_axis_dims", "rope_axis_tables", "rope_tables", "apply_rope"]


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels rotated by frame, height and width: ``(D - 4*(D//6), 2*(D//6), 2*(D//6))``."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {head_dim}")
    dh = 2 * (head_dim // 6)
    return head_dim - 2 * dh, dh, dh


def check_axis_dims(head_dim: int, axis_dims) -> tuple[int, int, int]:
    """``axis_dims`` (``None``: Wan's :func:`rope_axis_dims`) as three positive even ints summing to
    ``head_dim``; a ``ValueError`` naming ``axis_dims`` otherwise."""
    if axis_dims is None:
        return rope_axis_dims(head_dim)
    dims = tuple(axis_dims)
    if (
        len(dims) != 3
        or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 2 or d % 2 for d in dims)
        or sum(dims) != head_dim
    ):
        raise ValueError(
            f"axis_dims must be three positive even integers summing to head_dim={head_dim}, got {axis_dims!r}"
        )
    return tuple(int(d) for d in dims)


def rope_axis_tables(
    head_dim: int,
    grid: tuple[int, int, int],
    theta: float = 10000.0,
    max_seq_len: int = 1024,
    axis_dims: tuple[int, int, int] | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per-axis ``(cos, sin)`` tables, float32 NumPy ``[size_axis, d_axis / 2]``, for F, H, W.

    ``axis_dims``: channels rotated by each axis (``None``: Wan's split, :func:`rope_axis_dims`).

    Raises:
      ValueError: if a grid axis exceeds ``max_seq_len`` (the positions Wan's tables cover), or
        for ``axis_dims`` that are not three even ints summing to ``head_dim``.
    """
    if any(int(s) > max_seq_len for s in grid):
        raise ValueError(f"grid {tuple(grid)} exceeds the RoPE table length rope_max_seq_len={max_seq_len}")
    tables = []
    for size, dim in zip(grid, check_axis_dims(head_dim, axis_dims)):
        inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
        angles = np.outer(np.arange(int(size), dtype=np.float64), inv_freq)
        tables.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
    return tuple(tables)


def rope_tables(
    head_dim: int,
    grid: tuple[int, int, int],
    perm: Int[Array, " l"] | np.ndarray | None = None,
    *,
    theta: float = 10000.0,
    max_seq_len: int = 1024,
    axis_dims: tuple[int, int, int] | None = None,
) -> tuple[Float[Array, "l d2"], Float[Array, "l d2"]]:
    """RoPE ``(cos, sin)`` of shape ``[L, D/2]`` (float32) for tokens in the order ``perm``.

    Args:
      head_dim: ``D``.
      grid: token grid ``(F, H, W)``.
      perm: the token order (``x_ordered = x[perm]``); ``None`` is raster order.
      theta: the RoPE base.
      max_seq_len: the longest grid axis allowed.
      axis_dims: channels rotated by F, H and W (``None``: Wan's split).

    Token ``i`` of the ordered sequence is the raster token ``perm[i]`` with coordinates
    ``f = perm // (H*W)``, ``h = perm // W % H``, ``w = perm % W``.
    """
    f_n, h_n, w_n = (int(g) for g in grid)
    if perm is None:
        idx = jnp.arange(f_n * h_n * w_n, dtype=jnp.int32)
    else:
        idx = jnp.asarray(perm, dtype=jnp.int32)
    coords = (idx // (h_n * w_n), (idx // w_n) % h_n, idx % w_n)
    cos_parts, sin_parts = [], []
    for (cos_t, sin_t), c in zip(rope_axis_tables(head_dim, grid, theta, max_seq_len, axis_dims), coords):
        cos_parts.append(jnp.take(jnp.asarray(cos_t), c, axis=0))
        sin_parts.append(jnp.take(jnp.asarray(sin_t), c, axis=0))
    return jnp.concatenate(cos_parts, axis=-1), jnp.concatenate(sin_parts, axis=-1)


def apply_rope(
    x: Float[Array, "b l n d"], cos: Float[Array, "l d2"], sin: Float[Array, "l d2"]
) -> Float[Array, "b l n d"]:
    """Rotates adjacent channel pairs of ``x``; computed in float32, returned in ``x.dtype``."""
    b, l, n, d = x.shape
    if cos.shape != (l, d // 2) or sin.shape != (l, d // 2):
        raise ValueError(f"cos/sin must have shape {(l, d // 2)}, got {cos.shape} and {sin.shape}")
    pairs = x.astype(jnp.float32).reshape(b, l, n, d // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(b, l, n, d).astype(x.dtype)
