"""Writing files: every writer of the project goes through the one atomic write of
:mod:`models.common.files`, and :func:`~models.common.files.check_writable` checks an output path
before any work.

* every writer (latents, prompt embeddings, JSON reports, small-DiT weights, GIFs, training
  checkpoints): a failure in the serializer, in ``fsync`` or in ``os.replace`` keeps the old
  file and leaves no temporary file; missing parent folders are created;
* :func:`~models.common.files.atomic_write` keeps the destination's suffix and the file mode, and
  an error in its body leaves nothing behind;
* :func:`~models.common.files.check_writable` accepts new paths (folders to be created) and
  rejects bad ones with one line, leaving nothing behind;
* :func:`~models.common.files.component_folder` finds a diffusers component in its checkpoint
  subfolder or in the folder given, else says so in one line.

Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

from models.common.files import atomic_write, atomic_write_bytes, atomic_write_text, check_writable, component_folder
from models.evaluation import harness_weights, results, training, training_checkpoints
from models.evaluation import small_dit as pretrained
from models.io import load_latents, load_prompt_embeds, save_latents, save_prompt_embeds
from models.wan.transformer import WanTransformer3DModel


def _listing(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ================================================================ one atomic write for every writer


def _latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 2, 3, 5)).astype(np.float32)


def _small_dit(seed: int):
    config = pretrained.SMOKE_DIT_CONFIG
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(
        lambda: WanTransformer3DModel(config.wan, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    )
    cond = nnx.eval_shape(lambda: pretrained.ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(0)))
    for module in (model, cond):
        state = nnx.state(module, nnx.Param)
        nnx.update(module, jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), state))
    return model, cond, config


def _write_gif(path, seed):
    from PIL import Image

    frames = np.random.default_rng(seed).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    with atomic_write(path) as tmp:
        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=50, loop=0)


# Every writer of the project: (name, write(path, seed), the file(s) it writes, read(path)).
WRITERS = {
    "latents": (
        lambda p, s: save_latents(p, _latents(s), {"seed": s}),
        lambda p: load_latents(p)[1]["seed"],
    ),
    "prompt_embeds": (
        lambda p, s: save_prompt_embeds(p, np.full((3, 8), s, np.float32)),
        lambda p: float(load_prompt_embeds(p, require_uncond=False)[0][0, 0, 0]),
    ),
    "json_report": (
        lambda p, s: results.write_json(p, {"seed": s}),
        lambda p: json.loads(p.read_text())["seed"],
    ),
    "small_dit": (
        lambda p, s: harness_weights.save_small_video_dit(p, *_small_dit(s), dtype=jnp.float32, metadata={"seed": str(s)}),
        lambda p: (harness_weights.verify_checksum(p), pretrained._read(p, True)[2]["seed"])[1],
    ),
    "gif": (_write_gif, lambda p: p.read_bytes()),
}
SUFFIX = {"json_report": ".json", "gif": ".gif"}


def _file(tmp_path, kind):
    return tmp_path / f"out{SUFFIX.get(kind, '.safetensors')}"


def _failing(monkeypatch, how: str, kind: str):
    """Makes the next write fail: in the serializer (which may have written part of its file),
    while fsyncing, or in os.replace."""

    def boom(*args, **kwargs):
        raise OSError(28, "simulated: no space left on device")

    def partial_then_boom(tensors, filename, *args, **kwargs):  # a writer killed half-way
        pathlib.Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
        boom()

    if how == "serializer":
        monkeypatch.setattr(safetensors.numpy, "save", boom)
        monkeypatch.setattr(safetensors.numpy, "save_file", partial_then_boom)
        if kind == "json_report":
            monkeypatch.setattr(json, "dumps", boom)
    elif how == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)


@pytest.mark.parametrize("how", ["serializer", "fsync", "replace"])
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_writer_is_atomic_old_file_intact_no_temp_left(tmp_path, monkeypatch, kind, how):
    write, read = WRITERS[kind]
    path = _file(tmp_path, kind)
    write(path, 1)
    before = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}
    old = read(path)
    with monkeypatch.context() as m:
        if how == "serializer" and kind == "gif":
            # Pillow fails half-way through writing the frames into the temporary file.
            from PIL import Image

            def half_then_fail(self, fp, *args, **kwargs):
                pathlib.Path(fp).write_bytes(b"GIF89a partial")
                raise OSError(28, "simulated: no space left on device")

            m.setattr(Image.Image, "save", half_then_fail)
        else:
            _failing(m, how, kind)
        with pytest.raises(OSError, match="simulated"):
            write(path, 2)
    after = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}
    assert after == before, "the old file(s) changed or a temporary file was left behind"
    assert read(path) == old
    write(path, 3)  # and the writer still works afterwards
    assert read(path) != old


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_writer_creates_missing_parent_folders(tmp_path, kind):
    write, read = WRITERS[kind]
    path = tmp_path / "a" / "b" / _file(tmp_path, kind).name
    write(path, 5)
    assert read(path) is not None
    expected = {path.name} | ({path.name + ".sha256"} if kind == "small_dit" else set())
    assert set(_listing(path.parent)) == expected


def test_training_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    config = pretrained.SMOKE_DIT_CONFIG
    cfg = training.TrainConfig(stages=(training.Stage(4, 1, 4, 16, 16),))
    abstract = nnx.eval_shape(lambda: training.SmallDiT(config, rngs=nnx.Rngs(0), dtype=jnp.float32))
    _, params_shape = nnx.split(abstract, nnx.Param)
    tx = training.make_optimizer(cfg)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    rng = np.random.default_rng(0)
    fill = lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype))  # noqa: E731
    params, opt_state = jax.tree.map(fill, params_shape), jax.tree.map(fill, opt_shape)
    path = tmp_path / "run" / "checkpoint.safetensors"
    training_checkpoints.save_checkpoint(path, params, opt_state, 3, config, cfg)
    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("simulated")))
        with pytest.raises(OSError, match="simulated"):
            training_checkpoints.save_checkpoint(path, params, opt_state, 4, config, cfg)
    assert path.read_bytes() == before and _listing(path.parent) == ["checkpoint.safetensors"]
    assert training_checkpoints.load_checkpoint(path, params_shape, opt_shape, config)[2] == 3


def test_atomic_write_keeps_suffix_and_file_mode(tmp_path):
    """Writers that choose the format from the extension (Pillow, matplotlib, imageio) get it;
    a new file has open()'s mode, an overwrite keeps the old file's mode."""
    target = tmp_path / "clip.gif"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".gif" and tmp.name.startswith(".clip.gif")
        assert tmp.exists() and not target.exists()
    mask = os.umask(0o022)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~mask
    target.chmod(0o640)
    atomic_write_text(target, "again")
    assert (target.stat().st_mode & 0o777) == 0o640 and target.read_text() == "again"
    assert atomic_write_bytes(tmp_path / "x" / "y.bin", b"\x00\x01") == tmp_path / "x" / "y.bin"
    assert (tmp_path / "x" / "y.bin").read_bytes() == b"\x00\x01"


def test_atomic_write_error_in_body_leaves_nothing(tmp_path):
    target = tmp_path / "new.safetensors"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert _listing(tmp_path) == []


# ================================================================ check_writable (the command line's output check)


def test_check_writable_accepts_new_paths_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "lat.safetensors")
    check_writable(tmp_path / "new" / "deeper" / "lat.safetensors")  # folders would be created
    (tmp_path / "old.safetensors").write_bytes(b"x")
    check_writable(tmp_path / "old.safetensors")
    assert _listing(tmp_path) == ["old.safetensors"]


def test_check_writable_rejects_bad_paths_with_one_line(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = {
        tmp_path / "file.txt" / "lat.safetensors": "is a file, not a folder",
        tmp_path / "file.txt" / "sub" / "lat.safetensors": "is a file, not a folder",
        tmp_path / "folder": "is a folder",
        "": "empty",
    }
    for path, match in cases.items():
        with pytest.raises(ValueError, match=match) as err:
            check_writable(path)
        assert "\n" not in str(err.value)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes anywhere: stand in for a read-only folder
            monkeypatch.setattr(os, "access", lambda *a, **k: False)
        with pytest.raises(ValueError, match="not writable") as err:
            check_writable(locked / "sub" / "lat.safetensors")
        assert "\n" not in str(err.value) and str(locked) in str(err.value)
    finally:
        locked.chmod(0o700)
    assert _listing(tmp_path) == ["file.txt", "folder", "locked"] and _listing(locked) == []


# ================================================================ component_folder (a diffusers component's folder)


def test_component_folder_finds_the_checkpoint_subfolder_or_the_folder_itself(tmp_path):
    root = tmp_path / "ckpt"
    (root / "vae").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no diffusers VAE \(no config.json in it or in its vae/ folder\)") as err:
        component_folder(root, "vae", "VAE")
    assert "\n" not in str(err.value) and str(root) in str(err.value)
    (root / "vae" / "config.json").write_text("{}")
    assert component_folder(root, "vae", "VAE") == (root, "vae")  # a checkpoint root
    assert component_folder(root / "vae", "vae", "VAE") == (root / "vae", None)  # the component's folder
