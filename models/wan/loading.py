"""Load a diffusers-format Wan2.1 transformer checkpoint into the Flax NNX model.

A diffusers Wan2.1 checkpoint directory (e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``) holds the
transformer under ``transformer/``::

    transformer/config.json
    transformer/diffusion_pytorch_model.safetensors.index.json      (sharded checkpoints)
    transformer/diffusion_pytorch_model-00001-of-0000N.safetensors
    ...
    transformer/diffusion_pytorch_model.safetensors                 (or: one unsharded file)

:func:`load_wan` reads ``config.json`` into a :class:`~models.wan.config.WanConfig`, builds the
model *abstractly* (``nnx.eval_shape``: no random initialization, no memory), checks every tensor
name and shape against the safetensors headers (nothing is read yet), then reads the shards one
after the other through ``safe_open`` (memory-mapped), converting each tensor to the model's
layout and dtype as it goes. Host memory therefore holds at most one tensor beyond the model
itself; no second full copy of the checkpoint is ever made.

Name mapping (see :mod:`models.wan.transformer`): the NNX parameter path joined by dots is the diffusers
name, with ``kernel`` for ``weight``. ``nn.Linear`` weights ``[out, in]`` are transposed to
``[in, out]``; the ``patch_embedding`` Conv3d weight ``[dim, C, pt, ph, pw]`` becomes
``[pt, ph, pw, C, dim]``. Every other tensor keeps its name and shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

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

CONFIG_NAME = "config.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE_NAME = "diffusion_pytorch_model.safetensors"
_CLASS_NAME = "WanTransformer3DModel"
# diffusers config keys that only exist for features this model does not implement (I2V / FLF2V).
_UNSUPPORTED_WHEN_SET = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
_LIST_LIMIT = 20


# --------------------------------------------------------------------------------------------
# Locating the checkpoint and reading its config
# --------------------------------------------------------------------------------------------


def transformer_dir(path: str | os.PathLike) -> pathlib.Path:
    """The folder holding the transformer's ``config.json``: ``path`` itself or ``path/transformer``.

    Raises:
      ValueError: if neither holds a ``config.json``.
    """
    root = pathlib.Path(path)
    for candidate in (root, root / "transformer"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ValueError(
        f"path {str(root)!r} is not a diffusers Wan checkpoint: no {CONFIG_NAME} in it or in its "
        "transformer/ subfolder"
    )


def _config_name(config: WanConfig) -> str:
    """The name of the built-in config with the same hyper-parameters, if any."""
    for name, known in CONFIGS.items():
        if dataclasses.replace(known, name=config.name, text_len=config.text_len) == config:
            return name
    return config.name


def read_wan_config(path: str | os.PathLike) -> WanConfig:
    """Reads a diffusers ``WanTransformer3DModel`` ``config.json`` into a :class:`WanConfig`.

    Args:
      path: the checkpoint root, its ``transformer/`` folder, or the ``config.json`` file.

    Returns:
      The config; named like the matching built-in config (``"wan2.1-1.3b"``,
      ``"wan2.1-14b"``, ...) when the hyper-parameters agree, else ``"diffusers:<folder>"``.

    Raises:
      ValueError: for a missing or malformed file, another model class, or a feature this
        model does not implement (image conditioning, another QK norm).
    """
    p = pathlib.Path(path)
    file = p if p.is_file() else transformer_dir(p) / CONFIG_NAME
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"config {str(file)!r} could not be read as JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {str(file)!r} must hold a JSON object")
    cls = raw.get("_class_name", _CLASS_NAME)
    if cls != _CLASS_NAME:
        raise ValueError(f"config {str(file)!r} is for {cls!r}, expected {_CLASS_NAME!r}")
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
    try:
        heads = int(raw["num_attention_heads"])
        in_channels = int(raw.get("in_channels", 16))
        out_channels = raw.get("out_channels") or in_channels
        config = WanConfig(
            name=f"diffusers:{file.parent.parent.name if file.parent.name == 'transformer' else file.parent.name}",
            dim=heads * int(raw["attention_head_dim"]),
            num_layers=int(raw["num_layers"]),
            num_heads=heads,
            ffn_dim=int(raw["ffn_dim"]),
            text_dim=int(raw.get("text_dim", 4096)),
            in_channels=in_channels,
            out_channels=int(out_channels),
            freq_dim=int(raw.get("freq_dim", 256)),
            patch_size=tuple(int(v) for v in raw.get("patch_size", (1, 2, 2))),
            eps=float(raw.get("eps", 1e-6)),
            cross_attn_norm=bool(raw.get("cross_attn_norm", True)),
            rope_max_seq_len=int(raw.get("rope_max_seq_len", 1024)),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"config {str(file)!r} is not a valid Wan transformer config: {err}") from None
    return dataclasses.replace(config, name=_config_name(config))


def checkpoint_shards(path: str | os.PathLike) -> dict[pathlib.Path, list[str]]:
    """The safetensors files of a checkpoint and the tensor names each holds (from the headers).

    Uses ``diffusion_pytorch_model.safetensors.index.json`` when present (sharded checkpoint),
    else the single ``diffusion_pytorch_model.safetensors``. Only headers are read.

    Raises:
      ValueError: if no weights are found, the index is malformed or names a missing file, a
        tensor listed in the index is absent from its shard, or a tensor appears twice.
    """
    from safetensors import safe_open

    folder = transformer_dir(path)
    index_file = folder / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"index {str(index_file)!r} is malformed (needs a 'weight_map'): {err!r}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"index {str(index_file)!r} has an empty or invalid 'weight_map'")
        listed: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            listed.setdefault(str(shard), []).append(str(name))
        files = [folder / shard for shard in listed]
    elif (folder / SINGLE_FILE_NAME).is_file():
        listed = None
        files = [folder / SINGLE_FILE_NAME]
    else:
        raise ValueError(
            f"checkpoint {str(folder)!r} has neither {INDEX_NAME} nor {SINGLE_FILE_NAME}"
        )
    shards: dict[pathlib.Path, list[str]] = {}
    seen: dict[str, pathlib.Path] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"shard {file.name!r} named in {INDEX_NAME} is missing from {str(folder)!r}")
        with safe_open(str(file), framework="flax") as f:
            keys = list(f.keys())
        for key in keys:
            if key in seen:
                raise ValueError(f"tensor {key!r} appears in two shards: {seen[key].name!r} and {file.name!r}")
            seen[key] = file
        if listed is not None:
            absent = sorted(set(listed[file.name]) - set(keys))
            if absent:
                raise ValueError(
                    f"tensors {_short(absent)} are listed in {INDEX_NAME} for shard {file.name!r} but are "
                    "not in it"
                )
        shards[file] = keys
    return shards


# --------------------------------------------------------------------------------------------
# Name and layout mapping
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where a diffusers tensor goes in the NNX model.

    Attributes:
      path: the NNX state path of the parameter.
      shape: the shape diffusers stores (what the checkpoint must hold).
      axes: the permutation turning the stored tensor into the NNX layout (``None``: as is).
      dtype: the NNX parameter's dtype (the tensor is cast to it).
    """

    path: tuple[Any, ...]
    shape: tuple[int, ...]
    axes: tuple[int, ...] | None
    dtype: jnp.dtype


def diffusers_name(path: Iterable[Any]) -> str:
    """Diffusers tensor name of an NNX parameter path (``kernel`` becomes ``weight``)."""
    parts = [str(p) for p in path]
    if parts and parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _layout(path: tuple[Any, ...], nnx_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(diffusers shape, permutation diffusers -> NNX) of one parameter."""
    if str(path[-1]) != "kernel":
        return nnx_shape, None
    if len(nnx_shape) == 2:  # nn.Linear: [out, in] -> [in, out]
        return (nnx_shape[1], nnx_shape[0]), (1, 0)
    if len(nnx_shape) == 5:  # nn.Conv3d: [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
        kt, kh, kw, cin, cout = nnx_shape
        return (cout, cin, kt, kh, kw), (2, 3, 4, 1, 0)
    raise ValueError(f"parameter {diffusers_name(path)!r} has an unsupported kernel rank {len(nnx_shape)}")


def expected_tensors(model_or_state: nnx.Module | nnx.State) -> dict[str, TensorSpec]:
    """The diffusers tensors a model (abstract or concrete) needs, by diffusers name."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    specs: dict[str, TensorSpec] = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        shape, axes = _layout(tuple(path), tuple(value.shape))
        specs[diffusers_name(path)] = TensorSpec(tuple(path), shape, axes, jnp.dtype(value.dtype))
    return specs


def _short(names: Iterable[str]) -> str:
    names = sorted(names)
    head = ", ".join(repr(n) for n in names[:_LIST_LIMIT])
    more = f" and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else ""
    return f"[{head}{more}]"


def _check_names_and_shapes(
    specs: dict[str, TensorSpec], found: dict[str, tuple[tuple[int, ...], pathlib.Path]], where: str
) -> None:
    missing = sorted(set(specs) - set(found))
    unexpected = sorted(set(found) - set(specs))
    misshaped = [
        f"{name!r} in {found[name][1].name!r} has shape {list(found[name][0])}, expected {list(spec.shape)}"
        for name, spec in sorted(specs.items())
        if name in found and tuple(found[name][0]) != spec.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    if misshaped:
        extra = f" and {len(misshaped) - _LIST_LIMIT} more" if len(misshaped) > _LIST_LIMIT else ""
        problems.append("mis-shaped tensors: " + "; ".join(misshaped[:_LIST_LIMIT]) + extra)
    if problems:
        raise ValueError(f"checkpoint {where!r} does not match the Wan model: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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
      dtype: activation dtype of the model (default: bf16 on accelerators, float32 on CPU).
      param_dtype: parameter dtype (default: ``dtype``). The modules diffusers keeps in
        float32 (time embedder, modulation tables, cross-attention norm) stay float32.
      config: use this config instead of reading ``config.json`` (its shapes must match).
      device: where to put the parameters (a device or a sharding; default: JAX's default
        device).
      progress: optional callback called with each shard's file name before it is read.

    Returns:
      The model, with every parameter taken from the checkpoint.

    Raises:
      ValueError: naming the problem: a malformed directory or config, or any missing,
        unexpected or mis-shaped tensor (checked from the headers before any tensor is read).
    """
    from safetensors import safe_open

    from models.wan.config import default_dtype
    from models.wan.transformer import WanTransformer3DModel

    folder = transformer_dir(path)
    config = read_wan_config(folder) if config is None else config
    if not isinstance(config, WanConfig):
        raise ValueError(f"config must be a WanConfig, got {type(config).__name__}")
    dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
    param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else dtype

    abstract = nnx.eval_shape(
        lambda: WanTransformer3DModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    graphdef, abstract_state = nnx.split(abstract)
    specs = expected_tensors(abstract_state)

    shards = checkpoint_shards(folder)
    found: dict[str, tuple[tuple[int, ...], pathlib.Path]] = {}
    for file, keys in shards.items():
        with safe_open(str(file), framework="flax") as f:
            for key in keys:
                found[key] = (tuple(f.get_slice(key).get_shape()), file)
    _check_names_and_shapes(specs, found, str(folder))

    by_path = {spec.path: name for name, spec in specs.items()}
    loaded: dict[str, jax.Array] = {}
    for file, keys in shards.items():
        if progress is not None:
            progress(file.name)
        with safe_open(str(file), framework="flax") as f:
            for key in keys:
                spec = specs[key]
                tensor = f.get_tensor(key)
                loaded[key] = _convert(tensor, spec, device)
                del tensor

    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        flat.append((path, var.replace(loaded.pop(by_path[tuple(path)]))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _convert(tensor: Any, spec: TensorSpec, device: Any) -> jax.Array:
    """A stored tensor in the NNX layout and dtype, on ``device``."""
    x = jnp.asarray(tensor) if not isinstance(tensor, jax.Array) else tensor
    if device is not None:
        x = jax.device_put(x, device)
    if spec.axes is not None:
        x = jnp.transpose(x, spec.axes)
    x = x.astype(spec.dtype)
    if device is not None and not isinstance(device, jax.Device):
        x = jax.device_put(x, device)
    return x
