"""Load the ``vae/`` folder of a diffusers Wan2.1 or Wan2.2 checkpoint into
:class:`models.vae.wan_vae.WanVAE`.

A diffusers Wan repository (e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``,
``Wan-AI/Wan2.2-TI2V-5B-Diffusers``) holds the VAE as::

    vae/config.json                               (_class_name "AutoencoderKLWan")
    vae/diffusion_pytorch_model.safetensors       (or shards with their index)

:func:`load_wan_vae` reads ``config.json`` into a :class:`~models.vae.wan_vae.WanVAEConfig` and
loads the weights with :func:`models.common.checkpoint.load_checkpoint`: the model is built
abstractly, every tensor name, shape and dtype is checked against the safetensors headers before
any tensor is read, then the tensors are read memory-mapped, shard by shard, and converted.

Name mapping: the NNX parameter path joined by dots is the diffusers name (``kernel`` for
``weight``). Conv3d weights ``[out, in, kt, kh, kw]`` become ``kernel [kt, kh, kw, in, out]``;
the Conv2d weights (the resamplers' ``resample.1``, attention's ``to_qkv`` and ``proj``) keep
their name and PyTorch layout ``weight [out, in, kh, kw]``, as do the norms' ``gamma`` and every
bias. Wan2.2's shortcuts (AvgDown3D, DupUp3D) have no parameters.

The config keys read: ``base_dim``, ``decoder_base_dim``, ``z_dim``, ``dim_mult``,
``num_res_blocks``, ``temperal_downsample``, ``in_channels``, ``out_channels``, ``is_residual``,
``patch_size`` (``null`` or a positive integer), ``latents_mean``, ``latents_std``, and
``scale_factor_spatial`` / ``scale_factor_temporal``, which must agree with the structure (diffusers
uses them for tiling and the pipelines). Encoder attention (``attn_scales``) is refused; ``dropout``
and Wan2.2's leftover ``clip_output`` do nothing at inference (diffusers always clamps) and are
ignored. Every problem is named, with its key, before any tensor is read.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Callable

import jax
from flax import nnx

from models.common.checkpoint import (
    CONFIG_NAME,
    config_bool,
    config_int,
    load_checkpoint,
    load_dtypes,
    read_config_json,
)
from models.vae.wan_vae import CONFIGS, WanVAE, WanVAEConfig

__all__ = ["load_wan_vae", "read_wan_vae_config", "vae_dir"]

_CLASS_NAME = "AutoencoderKLWan"
_FAMILY = "Wan VAE"


def vae_dir(path: str | os.PathLike) -> pathlib.Path:
    """The folder holding the VAE's ``config.json``: ``path/vae`` or ``path`` itself.

    Raises:
      ValueError: if neither holds a ``config.json``.
    """
    root = pathlib.Path(path)
    for candidate in (root / "vae", root):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ValueError(
        f"path {str(root)!r} is not a diffusers Wan VAE checkpoint: no {CONFIG_NAME} in it or in its vae/ subfolder"
    )


def _int_list(raw: dict, key: str, file: pathlib.Path, default: Any) -> tuple[int, ...]:
    value = raw.get(key, default)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"config {str(file)!r}: {key} must be a non-empty list of integers, got {value!r}")
    return tuple(config_int({key: v}, key, file) for v in value)


def _number_list(raw: dict, key: str, file: pathlib.Path, default: Any) -> tuple[float, ...]:
    value = raw.get(key, default)
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise ValueError(f"config {str(file)!r}: {key} must be a list of finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def read_wan_vae_config(path: str | os.PathLike) -> WanVAEConfig:
    """Reads a diffusers ``AutoencoderKLWan`` ``config.json`` into a :class:`WanVAEConfig`.

    Args:
      path: the checkpoint root (with ``vae/``), the VAE folder, or its ``config.json``.

    Returns:
      The config, named ``"wan2.1"`` or ``"wan2.2"`` when it equals that built-in one, else
      ``"diffusers:<folder>"``.

    Raises:
      ValueError: for a missing or malformed file, another model class, an unsupported feature
        (naming the key), a field of the wrong type, or an inconsistent structure.
    """
    p = pathlib.Path(path)
    raw, file = read_config_json(p if p.is_file() else vae_dir(p), _CLASS_NAME, _FAMILY)
    is_residual = config_bool(raw, "is_residual", file, False)
    patch_size = 1 if raw.get("patch_size") is None else config_int(raw, "patch_size", file)
    if raw.get("attn_scales", []):
        raise ValueError(f"config {str(file)!r} sets attn_scales={raw['attn_scales']!r}: encoder attention is not supported")
    temporal = raw.get("temperal_downsample", [False, True, True])
    if not isinstance(temporal, (list, tuple)) or not all(isinstance(t, bool) for t in temporal):
        raise ValueError(f"config {str(file)!r}: temperal_downsample must be a list of booleans, got {temporal!r}")
    decoder_base_dim = raw.get("decoder_base_dim")
    defaults = WanVAEConfig(name="defaults")
    try:
        config = WanVAEConfig(
            name=f"diffusers:{file.parent.parent.name if file.parent.name == 'vae' else file.parent.name}",
            base_dim=config_int(raw, "base_dim", file, defaults.base_dim),
            decoder_base_dim=None if decoder_base_dim is None else config_int(raw, "decoder_base_dim", file),
            z_dim=config_int(raw, "z_dim", file, defaults.z_dim),
            dim_mult=_int_list(raw, "dim_mult", file, list(defaults.dim_mult)),
            num_res_blocks=config_int(raw, "num_res_blocks", file, defaults.num_res_blocks),
            temporal_downsample=tuple(temporal),
            in_channels=config_int(raw, "in_channels", file, defaults.in_channels),
            out_channels=config_int(raw, "out_channels", file, defaults.out_channels),
            is_residual=is_residual,
            patch_size=patch_size,
            latents_mean=_number_list(raw, "latents_mean", file, list(defaults.latents_mean)),
            latents_std=_number_list(raw, "latents_std", file, list(defaults.latents_std)),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"config {str(file)!r} is not a valid Wan VAE config: {err}") from None
    for key, derived in (("scale_factor_spatial", config.spatial_factor), ("scale_factor_temporal", config.temporal_factor)):
        if raw.get(key) is not None and config_int(raw, key, file) != derived:
            raise ValueError(
                f"config {str(file)!r}: {key}={raw[key]!r} disagrees with the structure, which gives {derived}"
            )
    for name in ("wan2.1", "wan2.2"):
        if config.replace(name=name) == CONFIGS[name]:
            return CONFIGS[name]
    return config


def load_wan_vae(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    config: WanVAEConfig | None = None,
    device: jax.Device | jax.sharding.Sharding | None = None,
    progress: Callable[[str], None] | None = None,
) -> WanVAE:
    """Loads the ``vae/`` folder of a diffusers Wan2.1 or Wan2.2 checkpoint into :class:`WanVAE`.

    Args:
      path: the checkpoint root (with a ``vae/`` folder) or the VAE folder.
      dtype: activation dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (default: bf16
        on accelerators, float32 on CPU).
      param_dtype: parameter dtype, same choices (default: ``dtype``).
      config: use this config instead of reading ``config.json`` (its shapes must match).
      device: where to put the parameters (a device or a sharding; default: JAX's default device).
      progress: optional callback called with each shard's file name before it is read.

    Raises:
      ValueError: naming the problem: a ``dtype`` / ``param_dtype`` that is not floating point
        (before anything is read), a missing folder or malformed config, any missing,
        unexpected, mis-shaped or non-floating-point tensor (from the headers, before any tensor
        is read), or a truncated or corrupt file.
    """
    dtype, param_dtype = load_dtypes(dtype, param_dtype)
    folder = vae_dir(path)
    config = read_wan_vae_config(folder) if config is None else config
    if not isinstance(config, WanVAEConfig):
        raise ValueError(f"config must be a WanVAEConfig, got {type(config).__name__}")
    return load_checkpoint(
        folder,
        lambda: WanVAE(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
        family=_FAMILY, device=device, progress=progress,
    )  # fmt: skip
