"""Writing files atomically, and the path checks that the file readers and the command lines share.

Every file the project writes goes through one atomic write (:func:`atomic_write`, with
:func:`atomic_write_bytes` and :func:`atomic_write_text` on top): the content goes to a temporary
file in the destination's folder, is flushed to disk (``fsync``), then renamed over the
destination with ``os.replace``. A crash or a kill during the write therefore leaves either the
old file or the new one, never a truncated mix, and no temporary file is left behind by an
error.

Path checks, each raising a one-line ``ValueError``:

* :func:`check_writable`: the cheap up-front check a command line runs before hours of sampling
  (can :func:`atomic_write` later write this path?);
* :func:`component_folder`: where a diffusers component (``vae``, ...) keeps its ``config.json``:
  in its subfolder of a checkpoint root, or in the folder given.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
import tempfile
from typing import Iterator

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "component_folder",
]

_TMP_TAG = ".tmp-"


def _default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` would give a new file
    (``mkstemp`` creates ``0o600``)."""
    try:  # Linux: read the umask without changing it (os.umask is process-wide and racy)
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms / file systems cannot open a folder: best effort
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _tmp_prefix(target: pathlib.Path) -> str:
    """Hidden temporary-file prefix next to ``target`` (name shortened to stay under NAME_MAX)."""
    return f".{target.name[:120]}{_TMP_TAG}"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Context manager for writing ``path`` atomically: yields a temporary path to write to.

    The temporary file lives in ``path``'s folder (created with its parents when missing), is
    hidden (``.<name>.tmp-XXXX<suffix>``) and keeps ``path``'s suffix, so writers that pick the
    format from the extension (Pillow, matplotlib, imageio) work unchanged. It exists (empty)
    when the block starts; the writer may overwrite it. When the block exits normally the file
    is fsynced and renamed over ``path`` with ``os.replace`` (then the folder is fsynced); when
    the block raises, the temporary file is removed and ``path`` is left untouched.

    Example::

        with atomic_write("out/samples.gif") as tmp:
            frames[0].save(tmp, save_all=True, append_images=frames[1:])

    A symbolic link at ``path`` is replaced by the new file (the link target is not written).
    """
    target = pathlib.Path(path)
    if not target.name or target.name in (".", ".."):
        raise ValueError(f"cannot write {str(path)!r}: it names no file")
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:  # an overwrite keeps the old file's permissions; a new file gets open()'s default
        mode = stat.S_IMODE(os.stat(target).st_mode) if target.is_file() else _default_file_mode()
    except OSError:
        mode = _default_file_mode()
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=target.suffix[:32], dir=folder)
    tmp = pathlib.Path(name)
    try:
        os.close(fd)
        os.chmod(tmp, mode)
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_path(folder, directory=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return pathlib.Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> pathlib.Path:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_write`); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def check_writable(path: str | os.PathLike) -> None:
    """Checks, cheaply and before any work, that :func:`atomic_write` can later write ``path``.

    ``path`` may not exist yet, nor its folders (they would be created): the nearest existing
    ancestor must then be a writable folder. Nothing is created or left behind (a probe file
    is made in the nearest existing folder and removed at once).

    Raises:
      ValueError: with a one-line message when ``path`` is empty or names a folder, when a
        parent is not a folder (e.g. a regular file), or when the folder is not writable.
    """
    if not str(path).strip():
        raise ValueError("output path is empty")
    target = pathlib.Path(path).expanduser()
    if not target.name or target.name in (".", ".."):
        raise ValueError(f"output path {str(path)!r} names no file")
    if target.is_dir():
        raise ValueError(f"output path {str(path)!r} is a folder, not a file")
    if target.exists() and not target.is_file():
        raise ValueError(f"output path {str(path)!r} exists and is not a regular file")
    existing = target.parent
    while not existing.exists():
        if existing.is_symlink():
            raise ValueError(f"cannot write {str(path)!r}: its parent {str(existing)!r} is a broken symbolic link")
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: its parent {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {str(path)!r}: folder {str(existing)!r} is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=_tmp_prefix(target) + "probe-", dir=existing)
    except OSError as err:
        raise ValueError(f"cannot write {str(path)!r}: folder {str(existing)!r} is not writable ({err.strerror})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def component_folder(path: str | os.PathLike, subfolder: str, what: str) -> tuple[pathlib.Path, str | None]:
    """Where a diffusers component's ``config.json`` is, as ``from_pretrained`` takes it:
    ``(path, subfolder)`` when ``path/<subfolder>/config.json`` exists (a checkpoint root), else
    ``(path, None)`` when ``path/config.json`` exists (the component's own folder).

    Args:
      path: a checkpoint root or the component's folder.
      subfolder: the component's folder in a checkpoint root (``"vae"``).
      what: the component's name in the message (``"VAE"``).

    Raises:
      ValueError: ``"'<path>' holds no diffusers <what> (no config.json in it or in its
        <subfolder>/ folder)"`` when neither exists.
    """
    root = pathlib.Path(path)
    if (root / subfolder / "config.json").is_file():
        return root, subfolder
    if (root / "config.json").is_file():
        return root, None
    raise ValueError(
        f"{str(root)!r} holds no diffusers {what} (no config.json in it or in its {subfolder}/ folder)"
    )
