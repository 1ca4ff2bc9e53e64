"""Hardening of the files the project reads and writes (the hardening issue's file findings).

Each test is named after its finding:

1. an integer or bool tensor in a checkpoint shard is rejected, not cast to float;
2. a non-float ``dtype`` / ``param_dtype`` for ``load_wan`` is rejected before anything is read;
3. a truncated or corrupt shard raises a ``ValueError`` naming the file (and the tensor);
4. a fractional (or otherwise non-integer) integer field of ``config.json`` is rejected;
5. every file is written through the one atomic write of ``models.io`` (a failure during the
   write keeps the old file and leaves no temporary file; missing folders are created);
6. the safetensors minimum version in ``pyproject.toml`` has the APIs the code uses;
plus ``models.io.check_writable``, the CLI's up-front output check.

Checkpoints are damaged copies of the tiny fixture ``tests/fixtures/wan_tiny``; everything runs
on CPU in a few seconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx
from safetensors.numpy import load_file, save_file

from models.evaluation import results
from models.evaluation import small_dit as pretrained
from models.io import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    load_latents,
    load_prompt_embeds,
    save_latents,
    save_prompt_embeds,
)
from models.wan.loading import INDEX_NAME, checkpoint_shards, load_wan, read_wan_config
from models.wan.transformer import WanTransformer3DModel
from helpers import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "wan_tiny"
SHARDS = json.loads((FIXTURE / "metadata.json").read_text())["shards"]


def _copy_fixture(tmp_path: pathlib.Path) -> pathlib.Path:
    """The tiny checkpoint copied into ``tmp_path/ckpt`` (the root holding ``transformer/``)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "transformer", dst / "transformer")
    return dst


def _retype(tmp_path: pathlib.Path, name: str, new_dtype) -> tuple[pathlib.Path, str]:
    """A checkpoint copy with tensor ``name`` stored as ``new_dtype`` (same shape); returns
    ``(root, shard file name)``."""
    root = _copy_fixture(tmp_path)
    folder = root / "transformer"
    index = json.loads((folder / INDEX_NAME).read_text())
    shard = index["weight_map"][name]
    tensors = load_file(folder / shard)
    tensors[name] = (tensors[name] + 46).astype(new_dtype)
    save_file(tensors, folder / shard)
    return root, shard


def _listing(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ================================================================ 1. integer / bool tensors


@pytest.mark.parametrize(
    "name, dtype, label",
    [
        ("blocks.0.attn1.to_q.bias", np.int32, "int32"),  # shard 1
        ("blocks.1.norm2.weight", np.bool_, "bool"),  # shard 2
    ],
)
def test_int_or_bool_tensor_in_shard_is_rejected_not_cast(tmp_path, name, dtype, label):
    root, shard = _retype(tmp_path, name, dtype)
    read = []
    with pytest.raises(ValueError, match="not floating point") as err:
        load_wan(root, dtype=jnp.float32, progress=read.append)
    msg = str(err.value)
    assert repr(name) in msg and shard in msg and label in msg, msg
    assert read == [], "the dtype check must come from the headers, before any shard is read"


# ================================================================ 2. non-float load dtype


@pytest.mark.parametrize("kwargs", [
    {"dtype": "int32"},
    {"dtype": jnp.int8},
    {"dtype": "bool"},
    {"dtype": "not-a-dtype"},
    {"dtype": jnp.float32, "param_dtype": "int32"},
    {"dtype": "float64"} if not jax.config.jax_enable_x64 else {"dtype": "complex64"},
])  # fmt: skip
def test_non_float_load_dtype_is_rejected_before_reading(tmp_path, kwargs):
    name = "param_dtype" if "param_dtype" in kwargs else "dtype"
    # A path that does not exist: the dtype error must come first, before any file is touched.
    with pytest.raises(ValueError, match=rf"^{name} must be a floating-point dtype") as err:
        load_wan(tmp_path / "nowhere", **kwargs)
    msg = str(err.value)
    assert "'float32'" in msg and "'bfloat16'" in msg and "'float16'" in msg, msg


def test_float_load_dtypes_still_accepted():
    m = load_wan(FIXTURE, dtype="float16", param_dtype="float32")
    assert m.blocks[0].attn1.to_q.kernel.get_value().dtype == jnp.float32
    m = load_wan(FIXTURE, dtype=jnp.bfloat16)
    assert m.blocks[0].attn1.to_q.kernel.get_value().dtype == jnp.bfloat16


# ================================================================ 3. truncated / corrupt shard


def _truncate(data: bytes) -> bytes:
    return data[:-100]


def _garble_header(data: bytes) -> bytes:
    return data[:8] + b"#" + data[9:]  # the JSON header no longer parses


def _header_too_small(data: bytes) -> bytes:
    return data[:5]


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _header_too_small], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("shard", SHARDS)
def test_truncated_or_corrupt_shard_names_the_file(tmp_path, damage, shard):
    root = _copy_fixture(tmp_path)
    file = root / "transformer" / shard
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        load_wan(root, dtype=jnp.float32)
    assert shard in str(err.value)
    assert type(err.value) is ValueError
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        checkpoint_shards(root)
    assert shard in str(err.value)


def test_corrupt_shard_read_names_file_and_tensor(tmp_path, monkeypatch):
    """A safetensors error while reading one tensor's data names the shard and the tensor."""
    bad = "blocks.1.ffn.net.2.weight"
    real_open = safetensors.safe_open

    class FailsOnOneTensor:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_slice(self, key):
            return self._f.get_slice(key)

        def get_tensor(self, key):
            if key == bad:
                raise safetensors.SafetensorError("simulated: data region unreadable")
            return self._f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", FailsOnOneTensor)
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        load_wan(FIXTURE, dtype=jnp.float32)
    msg = str(err.value)
    assert SHARDS[1] in msg and repr(bad) in msg, msg


# ================================================================ 4. non-integer config fields


def _config_with(tmp_path: pathlib.Path, **changes) -> pathlib.Path:
    raw = json.loads((FIXTURE / "transformer" / "config.json").read_text())
    raw.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_layers", 2.5),
        ("attention_head_dim", 32.5),
        ("num_attention_heads", 2.0001),
        ("ffn_dim", "96"),
        ("in_channels", True),
        ("text_dim", None),
        ("freq_dim", 31.9),
        ("rope_max_seq_len", 1024.5),
        ("patch_size", [1, 2.5, 2]),
    ],
)
def test_fractional_or_non_integer_config_field_is_rejected(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"{key} must be an integer") as err:
        read_wan_config(_config_with(tmp_path, **{key: value}))
    bad = value[1] if isinstance(value, list) else value
    assert str(err.value).endswith(f"got {bad!r}"), str(err.value)


def test_whole_number_floats_in_config_are_accepted(tmp_path):
    cfg = read_wan_config(_config_with(tmp_path, num_layers=2.0, attention_head_dim=32.0, patch_size=[1.0, 2, 2]))
    assert cfg == read_wan_config(FIXTURE).replace(name=cfg.name)
    assert type(cfg.num_layers) is int and type(cfg.patch_size[1]) is int


@pytest.mark.parametrize("change, match", [({"eps": "1e-6"}, "eps"), ({"cross_attn_norm": "false"}, "cross_attn_norm")])
def test_config_eps_and_flag_types_are_checked(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        read_wan_config(_config_with(tmp_path, **change))


# ================================================================ 5. one atomic write


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
        lambda p, s: pretrained.save_small_video_dit(p, *_small_dit(s), dtype=jnp.float32, metadata={"seed": str(s)}),
        lambda p: (pretrained.verify_checksum(p), pretrained._read(p, True)[2]["seed"])[1],
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


def test_train_small_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    from benchmarks import train_small

    config = pretrained.SMOKE_DIT_CONFIG
    cfg = train_small.TrainConfig(stages=(train_small.Stage(4, 1, 4, 16, 16),))
    abstract = nnx.eval_shape(lambda: train_small.SmallDiT(config, rngs=nnx.Rngs(0), dtype=jnp.float32))
    _, params_shape = nnx.split(abstract, nnx.Param)
    tx = train_small.make_optimizer(cfg)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    rng = np.random.default_rng(0)
    fill = lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype))  # noqa: E731
    params, opt_state = jax.tree.map(fill, params_shape), jax.tree.map(fill, opt_shape)
    path = tmp_path / "run" / "checkpoint.safetensors"
    train_small.save_checkpoint(path, params, opt_state, 3, config, cfg)
    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("simulated")))
        with pytest.raises(OSError, match="simulated"):
            train_small.save_checkpoint(path, params, opt_state, 4, config, cfg)
    assert path.read_bytes() == before and _listing(path.parent) == ["checkpoint.safetensors"]
    assert train_small.load_checkpoint(path, params_shape, opt_shape, config)[2] == 3


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


# ================================================================ 6. safetensors minimum version


def test_safetensors_minimum_version_has_the_apis_used():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.replace(" ", "").startswith("safetensors")]
    minimum = pin.replace(" ", "").split(">=")[1].split(",")[0]
    as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:3])  # noqa: E731
    # safe_open(...).get_tensor on BF16 tensors with framework="flax"/"numpy" needs >= 0.4.1.
    assert as_tuple(minimum) >= (0, 4, 1), pin
    assert as_tuple(safetensors.__version__) >= as_tuple(minimum)
    assert callable(safetensors.numpy.save) and callable(safetensors.safe_open)
    assert issubclass(safetensors.SafetensorError, Exception)


# ================================================================ check_writable (for the CLI)


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
