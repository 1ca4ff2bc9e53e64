"""Load a diffusers-format Wan2.1 transformer checkpoint into the Flax NNX model.

A diffusers Wan2.1 checkpoint directory (e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``) holds the
transformer under ``transformer/``::

    transformer/config.json
    transformer/diffusion_pytorch_model.safetensors.index.json      (sharded checkpoints)
    transformer/diffusion_pytorch_model-00001-of-0000N.safetensors
    ...
    transformer/diffusion_pytorch_model.safetensors                 (or: one unsharded file)

:func:`load_wan` reads ``config.json`` into a :class:`~models.wan.config.WanConfig` and loads
the weights with :func:`models.common.checkpoint.load_checkpoint`: the model is built
*abstractly* (``nnx.eval_shape``: no random initialization, no memory), every tensor name and
shape is checked against the safetensors headers (nothing is read yet), then the shards are read
one after the other through ``safe_open`` (memory-mapped), each tensor converted to the model's
layout and dtype as it goes. Host memory therefore holds at most one tensor beyond the model
itself; no second full copy of the checkpoint is ever made.

Name mapping (see :mod:`models.wan.transformer`): the NNX parameter path joined by dots is the diffusers
name, with ``kernel`` for ``weight``. ``nn.Linear`` weights ``[out, in]`` are transposed to
``[in, out]``; the ``patch_embedding`` Conv3d weight ``[dim, C, pt, ph, pw]`` becomes
``[pt, ph, pw, C, dim]``. Every other tensor keeps its name and shape.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
from flax import nnx

from models.common.checkpoint import (
    builtin_name,
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_FILE_NAME,
    TensorSpec,
    checkpoint_shards,
    config_bool,
    config_int,
    config_name,
    config_number,
    config_three_ints,
    diffusers_name,
    expected_tensors,
    load_dtypes,
    load_checkpoint,
    read_config_json,
    transformer_dir,
)
from models.wan.config import CONFIGS, WanConfig

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "TensorSpec",
    "transformer_dir",
    "read_wan_config",
    "checkpoint_shards",
    "diffusers_name",
    "expected_tensors",
    "load_wan",
]

_CLASS_NAME = "WanTransformer3DModel"
_FAMILY = "Wan"
# diffusers config keys that only exist for features this model does not implement (I2V / FLF2V).
_UNSUPPORTED_WHEN_SET = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def read_wan_config(path: str | os.PathLike) -> WanConfig:
    """Reads a diffusers ``WanTransformer3DModel`` ``config.json`` into a :class:`WanConfig`.

    Args:
      path: the checkpoint root, its ``transformer/`` folder, or the ``config.json`` file.

    Returns:
      The config; named like the matching built-in config (``"wan2.1-1.3b"``,
      ``"wan2.1-14b"``, ...) when the hyper-parameters agree, else ``"diffusers:<folder>"``.

    Raises:
      ValueError: for a missing or malformed file, another model class, a feature this model
        does not implement (image conditioning, another QK norm), or a field of the wrong type
        (an integer field holding a fraction, a string or a bool is named with its value, never
        truncated).
    """
    raw, file = read_config_json(path, _CLASS_NAME, _FAMILY)
    for key in _UNSUPPORTED_WHEN_SET:
        if raw.get(key) is not None:
            raise ValueError(
                f"config {str(file)!r} sets {key}={raw[key]!r}: image-conditioned Wan models are not "
                "supported (text-to-video only)"
            )
    qk_norm = raw.get("qk_norm", "rms_norm_across_heads")
    if qk_norm != "rms_norm_across_heads":
        raise ValueError(f"config {str(file)!r} has qk_norm={qk_norm!r}; only 'rms_norm_across_heads' is supported")
    required = ("num_attention_heads", "attention_head_dim", "num_layers", "ffn_dim")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"config {str(file)!r} lacks the keys {missing}")
    heads = config_int(raw, "num_attention_heads", file)
    head_dim = config_int(raw, "attention_head_dim", file)
    in_channels = config_int(raw, "in_channels", file, 16)
    out_channels = in_channels if raw.get("out_channels") is None else config_int(raw, "out_channels", file)
    patch_size = config_three_ints(raw, "patch_size", file, (1, 2, 2))
    eps = config_number(raw, "eps", file, 1e-6)
    cross_attn_norm = config_bool(raw, "cross_attn_norm", file, True)
    try:
        config = WanConfig(
            name=config_name(file),
            dim=heads * head_dim,
            num_layers=config_int(raw, "num_layers", file),
            num_heads=heads,
            ffn_dim=config_int(raw, "ffn_dim", file),
            text_dim=config_int(raw, "text_dim", file, 4096),
            in_channels=in_channels,
            out_channels=out_channels,
            freq_dim=config_int(raw, "freq_dim", file, 256),
            patch_size=patch_size,
            eps=eps,
            cross_attn_norm=cross_attn_norm,
            rope_max_seq_len=config_int(raw, "rope_max_seq_len", file, 1024),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"config {str(file)!r} is not a valid Wan transformer config: {err}") from None
    return dataclasses.replace(config, name=builtin_name(config, CONFIGS))


def load_wan(
    path: str | os.PathLike,
    dtype: Any = None,
    *,
    param_dtype: Any = None,
    config: WanConfig | None = None,
    device: jax.Device | jax.sharding.Sharding | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Loads a diffusers-format Wan2.1 transformer checkpoint into :class:`models.wan.transformer.WanTransformer3DModel`.

    Args:
      path: the checkpoint root (with a ``transformer/`` folder) or the transformer folder.
      dtype: activation dtype of the model, a floating-point dtype: ``"float32"``,
        ``"bfloat16"`` or ``"float16"`` (``"float64"`` too when JAX runs with x64); default
        bf16 on accelerators, float32 on CPU.
      param_dtype: parameter dtype, same choices (default: ``dtype``). The modules diffusers
        keeps in float32 (time embedder, modulation tables, cross-attention norm) stay float32.
      config: use this config instead of reading ``config.json`` (its shapes must match).
      device: where to put the parameters (a device or a sharding; default: JAX's default
        device).
      progress: optional callback called with each shard's file name before it is read.

    Returns:
      The model, with every parameter taken from the checkpoint.

    Raises:
      ValueError: naming the problem: a ``dtype`` / ``param_dtype`` that is not floating point
        (checked before anything is read), a malformed directory or config, any missing,
        unexpected, mis-shaped or non-floating-point tensor (checked from the headers before
        any tensor is read), or a truncated or corrupt shard (naming the file and, when known,
        the tensor).
    """
    from models.wan.transformer import WanTransformer3DModel

    dtype, param_dtype = load_dtypes(dtype, param_dtype)
    folder = transformer_dir(path, _FAMILY)
    config = read_wan_config(folder) if config is None else config
    if not isinstance(config, WanConfig):
        raise ValueError(f"config must be a WanConfig, got {type(config).__name__}")

    return load_checkpoint(
        folder,
        lambda: WanTransformer3DModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        family=_FAMILY, device=device, progress=progress,
    )  # fmt: skip
