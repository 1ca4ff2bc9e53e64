"""Synthetic video-like attention inputs, and the raster-vs-hilbert3d table built on them.

The synthetic q and k are smooth random fields over (f, h, w): random Fourier features of
the token position, ``phi(x) = sqrt(2/D) cos(omega . x + b)`` with ``omega`` drawn with a
per-head length scale, so that ``phi(x) . phi(y) ~ exp(-|x - y|**2 / (2 l**2))`` and every
token attends mostly to its spatio-temporal neighbourhood, plus independent noise. v is
another smooth field plus noise. The demo prints :func:`synthetic_report`; the kernel benchmark
scores :func:`synthetic_qkv` to get DFSAttn layouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfsattn_jax.checks import check_density, check_tile_size
from dfsattn_jax.layout import blocks_for_density, select_blocks
from dfsattn_jax.metrics import attention_error, layout_recall
from dfsattn_jax.orders import ORDER_NAMES, check_grid, inverse_permutation, token_order
from dfsattn_jax.reference import reference_block_sparse_attention
from dfsattn_jax.scoring import block_scores

__all__ = ["DEFAULT_DENSITIES", "DEFAULT_GRID", "DEFAULT_ORDERS", "format_table", "synthetic_qkv", "synthetic_report"]

DEFAULT_GRID = (8, 16, 16)
DEFAULT_DENSITIES = (0.5, 0.3, 0.2, 0.1)
DEFAULT_ORDERS = ("raster", "hilbert3d")


def _smooth_field(
    rng: np.random.Generator, coords: np.ndarray, heads: int, dim: int, length_scale: np.ndarray
) -> np.ndarray:
    """Random Fourier features ``[L, N, D]`` of positions ``coords`` ([L, 3]), unit-ish norm per token."""
    omega = rng.normal(size=(heads, dim, 3)) / length_scale[:, None, :]
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(heads, dim))
    angles = np.einsum("lc,ndc->lnd", coords, omega) + phase[None]
    return np.sqrt(2.0 / dim) * np.cos(angles)


def synthetic_qkv(
    grid: Sequence[int],
    *,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    sharpness: float = 12.0,
    noise: float = 0.5,
    seed: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Video-like ``q, k, v`` of shape ``[B, F*H*W, N, D]`` (float32, raster order).

    ``q = a * phi + noise``, ``k = a * phi + noise`` with ``phi`` a smooth random field
    (:func:`_smooth_field`) whose spatial length scale differs per head (between 1 and 3
    tokens) and is twice as long along frames (consecutive latent frames are alike), and ``a = sqrt(sharpness * sqrt(D))`` so that neighbouring tokens get
    logits about ``sharpness`` above distant ones. ``noise`` is relative to ``a / sqrt(D)``, the
    typical size of one entry of ``a * phi``.
    """
    frames, height, width = check_grid(grid)
    rng = np.random.default_rng(seed)
    f, h, w = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    coords = np.stack([f.ravel(), h.ravel(), w.ravel()], axis=1).astype(np.float64)
    length = coords.shape[0]
    spatial = np.linspace(1.0, 3.0, heads)
    scales = np.stack([2.0 * spatial, spatial, spatial], axis=1)
    amplitude = np.sqrt(sharpness * np.sqrt(head_dim))
    entry = amplitude / np.sqrt(head_dim)

    def one(kind_seed: int) -> np.ndarray:
        sub = np.random.default_rng([seed, kind_seed])
        out = []
        for _ in range(batch):
            phi = _smooth_field(sub, coords, heads, head_dim, scales)
            out.append(phi)
        return np.stack(out)

    phi = one(0)
    q = amplitude * phi + noise * entry * rng.normal(size=(batch, length, heads, head_dim))
    k = amplitude * phi + noise * entry * rng.normal(size=(batch, length, heads, head_dim))
    v = one(1) * np.sqrt(head_dim) + 0.3 * rng.normal(size=(batch, length, heads, head_dim))
    return tuple(jnp.asarray(x, dtype=jnp.float32) for x in (q, k, v))  # type: ignore[return-value]


def synthetic_report(
    grid: Sequence[int] = DEFAULT_GRID,
    *,
    orders: Sequence[str] = DEFAULT_ORDERS,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    batch: int = 1,
    heads: int = 4,
    head_dim: int = 64,
    block_size: int = 128,
    tile_size: int = 16,
    num_query_samples: int = 1024,
    seed: int = 0,
) -> list[dict]:
    """Runs the synthetic end-to-end comparison and returns one row per (order, density).

    Each row: ``order``, ``density`` (requested), ``num_blocks`` (key blocks kept per query
    block), ``kept`` (fraction of block pairs kept), ``recall`` (mean over batch and heads of
    :func:`layout_recall`) and ``error`` (relative L2 error vs dense attention, in raster order).
    """
    grid = check_grid(grid)
    tile_size, block_size = check_tile_size(tile_size, block_size)
    densities = [check_density(d) for d in densities]
    for name in orders:
        if name not in ORDER_NAMES:
            raise ValueError(f"orders must be taken from {ORDER_NAMES}, got {name!r}")
    q, k, v = synthetic_qkv(grid, batch=batch, heads=heads, head_dim=head_dim, seed=seed)
    length = q.shape[1]
    num_key_blocks = -(-length // block_size)
    dense = jax.nn.dot_product_attention(q, k, v, implementation="xla")

    @jax.jit
    def run(qo, ko, vo, num_blocks):
        scores = block_scores(qo, ko, tile_size=tile_size, block_size=block_size)
        layout = select_blocks(scores, num_blocks, max_blocks=num_key_blocks)
        out = reference_block_sparse_attention(qo, ko, vo, layout, block_size=block_size)
        recall = layout_recall(qo, ko, layout, block_size=block_size, num_query_samples=num_query_samples)
        return out, recall, layout.density()

    rows = []
    for name in orders:
        perm = token_order(name, grid)
        inv = inverse_permutation(perm)
        qo, ko, vo = q[:, perm], k[:, perm], v[:, perm]
        for density in densities:
            num_blocks = blocks_for_density(density, num_key_blocks)
            out, recall, kept = run(qo, ko, vo, jnp.int32(num_blocks))
            error = attention_error(out[:, inv], dense)
            rows.append(
                dict(
                    order=name,
                    density=density,
                    num_blocks=num_blocks,
                    kept=float(kept),
                    recall=float(jnp.mean(recall)),
                    error=float(error),
                )
            )
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of :func:`synthetic_report` rows."""
    lines = [f"{'order':<10} {'density':>7} {'blocks':>6} {'kept':>6} {'recall':>7} {'rel.err':>8}"]
    for r in rows:
        lines.append(
            f"{r['order']:<10} {r['density']:>7.2f} {r['num_blocks']:>6d} {r['kept']:>6.3f}"
            f" {r['recall']:>7.4f} {r['error']:>8.4f}"
        )
    return "\n".join(lines)
