"""Helpers shared by the tests (``from helpers import rel_l2``; ``pythonpath`` in pyproject.toml puts
``tests/`` on sys.path for every test folder).

One helper per concept: a test file that needs one of these imports it from here instead of
keeping a private copy.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from collections.abc import Callable

import numpy as np

__all__ = [
    "FIXTURES",
    "ROOT",
    "modified_checkpoint_copy",
    "watch_tensor_reads",
    "numpy_block_scores",
    "numpy_tile_probs",
    "rel_l2",
    "assert_rel_l2",
    "assemble_wan22_repository",
]

#: The repository root and the folder of the committed fixtures.
ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def rel_l2(a, b) -> float:
    """Relative L2 error ``||a - b|| / ||b||`` of ``a`` against the reference ``b``, in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))



def assert_rel_l2(got, want, rtol: float, what: str = "") -> None:
    """Asserts ``got`` has ``want``'s shape, only finite values, and :func:`rel_l2` at most
    ``rtol`` against it (``what`` names the compared quantity in the message)."""
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.all(np.isfinite(np.asarray(got, np.float32))), f"{what}: non-finite values"
    err = rel_l2(got, want)
    assert err <= rtol, f"{what}: relative L2 {err:.2e} > {rtol:.1e}"


def assemble_wan22_repository(
    folder: pathlib.Path, base: pathlib.Path, extra: pathlib.Path, experts: tuple[str, ...] = ("transformer_2",)
) -> pathlib.Path:
    """A whole tiny Wan2.2 diffusers repository at ``folder``: a copy of the Wan2.1 pipeline
    fixture ``base`` with the ``experts`` subfolders of ``extra`` (replacing ``base``'s where it has
    them) and ``extra``'s ``model_index.json``. The Wan2.2 fixtures store only what differs from
    the Wan2.1 one; their scripts and tests assemble the repository with this."""
    shutil.copytree(base, folder)
    for name in experts:
        if (folder / name).exists():
            shutil.rmtree(folder / name)
        shutil.copytree(extra / name, folder / name)
    shutil.copy(extra / "model_index.json", folder / "model_index.json")
    return folder


def modified_checkpoint_copy(
    src: pathlib.Path,
    root: pathlib.Path,
    edit: Callable[[str, np.ndarray], dict[str, np.ndarray]],
    *,
    subfolder: str = "transformer",
    index_name: str | None = None,
) -> pathlib.Path:
    """A copy of the sharded checkpoint folder ``src`` at ``root/<subfolder>`` with
    ``edit(name, array) -> {name: array}`` applied to every tensor (rename, drop, reshape), the
    shards and the index rewritten consistently; returns ``root``. ``index_name``: the index
    file's name (default diffusers' ``diffusion_pytorch_model.safetensors.index.json``;
    a transformers folder has ``model.safetensors.index.json``)."""
    from safetensors.numpy import load_file, save_file

    from models.common.checkpoint import INDEX_NAME, checkpoint_shards

    index_name = INDEX_NAME if index_name is None else index_name
    dst = root / subfolder
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    weight_map = {}
    for file in checkpoint_shards(src, index_name=index_name):
        tensors = {}
        for name, arr in load_file(file).items():
            tensors.update(edit(name, arr))
        save_file(tensors, dst / file.name)
        weight_map.update({k: file.name for k in tensors})
    (dst / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root
def numpy_tile_probs(q, k, tile, kv_lengths=None):
    """float64 brute force: A[b, n, i, j] over the valid tiles, token by token, sample by sample.

    With ``kv_lengths``, key tile ``j`` of sample ``b`` averages its keys before
    ``kv_lengths[b]``; a key tile with none is left out of the softmax (probability 0); a sample
    with no valid key tile gets zero rows.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    batch, length, heads, dim = q.shape
    lengths = [length] * batch if kv_lengths is None else [int(x) for x in np.asarray(kv_lengths)]
    num_tiles = math.ceil(length / tile)
    probs = np.zeros((batch, heads, num_tiles, num_tiles))
    for b in range(batch):
        qbar = np.stack([q[b, i * tile : min((i + 1) * tile, length)].mean(axis=0) for i in range(num_tiles)])
        valid = [j for j in range(num_tiles) if j * tile < lengths[b]]
        if not valid:
            continue
        kbar = np.stack([k[b, j * tile : min((j + 1) * tile, lengths[b])].mean(axis=0) for j in valid])
        logits = np.einsum("ind,jnd->nij", qbar, kbar) / math.sqrt(dim)
        logits -= logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        probs[b][:, :, valid] = e / e.sum(axis=-1, keepdims=True)
    return probs


def numpy_block_scores(q, k, tile, block, kv_lengths=None):
    probs = numpy_tile_probs(q, k, tile, kv_lengths)
    batch, heads, num_tiles, _ = probs.shape
    nb = math.ceil(q.shape[1] / block)
    per = block // tile
    out = np.zeros((batch, heads, nb, nb))
    for u in range(nb):
        for v in range(nb):
            out[:, :, u, v] = probs[:, :, u * per : (u + 1) * per, v * per : (v + 1) * per].sum(axis=(2, 3))
    return out


def watch_tensor_reads(monkeypatch, on_read: Callable[[str], None]) -> None:
    """Routes every ``get_tensor`` of a safetensors file opened through ``safetensors.safe_open``
    (the checkpoint reader's way in) to ``on_read(name)`` first, which may record it or raise."""
    import safetensors

    real_open = safetensors.safe_open

    class Watched:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def get_tensor(self, key):
            on_read(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Watched)

