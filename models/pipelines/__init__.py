"""Whole pipelines: prompt to video in JAX alone.

- :mod:`models.pipelines.wan`: :class:`WanPipeline` (Wan2.1 text to video), diffusers' ``WanPipeline``
  with UMT5, the tokenizer, the sampler with DFSAttn and the Wan VAE all in JAX.
"""

from models.pipelines.wan import (
    OUTPUT_TYPES,
    WanPipeline,
    WanPipelineOutput,
    check_text_width,
    decode_frames,
    encode_prompts,
    read_scheduler,
)

__all__ = ["OUTPUT_TYPES", "WanPipeline", "WanPipelineOutput", "check_text_width", "decode_frames", "encode_prompts", "read_scheduler"]
