"""The small video DiTs' weights files: shards, checksums, and the flat state they hold.

Weights files (:func:`save_small_video_dit`): the transformer parameters
(``transformer.<nnx path>``, bfloat16) and the conditioner tables (``conditioner.photo``,
``conditioner.motion``), with the model's :class:`~models.evaluation.small_dit.SmallDiTConfig`
as JSON in the header metadata (``"config"``). A set of tensors whose file would exceed
``max_shard_bytes`` (:data:`MAX_SHARD_BYTES`, 16 MiB) is split into shards
``<stem>-00001-of-0000N.safetensors`` (whole tensors, each shard with the metadata;
:func:`write_sharded`, :func:`read_sharded`); ``<path>`` then names the set
(:func:`weights_files`). ``<path>.sha256`` (``sha256sum`` format, one line per file, so
``sha256sum -c`` checks it) holds the SHA-256 of every file; the readers verify them first
(:func:`verify_weights`).

State trees go to and from flat ``{"a.b.0.c": array}`` dicts with :func:`flatten_state` and
:func:`unflatten_into`. The model classes and the loaders that build models from these files
are in :mod:`models.evaluation.small_dit`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.common.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:  # annotations only: the model module imports this one
    from models.evaluation.small_dit import ClipConditioner, SmallDiTConfig
    from models.wan.transformer import WanTransformer3DModel

__all__ = [
    "MAX_SHARD_BYTES",
    "file_sha256",
    "flatten_state",
    "read_checksum",
    "read_checksums",
    "read_sharded",
    "read_weights_checksums",
    "save_small_video_dit",
    "unflatten_into",
    "verify_checksum",
    "verify_weights",
    "weights_files",
    "write_sharded",
]

#: Largest weights file written (the GPU machine returns files of at most 16 MiB).
MAX_SHARD_BYTES = 16 * 1024 * 1024


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def read_checksums(path: str | os.PathLike) -> dict[str, str]:
    """``{file name: SHA-256}`` from ``<path>.sha256`` (``sha256sum`` format: one ``digest  name``
    line per file, so ``sha256sum -c`` checks it in its folder)."""
    path = pathlib.Path(path)
    sums = _checksum_path(path)
    if not sums.is_file():
        raise ValueError(f"path {str(path)!r} has no checksum file {str(sums)!r}")
    out: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in parts[0]):
            raise ValueError(f"checksum file {str(sums)!r} has a line that is not 'SHA-256 hex digest  name': {line!r}")
        out[parts[1].lstrip("*")] = parts[0].lower()
    if not out:
        raise ValueError(f"checksum file {str(sums)!r} does not start with a SHA-256 hex digest")
    return out


def read_checksum(path: str | os.PathLike) -> str:
    """The expected SHA-256 of the single file ``path`` from ``<path>.sha256``."""
    path = pathlib.Path(path)
    sums = read_checksums(path)
    if path.name in sums:
        return sums[path.name]
    if len(sums) == 1:  # a checksum file written under another name of the same file
        return next(iter(sums.values()))
    raise ValueError(f"checksum file of {str(path)!r} lists {sorted(sums)}, not {path.name!r}")


def verify_checksum(path: str | os.PathLike) -> str:
    """Checks the single file ``path`` against ``<path>.sha256``; returns the digest or raises ``ValueError``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist (train it with python -m benchmarks.train_small)")
    expected = read_checksum(path)
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(f"weights file {str(path)!r} has SHA-256 {actual}, its checksum file says {expected}")
    return actual


def _shard_path(path: pathlib.Path, index: int, count: int) -> pathlib.Path:
    return path.with_name(f"{path.stem}-{index:05d}-of-{count:05d}{path.suffix}")


def _shards_of(path: pathlib.Path) -> list[tuple[int, int, pathlib.Path]]:
    """``(index, count, file)`` of every ``<stem>-IIIII-of-NNNNN<suffix>`` next to ``path``."""
    pattern = re.compile(re.escape(path.stem) + r"-(\d{5})-of-(\d{5})" + re.escape(path.suffix) + "$")
    found = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_file():
                found.append((int(match[1]), int(match[2]), entry))
    return sorted(found)


def weights_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The files holding the weights named ``path``: ``[path]`` when it is a file, else its shards
    ``<stem>-00001-of-0000N<suffix>`` … in order.

    Raises:
      ValueError: when neither exists, when both exist, or when the shards do not form one
        complete set (the message names the missing or extra files).
    """
    path = pathlib.Path(path)
    shards = _shards_of(path)
    if path.is_file():
        if shards:
            raise ValueError(
                f"weights {str(path)!r} exist both as one file and as shards ({shards[0][2].name}, ...); remove one"
            )
        return [path]
    if not shards:
        raise ValueError(f"weights file {str(path)!r} does not exist (train it with python -m benchmarks.train_small)")
    counts = sorted({count for _, count, _ in shards})
    if len(counts) != 1:
        raise ValueError(f"weights {str(path)!r} have shards of several sets (of {counts}); remove the stale ones")
    count = counts[0]
    present = [index for index, _, _ in shards]
    if present != list(range(1, count + 1)):
        missing = sorted(set(range(1, count + 1)) - set(present))
        raise ValueError(
            f"weights {str(path)!r} lack shards {[_shard_path(path, i, count).name for i in missing]}"
        )
    return [file for _, _, file in shards]


def read_weights_checksums(path: str | os.PathLike) -> dict[str, str]:
    """``{file name: expected SHA-256}`` of every file of the weights named ``path``, from
    ``<path>.sha256`` (no hashing; :func:`verify_weights` hashes)."""
    files = weights_files(path)
    if len(files) == 1 and files[0] == pathlib.Path(path):
        return {files[0].name: read_checksum(files[0])}
    sums = read_checksums(path)
    missing = [f.name for f in files if f.name not in sums]
    if missing:
        raise ValueError(f"checksum file of {str(path)!r} does not list {missing}")
    return {f.name: sums[f.name] for f in files}


def verify_weights(path: str | os.PathLike) -> dict[str, str]:
    """Checks every file of the weights named ``path`` against ``<path>.sha256``; returns
    ``{file name: SHA-256}`` or raises ``ValueError`` naming the file that differs."""
    expected = read_weights_checksums(path)
    for file in weights_files(path):
        actual = file_sha256(file)
        if actual != expected[file.name]:
            raise ValueError(
                f"weights file {str(file)!r} has SHA-256 {actual}, its checksum file says {expected[file.name]}"
            )
    return expected


def write_sharded(
    path: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str],
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict[str, str]:
    """Writes ``tensors`` to ``path``, or to shards of at most ``max_shard_bytes`` when one file
    would be larger, and ``<path>.sha256`` listing every file written; returns ``{file name: SHA-256}``.

    Tensors are whole in one shard (filled in name order); every shard carries ``metadata`` plus
    ``"shard": "i/N"``. Files are written atomically
    (:func:`models.common.files.atomic_write_bytes`), then the files of an earlier write under the
    other form (or another shard count) are removed, so :func:`weights_files` finds exactly this
    set.

    Raises:
      ValueError: when one tensor alone exceeds ``max_shard_bytes``.
    """
    from safetensors.numpy import save

    path = pathlib.Path(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    overhead = 1024 + len(json.dumps(metadata)) + 256  # header: metadata, "shard", framing
    budget = int(max_shard_bytes) - overhead
    groups: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name, array in tensors.items():
        size = array.nbytes + 160 + len(name)  # data + its header entry
        if size > budget:
            raise ValueError(f"tensor {name!r} ({array.nbytes} bytes) alone exceeds max_shard_bytes={max_shard_bytes}")
        if used + size > budget and groups[-1]:
            groups.append({})
            used = 0
        groups[-1][name] = array
        used += size
    count = len(groups)
    targets = [path] if count == 1 else [_shard_path(path, i + 1, count) for i in range(count)]
    digests: dict[str, str] = {}
    for i, (target, group) in enumerate(zip(targets, groups)):
        meta = dict(metadata) if count == 1 else {**metadata, "shard": f"{i + 1}/{count}"}
        data = save(group, metadata=meta)
        if len(data) > max_shard_bytes:  # pragma: no cover - the header estimate above is generous
            raise ValueError(f"shard {target.name} has {len(data)} bytes, over max_shard_bytes={max_shard_bytes}")
        atomic_write_bytes(target, data)
        digests[target.name] = hashlib.sha256(data).hexdigest()
    atomic_write_text(_checksum_path(path), "".join(f"{d}  {name}\n" for name, d in digests.items()))
    stale = [f for _, _, f in _shards_of(path) if f not in targets] + ([path] if count > 1 and path.is_file() else [])
    for old in stale:
        old.unlink()
    return digests


def read_sharded(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads the weights named ``path`` (a file or its shards): ``(tensors, metadata)``.

    With ``verify``, every file is checked against ``<path>.sha256`` first (:func:`verify_weights`). The shards must carry
    the same metadata (besides ``"shard"``) and distinct tensor names; ``metadata`` is the first
    file's without ``"shard"``.
    """
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] | None = None
    if verify:
        verify_weights(path)
    for file in weights_files(path):
        with safe_open(str(file), framework="numpy") as f:
            meta = {k: v for k, v in (f.metadata() or {}).items() if k != "shard"}
            if metadata is None:
                metadata = meta
            elif meta != metadata:
                raise ValueError(f"shard {file.name!r} has other metadata than the first shard of {str(path)!r}")
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"tensor {key!r} appears in two shards of {str(path)!r}")
                tensors[key] = f.get_tensor(key)
    return tensors, metadata or {}


def flatten_state(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A pure nested dict (``nnx.to_pure_dict(state)``) → ``{"a.b.0.c": array}``."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out[prefix + ".".join(keys)] = np.asarray(leaf)
    return out


def unflatten_into(template: Any, flat: dict[str, np.ndarray], prefix: str = "", *, dtype=None) -> Any:
    """Fills the leaves of ``template`` (a pure nested dict) from ``flat`` by name.

    Each leaf is cast to the template's dtype (or ``dtype`` when given). Raises ``ValueError``
    listing missing keys or shape mismatches; extra keys under ``prefix`` are an error too.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = list(flatten_state(template, prefix))
    missing = [n for n in names if n not in flat]
    extra = [k for k in flat if k.startswith(prefix) and k not in set(names)]
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    values = []
    for name, (_, leaf) in zip(names, leaves):
        array = flat[name]
        if tuple(array.shape) != tuple(leaf.shape):
            raise ValueError(f"weights tensor {name!r} has shape {array.shape}, the model expects {leaf.shape}")
        values.append(jnp.asarray(array, dtype or leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


def save_small_video_dit(
    path: str | os.PathLike,
    model: WanTransformer3DModel,
    conditioner: ClipConditioner,
    config: SmallDiTConfig,
    *,
    dtype=jnp.bfloat16,
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict[str, str]:
    """Writes the weights (transformer in ``dtype``, conditioner float32) with their checksums.

    One file at ``path``, or shards of at most ``max_shard_bytes`` (:func:`write_sharded`).
    Each file is written atomically (:func:`models.common.files.atomic_write_bytes`; parent
    folders are created) before its ``.sha256``: a kill leaves the old files, or new weights whose checksum
    file does not match yet (which :func:`verify_checksum` reports), never a truncated weights
    file. Returns ``{file name: SHA-256}``.
    """
    tensors = {
        k: np.asarray(jnp.asarray(v, dtype))
        for k, v in flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "transformer.").items()
    }
    tensors.update(flatten_state(nnx.to_pure_dict(nnx.state(conditioner, nnx.Param)), "conditioner."))
    meta = {"config": config.to_json(), "format": "dfsattn-jax small video DiT v1"}
    meta.update(metadata or {})
    return write_sharded(path, tensors, meta, max_shard_bytes=max_shard_bytes)
