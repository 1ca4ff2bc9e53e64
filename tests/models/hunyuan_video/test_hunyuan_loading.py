"""Loading diffusers HunyuanVideo checkpoints (models.hunyuan_video.loading).

The checkpoint is ``tests/fixtures/hunyuan_tiny/transformer`` (two shards plus the index, from
``tests/fixtures/make_hunyuan_fixture.py``); errors are provoked on edited copies of it.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from helpers import FIXTURES, modified_checkpoint_copy

from models.common.checkpoint import checkpoint_shards, expected_tensors
from models.hunyuan_video.config import get_config
from models.hunyuan_video.loading import diffusers_config, load_hunyuan_video, read_hunyuan_config

FIXTURE = FIXTURES / "hunyuan_tiny"
META = json.loads((FIXTURE / "metadata.json").read_text())
CONFIG = json.loads((FIXTURE / "transformer" / "config.json").read_text())


def _modified_copy(tmp_path: pathlib.Path, edit) -> pathlib.Path:
    """The fixture checkpoint copied to ``tmp_path/ckpt`` with ``edit`` applied to its tensors."""
    return modified_checkpoint_copy(FIXTURE / "transformer", tmp_path / "ckpt", edit)


def test_every_parameter_comes_from_the_checkpoint():
    """Each NNX parameter equals its diffusers tensor (linear weights transposed, the Conv3d
    permuted), read from both shards, in float32; the root and its transformer/ both work."""
    seen = []
    model = load_hunyuan_video(FIXTURE, dtype="float32", progress=seen.append)
    assert seen == META["shards"]
    stored = {}
    for file in checkpoint_shards(FIXTURE / "transformer"):
        stored.update(load_file(file))
    specs = expected_tensors(model)
    assert set(specs) == set(stored) and len(stored) == META["num_tensors"]
    flat = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    for name, spec in specs.items():
        value = np.asarray(flat[spec.path])
        want = stored[name] if spec.axes is None else np.transpose(stored[name], spec.axes)
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, want, err_msg=name)
    conv = specs["x_embedder.proj.weight"]
    assert conv.shape == (32, 16, 1, 2, 2) and conv.axes == (2, 3, 4, 1, 0)
    assert specs["transformer_blocks.0.attn.norm_added_q.weight"].shape == (16,)  # per-head RMSNorm
    again = load_hunyuan_video(FIXTURE / "transformer", dtype="float32")
    leaves = jax.tree.leaves(nnx.state(again))
    for a, b in zip(jax.tree.leaves(nnx.state(model)), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_load_casts_every_parameter():
    model = load_hunyuan_video(FIXTURE, dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.bfloat16
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    mixed = load_hunyuan_video(FIXTURE, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(mixed, nnx.Param))} == {jnp.dtype(jnp.float32)}


def test_read_config():
    config = read_hunyuan_config(FIXTURE)
    assert config.name == "tiny" and config == get_config("tiny").replace(text_len=config.text_len)
    assert (config.num_dual_layers, config.num_single_layers, config.num_layers) == (2, 2, 4)
    assert read_hunyuan_config(FIXTURE / "transformer" / "config.json") == config
    written = diffusers_config(config)
    assert {k: v for k, v in written.items() if k != "_class_name"} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in META["model_config"].items()
    }


def test_read_default_config_is_13b(tmp_path):
    """diffusers' default config (as the conversion script writes it) reads as the 13B config."""
    raw = {
        "_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": "0.32.0.dev0",
        "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
        "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0,
        "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
        "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0,
        "rope_axes_dim": [16, 56, 56],
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = read_hunyuan_config(tmp_path)
    assert config.name == "hunyuan-video-13b" and config.num_layers == 60
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DModel"}))
    assert read_hunyuan_config(tmp_path).name == "hunyuan-video-13b"  # absent keys: diffusers' defaults


def test_error_renamed_tensor(tmp_path):
    old, new = "single_transformer_blocks.1.attn.norm_k.weight", "single_transformer_blocks.1.attn.k_norm.weight"
    path = _modified_copy(tmp_path, lambda k, a: {new if k == old else k: a})
    with pytest.raises(ValueError, match="missing tensors") as err:
        load_hunyuan_video(path, dtype=jnp.float32)
    msg = str(err.value)
    assert repr(old) in msg and "unexpected tensors" in msg and repr(new) in msg and "HunyuanVideo model" in msg


def test_error_missing_tensor(tmp_path):
    gone = "time_text_embed.guidance_embedder.linear_2.bias"
    path = _modified_copy(tmp_path, lambda k, a: {} if k == gone else {k: a})
    with pytest.raises(ValueError, match="missing tensors") as err:
        load_hunyuan_video(path, dtype=jnp.float32)
    assert repr(gone) in str(err.value) and "unexpected" not in str(err.value)


def test_error_misshaped_tensor(tmp_path):
    bad = "context_embedder.token_refiner.refiner_blocks.0.ff.net.2.weight"  # [32, 128] stored as [128, 32]
    path = _modified_copy(tmp_path, lambda k, a: {k: np.ascontiguousarray(a.T) if k == bad else a})
    with pytest.raises(ValueError, match="mis-shaped tensors") as err:
        load_hunyuan_video(path, dtype=jnp.float32)
    msg = str(err.value)
    assert repr(bad) in msg and "[128, 32]" in msg and "expected [32, 128]" in msg


def test_error_missing_shard_and_bad_dirs(tmp_path):
    path = _modified_copy(tmp_path, lambda k, a: {k: a})
    (path / "transformer" / META["shards"][1]).unlink()
    with pytest.raises(ValueError, match="shard .* is missing"):
        load_hunyuan_video(path, dtype=jnp.float32)
    with pytest.raises(ValueError, match="not a diffusers HunyuanVideo checkpoint"):
        load_hunyuan_video(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        load_hunyuan_video(FIXTURE, dtype=jnp.int32)
    with pytest.raises(ValueError, match="config must be a HunyuanConfig"):
        load_hunyuan_video(FIXTURE, config="tiny")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"image_condition_type": "latent_concat"}, "image_condition_type"),
        ({"image_condition_type": "token_replace"}, "image_condition_type"),
        ({"qk_norm": "layer_norm"}, "qk_norm"),
        ({"use_flash_attention": True}, "use_flash_attention"),
        ({"_class_name": "WanTransformer3DModel"}, "WanTransformer3DModel"),
        ({"num_layers": 2.5}, "num_layers must be an integer"),
        ({"guidance_embeds": "yes"}, "guidance_embeds"),
        ({"rope_axes_dim": [4, 6]}, "rope_axes_dim"),
        ({"rope_axes_dim": [4, 6, 8]}, "not a valid HunyuanVideo transformer config"),
        ({"mlp_ratio": 0}, "mlp_ratio must be a positive number"),
    ],
)
def test_error_unsupported_config(tmp_path, change, match):
    raw = dict(CONFIG)
    raw.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        read_hunyuan_config(tmp_path)


def test_wrong_config_shapes_are_named(tmp_path):
    """A config that disagrees with the weights (3 refiner blocks) fails on the names, before reading."""
    config = read_hunyuan_config(FIXTURE).replace(num_refiner_layers=3)
    with pytest.raises(ValueError, match="missing tensors") as err:
        load_hunyuan_video(FIXTURE, dtype=jnp.float32, config=config)
    assert "'context_embedder.token_refiner.refiner_blocks.2.norm1.weight'" in str(err.value)
