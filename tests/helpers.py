"""Helpers shared by the tests (``from helpers import rel_l2``; pytest puts ``tests/`` on sys.path).

One helper per concept: a test file that needs one of these imports it from here instead of
keeping a private copy.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["modified_checkpoint_copy", "poisoned", "rel_l2"]


def rel_l2(a, b) -> float:
    """Relative L2 error ``||a - b|| / ||b||`` of ``a`` against the reference ``b``, in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def poisoned(like) -> jax.Array:
    """An all-NaN array of the shape and dtype of ``like``: as a kernel's initial output, any
    element the kernel fails to write stays NaN."""
    return jnp.full(like.shape, jnp.nan, like.dtype)


def modified_checkpoint_copy(
    src: pathlib.Path, root: pathlib.Path, edit: Callable[[str, np.ndarray], dict[str, np.ndarray]]
) -> pathlib.Path:
    """A copy of the diffusers transformer folder ``src`` at ``root/transformer`` with
    ``edit(name, array) -> {name: array}`` applied to every tensor (rename, drop, reshape), the
    shards and the index rewritten consistently; returns ``root``."""
    from safetensors.numpy import load_file, save_file

    from models.common.checkpoint import INDEX_NAME, checkpoint_shards

    dst = root / "transformer"
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    weight_map = {}
    for file in checkpoint_shards(src):
        tensors = {}
        for name, arr in load_file(file).items():
            tensors.update(edit(name, arr))
        save_file(tensors, dst / file.name)
        weight_map.update({k: file.name for k in tensors})
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root
