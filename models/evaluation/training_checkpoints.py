"""Checkpoints of a small video DiT's training run, two kinds (a run resumes from the newer one).

* **full** (:data:`CHECKPOINT`, :func:`save_checkpoint` / :func:`load_checkpoint`): float32
  params, the AdamW moments and the step in one safetensors file; it stays on the machine that
  trains (v2: 178 MB);
* **compact** (:data:`COMPACT` in a folder, :func:`save_compact` / :func:`load_compact`): the
  params only, in a chosen dtype (bfloat16: 29.7 MB for v2, in shards of at most 16 MiB via
  :func:`models.evaluation.harness_weights.write_sharded`, with a ``.sha256``), with the step,
  the configs and the loss and held-out histories in the safetensors metadata (every shard's
  header). This is what travels between GPU calls: the GPU machine returns files of at most
  16 MiB and receives a working tree of at most 64 MiB. Resuming from it rounds the weights to
  bfloat16 once (a relative change of at most 2⁻⁹, the rounding the shipped weights get anyway)
  and restarts the AdamW moments, so the learning rate ramps back up
  (:func:`models.evaluation.training.learning_rate`'s ``rewarm_from``).

Both refuse a checkpoint written for another model config. Every file is written atomically.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.common.files import atomic_write_bytes
from models.evaluation.harness_weights import (
    MAX_SHARD_BYTES,
    flatten_state,
    read_sharded,
    unflatten_into,
    weights_files,
    write_sharded,
)

if TYPE_CHECKING:  # annotations only
    from models.evaluation.small_dit import SmallDiTConfig
    from models.evaluation.training import TrainConfig

__all__ = [
    "CHECKPOINT",
    "COMPACT",
    "HISTORIES",
    "checkpoint_info",
    "compact_info",
    "load_checkpoint",
    "load_compact",
    "save_checkpoint",
    "save_compact",
]

#: The full checkpoint's file name in the run's output folder.
CHECKPOINT = "checkpoint.safetensors"
#: The compact checkpoint's file name (or the name of its shards) in its folder.
COMPACT = "compact.safetensors"
#: The histories a compact checkpoint carries: JSON lists of ``[step, loss]``.
HISTORIES = ("losses", "heldout")


def _opt_names(opt_state) -> list[str]:
    return ["opt" + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]]


def save_checkpoint(
    path: pathlib.Path, params, opt_state, step: int, config: SmallDiTConfig, cfg: TrainConfig,
    *, rewarm_from: int | None = None,
) -> None:  # fmt: skip
    """The full checkpoint: params (float32), the optimizer state and the step, atomically
    (:func:`models.common.files.atomic_write_bytes`)."""
    from safetensors.numpy import save

    tensors = flatten_state(nnx.to_pure_dict(params), "params.")
    leaves = jax.tree_util.tree_leaves(opt_state)
    tensors.update({name: np.asarray(leaf) for name, leaf in zip(_opt_names(opt_state), leaves)})
    tensors["step"] = np.asarray(step, np.int64)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {"config": config.to_json(), "train": cfg.to_json(), "step": str(step),
            "rewarm_from": "" if rewarm_from is None else str(rewarm_from)}  # fmt: skip
    atomic_write_bytes(path, save(tensors, metadata=meta))


def checkpoint_info(path: pathlib.Path) -> dict[str, str]:
    """A checkpoint file's metadata without reading its tensors: the full checkpoint's (step,
    configs, ``rewarm_from``) or a compact one's (:func:`compact_info`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def load_checkpoint(path: pathlib.Path, params, opt_state, config: SmallDiTConfig):
    """Restores ``(params, opt_state, step)`` into the given templates; checks the model config."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("config") != config.to_json():
        raise ValueError(f"checkpoint {str(path)!r} was trained with another model config; use another --out")
    pure = unflatten_into(nnx.to_pure_dict(params), {k: v for k, v in tensors.items() if k.startswith("params.")}, "params.")
    nnx.replace_by_pure_dict(params, pure)
    names = _opt_names(opt_state)
    leaves, treedef = jax.tree_util.tree_flatten(opt_state)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks optimizer tensors {missing[:3]}")
    opt_state = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(tensors[n], leaf.dtype).reshape(leaf.shape) for n, leaf in zip(names, leaves)]
    )
    return params, opt_state, int(np.asarray(tensors["step"]).reshape(-1)[0])


def save_compact(
    folder: pathlib.Path, params, step: int, config: SmallDiTConfig, cfg: TrainConfig, history: dict[str, list],
    *, dtype=jnp.bfloat16, max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict[str, str]:  # fmt: skip
    """The compact checkpoint in ``folder``: params in ``dtype`` (``compact.safetensors`` or its
    shards, with ``compact.safetensors.sha256``); the step, the configs and the histories
    (``losses``, ``heldout``: JSON lists of ``[step, loss]``) in the safetensors metadata, the one
    record of them. Returns ``{file name: SHA-256}``."""
    tensors = {k: np.asarray(jnp.asarray(v, dtype)) for k, v in flatten_state(nnx.to_pure_dict(params), "params.").items()}
    meta = {"config": config.to_json(), "train": cfg.to_json(), "step": str(step),
            **{key: json.dumps(history[key]) for key in HISTORIES}}  # fmt: skip
    return write_sharded(folder / COMPACT, tensors, meta, max_shard_bytes=max_shard_bytes)


def compact_info(folder: pathlib.Path | None) -> dict[str, str] | None:
    """The metadata of the compact checkpoint in ``folder`` (step, configs, histories), read from
    its first file's header without the tensors; ``None`` when ``folder`` holds none."""
    if folder is None or not any(folder.glob(f"{pathlib.Path(COMPACT).stem}*{pathlib.Path(COMPACT).suffix}")):
        return None
    return checkpoint_info(weights_files(folder / COMPACT)[0])


def load_compact(folder: pathlib.Path, params, config: SmallDiTConfig) -> tuple[Any, int, dict[str, list]]:
    """Restores the params (cast to the template's dtypes) of the compact checkpoint in
    ``folder``: ``(params, step, histories)``. Checks the files' SHA-256 and the model config."""
    tensors, meta = read_sharded(folder / COMPACT, verify=True)
    if meta.get("config") != config.to_json():
        raise ValueError(f"compact checkpoint in {str(folder)!r} was trained with another model config")
    missing = [key for key in ("step", *HISTORIES) if key not in meta]
    if missing:
        raise ValueError(f"compact checkpoint in {str(folder)!r} has no {missing[0]!r} in its metadata "
                         "(written by an older train_small; resume with --fresh)")  # fmt: skip
    pure = unflatten_into(nnx.to_pure_dict(params), tensors, "params.")
    nnx.replace_by_pure_dict(params, pure)
    history = {key: [tuple(x) for x in json.loads(meta[key])] for key in HISTORIES}
    return params, int(meta["step"]), history
