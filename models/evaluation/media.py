"""Pictures and videos of results: side-by-side GIFs and MP4s, and block-mask figures.

Videos are ``[B, T, H, W, 3]`` in [-1, 1]. GIFs are drawn with Pillow (a matplotlib dependency),
figures with matplotlib (Agg backend, no display needed). MP4s need an H.264 encoder, which is
optional: :func:`~models.common.video.mp4_encoder` (re-exported here) says which one is installed (``imageio`` with ``imageio-ffmpeg``,
or an ``ffmpeg`` on the PATH through matplotlib's writer), and :func:`write_side_by_side_mp4`
returns ``None`` instead of failing when there is none. Every file is written atomically
(:func:`models.common.files.atomic_write`: a temporary file renamed over the destination), so an error or a
kill never leaves a truncated GIF, MP4 or PNG.
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np
from jaxtyping import Float

from dfsattn_jax.checks import check_positive_int
from models.common.files import atomic_write
from models.common.video import mp4_encoder, write_gif, write_mp4

__all__ = [
    "MASK_COLOURS",
    "MP4_ENCODER_HINT",
    "block_mask_figure",
    "mp4_encoder",
    "plot_block_masks",
    "plot_sample_grid",
    "sample_grid_figure",
    "side_by_side_frames",
    "to_uint8",
    "write_side_by_side_gif",
    "write_side_by_side_mp4",
]

#: Colours of the block-mask figures: a kept (computed) block and a skipped one.
MASK_COLOURS = {"kept": "#1f3a93", "skipped": "#eeeeee"}
#: What to install for MP4 output.
MP4_ENCODER_HINT = "pip install imageio imageio-ffmpeg, or put ffmpeg on the PATH"


def to_uint8(video: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(video, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def side_by_side_frames(
    left: Float[np.ndarray, "b t h w 3"],
    right: Float[np.ndarray, "b t h w 3"],
    *,
    titles: tuple[str, str] = ("dense", "DFSAttn"),
    captions: Sequence[str] | None = None,
    scale: int = 4,
    multiple_of: int = 1,
) -> list[np.ndarray]:
    """The frames of a side-by-side video as ``uint8[H', W', 3]`` RGB arrays.

    One row per sample, ``left`` and ``right`` side by side, frames upscaled ``scale``×
    (nearest), a title strip on top and an optional caption per row; the canvas is padded (white)
    to a multiple of ``multiple_of`` pixels in each direction (16 for H.264).
    """
    from PIL import Image, ImageDraw, ImageFont

    left, right = np.asarray(left), np.asarray(right)
    if left.shape != right.shape or left.ndim != 5 or left.shape[-1] != 3:
        raise ValueError(f"left and right must both have shape [B, T, H, W, 3], got {left.shape} and {right.shape}")
    scale = check_positive_int(scale, "scale")
    b, t, h, w, _ = left.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"captions must hold one string per sample ({b}), got {len(captions)}")
    font = ImageFont.load_default()
    gap, head, cap = 6, 16, 12 if captions is not None else 0
    cell_w, cell_h = w * scale, h * scale
    width = 2 * cell_w + 3 * gap
    height = head + b * (cap + cell_h + gap) + gap
    m = max(1, int(multiple_of))
    width, height = -(-width // m) * m, -(-height // m) * m
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
        frames.append(np.asarray(canvas))
    return frames


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
    frames = side_by_side_frames(left, right, titles=titles, captions=captions, scale=scale)
    return write_gif(frames, path, frame_ms=frame_ms)


def write_side_by_side_mp4(
    left: Float[np.ndarray, "b t h w 3"],
    right: Float[np.ndarray, "b t h w 3"],
    path: str | os.PathLike,
    *,
    titles: tuple[str, str] = ("dense", "DFSAttn"),
    captions: Sequence[str] | None = None,
    scale: int = 4,
    fps: int = 8,
    encoder: str | None = None,
) -> str | None:
    """Writes the side-by-side video of :func:`write_side_by_side_gif` as an H.264 MP4.

    ``encoder`` is one of :func:`mp4_encoder`'s names (default: the installed one). Returns the
    path, or ``None`` (nothing written) when no encoder is installed.
    """
    encoder = mp4_encoder() if encoder is None else encoder
    if encoder is None:
        return None
    frames = side_by_side_frames(left, right, titles=titles, captions=captions, scale=scale, multiple_of=16)
    return write_mp4(frames, path, fps=fps, encoder=encoder)


def block_mask_figure(masks: dict[str, np.ndarray], *, title: str, heads: int = 4):
    """The block-mask figure of :func:`plot_block_masks` (a matplotlib ``Figure``, not saved).

    Rows are token orders, columns heads; each panel is one head's ``bool[nq, nk]`` mask with
    kept blocks dark and skipped blocks light (:data:`MASK_COLOURS`), titled with the head and its
    kept fraction, the order on the left of each row, query/key block axis labels, a colour key
    (legend) under the panels and ``title`` (wrapped) as the figure's title above them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    orders = list(masks)
    if not orders:
        raise ValueError("masks must hold at least one order")
    heads = max(1, min(heads, *(m.shape[0] for m in masks.values())))
    lines = [textwrap.fill(line, width=max(40, 34 * heads)) for line in str(title).split("\n")]
    n_title_lines = sum(line.count("\n") + 1 for line in lines)
    fig, axes = plt.subplots(
        len(orders), heads, figsize=(2.7 * heads + 0.6, 2.9 * len(orders) + 0.35 * n_title_lines + 0.8),
        squeeze=False, layout="constrained",
    )  # fmt: skip
    cmap = ListedColormap([MASK_COLOURS["skipped"], MASK_COLOURS["kept"]])
    for r, order in enumerate(orders):
        for h in range(heads):
            ax = axes[r][h]
            mask = np.asarray(masks[order][h], bool)
            nq, nk = mask.shape
            ax.imshow(mask, cmap=cmap, interpolation="nearest", vmin=0, vmax=1, aspect="auto")
            ax.set_title(f"head {h} (kept {mask.mean():.0%})", fontsize=8)
            ax.set_xticks([0, nk - 1])
            ax.set_yticks([0, nq - 1])
            ax.tick_params(labelsize=6, length=2)
            ax.set_xlabel("key block", fontsize=7, labelpad=1)
            ax.set_ylabel(f"{order}\nquery block" if h == 0 else "query block", fontsize=7, labelpad=1)
    fig.legend(
        handles=[
            Patch(facecolor=MASK_COLOURS["kept"], edgecolor="black", label="kept block (attention computed)"),
            Patch(facecolor=MASK_COLOURS["skipped"], edgecolor="black", label="skipped block"),
        ],
        loc="outside lower center", ncols=2, fontsize=8, frameon=False,
    )  # fmt: skip
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.get_layout_engine().set(h_pad=0.08, w_pad=0.08, hspace=0.06, wspace=0.04)
    return fig


def plot_block_masks(masks: dict[str, np.ndarray], path: str, *, title: str, heads: int = 4) -> str:
    """Saves a grid (rows: orders, columns: heads) of block masks ``bool[N, nq, nk]`` as a PNG,
    with a kept/skipped colour key, axis labels and the (wrapped) ``title`` above the panels
    (:func:`block_mask_figure`)."""
    import matplotlib.pyplot as plt

    fig = block_mask_figure(masks, title=title, heads=heads)
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path


def sample_grid_figure(
    real: Float[np.ndarray, "b t h w 3"],
    generated: Float[np.ndarray, "b t h w 3"],
    *,
    captions: Sequence[str],
    columns: int = 8,
):
    """The figure of :func:`plot_sample_grid` (a matplotlib ``Figure``, not saved).

    For each of the ``B`` classes a row of ``real`` frames above a row of ``generated`` frames
    (``columns`` frames spread over ``T``), the frame index above each real frame and the class
    caption above its pair of rows; videos in [-1, 1]. The captions take no part in the layout:
    a caption longer than a column (square 64 px clips, ``immunohistochemistry / zoom_in``) must
    not shrink the frames to make room for it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real, generated = np.asarray(real), np.asarray(generated)
    if real.shape != generated.shape or real.ndim != 5 or len(captions) != real.shape[0]:
        raise ValueError(f"real and generated must have the same shape [B, T, H, W, 3] and captions B entries, got "
                         f"{real.shape}, {generated.shape} and {len(captions)} captions")  # fmt: skip
    n, t, h, w = real.shape[:4]
    cols = min(t, columns)
    frames = np.linspace(0, t - 1, cols).round().astype(int)
    fig, axes = plt.subplots(2 * n, cols, figsize=(1.1 * cols * w / h, 1.25 * 2 * n), dpi=90, squeeze=False)
    for i in range(n):
        for j, f in enumerate(frames):
            for r, (video, kind) in enumerate(((real, "real"), (generated, "sample"))):
                ax = axes[2 * i + r, j]
                ax.imshow(to_uint8(video[i, f]))
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(kind, fontsize=7)
            axes[2 * i, j].set_title(f"t={f}", fontsize=6)
        caption = axes[2 * i, 0].annotate(captions[i], (0, 1), xycoords="axes fraction", xytext=(0, 11),
                                          textcoords="offset points", fontsize=7, ha="left", va="bottom")  # fmt: skip
        caption.set_in_layout(False)
    # Room for the captions (≈ 11 pt above the top of a real row plus 7 pt of text), which the
    # layout does not see: padding between rows and a margin at the top, in font-size units.
    fig.tight_layout(h_pad=2.2, rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    return fig


def plot_sample_grid(
    real: Float[np.ndarray, "b t h w 3"],
    generated: Float[np.ndarray, "b t h w 3"],
    path: str | os.PathLike,
    *,
    captions: Sequence[str],
    columns: int = 8,
) -> str:
    """Saves :func:`sample_grid_figure` as a PNG of 256 adaptive colours (a quarter of the bytes
    of a full-colour PNG of photographs, which matters where results travel to and from the GPU
    machine under size limits)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    fig = sample_grid_figure(real, generated, captions=captions, columns=columns)
    try:
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    finally:
        plt.close(fig)
    with atomic_write(path) as tmp:
        Image.fromarray(rgb).quantize(colors=256).save(tmp, format="PNG", optimize=True)
    return str(path)
