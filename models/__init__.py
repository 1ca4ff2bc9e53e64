"""Video diffusion transformers using DFSAttn: a Flax NNX Wan2.1 model and its jitted sampler.

- :mod:`models.configs`: named configs (``wan2.1-1.3b``, ``wan2.1-14b``, ``tiny``), latent shapes.
- :mod:`models.wan`: :class:`WanTransformer3DModel` (diffusers' ``WanTransformer3DModel``, T2V).
- :mod:`models.attention_backend`: dense vs DFS self-attention, step controls, the mask cache.
- :mod:`models.sampler`: flow-matching sampling (Wan's shifted sigmas, Euler; UniPC by name).
- :mod:`models.compare`: dense-vs-DFS comparison with a JSON report and a mask picture.
- :mod:`models.loading`: :func:`load_wan` for diffusers-format Wan2.1 checkpoints.
"""

from models.attention_backend import (
    AttentionBackend,
    StepControl,
    dense_step,
    init_cache,
    make_backend,
    sparse_step,
)
from models.configs import CONFIGS, WanConfig, default_dtype, get_config, latent_shape, token_grid
from models.sampler import SampleResult, Sampler, Solver, flow_schedule, get_solver, sample
from models.wan import WanTransformer3DModel
from models.loading import load_wan  # noqa: E402  (issue 6: ``models.load_wan``)

__all__ = [
    "AttentionBackend",
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
]
