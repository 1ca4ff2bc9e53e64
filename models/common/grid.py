"""Latent and token grids of a video: the VAE compression and the transformer's patch.

Both model families (Wan2.1, HunyuanVideo) use a causal video VAE that compresses time by 4
(``latent_frames = (frames - 1) / 4 + 1``) and space by 8, and a transformer that patches the
latent grid by ``(p_t, p_h, p_w)`` (``(1, 2, 2)`` for both).
"""

from __future__ import annotations

import operator

__all__ = ["VAE_TEMPORAL_FACTOR", "VAE_SPATIAL_FACTOR", "video_latent_shape", "patch_token_grid", "check_latents"]

VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8


def video_latent_shape(
    channels: int,
    patch_size: tuple[int, int, int],
    frames: int,
    height: int,
    width: int,
    *,
    spatial_factor: int = VAE_SPATIAL_FACTOR,
) -> tuple[int, int, int, int]:
    """Latent shape ``(C, F, H, W)`` of a video of ``frames x height x width`` pixels.

    ``F = (frames - 1) / 4 + 1``, ``H = height / s``, ``W = width / s`` with ``s`` the VAE's
    ``spatial_factor`` (8; 16 for the Wan2.2 VAE); the latent grid must also be divisible by the
    patch size.

    Raises:
      ValueError: naming the argument that does not fit.
    """
    try:
        frames, height, width = (operator.index(v) for v in (frames, height, width))
    except TypeError:
        raise ValueError(f"frames, height and width must be integers, got {(frames, height, width)!r}") from None
    if frames < 1 or (frames - 1) % VAE_TEMPORAL_FACTOR:
        raise ValueError(f"frames must be 4*k + 1 (k >= 0), got {frames}")
    pt, ph, pw = patch_size
    for name, value, patch in (("height", height, ph), ("width", width, pw)):
        unit = spatial_factor * patch
        if value < unit or value % unit:
            raise ValueError(
                f"{name} must be a positive multiple of {unit} (VAE {spatial_factor} x patch {patch}), got {value}"
            )
    lat_f = (frames - 1) // VAE_TEMPORAL_FACTOR + 1
    if lat_f % pt:
        raise ValueError(f"latent frames ({lat_f}) must be divisible by the temporal patch {pt}")
    return (channels, lat_f, height // spatial_factor, width // spatial_factor)


def patch_token_grid(patch_size: tuple[int, int, int], latent_grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid ``(F/p_t, H/p_h, W/p_w)`` of a latent grid ``(F, H, W)``.

    Raises:
      ValueError: when the latent grid is not divisible by the patch.
    """
    if len(latent_grid) != 3:
        raise ValueError(f"latent grid must be (F, H, W), got {latent_grid!r}")
    out = []
    for axis, size, patch in zip("FHW", latent_grid, patch_size):
        if size < 1 or size % patch:
            raise ValueError(
                f"latent {axis} ({size}) must be a positive multiple of the patch size {patch} "
                f"(patch_size={tuple(patch_size)})"
            )
        out.append(size // patch)
    return tuple(out)


def check_latents(
    shape: tuple[int, ...], channels: int, patch_size: tuple[int, int, int], max_axis: int
) -> tuple[int, int, int]:
    """The token grid of latents ``hidden_states`` of ``shape`` ``[B, C, F, H, W]``.

    Raises:
      ValueError: naming ``hidden_states`` when the rank, the channels (``channels``), the patch
        divisibility or the grid (no axis longer than ``max_axis``, the RoPE tables' reach) do not fit.
    """
    shape = tuple(shape)
    if len(shape) != 5:
        raise ValueError(f"hidden_states must have shape [B, C, F, H, W], got shape {shape}")
    if shape[1] != channels:
        raise ValueError(f"hidden_states must have {channels} channels (axis 1), got shape {shape}")
    try:
        grid = patch_token_grid(patch_size, shape[2:])
    except ValueError as err:
        raise ValueError(f"hidden_states latent shape {shape[2:]} does not fit the patch: {err}") from None
    if any(g > max_axis for g in grid):
        raise ValueError(f"hidden_states token grid {grid} exceeds rope_max_seq_len={max_axis}")
    return grid
