"""Video diffusion transformers with DFSAttn: model families, sampling, evaluation.

- :mod:`models.common`: the attention backend and processor, the device mesh, shared layers, RoPE
  tables, checkpoint reading and the atomic file writer.
- :mod:`models.wan`: Wan2.1 (config, Flax NNX transformer, diffusers checkpoint loading).
- :mod:`models.hunyuan_video`: HunyuanVideo (config, Flax NNX transformer with joint text + video
  attention, diffusers checkpoint loading).
- :mod:`models.text_encoders`: UMT5 (Wan's text encoder) and the prompt handling, in JAX.
- :mod:`models.vae`: the Wan VAE (encode, decode), in JAX.
- :mod:`models.sampling`: the one jitted sampling loop and its solvers (Euler, UniPC).
- :mod:`models.pipelines`: prompt (and image) to video: :class:`WanPipeline`,
  :class:`WanImageToVideoPipeline`.
- :mod:`models.evaluation`: the small trained video DiT, the quality runner, comparisons, media.
- :mod:`models.io`, :mod:`models.cli_args`, :mod:`models.generate`, :mod:`models.demo`: files and command lines.
"""

from models.common.processor import (
    AttentionBackend,
    AttentionHooks,
    AttentionState,
    StepControl,
    dense_step,
    init_cache,
    make_backend,
    sparse_step,
)
from models.sampling import SampleResult, Sampler, Solver, flow_schedule, get_solver, sample
from models.pipelines import WanImageToVideoPipeline, WanPipeline, WanPipelineOutput
from models.hunyuan_video import HunyuanConditioning, HunyuanVideoTransformer3DModel, load_hunyuan_video
from models.wan import CONFIGS, WanConfig, WanTransformer3DModel, default_dtype, get_config, latent_shape, load_wan, token_grid

__all__ = [
    "WanImageToVideoPipeline",
    "WanPipeline",
    "WanPipelineOutput",
    "AttentionBackend",
    "AttentionHooks",
    "AttentionState",
    "StepControl",
    "dense_step",
    "sparse_step",
    "init_cache",
    "make_backend",
    "CONFIGS",
    "WanConfig",
    "default_dtype",
    "get_config",
    "latent_shape",
    "token_grid",
    "SampleResult",
    "Sampler",
    "Solver",
    "flow_schedule",
    "get_solver",
    "sample",
    "WanTransformer3DModel",
    "load_wan",
    "HunyuanConditioning",
    "HunyuanVideoTransformer3DModel",
    "load_hunyuan_video",
]
