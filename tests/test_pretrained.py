"""The small video DiT's weights file: checksum, loader, and the shipped weights.

The shipped ``models/evaluation/weights/small_video_dit.safetensors`` (with its ``.sha256``) must be there,
match the checksum, fit in 25 MB and denoise a real clip; these tests never skip.
"""

from __future__ import annotations

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.evaluation import clips
from models.evaluation import codec as latent_codec
from models.evaluation import small_dit as pretrained
from models.wan.transformer import WanTransformer3DModel

SHIPPED = pretrained.default_weights_path()
SHIPPED_SUM = SHIPPED.with_name(SHIPPED.name + ".sha256")


def _random_modules(seed: int) -> tuple[WanTransformer3DModel, pretrained.ClipConditioner]:
    """Smoke-sized modules with random float32 weights drawn from ``seed`` (built abstractly: no XLA compiles)."""
    config = pretrained.SMOKE_DIT_CONFIG
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(
        lambda: WanTransformer3DModel(config.wan, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    )
    conditioner = nnx.eval_shape(lambda: pretrained.ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(0)))
    for module in (model, conditioner):
        state = nnx.state(module, nnx.Param)
        nnx.update(module, jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), state))
    return model, conditioner


def _smoke_file(tmp_path: pathlib.Path, seed: int) -> tuple[pathlib.Path, WanTransformer3DModel, pretrained.ClipConditioner]:
    model, conditioner = _random_modules(seed)
    path = tmp_path / "w.safetensors"
    pretrained.save_small_video_dit(path, model, conditioner, pretrained.SMOKE_DIT_CONFIG, dtype=jnp.float32)
    return path, model, conditioner


def test_save_load_roundtrip(tmp_path):
    path, model, conditioner = _smoke_file(tmp_path, 7)
    assert pretrained.verify_checksum(path) == pretrained.file_sha256(path)
    loaded, config = pretrained.load_small_video_dit(path, dtype=jnp.float32, param_dtype=jnp.float32)
    assert config == pretrained.SMOKE_DIT_CONFIG
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        nnx.to_pure_dict(nnx.state(loaded, nnx.Param)),
    )
    cond = pretrained.load_clip_conditioner(path)
    photo, motion = jnp.array([0, clips.NUM_PHOTOS]), jnp.array([3, clips.NUM_MOTIONS])
    chex.assert_trees_all_equal(cond(photo, motion), conditioner(photo, motion))
    assert cond(photo, motion).shape == (2, config.text_len, config.wan.text_dim)
    chex.assert_trees_all_equal(cond.unconditional(2)[1], cond(photo, motion)[1])


def test_bf16_export_rounds_weights(tmp_path):
    config = pretrained.SMOKE_DIT_CONFIG
    model, cond = _random_modules(8)
    path = tmp_path / "bf16.safetensors"
    pretrained.save_small_video_dit(path, model, cond, config)  # default: bfloat16 transformer
    loaded, _ = pretrained.load_small_video_dit(path, dtype=jnp.float32, param_dtype=jnp.float32)
    expected = jax.tree.map(
        lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    jax.tree.map(np.testing.assert_array_equal, expected, nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))


def test_checksum_mismatch_and_missing_files_raise(tmp_path):
    path, _, _ = _smoke_file(tmp_path, 11)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        pretrained.load_small_video_dit(path)
    with pytest.raises(ValueError, match="does not exist"):
        pretrained.load_small_video_dit(tmp_path / "absent.safetensors")
    (tmp_path / "w.safetensors.sha256").unlink()
    with pytest.raises(ValueError, match="checksum file"):
        pretrained.load_small_video_dit(path)


def test_config_json_roundtrip_and_validation():
    for config in (pretrained.SMALL_DIT_CONFIG, pretrained.SMOKE_DIT_CONFIG):
        assert pretrained.SmallDiTConfig.from_json(config.to_json()) == config
    assert pretrained.SMALL_DIT_CONFIG.latent_shape == (3, 16, 64, 64)
    assert np.prod(pretrained.SMALL_DIT_CONFIG.token_grid) == 16384
    with pytest.raises(ValueError, match="channels"):
        pretrained.SmallDiTConfig(codec=latent_codec.LatentCodec(space_to_depth=2))


def _require_shipped() -> None:
    # The weights ship with the package: these tests never skip.
    assert SHIPPED.is_file(), f"{SHIPPED} is missing"
    assert SHIPPED_SUM.is_file(), f"{SHIPPED_SUM} is missing"


def test_shipped_weights_match_checksum_and_size():
    _require_shipped()
    assert pretrained.verify_checksum(SHIPPED) == pretrained.read_checksum(SHIPPED)
    assert SHIPPED.stat().st_size <= 25 * 1024 * 1024
    model, config = pretrained.load_small_video_dit(dtype=jnp.float32, param_dtype=jnp.float32)
    assert config == pretrained.SMALL_DIT_CONFIG
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_shipped_model_denoises_a_real_clip():
    # A learned model predicts the velocity ε - x0 of a real clip far better than chance: its
    # x0 estimate from a noisy clip is closer to the clean clip than the noisy input is.
    # A 4-frame 32×32-pixel window of a 64×64 training clip keeps the CPU cost small.
    _require_shipped()
    model, config = pretrained.load_small_video_dit(dtype=jnp.float32, param_dtype=jnp.float32)
    conditioner = pretrained.load_clip_conditioner()
    rng = np.random.default_rng(0)
    bank = clips.load_photo_bank(config.clip.bank_size)
    out = clips.make_clips(rng, 2, config.clip, bank=bank)
    latent = latent_codec.encode_latent(out.video[:, :4, :32, :32], config.codec)
    x0 = jnp.moveaxis(latent, -1, 1)  # [B, C, F, H, W]
    sigma = 0.4
    eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    noisy = (1 - sigma) * x0 + sigma * eps
    text = conditioner(jnp.asarray(out.photo), jnp.asarray(out.motion))
    v, _ = model(noisy, jnp.full((2,), sigma * 1000.0), text)
    x0_hat = noisy - sigma * v
    err_model = float(jnp.mean(jnp.square(x0_hat - x0)))
    err_input = float(jnp.mean(jnp.square(noisy - x0)))
    assert err_model < 0.5 * err_input, (err_model, err_input)
