"""The small DiT's "latent": an exact, invertible pixels ↔ latent map, and its token grid.

The "latent" (:class:`LatentCodec`): the DiT is trained directly on a small pixel-space latent,
an exact, deterministic, invertible map: optional space-to-depth by ``space_to_depth`` (pixel
unshuffle) and a fixed per-channel affine normalisation (to zero mean, unit variance over the
default clips, as Wan's VAE latents are normalised). Default sizes: clips of 16 frames × 64×64 px,
``space_to_depth=1`` → latent 16×64×64×3 (channels last) → DiT patch (1, 2, 2) → a 16×32×32 token
grid = 16,384 tokens = 128 blocks of 128 (see :func:`token_grid`). For 128×128 px clips use
``space_to_depth=2``: latent 16×64×64×12, the same token grid.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from dfsattn_jax.checks import check_int_fields

from models.evaluation.clips import ClipConfig

__all__ = ["LatentCodec", "decode_latent", "encode_latent", "latents_to_video", "token_grid"]

# Per-channel mean and standard deviation of the pixel values ([-1, 1] scale) of 256 default
# clips (`make_clips((999, s), 32)` for s in 0..7), rounded: the latent normalisation constants.
_CHANNEL_MEAN: tuple[float, float, float] = (-0.05, -0.25, -0.34)
_CHANNEL_STD: tuple[float, float, float] = (0.57, 0.50, 0.49)


@dataclasses.dataclass(frozen=True)
class LatentCodec:
    """Exact, deterministic pixels ↔ latent map the small DiT is trained on.

    ``encode``: space-to-depth by ``space_to_depth`` (channel index ``(dy * s + dx) * 3 + c``),
    then per-channel ``(x - mean) / std`` with the default clips' statistics. ``decode`` inverts it.

    Attributes:
      space_to_depth: pixel-unshuffle factor s; latent channels = 3 s².
    """

    space_to_depth: int = 1

    def __post_init__(self) -> None:
        check_int_fields(self, ("space_to_depth",))

    @property
    def channels(self) -> int:
        return 3 * self.space_to_depth**2


def _channel_stats(codec: LatentCodec) -> tuple[Array, Array]:
    reps = codec.space_to_depth**2
    mean = jnp.tile(jnp.asarray(_CHANNEL_MEAN, jnp.float32), reps)
    std = jnp.tile(jnp.asarray(_CHANNEL_STD, jnp.float32), reps)
    return mean, std


def encode_latent(video: Float[Array, "... t h w 3"], codec: LatentCodec = LatentCodec()) -> Float[Array, "... t h2 w2 c"]:
    """Pixels ``[..., T, H, W, 3]`` in [-1, 1] → latent ``[..., T, H/s, W/s, 3 s²]`` (float32)."""
    video = jnp.asarray(video, jnp.float32)
    s = codec.space_to_depth
    if video.ndim < 4 or video.shape[-1] != 3:
        raise ValueError(f"video must have shape [..., T, H, W, 3], got {video.shape}")
    *lead, t, h, w, _ = video.shape
    if h % s or w % s:
        raise ValueError(f"video height and width must be multiples of space_to_depth={s}, got {h}x{w}")
    x = video.reshape(*lead, t, h // s, s, w // s, s, 3)
    x = jnp.moveaxis(x, -4, -3).reshape(*lead, t, h // s, w // s, 3 * s * s)
    mean, std = _channel_stats(codec)
    return (x - mean) / std


def decode_latent(
    latent: Float[Array, "... t h2 w2 c"], codec: LatentCodec = LatentCodec(), *, clip: bool = True
) -> Float[Array, "... t h w 3"]:
    """Latent ``[..., T, h, w, 3 s²]`` → pixels ``[..., T, h s, w s, 3]`` (clipped to [-1, 1] by default)."""
    latent = jnp.asarray(latent, jnp.float32)
    s = codec.space_to_depth
    if latent.ndim < 4 or latent.shape[-1] != codec.channels:
        raise ValueError(f"latent must have shape [..., T, h, w, {codec.channels}], got {latent.shape}")
    mean, std = _channel_stats(codec)
    x = latent * std + mean
    *lead, t, h, w, _ = x.shape
    x = x.reshape(*lead, t, h, w, s, s, 3)
    x = jnp.moveaxis(x, -3, -4).reshape(*lead, t, h * s, w * s, 3)
    return jnp.clip(x, -1.0, 1.0) if clip else x


def token_grid(
    config: ClipConfig = ClipConfig(), codec: LatentCodec = LatentCodec(), patch: tuple[int, int, int] = (1, 2, 2)
) -> tuple[int, int, int]:
    """The DiT's token grid (F, H, W) for clips of ``config`` through ``codec`` and ``patch``.

    The default gives (16, 32, 32): 16,384 tokens.
    """
    s = codec.space_to_depth
    dims = (config.frames, config.height // s, config.width // s)
    for size, step, name in zip(dims, patch, ("frames", "height", "width")):
        if size % step:
            raise ValueError(f"latent {name} {size} is not a multiple of patch {patch}")
    return tuple(size // step for size, step in zip(dims, patch))


def latents_to_video(latents: Float[Array, "b c f h w"], codec) -> np.ndarray:
    """Latents ``[B, C, F, H, W]`` → pixels ``[B, F, H, W, 3]`` in [-1, 1] (:class:`LatentCodec`)."""
    return np.asarray(decode_latent(jnp.moveaxis(jnp.asarray(latents, jnp.float32), 1, -1), codec))
