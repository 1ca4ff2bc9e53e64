"""Whole pipelines: prompt to video in JAX alone.

- :mod:`models.pipelines.wan`: :class:`WanPipeline` (Wan2.1 and Wan2.2 A14B text to video),
  diffusers' ``WanPipeline`` with UMT5, the tokenizer, the sampler with DFSAttn and the Wan VAE
  all in JAX.
- :mod:`models.pipelines.wan_i2v`: :class:`WanImageToVideoPipeline` (Wan2.2 I2V-A14B), diffusers'
  ``WanImageToVideoPipeline`` without CLIP: the image's VAE latents and mask beside the noise.
- :mod:`models.pipelines.wan_repository`: what a repository's scheduler config and
  ``model_index.json`` say (the flow shift, Wan2.2's ``boundary_ratio``).
"""

from models.pipelines.wan import (
    OUTPUT_TYPES,
    WanPipeline,
    WanPipelineOutput,
    check_text_width,
    decode_frames,
    encode_prompts,
)
from models.pipelines.wan_i2v import WanImageToVideoPipeline, image_condition
from models.pipelines.wan_repository import read_boundary_ratio, read_scheduler

__all__ = [
    "OUTPUT_TYPES",
    "WanImageToVideoPipeline",
    "WanPipeline",
    "WanPipelineOutput",
    "check_text_width",
    "decode_frames",
    "encode_prompts",
    "image_condition",
    "read_boundary_ratio",
    "read_scheduler",
]
