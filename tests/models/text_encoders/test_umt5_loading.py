"""Loading a diffusers ``text_encoder/`` folder (models.text_encoders.umt5_loading).

Every checkpoint problem must be named before any tensor is read: the ``progress`` callback,
called before each shard is read, is never called when the load fails on names, shapes or the
config. Damaged checkpoints are copies of ``tests/fixtures/umt5_tiny`` (see
``tests/fixtures/make_umt5_fixture.py``).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from helpers import FIXTURES, modified_checkpoint_copy, rel_l2

from models.common.checkpoint import checkpoint_shards, diffusers_name, expected_tensors
from models.text_encoders.umt5 import CONFIGS
from models.text_encoders.umt5_loading import (
    INDEX_NAME,
    SINGLE_FILE_NAME,
    load_umt5,
    read_umt5_config,
    text_encoder_dir,
)

FIXTURE = FIXTURES / "umt5_tiny"
META = json.loads((FIXTURE / "metadata.json").read_text())
SOURCE = FIXTURE / "text_encoder"


@pytest.fixture(scope="module")
def model():
    return load_umt5(FIXTURE, dtype=jnp.float32)


@pytest.fixture(scope="module")
def stored() -> dict[str, np.ndarray]:
    out = {}
    for file in checkpoint_shards(SOURCE, index_name=INDEX_NAME):
        out.update(load_file(file))
    return out


def _modified_copy(tmp_path: pathlib.Path, edit) -> pathlib.Path:
    """The fixture's text_encoder/ copied to ``tmp_path/ckpt/text_encoder`` with ``edit(name,
    array) -> {name: array}`` applied to every tensor (shards and index rewritten)."""
    return modified_checkpoint_copy(SOURCE, tmp_path / "ckpt", edit, subfolder="text_encoder", index_name=INDEX_NAME)


def _fails_before_reading(path, match: str, **kwargs) -> str:
    """Loads ``path``, expecting a ValueError matching ``match`` raised before any shard is read."""
    read = []
    with pytest.raises(ValueError, match=match) as err:
        load_umt5(path, dtype=jnp.float32, progress=read.append, **kwargs)
    assert read == [], f"shards were read before the error: {read}"
    return str(err.value)


# ------------------------------------------------------------------ what a good folder gives


def test_every_tensor_mapped_from_both_shards(model, stored):
    read = []
    load_umt5(FIXTURE / "text_encoder", dtype=jnp.float32, progress=read.append)
    assert read == META["shards"]
    specs = expected_tensors(model)
    assert set(stored) == set(specs) == set(META["tensors"])
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = diffusers_name(path)
        want = stored[name] if specs[name].axes is None else np.transpose(stored[name], specs[name].axes)
        np.testing.assert_array_equal(np.asarray(var.get_value()), want, err_msg=name)


def test_config_from_transformers_json():
    cfg = read_umt5_config(FIXTURE)
    assert cfg == CONFIGS["tiny"]
    assert read_umt5_config(SOURCE / "config.json") == cfg
    assert text_encoder_dir(FIXTURE) == SOURCE and text_encoder_dir(SOURCE) == SOURCE


def test_umt5_xxl_config_json(tmp_path):
    """The text_encoder/config.json of the Wan2.1 diffusers checkpoints names the built-in config."""
    raw = json.loads((SOURCE / "config.json").read_text())
    raw.update(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
               num_decoder_layers=24, dropout_rate=0.1, dtype="bfloat16")  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_umt5_config(tmp_path) == CONFIGS["umt5-xxl"]
    raw["num_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = read_umt5_config(tmp_path)
    assert cfg.name == f"transformers:{tmp_path.name}" and cfg.num_layers == 2


def test_single_file_checkpoint(tmp_path, model, stored):
    """An unsharded ``model.safetensors`` loads the same."""
    dst = tmp_path / "text_encoder"
    dst.mkdir()
    shutil.copy(SOURCE / "config.json", dst / "config.json")
    save_file(stored, dst / SINGLE_FILE_NAME)
    m = load_umt5(tmp_path, dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(nnx.state(m)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("names", [("encoder.embed_tokens.weight",), ("shared.weight", "encoder.embed_tokens.weight")])
def test_embedding_under_its_tied_name(tmp_path, model, names):
    """``encoder.embed_tokens.weight`` instead of (or beside) ``shared.weight``."""
    path = _modified_copy(tmp_path, lambda k, a: {n: a for n in names} if k == "shared.weight" else {k: a})
    m = load_umt5(path, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(m.shared.weight.get_value()), np.asarray(model.shared.weight.get_value()))
    io = load_file(FIXTURE / "io.safetensors")
    assert rel_l2(m(io["b/input_ids"]), io["b/last_hidden_state"]) <= 1e-5


def test_bfloat16_parameters_are_cast_on_load():
    m = load_umt5(FIXTURE, dtype="bfloat16", param_dtype="float32")
    assert m.encoder.block[0].layer[0].SelfAttention.q.kernel.get_value().dtype == jnp.float32
    assert m.dtype == jnp.bfloat16
    m = load_umt5(FIXTURE, dtype="bfloat16")
    assert m.encoder.final_layer_norm.weight.get_value().dtype == jnp.bfloat16


# ------------------------------------------------------------------ errors, named before any read


def test_error_missing_tensor(tmp_path):
    gone = "encoder.block.2.layer.0.SelfAttention.relative_attention_bias.weight"
    path = _modified_copy(tmp_path, lambda k, a: {} if k == gone else {k: a})
    msg = _fails_before_reading(path, "missing tensors")
    assert repr(gone) in msg and "unexpected" not in msg and "UMT5 text encoder" in msg


def test_error_missing_embedding_under_both_names(tmp_path):
    path = _modified_copy(tmp_path, lambda k, a: {} if k == "shared.weight" else {k: a})
    assert "'shared.weight'" in _fails_before_reading(path, "missing tensors")


def test_error_renamed_tensor(tmp_path):
    old, new = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight", "encoder.block.1.layer.1.DenseReluDense.wi.weight"
    path = _modified_copy(tmp_path, lambda k, a: {new if k == old else k: a})
    msg = _fails_before_reading(path, "missing tensors")
    assert repr(old) in msg and "unexpected tensors" in msg and repr(new) in msg


def test_error_misshaped_tensor(tmp_path):
    bad = "encoder.block.0.layer.1.DenseReluDense.wo.weight"  # [d_model, d_ff] stored as [d_ff, d_model]
    path = _modified_copy(tmp_path, lambda k, a: {k: np.ascontiguousarray(a.T) if k == bad else a})
    msg = _fails_before_reading(path, "mis-shaped tensors")
    assert repr(bad) in msg and "[96, 64]" in msg and "expected [64, 96]" in msg


def test_error_tied_names_with_different_shapes(tmp_path):
    def edit(k, a):
        return {k: a, "encoder.embed_tokens.weight": a[:-1]} if k == "shared.weight" else {k: a}

    msg = _fails_before_reading(_modified_copy(tmp_path, edit), "two names of one tied tensor")
    assert "[1024, 64]" in msg and "[1023, 64]" in msg


def test_error_config_shapes_disagree_with_tensors(tmp_path):
    """A config.json whose shapes are not the tensors' (d_ff 128): every tensor it touches is named."""
    path = _modified_copy(tmp_path, lambda k, a: {k: a})
    file = path / "text_encoder" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "d_ff": 128}))
    msg = _fails_before_reading(path, "mis-shaped tensors")
    assert "'encoder.block.2.layer.1.DenseReluDense.wi_1.weight'" in msg and "expected [128, 64]" in msg


def test_error_missing_shard_and_bad_folders(tmp_path):
    path = _modified_copy(tmp_path, lambda k, a: {k: a})
    (path / "text_encoder" / META["shards"][1]).unlink()
    _fails_before_reading(path, "shard .* named in model.safetensors.index.json is missing")
    _fails_before_reading(tmp_path / "nowhere", "not a UMT5 text encoder checkpoint")
    empty = tmp_path / "empty" / "text_encoder"
    empty.mkdir(parents=True)
    shutil.copy(SOURCE / "config.json", empty / "config.json")
    _fails_before_reading(empty.parent, "has neither model.safetensors.index.json nor model.safetensors")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "t5"}, "model_type='t5', expected 'umt5'"),
        ({"architectures": ["UMT5ForConditionalGeneration"]}, "UMT5ForConditionalGeneration"),
        ({"feed_forward_proj": "relu"}, "feed_forward_proj='relu'"),
        ({"d_kv": 16.5}, "d_kv must be an integer, got 16.5"),
        ({"num_heads": "3"}, "num_heads must be an integer"),
        ({"num_layers": 0}, "not a valid UMT5 config: num_layers"),
        ({"layer_norm_epsilon": -1}, "layer_norm_epsilon must be a positive number"),
        ({"relative_attention_max_distance": 4}, "relative_attention_max_distance"),
    ],
)
def test_error_wrong_config(tmp_path, change, match):
    path = _modified_copy(tmp_path, lambda k, a: {k: a})
    file = path / "text_encoder" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    _fails_before_reading(path, match)


def test_error_config_lacks_shape_keys(tmp_path):
    raw = json.loads((SOURCE / "config.json").read_text())
    del raw["d_model"], raw["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"lacks the keys \['vocab_size', 'd_model'\]"):
        read_umt5_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        read_umt5_config(tmp_path)


@pytest.mark.parametrize("dtype, match", [("float16", "float16"), ("int8", "floating-point dtype")])
def test_error_dtype(dtype, match):
    with pytest.raises(ValueError, match=match):
        load_umt5(FIXTURE, dtype=dtype, progress=lambda name: pytest.fail(f"read {name}"))


def test_error_config_argument_of_another_kind():
    with pytest.raises(ValueError, match="config must be a UMT5Config"):
        load_umt5(FIXTURE, config={"d_model": 64})
