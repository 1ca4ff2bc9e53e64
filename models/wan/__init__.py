"""Wan2.1 (text-to-video): config, Flax NNX transformer, diffusers checkpoint loading."""

from models.wan.config import CONFIGS, WanConfig, default_dtype, get_config, latent_shape, token_grid
from models.wan.loading import load_wan, read_wan_config
from models.wan.transformer import WanTransformer3DModel

__all__ = [
    "CONFIGS",
    "WanConfig",
    "WanTransformer3DModel",
    "default_dtype",
    "get_config",
    "latent_shape",
    "load_wan",
    "read_wan_config",
    "token_grid",
]
