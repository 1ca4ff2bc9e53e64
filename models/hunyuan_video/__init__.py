"""HunyuanVideo (text-to-video): config, Flax NNX transformer, diffusers checkpoint loading."""

from models.hunyuan_video.config import CONFIGS, HunyuanConfig, get_config, latent_shape, token_grid
from models.hunyuan_video.loading import load_hunyuan_video, read_hunyuan_config
from models.hunyuan_video.transformer import HunyuanConditioning, HunyuanVideoTransformer3DModel

__all__ = [
    "CONFIGS",
    "HunyuanConditioning",
    "HunyuanConfig",
    "HunyuanVideoTransformer3DModel",
    "get_config",
    "latent_shape",
    "load_hunyuan_video",
    "read_hunyuan_config",
    "token_grid",
]
