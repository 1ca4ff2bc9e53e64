"""The configs of the Wan VAEs: Wan2.1's (z_dim 16, spatial factor 8) and Wan2.2's (z_dim 48,
residual up/down blocks, 2 x 2 patchify, spatial factor 16), as diffusers' ``AutoencoderKLWan``
``config.json`` describes them, and their latent statistics.

:class:`WanVAEConfig` validates itself once, at construction: a config that builds is a
structure :class:`~models.vae.wan_vae.WanVAE` can build (every width, shortcut factor and patch
size consistent).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dfsattn_jax.checks import check_int_fields, check_positive_int, lookup

__all__ = [
    "CONFIGS",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "WanVAEConfig",
    "get_vae_config",
    "residual_factors",
]

#: Per-channel statistics of Wan2.1 latents (diffusers' ``AutoencoderKLWan`` defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
#: Per-channel statistics of Wan2.2 latents (diffusers ``scripts/convert_wan_to_diffusers.py``,
#: ``vae22_diffusers_config``; the same as the official ``Wan2_2_VAE``).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """Hyper-parameters of a Wan VAE (diffusers ``AutoencoderKLWan`` ``config.json``).

    Attributes:
      name: the config's name.
      base_dim: encoder width at full resolution (96; Wan2.2 160).
      decoder_base_dim: decoder width at full resolution (``None``: ``base_dim``; Wan2.2 256).
      z_dim: latent channels (16; Wan2.2 48).
      dim_mult: width multipliers per resolution level (``(1, 2, 4, 4)``).
      num_res_blocks: residual blocks per encoder level (the decoder has one more).
      temporal_downsample: per level transition, whether the encoder also halves time
        (diffusers spells it ``temperal_downsample``; the decoder upsamples in reverse order).
      in_channels / out_channels: the encoder's input and the decoder's output channels, after
        patchifying (Wan2.1 3; Wan2.2 12 = 3 video channels x 2 x 2).
      is_residual: Wan2.2's residual down/up blocks (:mod:`models.vae.wan22_blocks`): an
        AvgDown3D / DupUp3D shortcut around each level, decoder levels not halved.
      patch_size: the space-to-channel patch applied before the encoder and undone after the
        decoder (1: none, as diffusers' ``None``; Wan2.2 2).
      latents_mean / latents_std: per-channel latent statistics for ``normalize_latents``.
    """

    name: str
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    is_residual: bool = False
    patch_size: int = 1
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check_int_fields(self, ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels", "patch_size"))
        if self.decoder_base_dim is not None:
            object.__setattr__(self, "decoder_base_dim", check_positive_int(self.decoder_base_dim, "decoder_base_dim"))
        if not isinstance(self.is_residual, bool):
            raise ValueError(f"is_residual must be a bool, got {self.is_residual!r}")
        if not self.dim_mult:
            raise ValueError("dim_mult must list at least one multiplier")
        object.__setattr__(self, "dim_mult", tuple(check_positive_int(m, "dim_mult") for m in self.dim_mult))
        levels = len(self.dim_mult) - 1
        if len(self.temporal_downsample) < levels or not all(isinstance(t, bool) for t in self.temporal_downsample):
            raise ValueError(
                f"temporal_downsample must hold at least {levels} booleans (one per level transition), "
                f"got {self.temporal_downsample!r}"
            )
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if len(values) != self.z_dim or not all(np.isfinite(v) for v in values):
                raise ValueError(f"{name} must hold z_dim={self.z_dim} finite numbers, got {len(values)}")
        if any(v <= 0 for v in self.latents_std):
            raise ValueError(f"latents_std must be positive, got {self.latents_std!r}")
        patch_area = self.patch_size**2
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % patch_area:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be a multiple of patch_size**2 ({patch_area}): the video "
                    "channels times the patch area"
                )
        if self.is_residual:
            _check_residual_factors(self)
        else:
            for base in (self.base_dim, self.decoder_dim):
                for m in self.dim_mult[1:]:
                    if (base * m) % 2:
                        raise ValueError(f"every level width but the first must be even, got {base} x {m}")

    @property
    def decoder_dim(self) -> int:
        """The decoder's base width."""
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width: 2 per level transition times the patch
        size (8 for Wan2.1, 16 for Wan2.2; diffusers' ``scale_factor_spatial``)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4 for Wan2.1 and Wan2.2)."""
        return 2 ** sum(self.temporal_downsample[: len(self.dim_mult) - 1])

    @property
    def video_in_channels(self) -> int:
        """The channels of a video :meth:`~models.vae.wan_vae.WanVAE.encode` takes (3)."""
        return self.in_channels // self.patch_size**2

    @property
    def video_out_channels(self) -> int:
        """The channels of a video :meth:`~models.vae.wan_vae.WanVAE.decode` returns (3)."""
        return self.out_channels // self.patch_size**2

    def replace(self, **changes) -> WanVAEConfig:
        return dataclasses.replace(self, **changes)


def residual_factors(config: WanVAEConfig) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """The shortcut of each residual level, ``(in_dim, out_dim, factor_t, factor_s)``: the
    encoder's AvgDown3D per level (the last level has factors 1, 1) and the decoder's DupUp3D per
    level (``factor_s`` 0 at the last level: no shortcut), diffusers' rules."""
    levels = len(config.dim_mult) - 1
    temporal = config.temporal_downsample[:levels]
    enc = [config.base_dim * m for m in (1,) + config.dim_mult]
    down = []
    for i in range(levels + 1):
        last = i == levels
        down.append((enc[i], enc[i + 1], 1 if last or not temporal[i] else 2, 1 if last else 2))
    dec = [config.decoder_dim * m for m in (config.dim_mult[-1],) + config.dim_mult[::-1]]
    up_temporal = temporal[::-1]
    up = []
    for i in range(levels + 1):
        last = i == levels
        up.append((dec[i], dec[i + 1], 1 if last or not up_temporal[i] else 2, 0 if last else 2))
    return down, up


def _check_residual_factors(config: WanVAEConfig) -> None:
    down, up = residual_factors(config)
    for i, (c_in, c_out, ft, fs) in enumerate(down):
        if (c_in * ft * fs * fs) % c_out:
            raise ValueError(
                f"encoder level {i}: AvgDown3D needs in_dim x factor ({c_in} x {ft * fs * fs}) to be a multiple of "
                f"out_dim ({c_out}); change base_dim or dim_mult"
            )
    for i, (c_in, c_out, ft, fs) in enumerate(up):
        if fs and (c_out * ft * fs * fs) % c_in:
            raise ValueError(
                f"decoder level {i}: DupUp3D needs out_dim x factor ({c_out} x {ft * fs * fs}) to be a multiple of "
                f"in_dim ({c_in}); change decoder_base_dim or dim_mult"
            )


CONFIGS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(name="wan2.1"),
    "wan2.2": WanVAEConfig(
        name="wan2.2", base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12, out_channels=12,
        is_residual=True, patch_size=2, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
    ),
    # The structure of the tests' fixture (tests/fixtures/wan_vae_tiny).
    "tiny": WanVAEConfig(name="tiny", base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    # The structure of the tests' Wan2.2 fixture (tests/fixtures/wan22_vae_tiny).
    "tiny2.2": WanVAEConfig(
        name="tiny2.2", base_dim=2, decoder_base_dim=4, z_dim=48, dim_mult=(1, 1, 2, 2), num_res_blocks=1,
        in_channels=12, out_channels=12, is_residual=True, patch_size=2, latents_mean=WAN22_LATENTS_MEAN,
        latents_std=WAN22_LATENTS_STD,
    ),
}


def get_vae_config(name: str | WanVAEConfig) -> WanVAEConfig:
    """The named config (a :class:`WanVAEConfig` is returned unchanged); a ValueError lists the names."""
    return name if isinstance(name, WanVAEConfig) else lookup(CONFIGS, name, "config")
