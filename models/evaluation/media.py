"""Pictures and videos of results: side-by-side GIFs and block-mask figures.

Videos are ``[B, T, H, W, 3]`` in [-1, 1]. GIFs are drawn with Pillow (a matplotlib dependency),
figures with matplotlib (Agg backend, no display needed).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from jaxtyping import Float

__all__ = ["plot_block_masks", "to_uint8", "write_side_by_side_gif"]


def to_uint8(video: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(video, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_side_by_side_gif(
    left: Float[np.ndarray, "b t h w 3"],
    right: Float[np.ndarray, "b t h w 3"],
    path: str | os.PathLike,
    *,
    titles: tuple[str, str] = ("dense", "DFSAttn"),
    captions: Sequence[str] | None = None,
    scale: int = 4,
    frame_ms: int = 125,
) -> str:
    """Writes an animated GIF: one row per sample, ``left`` and ``right`` side by side.

    Videos are ``[B, T, H, W, 3]`` in [-1, 1]; frames are upscaled ``scale``× (nearest), with a
    title strip on top and an optional caption per row. Uses Pillow (a matplotlib dependency).
    """
    from PIL import Image, ImageDraw, ImageFont

    left, right = np.asarray(left), np.asarray(right)
    if left.shape != right.shape or left.ndim != 5 or left.shape[-1] != 3:
        raise ValueError(f"left and right must both have shape [B, T, H, W, 3], got {left.shape} and {right.shape}")
    if isinstance(scale, bool) or int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    b, t, h, w, _ = left.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"captions must hold one string per sample ({b}), got {len(captions)}")
    font = ImageFont.load_default()
    gap, head, cap = 6, 16, 12 if captions is not None else 0
    cell_w, cell_h = w * scale, h * scale
    width = 2 * cell_w + 3 * gap
    height = head + b * (cap + cell_h + gap) + gap
    lu8, ru8 = to_uint8(left), to_uint8(right)
    frames = []
    for f in range(t):
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for c, title in enumerate(titles):
            draw.text((gap + c * (cell_w + gap) + 2, 2), title, fill=(0, 0, 0), font=font)
        for i in range(b):
            top = head + i * (cap + cell_h + gap)
            if captions is not None:
                draw.text((gap + 2, top), captions[i], fill=(60, 60, 60), font=font)
            for c, video in enumerate((lu8, ru8)):
                tile = Image.fromarray(video[i, f]).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (gap + c * (cell_w + gap), top + cap))
        frames.append(canvas.convert("P", palette=Image.ADAPTIVE, colors=255))
    path = str(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(frame_ms), loop=0)
    return path


def plot_block_masks(masks: dict[str, np.ndarray], path: str, *, title: str, heads: int = 4) -> str:
    """Saves a grid (rows: orders, columns: heads) of block masks ``bool[N, nq, nk]`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    orders = list(masks)
    heads = max(1, min(heads, *(m.shape[0] for m in masks.values())))
    fig, axes = plt.subplots(len(orders), heads, figsize=(2.6 * heads, 2.8 * len(orders)), squeeze=False)
    for r, order in enumerate(orders):
        for h in range(heads):
            ax = axes[r][h]
            mask = masks[order][h]
            ax.imshow(mask, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
            ax.set_title(f"{order}, head {h}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel("query block", fontsize=7)
            if r == len(orders) - 1:
                ax.set_xlabel("key block", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
