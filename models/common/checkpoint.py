"""Reading diffusers-format transformer checkpoints into Flax NNX models (every model family).

A diffusers checkpoint directory holds the transformer under ``transformer/``::

    transformer/config.json
    transformer/diffusion_pytorch_model.safetensors.index.json      (sharded checkpoints)
    transformer/diffusion_pytorch_model-00001-of-0000N.safetensors
    ...
    transformer/diffusion_pytorch_model.safetensors                 (or: one unsharded file)

:func:`load_checkpoint` builds the model *abstractly* (``nnx.eval_shape``: no random
initialization, no memory), checks every tensor name and shape against the safetensors headers
(nothing is read yet), then reads the shards one after the other through ``safe_open``
(memory-mapped), converting each tensor to the model's layout and dtype as it goes. Host memory
therefore holds at most one tensor beyond the model itself; no second full copy of the
checkpoint is ever made. Each family's loader (:mod:`models.wan.loading`,
:mod:`models.hunyuan_video.loading`) reads its ``config.json`` and calls it.

Name mapping: the NNX parameter path joined by dots is the diffusers name, with ``kernel`` for
``weight``. ``nn.Linear`` weights ``[out, in]`` are transposed to ``[in, out]``; a Conv3d
weight ``[dim, C, pt, ph, pw]`` becomes ``[pt, ph, pw, C, dim]``. Every other tensor keeps its
name and shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models.common.layers import default_dtype

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "TensorSpec",
    "as_int",
    "builtin_name",
    "checkpoint_shards",
    "config_bool",
    "config_int",
    "config_name",
    "config_number",
    "config_three_ints",
    "diffusers_name",
    "expected_tensors",
    "float_dtype",
    "load_dtypes",
    "load_checkpoint",
    "read_config_json",
    "transformer_dir",
]

CONFIG_NAME = "config.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE_NAME = "diffusion_pytorch_model.safetensors"
_LIST_LIMIT = 20
# Parameter / activation dtypes the loaders accept (JAX runs with 32-bit defaults: no float64).
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


def transformer_dir(path: str | os.PathLike, family: str = "transformer") -> pathlib.Path:
    """The folder holding the transformer's ``config.json``: ``path`` itself or ``path/transformer``.

    Raises:
      ValueError: if neither holds a ``config.json`` (naming the model ``family``).
    """
    root = pathlib.Path(path)
    for candidate in (root, root / "transformer"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ValueError(
        f"path {str(root)!r} is not a diffusers {family} checkpoint: no {CONFIG_NAME} in it or in its "
        "transformer/ subfolder"
    )


def read_config_json(path: str | os.PathLike, class_name: str, family: str) -> tuple[dict, pathlib.Path]:
    """The JSON object of a transformer ``config.json`` and the file it came from.

    Args:
      path: the checkpoint root, its ``transformer/`` folder, or the ``config.json`` file.
      class_name: the diffusers class the config must be for (``_class_name``; absent is
        accepted).
      family: the model family, for messages.

    Raises:
      ValueError: for a missing or malformed file, or a config of another class.
    """
    p = pathlib.Path(path)
    file = p if p.is_file() else transformer_dir(p, family) / CONFIG_NAME
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"config {str(file)!r} could not be read as JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {str(file)!r} must hold a JSON object")
    cls = raw.get("_class_name", class_name)
    if cls != class_name:
        raise ValueError(f"config {str(file)!r} is for {cls!r}, expected {class_name!r}")
    return raw, file


def config_name(file: pathlib.Path) -> str:
    """``"diffusers:<checkpoint folder>"`` for a config read from ``file``."""
    return f"diffusers:{file.parent.parent.name if file.parent.name == 'transformer' else file.parent.name}"


def builtin_name(config: Any, configs: dict[str, Any]) -> str:
    """The name of the built-in config in ``configs`` with ``config``'s hyper-parameters (its
    ``name`` and ``text_len`` aside), else ``config.name``."""
    for name, known in configs.items():
        if dataclasses.replace(known, name=config.name, text_len=config.text_len) == config:
            return name
    return config.name


def config_int(raw: dict, key: str, file: pathlib.Path, default: Any = None) -> int:
    """``raw[key]`` (or ``default`` when absent) as an int; a fraction, a bool, a string or
    anything else that is not a whole number raises instead of being truncated."""
    value = raw.get(key, default)
    return as_int(value, key, file)


def config_number(raw: dict, key: str, file: pathlib.Path, default: Any = None) -> float:
    """``raw[key]`` (or ``default`` when absent) as a positive, finite float; a ValueError otherwise."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"config {str(file)!r}: {key} must be a positive number, got {value!r}")
    return float(value)


def config_bool(raw: dict, key: str, file: pathlib.Path, default: Any = None) -> bool:
    """``raw[key]`` (or ``default`` when absent), which must be a JSON boolean."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"config {str(file)!r}: {key} must be true or false, got {value!r}")
    return value


def config_three_ints(raw: dict, key: str, file: pathlib.Path, default: Any = None) -> tuple[int, int, int]:
    """``raw[key]`` (or ``default`` when absent), a list of three whole numbers, as a tuple of ints."""
    value = raw.get(key, default)
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"config {str(file)!r}: {key} must be a list of three integers, got {value!r}")
    return tuple(as_int(v, key, file) for v in value)


def as_int(value: Any, key: str, file: pathlib.Path) -> int:
    """``value`` (config ``key`` of ``file``) as an int, or a ValueError naming both."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config {str(file)!r}: {key} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(f"config {str(file)!r}: {key} must be an integer, got {value!r}")
        value = int(value)
    return value


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


def checkpoint_shards(
    path: str | os.PathLike,
    family: str = "transformer",
    *,
    index_name: str = INDEX_NAME,
    single_file_name: str = SINGLE_FILE_NAME,
) -> dict[pathlib.Path, list[str]]:
    """The safetensors files of a checkpoint and the tensor names each holds (from the headers).

    Uses the index ``index_name`` when present (sharded checkpoint), else the single file
    ``single_file_name``. The defaults are diffusers' names
    (``diffusion_pytorch_model.safetensors.index.json``, ``diffusion_pytorch_model.safetensors``);
    a transformers model saved by ``save_pretrained`` uses ``model.safetensors.index.json`` and
    ``model.safetensors``. Only headers are read.

    Raises:
      ValueError: if no weights are found, the index is malformed or names a missing file, a
        tensor listed in the index is absent from its shard, a tensor appears twice, or a
        shard is truncated or corrupt (naming the file).
    """
    folder = transformer_dir(path, family)
    index_file = folder / index_name
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
    elif (folder / single_file_name).is_file():
        listed = None
        files = [folder / single_file_name]
    else:
        raise ValueError(f"checkpoint {str(folder)!r} has neither {index_name} nor {single_file_name}")
    shards: dict[pathlib.Path, list[str]] = {}
    seen: dict[str, pathlib.Path] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"shard {file.name!r} named in {index_name} is missing from {str(folder)!r}")
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
                    f"tensors {_short(absent)} are listed in {index_name} for shard {file.name!r} but are "
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
    specs: dict[str, TensorSpec], found: dict[str, tuple[tuple[int, ...], pathlib.Path, str]], where: str, family: str
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
        raise ValueError(f"checkpoint {where!r} does not match the {family} model: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_checkpoint(
    folder: pathlib.Path,
    build: Callable[[], nnx.Module],
    *,
    family: str,
    device: jax.Device | jax.sharding.Sharding | None = None,
    progress: Callable[[str], None] | None = None,
    index_name: str = INDEX_NAME,
    single_file_name: str = SINGLE_FILE_NAME,
    aliases: Mapping[str, str] | None = None,
) -> nnx.Module:
    """The model ``build()`` makes, with every parameter read from the checkpoint in ``folder``.

    ``build`` runs only under ``nnx.eval_shape`` (no initialization, no memory). Every tensor
    name, shape and dtype is checked from the shard headers before any tensor is read; then the
    shards are read one after the other (memory-mapped), each tensor converted to its
    parameter's layout and dtype and placed on ``device`` as it is read.

    Args:
      folder: the transformer folder (see :func:`transformer_dir`).
      build: makes the model (its parameters' shapes and dtypes are what the checkpoint must fill).
      family: the model family, for messages.
      device: where to put the parameters (a device or a sharding; default: JAX's default device).
      progress: optional callback called with each shard's file name before it is read.
      index_name, single_file_name: the checkpoint's file names (see :func:`checkpoint_shards`).
      aliases: ``{model tensor name: other stored name}``: the checkpoint may hold the tensor
        under the other name instead (a tied copy, such as UMT5's ``encoder.embed_tokens.weight``
        for ``shared.weight``). When it holds both, the model name is read and the other, which
        must have the same shape, is skipped.

    Raises:
      ValueError: naming every missing, unexpected, mis-shaped or non-floating-point tensor
        (before anything is read), or a truncated or corrupt shard (naming the file and, when
        known, the tensor).
    """
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    specs = expected_tensors(abstract_state)

    shards = checkpoint_shards(folder, family, index_name=index_name, single_file_name=single_file_name)
    found: dict[str, tuple[tuple[int, ...], pathlib.Path, str]] = {}
    for file, keys in shards.items():
        with _open_shard(file) as f:
            for key in keys:
                with _reading(file, key):
                    view = f.get_slice(key)
                    found[key] = (tuple(view.get_shape()), file, str(view.get_dtype()))
    stored_as = _apply_aliases(found, aliases or {})
    _check_names_and_shapes(specs, found, str(folder), family)

    by_path = {spec.path: name for name, spec in specs.items()}
    loaded: dict[str, jax.Array] = {}
    for file, keys in shards.items():
        if progress is not None:
            progress(file.name)
        with _open_shard(file) as f:
            for key in keys:
                name = stored_as.get(key, key)
                if name is None:  # a tied copy of a tensor read under its own name
                    continue
                with _reading(file, key):
                    tensor = f.get_tensor(key)
                loaded[name] = _convert(tensor, specs[name], device)
                del tensor

    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        flat.append((path, var.replace(loaded.pop(by_path[tuple(path)]))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _apply_aliases(
    found: dict[str, tuple[tuple[int, ...], pathlib.Path, str]], aliases: Mapping[str, str]
) -> dict[str, str | None]:
    """Files each aliased tensor of ``found`` under its model name (in place); returns
    ``{stored name: model name}``, ``None`` for a tied copy that is not to be read.

    Raises:
      ValueError: if a checkpoint holds both names with different shapes.
    """
    stored_as: dict[str, str | None] = {}
    for name, alias in aliases.items():
        if alias not in found:
            continue
        if name in found:
            if found[name][0] != found[alias][0]:
                raise ValueError(
                    f"tensors {name!r} and {alias!r} are two names of one tied tensor but have shapes "
                    f"{list(found[name][0])} and {list(found[alias][0])}"
                )
            del found[alias]
            stored_as[alias] = None
        else:
            found[name] = found.pop(alias)
            stored_as[alias] = name
    return stored_as


def load_dtypes(dtype: Any, param_dtype: Any) -> tuple[jnp.dtype, jnp.dtype]:
    """The ``(dtype, param_dtype)`` a loader builds its model with: each checked with
    :func:`float_dtype`; ``dtype`` defaults to the backend's default
    (:func:`models.common.layers.default_dtype`), ``param_dtype`` to ``dtype``."""
    dtype = float_dtype("dtype", dtype)
    param_dtype = float_dtype("param_dtype", param_dtype)
    dtype = dtype if dtype is not None else default_dtype()
    return dtype, param_dtype if param_dtype is not None else dtype


def float_dtype(name: str, value: Any) -> jnp.dtype | None:
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
