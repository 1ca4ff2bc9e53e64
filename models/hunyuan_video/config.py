"""Named HunyuanVideo transformer configurations and latent-shape helpers.

A :class:`HunyuanConfig` mirrors the ``config.json`` of diffusers' ``HunyuanVideoTransformer3DModel``
for the text-to-video path (no image conditioning): ``dim = num_heads * head_dim``.

======================  =====  ====  =====  ======  =======  ====  ======  ==============
name                    dim    dual  single refiner heads    text  pooled  RoPE axes
======================  =====  ====  =====  ======  =======  ====  ======  ==============
``hunyuan-video-13b``   3072   20    40     2       24x128   4096  768     (16, 56, 56)
``tiny``                32     2     2      2       2x16     40    24      (4, 6, 6)
======================  =====  ====  =====  ======  =======  ====  ======  ==============

Every one of the ``num_dual_layers + num_single_layers`` blocks holds one joint text + video
self-attention: :attr:`HunyuanConfig.num_layers` counts them (60 for 13B), as the DFS attention
processor does; diffusers' own ``num_layers`` is :attr:`HunyuanConfig.num_dual_layers`. The VAE
compresses time by 4 and space by 8 (:mod:`models.common.grid`); the patch is ``(1, 2, 2)``.
"""

from __future__ import annotations

import dataclasses
import math

from dfsattn_jax.checks import check_int_fields, lookup
from models.common.grid import patch_token_grid, video_latent_shape
from models.common.rope import check_axis_dims

__all__ = [
    "HunyuanConfig",
    "CONFIGS",
    "get_config",
    "latent_shape",
    "token_grid",
]


@dataclasses.dataclass(frozen=True)
class HunyuanConfig:
    """Shape hyper-parameters of a HunyuanVideo text-to-video transformer.

    Attributes:
      name: the config's name.
      num_heads: attention heads (diffusers ``num_attention_heads``).
      head_dim: channels per head (diffusers ``attention_head_dim``).
      num_dual_layers: dual-stream (MMDiT) blocks (diffusers ``num_layers``).
      num_single_layers: single-stream blocks.
      num_refiner_layers: blocks of the text token refiner (always dense attention).
      mlp_ratio: MLP width over ``dim``.
      in_channels / out_channels: latent channels.
      patch_size: ``(p_t, p_h, p_w)`` (diffusers ``patch_size_t``, ``patch_size``, ``patch_size``).
      text_dim: width of the LLM text embeddings (diffusers ``text_embed_dim``).
      pooled_dim: width of the pooled CLIP embedding (diffusers ``pooled_projection_dim``).
      guidance_embeds: whether the model embeds a (distilled) guidance scale.
      rope_theta: RoPE base.
      rope_axes_dim: RoPE channels of the frame, row and column axes (sum: ``head_dim``).
      freq_dim: width of the sinusoidal timestep embedding (diffusers fixes 256).
      eps: epsilon of every LayerNorm and RMSNorm.
      text_len: text length used for random prompt embeddings (the pipeline pads to 256).
      rope_max_seq_len: largest position along any grid axis.
    """

    name: str
    num_heads: int
    head_dim: int
    num_dual_layers: int
    num_single_layers: int
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    pooled_dim: int = 768
    guidance_embeds: bool = True
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    freq_dim: int = 256
    eps: float = 1e-6
    text_len: int = 256
    rope_max_seq_len: int = 4096

    def __post_init__(self) -> None:
        check_int_fields(self, ("num_heads", "head_dim", "in_channels", "out_channels", "text_dim", "pooled_dim",
                                "freq_dim", "text_len", "rope_max_seq_len"))  # fmt: skip
        check_int_fields(self, ("num_dual_layers", "num_single_layers", "num_refiner_layers"), nonnegative=True)
        if self.num_layers < 1:
            raise ValueError("num_dual_layers + num_single_layers must be at least 1")
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"guidance_embeds must be True or False, got {self.guidance_embeds!r}")
        if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio) and self.mlp_dim >= 1):
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if len(self.patch_size) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive integers, got {self.patch_size!r}")
        check_axis_dims(self.head_dim, self.rope_axes_dim)

    @property
    def dim(self) -> int:
        """Model width ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def num_layers(self) -> int:
        """Joint self-attention layers (one per dual- or single-stream block): the DFS layers."""
        return self.num_dual_layers + self.num_single_layers

    @property
    def mlp_dim(self) -> int:
        """MLP hidden width ``int(dim * mlp_ratio)`` (as diffusers rounds it)."""
        return int(self.dim * self.mlp_ratio)

    @property
    def patch_features(self) -> int:
        """``p_t * p_h * p_w``."""
        return math.prod(self.patch_size)

    def replace(self, **changes) -> "HunyuanConfig":
        return dataclasses.replace(self, **changes)


CONFIGS: dict[str, HunyuanConfig] = {
    "hunyuan-video-13b": HunyuanConfig(
        name="hunyuan-video-13b", num_heads=24, head_dim=128, num_dual_layers=20, num_single_layers=40
    ),
    "tiny": HunyuanConfig(
        name="tiny", num_heads=2, head_dim=16, num_dual_layers=2, num_single_layers=2, text_dim=40,
        pooled_dim=24, rope_axes_dim=(4, 6, 6), text_len=64,
    ),
}


def get_config(name: str | HunyuanConfig) -> HunyuanConfig:
    """Returns the named config (a :class:`HunyuanConfig` is returned unchanged).

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    return name if isinstance(name, HunyuanConfig) else lookup(CONFIGS, name, "config")


def latent_shape(
    config: str | HunyuanConfig, frames: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """Latent shape ``(C, F, H, W)`` of a video of ``frames x height x width`` pixels
    (720x1280x129 -> ``(16, 33, 90, 160)``).

    Raises:
      ValueError: naming the argument that does not fit.
    """
    config = get_config(config)
    return video_latent_shape(config.in_channels, config.patch_size, frames, height, width)


def token_grid(config: str | HunyuanConfig, latent_grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid ``(F/p_t, H/p_h, W/p_w)`` of a latent grid ``(F, H, W)`` (``(33, 45, 80)`` at 720p).

    Raises:
      ValueError: when the latent grid is not divisible by the patch.
    """
    return patch_token_grid(get_config(config).patch_size, latent_grid)
