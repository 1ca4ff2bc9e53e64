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

import contextlib
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterable, Iterator

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
# Parameter / activation dtypes load_wan accepts (JAX runs with 32-bit defaults: no float64).
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# safetensors dtype codes the loader casts to the parameter dtype: floating point only. An
# integer or bool tensor in a float slot is a broken checkpoint, not something to cast.
_FLOAT_TENSOR_DTYPES = ("F16", "BF16", "F32", "F64")
_TENSOR_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "U32": "uint32",
    "I32": "int32", "U64": "uint64", "I64": "int64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


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


def _int_field(raw: dict, key: str, file: pathlib.Path, default: Any = None) -> int:
    """``raw[key]`` (or ``default`` when absent) as an int; a fraction, a bool, a string or
    anything else that is not a whole number raises instead of being truncated."""
    value = raw.get(key, default)
    return _as_int(value, key, file)


def _as_int(value: Any, key: str, file: pathlib.Path) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config {str(file)!r}: {key} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"config {str(file)!r}: {key} must be an integer, got {value!r}")
        value = int(value)
    return value


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
    heads = _int_field(raw, "num_attention_heads", file)
    head_dim = _int_field(raw, "attention_head_dim", file)
    in_channels = _int_field(raw, "in_channels", file, 16)
    out_channels = in_channels if raw.get("out_channels") is None else _int_field(raw, "out_channels", file)
    patch_size = raw.get("patch_size", (1, 2, 2))
    if not isinstance(patch_size, (list, tuple)) or len(patch_size) != 3:
        raise ValueError(f"config {str(file)!r}: patch_size must be a list of three integers, got {patch_size!r}")
    patch_size = tuple(_as_int(v, "patch_size", file) for v in patch_size)
    eps = raw.get("eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"config {str(file)!r}: eps must be a positive number, got {eps!r}")
    cross_attn_norm = raw.get("cross_attn_norm", True)
    if not isinstance(cross_attn_norm, bool):
        raise ValueError(f"config {str(file)!r}: cross_attn_norm must be true or false, got {cross_attn_norm!r}")
    try:
        config = WanConfig(
            name=f"diffusers:{file.parent.parent.name if file.parent.name == 'transformer' else file.parent.name}",
            dim=heads * head_dim,
            num_layers=_int_field(raw, "num_layers", file),
            num_heads=heads,
            ffn_dim=_int_field(raw, "ffn_dim", file),
            text_dim=_int_field(raw, "text_dim", file, 4096),
            in_channels=in_channels,
            out_channels=out_channels,
            freq_dim=_int_field(raw, "freq_dim", file, 256),
            patch_size=patch_size,
            eps=float(eps),
            cross_attn_norm=cross_attn_norm,
            rope_max_seq_len=_int_field(raw, "rope_max_seq_len", file, 1024),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"config {str(file)!r} is not a valid Wan transformer config: {err}") from None
    return dataclasses.replace(config, name=_config_name(config))


@contextlib.contextmanager
def _reading(file: pathlib.Path, key: str | None = None) -> Iterator[None]:
    """Turns safetensors' own errors (a truncated or corrupt file) and I/O errors while reading
    ``file`` into a ``ValueError`` naming the shard (and the tensor, when known)."""
    from safetensors import SafetensorError

    tensor = f", tensor {key!r}" if key is not None else ""
    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"shard {str(file)!r}{tensor}: corrupt or truncated safetensors file ({err})") from None
    except OSError as err:
        raise ValueError(f"shard {str(file)!r}{tensor} could not be read: {err}") from None


def _open_shard(file: pathlib.Path):
    """``safe_open`` on a shard (memory-mapped, headers parsed and checked against the file size)."""
    from safetensors import safe_open

    with _reading(file):
        return safe_open(str(file), framework="flax")


def checkpoint_shards(path: str | os.PathLike) -> dict[pathlib.Path, list[str]]:
    """The safetensors files of a checkpoint and the tensor names each holds (from the headers).

    Uses ``diffusion_pytorch_model.safetensors.index.json`` when present (sharded checkpoint),
    else the single ``diffusion_pytorch_model.safetensors``. Only headers are read.

    Raises:
      ValueError: if no weights are found, the index is malformed or names a missing file, a
        tensor listed in the index is absent from its shard, a tensor appears twice, or a
        shard is truncated or corrupt (naming the file).
    """
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
        with _open_shard(file) as f, _reading(file):
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


def _dtype_label(code: str) -> str:
    name = _TENSOR_DTYPE_NAMES.get(code)
    return f"{code} ({name})" if name else code


def _check_names_and_shapes(
    specs: dict[str, TensorSpec], found: dict[str, tuple[tuple[int, ...], pathlib.Path, str]], where: str
) -> None:
    missing = sorted(set(specs) - set(found))
    unexpected = sorted(set(found) - set(specs))
    misshaped = [
        f"{name!r} in {found[name][1].name!r} has shape {list(found[name][0])}, expected {list(spec.shape)}"
        for name, spec in sorted(specs.items())
        if name in found and tuple(found[name][0]) != spec.shape
    ]
    non_float = [
        f"{name!r} in {found[name][1].name!r} is {_dtype_label(found[name][2])}"
        for name in sorted(specs)
        if name in found and found[name][2] not in _FLOAT_TENSOR_DTYPES
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    if misshaped:
        extra = f" and {len(misshaped) - _LIST_LIMIT} more" if len(misshaped) > _LIST_LIMIT else ""
        problems.append("mis-shaped tensors: " + "; ".join(misshaped[:_LIST_LIMIT]) + extra)
    if non_float:
        extra = f" and {len(non_float) - _LIST_LIMIT} more" if len(non_float) > _LIST_LIMIT else ""
        problems.append(
            "tensors that are not floating point (the model's weights are; they are not cast): "
            + "; ".join(non_float[:_LIST_LIMIT]) + extra
        )
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
    from models.wan.config import default_dtype
    from models.wan.transformer import WanTransformer3DModel

    dtype = _float_dtype("dtype", dtype)
    param_dtype = _float_dtype("param_dtype", param_dtype)
    folder = transformer_dir(path)
    config = read_wan_config(folder) if config is None else config
    if not isinstance(config, WanConfig):
        raise ValueError(f"config must be a WanConfig, got {type(config).__name__}")
    dtype = dtype if dtype is not None else default_dtype()
    param_dtype = param_dtype if param_dtype is not None else dtype

    abstract = nnx.eval_shape(
        lambda: WanTransformer3DModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    graphdef, abstract_state = nnx.split(abstract)
    specs = expected_tensors(abstract_state)

    shards = checkpoint_shards(folder)
    found: dict[str, tuple[tuple[int, ...], pathlib.Path, str]] = {}
    for file, keys in shards.items():
        with _open_shard(file) as f:
            for key in keys:
                with _reading(file, key):
                    view = f.get_slice(key)
                    found[key] = (tuple(view.get_shape()), file, str(view.get_dtype()))
    _check_names_and_shapes(specs, found, str(folder))

    by_path = {spec.path: name for name, spec in specs.items()}
    loaded: dict[str, jax.Array] = {}
    for file, keys in shards.items():
        if progress is not None:
            progress(file.name)
        with _open_shard(file) as f:
            for key in keys:
                spec = specs[key]
                with _reading(file, key):
                    tensor = f.get_tensor(key)
                loaded[key] = _convert(tensor, spec, device)
                del tensor

    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        flat.append((path, var.replace(loaded.pop(by_path[tuple(path)]))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _float_dtype(name: str, value: Any) -> jnp.dtype | None:
    """``value`` as a floating-point dtype (``None`` stays ``None``), else a ValueError naming
    ``name`` and the allowed values."""
    allowed = _FLOAT_DTYPES + (("float64",) if jax.config.jax_enable_x64 else ())
    if value is None:
        return None
    try:
        dt = jnp.dtype(value)
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.name not in allowed:
        raise ValueError(
            f"{name} must be a floating-point dtype, one of {list(allowed)} (or None for the default), "
            f"got {value!r}"
        )
    return dt


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
