"""Spatial tiling of the Wan VAE with diffusers' ``enable_tiling`` arithmetic.

A large video (or latent) is cut into overlapping spatial tiles, each encoded or decoded alone
(all frames, its own causal cache), and the tiles are blended back linearly:

- Tiles start every ``stride`` along each axis (``range(0, size, stride)``) and span ``tile``
  (less at the bottom and right edges), in latent units for decoding (pixel sizes divided by the
  spatial factor, 8; Wan2.2 16) and in pixels for encoding.
- Wan2.2 (patch size ``p = 2``), as diffusers: a decode blends the decoder's patchified output
  (``tile / p - stride / p`` pixels, keeping ``stride / p``) and unpatchifies the mosaic; an
  encode cuts the patchified video with the unchanged pixel sizes and strides (its latent blend
  is ``(tile - stride) / 8``), though whether to tile at all compares the video's own size with
  the tile.
- Going through the tiles row by row, each tile's first ``blend`` rows are mixed with the last
  rows of the tile above (``blend_v``) and then its first ``blend`` columns with the last columns
  of the tile to its left (``blend_h``); ``blend = tile - stride`` in output units, capped at both
  tiles' sizes, weights ``y / blend`` for the tile and ``1 - y / blend`` for its neighbour. A
  neighbour enters already blended with its own neighbours (diffusers blends in place).
- Each blended tile contributes its first ``stride`` rows and columns (output units); the mosaic is
  cropped to the full output size.

Tiles of one shape are stacked and run by one ``lax.map`` (one compiled body per distinct tile
shape, one tile in memory at a time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from dfsattn_jax.checks import check_int_fields

__all__ = ["WanVAETiling", "blend_h", "blend_v", "tile_starts", "tiled_apply"]


@dataclasses.dataclass(frozen=True)
class WanVAETiling:
    """diffusers' ``enable_tiling`` arguments, in pixels (its defaults).

    Attributes:
      tile_sample_min_height / tile_sample_min_width: the tile size; tiling starts when the
        video (encode) or the latent times the spatial factor (decode) exceeds it on either axis.
      tile_sample_stride_height / tile_sample_stride_width: the distance between tile starts;
        tiles overlap by ``min - stride``.

    All four must be positive multiples of the spatial factor (8; Wan2.2 16) with ``stride <= min``
    (checked by :meth:`check`, which the VAE calls).
    """

    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192

    def __post_init__(self) -> None:
        check_int_fields(self, ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
                                "tile_sample_stride_width"), prefix="tiling.")  # fmt: skip
        for axis in ("height", "width"):
            size = getattr(self, f"tile_sample_min_{axis}")
            stride = getattr(self, f"tile_sample_stride_{axis}")
            if stride > size:
                raise ValueError(
                    f"tiling.tile_sample_stride_{axis} ({stride}) must be <= tiling.tile_sample_min_{axis} ({size})"
                )

    def check(self, factor: int) -> None:
        """Raises a ValueError naming any size that is not a multiple of the spatial ``factor``."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value % factor:
                raise ValueError(f"tiling.{field.name} must be a multiple of {factor}, got {value}")


def tile_starts(size: int, stride: int) -> list[int]:
    """Where the tiles along an axis of ``size`` start."""
    return list(range(0, size, stride))


def _weights(extent: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(extent, dtype=np.float64) / extent
    return (1.0 - y).astype(np.float32), y.astype(np.float32)


def blend_v(a: Float[Array, "b t h w c"], b: Float[Array, "b t h2 w c"], extent: int) -> Float[Array, "b t h2 w c"]:
    """``b`` with its first rows mixed linearly with the last rows of ``a`` (the tile above)."""
    extent = min(a.shape[2], b.shape[2], extent)
    if extent <= 0:
        return b
    wa, wb = _weights(extent, b.dtype)
    top = a[:, :, -extent:].astype(jnp.float32) * wa[:, None, None] + b[:, :, :extent].astype(jnp.float32) * wb[:, None, None]
    return jnp.concatenate([top.astype(b.dtype), b[:, :, extent:]], axis=2)


def blend_h(a: Float[Array, "b t h w c"], b: Float[Array, "b t h w2 c"], extent: int) -> Float[Array, "b t h w2 c"]:
    """``b`` with its first columns mixed linearly with the last columns of ``a`` (the tile to the left)."""
    extent = min(a.shape[3], b.shape[3], extent)
    if extent <= 0:
        return b
    wa, wb = _weights(extent, b.dtype)
    left = a[:, :, :, -extent:].astype(jnp.float32) * wa[:, None] + b[:, :, :, :extent].astype(jnp.float32) * wb[:, None]
    return jnp.concatenate([left.astype(b.dtype), b[:, :, :, extent:]], axis=3)


def tiled_apply(
    fn: Callable[[Array], Array],
    x: Float[Array, "b t h w c"],
    *,
    tile: tuple[int, int],
    stride: tuple[int, int],
    out_blend: tuple[int, int],
    out_stride: tuple[int, int],
    out_size: tuple[int, int],
) -> Array:
    """``fn`` applied tile by tile to ``x`` (channel-last) and blended as the module docstring says.

    Args:
      fn: maps one tile ``[B, T, h, w, C]`` to its output ``[B, T', h', w', C']``.
      x: the input.
      tile / stride: tile size and tile spacing ``(rows, columns)`` in input units.
      out_blend / out_stride: the blend extent and the part kept of each tile, in output units.
      out_size: the output's ``(rows, columns)``.
    """
    height, width = x.shape[2:4]
    rows = tile_starts(height, stride[0])
    cols = tile_starts(width, stride[1])
    tiles = {(r, c): x[:, :, i : i + tile[0], j : j + tile[1]] for r, i in enumerate(rows) for c, j in enumerate(cols)}
    by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for key, t in tiles.items():
        by_shape.setdefault(t.shape, []).append(key)
    outputs = {}
    for keys in by_shape.values():
        if len(keys) == 1:
            outputs[keys[0]] = fn(tiles[keys[0]])
            continue
        stacked = jax.lax.map(fn, jnp.stack([tiles[k] for k in keys]))
        for n, key in enumerate(keys):
            outputs[key] = stacked[n]

    blended: dict[tuple[int, int], Array] = {}
    mosaic_rows = []
    for r in range(len(rows)):
        pieces = []
        for c in range(len(cols)):
            t = outputs[(r, c)]
            if r > 0:
                t = blend_v(blended[(r - 1, c)], t, out_blend[0])
            if c > 0:
                t = blend_h(blended[(r, c - 1)], t, out_blend[1])
            blended[(r, c)] = t
            pieces.append(t[:, :, : out_stride[0], : out_stride[1]])
        mosaic_rows.append(jnp.concatenate(pieces, axis=3))
    return jnp.concatenate(mosaic_rows, axis=2)[:, :, : out_size[0], : out_size[1]]
