"""Video VAEs in Flax NNX: the Wan2.1 and Wan2.2 VAEs (diffusers' ``AutoencoderKLWan``), encode
and decode.

- :mod:`models.vae.wan_vae_config`: the configs (``"wan2.1"``, ``"wan2.2"``) and latent statistics.
- :mod:`models.vae.wan_vae`: the model (``decode`` / ``encode`` with the causal
  chunk scan and spatial tiling; a decode's progress calls, :func:`decode_ticks` of them), the
  posterior, the latent normalization helpers.
- :mod:`models.vae.wan_vae_layers` / :mod:`models.vae.wan_vae_coders`: the blocks, the encoder and
  the decoder; :mod:`models.vae.wan22_blocks`: Wan2.2's patchify and residual up/down blocks;
  :mod:`models.vae.wan_vae_tiling`: diffusers' tile and blend arithmetic.
- :mod:`models.vae.wan_vae_loading`: reading a diffusers ``vae/`` folder.
"""

from models.vae.wan_vae import (
    CONFIGS,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    WanVAEPosterior,
    WanVAETiling,
    decode_ticks,
    decode_video,
    denormalize_latents,
    encode_video,
    get_vae_config,
    normalize_latents,
)
from models.vae.wan_vae_loading import load_wan_vae, read_wan_vae_config, vae_dir

__all__ = [
    "CONFIGS",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "WanVAE",
    "WanVAEConfig",
    "WanVAEPosterior",
    "WanVAETiling",
    "decode_ticks",
    "decode_video",
    "denormalize_latents",
    "encode_video",
    "get_vae_config",
    "load_wan_vae",
    "normalize_latents",
    "read_wan_vae_config",
    "vae_dir",
]
