"""Load a diffusers-format HunyuanVideo transformer checkpoint into the Flax NNX model.

A diffusers HunyuanVideo checkpoint (e.g. ``hunyuanvideo-community/HunyuanVideo``) holds the
transformer under ``transformer/``: ``config.json``, ``diffusion_pytorch_model.safetensors.index.json``
and the safetensors shards (or one unsharded ``diffusion_pytorch_model.safetensors``).

:func:`load_hunyuan_video` reads ``config.json`` into a :class:`~models.hunyuan_video.config.HunyuanConfig`
(text-to-video only: an image-conditioned config is rejected, naming the key) and loads the
weights with :func:`models.common.checkpoint.load_checkpoint`, with the same guarantees as
:func:`models.wan.loading.load_wan`: every tensor name and shape is checked against the shard
headers before anything is read, each missing, unexpected or mis-shaped tensor named; the
shards are then read one after the other, memory-mapped, each tensor converted to the model's
layout and dtype as it is read, so no second copy of the checkpoint is ever held.

Name mapping (see :mod:`models.hunyuan_video.transformer`): the NNX path joined by dots is the
diffusers name (``kernel`` for ``weight``); linear weights are transposed; the
``x_embedder.proj`` Conv3d weight ``[dim, C, 1, 2, 2]`` becomes ``[1, 2, 2, C, dim]``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
from flax import nnx

from models.common.checkpoint import (
    builtin_name,
    config_bool,
    config_int,
    config_name,
    config_number,
    config_three_ints,
    load_dtypes,
    load_checkpoint,
    read_config_json,
    transformer_dir,
)
from models.hunyuan_video.config import CONFIGS, HunyuanConfig

__all__ = ["diffusers_config", "read_hunyuan_config", "load_hunyuan_video"]

_CLASS_NAME = "HunyuanVideoTransformer3DModel"
_FAMILY = "HunyuanVideo"
# diffusers 0.42.1's HunyuanVideoTransformer3DModel config keys (its __init__ arguments).
_KNOWN_KEYS = (
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
    "num_single_layers", "num_refiner_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm",
    "guidance_embeds", "text_embed_dim", "pooled_projection_dim", "rope_theta", "rope_axes_dim",
    "image_condition_type",
)


def read_hunyuan_config(path: str | os.PathLike) -> HunyuanConfig:
    """Reads a diffusers ``HunyuanVideoTransformer3DModel`` ``config.json`` into a :class:`HunyuanConfig`.

    Absent keys take diffusers' defaults (the 13B model's values).

    Args:
      path: the checkpoint root, its ``transformer/`` folder, or the ``config.json`` file.

    Returns:
      The config; named like the matching built-in config (``"hunyuan-video-13b"``,
      ``"tiny"``) when the hyper-parameters agree, else ``"diffusers:<folder>"``.

    Raises:
      ValueError: naming the key: another model class, image conditioning
        (``image_condition_type`` set: image-to-video), another ``qk_norm`` than ``"rms_norm"``,
        a key diffusers 0.42.1 does not define, or a field of the wrong type or value.
    """
    raw, file = read_config_json(path, _CLASS_NAME, _FAMILY)
    if raw.get("image_condition_type") is not None:
        raise ValueError(
            f"config {str(file)!r} sets image_condition_type={raw['image_condition_type']!r}: image-conditioned "
            "HunyuanVideo models are not supported (text-to-video only)"
        )
    qk_norm = raw.get("qk_norm", "rms_norm")
    if qk_norm != "rms_norm":
        raise ValueError(f"config {str(file)!r} has qk_norm={qk_norm!r}; only 'rms_norm' is supported")
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"config {str(file)!r} has keys this model does not implement: {unknown}")
    guidance = config_bool(raw, "guidance_embeds", file, True)
    rope_axes = config_three_ints(raw, "rope_axes_dim", file, (16, 56, 56))
    patch, patch_t = config_int(raw, "patch_size", file, 2), config_int(raw, "patch_size_t", file, 1)
    in_channels = config_int(raw, "in_channels", file, 16)
    try:
        config = HunyuanConfig(
            name=config_name(file),
            num_heads=config_int(raw, "num_attention_heads", file, 24),
            head_dim=config_int(raw, "attention_head_dim", file, 128),
            num_dual_layers=config_int(raw, "num_layers", file, 20),
            num_single_layers=config_int(raw, "num_single_layers", file, 40),
            num_refiner_layers=config_int(raw, "num_refiner_layers", file, 2),
            mlp_ratio=config_number(raw, "mlp_ratio", file, 4.0),
            in_channels=in_channels,
            out_channels=in_channels if raw.get("out_channels") is None else config_int(raw, "out_channels", file),
            patch_size=(patch_t, patch, patch),
            text_dim=config_int(raw, "text_embed_dim", file, 4096),
            pooled_dim=config_int(raw, "pooled_projection_dim", file, 768),
            guidance_embeds=guidance,
            rope_theta=config_number(raw, "rope_theta", file, 256.0),
            rope_axes_dim=rope_axes,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"config {str(file)!r} is not a valid HunyuanVideo transformer config: {err}") from None
    return dataclasses.replace(config, name=builtin_name(config, CONFIGS))


def diffusers_config(config: HunyuanConfig) -> dict:
    """The diffusers ``config.json`` object of ``config`` (what :func:`read_hunyuan_config` reads back)."""
    pt, ph, pw = config.patch_size
    if ph != pw:
        raise ValueError(f"diffusers needs a square spatial patch, got patch_size={config.patch_size}")
    return {
        "_class_name": _CLASS_NAME,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "num_layers": config.num_dual_layers,
        "num_single_layers": config.num_single_layers,
        "num_refiner_layers": config.num_refiner_layers,
        "mlp_ratio": config.mlp_ratio,
        "patch_size": ph,
        "patch_size_t": pt,
        "qk_norm": "rms_norm",
        "guidance_embeds": config.guidance_embeds,
        "text_embed_dim": config.text_dim,
        "pooled_projection_dim": config.pooled_dim,
        "rope_theta": config.rope_theta,
        "rope_axes_dim": list(config.rope_axes_dim),
        "image_condition_type": None,
    }


def load_hunyuan_video(
    path: str | os.PathLike,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    config: HunyuanConfig | None = None,
    device: jax.Device | jax.sharding.Sharding | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Loads a diffusers-format HunyuanVideo transformer checkpoint into
    :class:`models.hunyuan_video.transformer.HunyuanVideoTransformer3DModel`.

    Args:
      path: the checkpoint root (with a ``transformer/`` folder) or the transformer folder.
      dtype: activation dtype of the model: ``"float32"``, ``"bfloat16"`` or ``"float16"``;
        default bf16 on accelerators, float32 on CPU.
      param_dtype: parameter dtype, same choices (default: ``dtype``; diffusers keeps no
        HunyuanVideo module in float32).
      config: use this config instead of reading ``config.json`` (its shapes must match).
      device: where to put the parameters (a device or a sharding; default: JAX's default device).
      progress: optional callback called with each shard's file name before it is read.

    Returns:
      The model, with every parameter taken from the checkpoint.

    Raises:
      ValueError: naming the problem: a ``dtype`` / ``param_dtype`` that is not floating point
        (checked before anything is read), a malformed directory or config (an image-to-video
        config names ``image_condition_type``), any missing, unexpected, mis-shaped or
        non-floating-point tensor (checked from the headers before any tensor is read), or a
        truncated or corrupt shard (naming the file and, when known, the tensor).
    """
    from models.hunyuan_video.transformer import HunyuanVideoTransformer3DModel

    dtype, param_dtype = load_dtypes(dtype, param_dtype)
    folder = transformer_dir(path, _FAMILY)
    config = read_hunyuan_config(folder) if config is None else config
    if not isinstance(config, HunyuanConfig):
        raise ValueError(f"config must be a HunyuanConfig, got {type(config).__name__}")
    return load_checkpoint(
        folder,
        lambda: HunyuanVideoTransformer3DModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        family=_FAMILY, device=device, progress=progress,
    )  # fmt: skip
