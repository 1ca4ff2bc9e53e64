"""Load the UMT5 text encoder of a diffusers checkpoint into :class:`~models.text_encoders.umt5.UMT5EncoderModel`.

A diffusers Wan checkpoint keeps the text encoder as transformers saves a ``UMT5EncoderModel``::

    text_encoder/config.json                       (transformers' UMT5Config: model_type "umt5")
    text_encoder/model.safetensors.index.json      (sharded: UMT5-XXL ships in five shards)
    text_encoder/model-00001-of-0000N.safetensors
    ...
    text_encoder/model.safetensors                 (or: one unsharded file)

:func:`load_umt5` reads ``config.json`` into a :class:`~models.text_encoders.umt5.UMT5Config` and
the weights through :func:`models.common.checkpoint.load_checkpoint`, with the guarantees of the
transformer loaders: the model is built abstractly (no initialization, no memory), every tensor
name, shape and dtype is checked against the safetensors headers before any tensor is read, and
each problem is named; then the shards are read one after the other, memory-mapped, each tensor
converted to the model's layout and dtype as it is read.

The token embedding may be stored as ``shared.weight`` (what ``save_pretrained`` writes) or as its
tied copy ``encoder.embed_tokens.weight``; a checkpoint with both reads ``shared.weight``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Callable

import jax
from flax import nnx

from models.common.checkpoint import (
    CONFIG_NAME,
    as_int,
    checkpoint_shards,
    load_checkpoint,
    load_dtypes,
    read_config_json,
)
from models.text_encoders.umt5 import CONFIGS, UMT5Config, UMT5EncoderModel

__all__ = [
    "EMBEDDING_ALIASES",
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "load_umt5",
    "read_umt5_config",
    "text_encoder_dir",
    "umt5_shard_count",
]

#: transformers' names for a sharded / unsharded ``save_pretrained`` folder.
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
#: ``{model tensor name: the other name a checkpoint may store it under}``.
EMBEDDING_ALIASES = {"shared.weight": "encoder.embed_tokens.weight"}

_FAMILY = "UMT5 text encoder"
_SUBFOLDER = "text_encoder"
_MODEL_TYPE = "umt5"
_ARCHITECTURE = "UMT5EncoderModel"
_SHAPE_KEYS = ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers")


def text_encoder_dir(path: str | os.PathLike) -> pathlib.Path:
    """The folder holding the text encoder's ``config.json``: ``path`` itself or ``path/text_encoder``.

    Raises:
      ValueError: if neither holds a ``config.json``.
    """
    root = pathlib.Path(path)
    for candidate in (root, root / _SUBFOLDER):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ValueError(
        f"path {str(root)!r} is not a UMT5 text encoder checkpoint: no {CONFIG_NAME} in it or in its "
        f"{_SUBFOLDER}/ subfolder"
    )


def umt5_shard_count(path: str | os.PathLike) -> int:
    """How many safetensors files :func:`load_umt5` reads for ``path`` (the checkpoint root or the
    text encoder folder), i.e. how many times it calls its ``progress``: the shards the index
    lists, or 1 for an unsharded folder. Only the index and the shard headers are read.

    Raises:
      ValueError: as :func:`models.common.checkpoint.checkpoint_shards`, for a folder with no
        weights, a malformed index or a missing or corrupt shard.
    """
    shards = checkpoint_shards(
        text_encoder_dir(path), _FAMILY, index_name=INDEX_NAME, single_file_name=SINGLE_FILE_NAME
    )
    return len(shards)


def read_umt5_config(path: str | os.PathLike) -> UMT5Config:
    """Reads transformers' UMT5 ``config.json`` into a :class:`UMT5Config`.

    Args:
      path: the checkpoint root (with ``text_encoder/``), the text encoder folder, or the
        ``config.json`` file.

    Returns:
      The config; named like the matching built-in config (``"umt5-xxl"``, ``"tiny"``) when the
      hyper-parameters agree, else ``"transformers:<checkpoint folder>"``.

    Raises:
      ValueError: for a missing or malformed file, another model type (T5 shares one position
        table across layers; UMT5 does not) or architecture, a feed-forward other than
        ``"gated-gelu"``, a missing shape key, or a field of the wrong type or value (named with
        its value; a fraction is never truncated).
    """
    p = pathlib.Path(path)
    raw, file = read_config_json(p if p.is_file() else text_encoder_dir(p) / CONFIG_NAME, _ARCHITECTURE, _FAMILY)
    where = f"config {str(file)!r}"
    if raw.get("model_type") != _MODEL_TYPE:
        raise ValueError(f"{where} has model_type={raw.get('model_type')!r}, expected {_MODEL_TYPE!r}")
    architectures = raw.get("architectures")
    if architectures is not None and _ARCHITECTURE not in architectures:
        raise ValueError(
            f"{where} is for {architectures!r}, expected {[_ARCHITECTURE]!r} (the encoder alone, as diffusers "
            f"saves {_SUBFOLDER}/)"
        )
    ff = raw.get("feed_forward_proj", "gated-gelu")
    if ff != "gated-gelu":
        raise ValueError(f"{where} has feed_forward_proj={ff!r}; only 'gated-gelu' (UMT5's) is supported")
    missing = [k for k in _SHAPE_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{where} lacks the keys {missing}")
    eps = raw.get("layer_norm_epsilon", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{where}: layer_norm_epsilon must be a positive number, got {eps!r}")
    ints = {k: as_int(raw[k], k, file) for k in _SHAPE_KEYS}
    for key, default in (("relative_attention_num_buckets", 32), ("relative_attention_max_distance", 128)):
        ints[key] = as_int(raw.get(key, default), key, file)
    folder = file.parent.parent.name if file.parent.name == _SUBFOLDER else file.parent.name
    try:
        config = UMT5Config(name=f"transformers:{folder}", layer_norm_epsilon=float(eps), **ints)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} is not a valid UMT5 config: {err}") from None
    for name, known in CONFIGS.items():
        if dataclasses.replace(known, name=config.name) == config:
            return dataclasses.replace(config, name=name)
    return config


def load_umt5(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    config: UMT5Config | None = None,
    device: jax.Device | jax.sharding.Sharding | None = None,
    progress: Callable[[str], None] | None = None,
) -> UMT5EncoderModel:
    """Loads the UMT5 text encoder of a diffusers checkpoint (or a transformers
    ``UMT5EncoderModel`` folder).

    Args:
      path: the checkpoint root (with a ``text_encoder/`` folder) or the text encoder folder.
      dtype: activation dtype, ``"float32"`` or ``"bfloat16"``; default bf16 on accelerators,
        float32 on CPU. The norms and the attention softmax run in float32 either way.
      param_dtype: parameter dtype, same choices (default: ``dtype``). Stored tensors are cast
        to it as they are read (Wan's UMT5-XXL is stored in bf16: 11.4 GB).
      config: use this config instead of reading ``config.json`` (its shapes must match).
      device: where to put the parameters (a device or a sharding; default: JAX's default
        device).
      progress: optional callback called with each shard's file name before it is read.

    Returns:
      The encoder, with every parameter taken from the checkpoint.

    Raises:
      ValueError: naming the problem, before any tensor is read: a ``dtype`` / ``param_dtype``
        other than float32 / bfloat16, a malformed folder or config, any missing, unexpected,
        mis-shaped or non-floating-point tensor; while reading, a truncated or corrupt shard
        (naming the file and, when known, the tensor).
    """
    dtype, param_dtype = load_dtypes(dtype, param_dtype)  # float16 is refused by the model itself
    folder = text_encoder_dir(path)
    config = read_umt5_config(folder) if config is None else config
    if not isinstance(config, UMT5Config):
        raise ValueError(f"config must be a UMT5Config, got {type(config).__name__}")
    return load_checkpoint(
        folder,
        lambda: UMT5EncoderModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        family=_FAMILY, device=device, progress=progress,
        index_name=INDEX_NAME, single_file_name=SINGLE_FILE_NAME, aliases=EMBEDDING_ALIASES,
    )  # fmt: skip
