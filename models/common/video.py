"""Writing videos: H.264 MP4s and animated GIFs, atomically.

MP4 goes through ``imageio`` with the ``imageio-ffmpeg`` binary (pip packages that ship the
encoder) or, failing that, matplotlib's writer with an ``ffmpeg`` on the PATH: :func:`mp4_encoder`
says which is installed. GIFs use Pillow (a matplotlib dependency). Frames are ``uint8 [H, W, 3]``;
:func:`to_uint8_frames` makes them from float video in [0, 1]. Every file is written through
:func:`models.common.files.atomic_write`, so an error never leaves a truncated video.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, UInt8

from models.common.files import atomic_write

__all__ = ["MP4_ENCODERS", "mp4_encoder", "to_uint8_frames", "write_gif", "write_mp4"]

#: The MP4 encoders :func:`write_mp4` drives.
MP4_ENCODERS: tuple[str, ...] = ("imageio-ffmpeg", "matplotlib-ffmpeg")


def mp4_encoder() -> str | None:
    """The installed MP4 (H.264) encoder: ``"imageio-ffmpeg"`` (``imageio`` with the
    ``imageio-ffmpeg`` binary), ``"matplotlib-ffmpeg"`` (matplotlib's writer with an ``ffmpeg``
    on the PATH), or ``None`` when neither is available."""
    try:
        import imageio  # noqa: F401  (the documented pair: imageio + imageio-ffmpeg)
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()  # raises when the package has no usable binary
        return "imageio-ffmpeg"
    except Exception:  # ImportError, or RuntimeError for a missing binary
        pass
    try:
        from matplotlib import animation

        if animation.writers.is_available("ffmpeg"):
            return "matplotlib-ffmpeg"
    except Exception:
        pass
    return None


def to_uint8_frames(video: Float[np.ndarray, "t h w 3"]) -> list[UInt8[np.ndarray, "h w 3"]]:
    """Float frames in [0, 1] (values outside are clipped) as a list of ``uint8 [H, W, 3]``,
    each value rounded to the nearest of the 256 levels.

    In float32 (the decoder's output dtype): a float64 copy of an 81-frame 720p video is 1.8 GB
    and made this step seconds long; float32 moves a value to the next level only where it lies
    within float32 rounding (~1e-5 of a level) of a half level."""
    video = np.clip(np.asarray(video, np.float32), 0.0, 1.0)
    return list(np.rint(video * np.float32(255.0)).astype(np.uint8))


def write_mp4(
    frames: Sequence[UInt8[np.ndarray, "h w 3"]], path: str | os.PathLike, *, fps: int, encoder: str
) -> str:
    """Writes ``frames`` as an H.264 MP4 (yuv420p) with ``encoder`` (one of :data:`MP4_ENCODERS`).

    H.264 needs even sizes; imageio-ffmpeg pads frames to multiples of 16. Returns the path.
    """
    if encoder not in MP4_ENCODERS:
        raise ValueError(f"unknown MP4 encoder {encoder!r}; use one of {MP4_ENCODERS}")
    path = str(path)
    with atomic_write(path) as tmp:
        if encoder == "imageio-ffmpeg":
            _encode_imageio_ffmpeg(list(frames), str(tmp), fps)
        else:
            _encode_matplotlib_ffmpeg(list(frames), str(tmp), fps)
    return path


def write_gif(frames: Sequence[UInt8[np.ndarray, "h w 3"]], path: str | os.PathLike, *, frame_ms: int) -> str:
    """Writes ``frames`` as an animated GIF (256-colour adaptive palette, looping). Returns the path."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(f)).convert("P", palette=Image.ADAPTIVE, colors=255) for f in frames]
    path = str(path)
    with atomic_write(path) as tmp:
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(frame_ms), loop=0, format="GIF")
    return path


def _encode_imageio_ffmpeg(frames: list[np.ndarray], path: str, fps: int) -> None:
    import imageio_ffmpeg

    height, width = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(
        path, (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=16,
        quality=8, ffmpeg_log_level="error",
    )  # fmt: skip
    with warnings.catch_warnings():
        # The ffmpeg child is started by fork + exec; JAX warns about any fork, but nothing of
        # JAX runs in the child before exec.
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        writer.send(None)  # starts ffmpeg
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _encode_matplotlib_ffmpeg(frames: list[np.ndarray], path: str, fps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FFMpegWriter

    height, width = frames[0].shape[:2]
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    image = ax.imshow(frames[0], interpolation="nearest")
    writer = FFMpegWriter(fps=fps, codec="libx264", extra_args=["-pix_fmt", "yuv420p"])
    try:
        with writer.saving(fig, path, dpi):
            for frame in frames:
                image.set_data(frame)
                writer.grab_frame()
    finally:
        plt.close(fig)
