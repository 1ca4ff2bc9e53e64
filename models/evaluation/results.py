"""Results files: the device's name and file slug, and JSON that carries no machine paths.

Every benchmark and evaluation names its results after the card with :func:`device_slug`
(``"NVIDIA H200"`` → ``"nvidia_h200"``, CPU → ``"cpu"``) and writes them with
:func:`write_json`, which turns every path under the repository into a repository-relative
one and any other absolute path into its file name. What a bench's file says about its run
(device, versions, date, command line) is ``benchmarks.harness.run_record``'s.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax

from models.common.files import atomic_write_text

__all__ = ["REPO_ROOT", "device_name", "device_slug", "portable", "write_json"]

#: The repository root (the folder holding ``models/``), for repository-relative paths.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def device_name() -> str:
    """The first JAX device's kind, e.g. ``"NVIDIA H200"``, or ``"cpu"``."""
    dev = jax.devices()[0]
    return dev.device_kind if dev.platform != "cpu" else "cpu"


def device_slug(device_kind: str | None = None) -> str:
    """A file-name slug of the device: ``"NVIDIA H100 80GB HBM3"`` → ``"nvidia_h100"``,
    ``"NVIDIA H200"`` → ``"nvidia_h200"``, CPU → ``"cpu"``."""
    kind = device_name() if device_kind is None else device_kind
    words = [w for w in "".join(c if c.isalnum() else " " for c in kind.lower()).split() if w]
    if not words:
        return "unknown"
    if words[0] == "nvidia" and len(words) > 1:
        return "_".join(words[:2])
    return words[0]


def portable(value: Any) -> Any:
    """``value`` with every path (``os.PathLike``, or a string naming an absolute path) made
    relative to the repository, recursively through dicts, lists and tuples; a path outside the
    repository keeps only its file name (results never carry machine paths)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.isabs(value)):
        path = pathlib.Path(value).resolve()
        try:
            return path.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return path.name
    return value


def _plain(value: Any) -> Any:
    """JSON for NumPy scalars and arrays (their Python values), anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(path: str | os.PathLike, data: Any) -> pathlib.Path:
    """Writes ``data`` as indented JSON (paths made portable), creating parent folders.

    The text is built first and written atomically
    (:func:`models.common.files.atomic_write_text`): an error or a kill leaves any previous file
    at ``path`` intact.
    """
    text = json.dumps(portable(data), indent=2, default=_plain) + "\n"
    return atomic_write_text(path, text)
