"""Named Wan transformer configurations and latent-shape helpers (docs/spec.md §7).

A :class:`WanConfig` mirrors the ``config.json`` of diffusers' ``WanTransformer3DModel`` for
the text-to-video path (no image embedding): ``dim = num_heads * head_dim``.

===================  =====  ======  =====  =====  ========  =============
name                 dim    layers  heads  ffn    text dim  channels in/out
===================  =====  ======  =====  =====  ========  =============
``wan2.1-1.3b``      1536   30      12     8960   4096      16 / 16
``wan2.1-14b``       5120   40      40     13824  4096      16 / 16
``wan2.2-t2v-a14b``  5120   40      40     13824  4096      16 / 16
``wan2.2-i2v-a14b``  5120   40      40     13824  4096      36 / 16
``wan2.2-ti2v-5b``   3072   30      24     14336  4096      48 / 48
``tiny``             64     2       2      128    32        16 / 16
===================  =====  ======  =====  =====  ========  =============

``wan2.2-t2v-a14b`` is each of Wan2.2-T2V-A14B's two experts (the high-noise ``transformer`` and
the low-noise ``transformer_2``): Wan2.1-14B's shape, so a checkpoint's config reads as
``wan2.1-14b`` (the first name with its shape); the pipeline runs the two
(:mod:`models.pipelines.wan`). ``wan2.2-i2v-a14b``'s experts take 36 latent channels: the noise
(16), a mask (4) and the image's latents (16) (:mod:`models.pipelines.wan_i2v`).

Wan2.2-TI2V-5B is the same transformer with 48 latent channels (the Wan2.2 VAE's ``z_dim``) and
no new weights; its pipelines pass per-token timesteps ``[B, L]`` (``expand_timesteps``), which
:class:`models.wan.transformer.WanTransformer3DModel` takes.

The Wan2.1 VAE compresses time by 4 (``latent_frames = (frames - 1) / 4 + 1``) and space by 8;
the transformer then patches the latent grid by ``(1, 2, 2)``. The Wan2.2 VAE of the 5B (48
latent channels) compresses space by 16: :func:`latent_shape` picks the factor by the latent
channels (:data:`VAE_SPATIAL_FACTORS`).
"""

from __future__ import annotations

import dataclasses

from dfsattn_jax.checks import check_int_fields, lookup
from models.common.grid import VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR, patch_token_grid, video_latent_shape
from models.common.layers import default_dtype

__all__ = [
    "WanConfig",
    "CONFIGS",
    "get_config",
    "default_dtype",
    "latent_shape",
    "token_grid",
    "VAE_TEMPORAL_FACTOR",
    "VAE_SPATIAL_FACTOR",
    "VAE_SPATIAL_FACTORS",
]

VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8
#: Spatial compression of the Wan VAE with this many latent channels: Wan2.1 (``z_dim`` 16) and
#: Wan2.2 (``z_dim`` 48, Wan2.2-TI2V-5B).
VAE_SPATIAL_FACTORS = {16: 8, 48: 16}


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Shape hyper-parameters of a Wan text-to-video transformer (Wan2.1, Wan2.2-TI2V-5B).

    Attributes:
      name: the config's name.
      dim: model width (``num_heads * head_dim``).
      num_layers: number of transformer blocks.
      num_heads: attention heads.
      ffn_dim: hidden width of the GELU-tanh feed-forward network.
      text_dim: width of the text-encoder embeddings fed to the model (UMT5: 4096).
      in_channels / out_channels: latent channels.
      freq_dim: width of the sinusoidal timestep embedding.
      patch_size: ``(p_t, p_h, p_w)`` patch of the latent grid.
      eps: epsilon of every LayerNorm and RMSNorm.
      cross_attn_norm: whether a LayerNorm with affine parameters precedes cross-attention.
      rope_max_seq_len: largest position along any grid axis the RoPE tables cover.
      rope_theta: RoPE base.
      text_len: text length used for random prompt embeddings (Wan pads prompts to 512).
    """

    name: str
    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    text_dim: int = 4096
    in_channels: int = 16
    out_channels: int = 16
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    text_len: int = 512

    def __post_init__(self) -> None:
        check_int_fields(self, ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "in_channels",
                                "out_channels", "freq_dim", "rope_max_seq_len", "text_len"))  # fmt: skip
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head_dim ({self.dim // self.num_heads}) must be even for RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if len(self.patch_size) != 3 or any(int(p) < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive integers, got {self.patch_size!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_features(self) -> int:
        """``p_t * p_h * p_w``."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)


CONFIGS: dict[str, WanConfig] = {
    "wan2.1-1.3b": WanConfig(name="wan2.1-1.3b", dim=1536, num_layers=30, num_heads=12, ffn_dim=8960),
    "wan2.1-14b": WanConfig(name="wan2.1-14b", dim=5120, num_layers=40, num_heads=40, ffn_dim=13824),
    "wan2.2-t2v-a14b": WanConfig(name="wan2.2-t2v-a14b", dim=5120, num_layers=40, num_heads=40, ffn_dim=13824),
    "wan2.2-i2v-a14b": WanConfig(
        name="wan2.2-i2v-a14b", dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, in_channels=36, out_channels=16
    ),
    "wan2.2-ti2v-5b": WanConfig(
        name="wan2.2-ti2v-5b", dim=3072, num_layers=30, num_heads=24, ffn_dim=14336, in_channels=48, out_channels=48
    ),
    "tiny": WanConfig(
        name="tiny", dim=64, num_layers=2, num_heads=2, ffn_dim=128, text_dim=32, freq_dim=32, text_len=16
    ),
}


def get_config(name: str | WanConfig) -> WanConfig:
    """Returns the named config (a :class:`WanConfig` is returned unchanged).

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    return name if isinstance(name, WanConfig) else lookup(CONFIGS, name, "config")


def latent_shape(
    config: str | WanConfig, frames: int, height: int, width: int
) -> tuple[int, int, int, int]:
    """Latent shape ``(C, F, H, W)`` of a video of ``frames x height x width`` pixels
    (:func:`models.common.grid.video_latent_shape`), through the Wan VAE with ``C`` latent
    channels (space / 8 for 16 channels, / 16 for Wan2.2's 48).

    Raises:
      ValueError: naming the argument that does not fit, or a config whose latent channels are
        no Wan VAE's.
    """
    config = get_config(config)
    # The noise's channels (the output's): an I2V expert takes 36 in, 16 of them the noise.
    channels = config.out_channels
    factor = VAE_SPATIAL_FACTORS.get(channels)
    if factor is None:
        raise ValueError(
            f"config {config.name!r} has {channels} latent channels; the Wan VAEs have "
            f"{sorted(VAE_SPATIAL_FACTORS)}, so its pixel size is unknown"
        )
    return video_latent_shape(channels, config.patch_size, frames, height, width, spatial_factor=factor)


def token_grid(config: str | WanConfig, latent_grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid ``(F/p_t, H/p_h, W/p_w)`` of a latent grid ``(F, H, W)``.

    Raises:
      ValueError: when the latent grid is not divisible by the patch.
    """
    return patch_token_grid(get_config(config).patch_size, latent_grid)
