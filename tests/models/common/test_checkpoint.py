"""Reading diffusers-format transformer checkpoints (:mod:`models.common.checkpoint`, through
:func:`models.wan.loading.load_wan`) when their files are damaged or malformed:

* an integer or bool tensor in a shard is rejected (from the headers, before any shard is read),
  not cast to float;
* a non-float ``dtype`` / ``param_dtype`` is rejected before anything is read;
* a truncated or corrupt shard raises a ``ValueError`` naming the file (and the tensor);
* a fractional or otherwise non-integer integer field of ``config.json`` is rejected, and the
  types of its float and flag fields are checked;
* the safetensors minimum version in ``pyproject.toml`` has the APIs the code uses.

Checkpoints are damaged copies of the tiny fixture ``tests/fixtures/wan_tiny``; everything runs
on CPU in a few seconds.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from safetensors.numpy import load_file, save_file

from models.wan.loading import INDEX_NAME, checkpoint_shards, load_wan, read_wan_config
from helpers import ROOT, watch_tensor_reads

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


# ================================================================ integer / bool tensors


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


# ================================================================ load dtypes


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


# ================================================================ truncated / corrupt shards


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

    def fail_on_one_tensor(key):
        if key == bad:
            raise safetensors.SafetensorError("simulated: data region unreadable")

    watch_tensor_reads(monkeypatch, fail_on_one_tensor)
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        load_wan(FIXTURE, dtype=jnp.float32)
    msg = str(err.value)
    assert SHARDS[1] in msg and repr(bad) in msg, msg


# ================================================================ config.json fields


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


# ================================================================ safetensors minimum version


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
