"""The small video DiTs' weights files (:mod:`models.evaluation.harness_weights`: checksums,
shards, the flat state) and their loaders (:mod:`models.evaluation.small_dit`), and the shipped
weights.

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
from models.evaluation import harness_weights
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
    harness_weights.save_small_video_dit(path, model, conditioner, pretrained.SMOKE_DIT_CONFIG, dtype=jnp.float32)
    return path, model, conditioner


def test_save_load_roundtrip(tmp_path):
    path, model, conditioner = _smoke_file(tmp_path, 7)
    assert harness_weights.verify_checksum(path) == harness_weights.file_sha256(path)
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
    harness_weights.save_small_video_dit(path, model, cond, config)  # default: bfloat16 transformer
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
    assert harness_weights.verify_checksum(SHIPPED) == harness_weights.read_checksum(SHIPPED)
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


# ---------------------------------------------------------------------------------------------
# The model registry, the v2 model's shape and sharded weights


def test_registry_names_both_models_and_rejects_others():
    assert set(pretrained.SMALL_DIT_MODELS) >= {"v1", "v2"}
    assert pretrained.get_small_dit("v1").config == pretrained.SMALL_DIT_CONFIG
    assert pretrained.get_small_dit("v1").weights_path == SHIPPED == pretrained.default_weights_path("v1")
    assert pretrained.get_small_dit("v2").config == pretrained.SMALL_DIT_V2_CONFIG
    with pytest.raises(ValueError, match="model must be one of"):
        pretrained.get_small_dit("v3")


def test_v2_is_wan_shaped_and_fits_the_transfer_limits():
    config = pretrained.SMALL_DIT_V2_CONFIG
    assert pretrained.SmallDiTConfig.from_json(config.to_json()) == config
    grid = config.token_grid
    tokens = int(np.prod(grid))
    assert grid == (16, 30, 54) and tokens == 25920
    assert all(side & (side - 1) for side in grid[1:])  # height and width are not powers of two
    assert -(-tokens // 128) == 203 and tokens % 128 == 64  # the last block is half full
    assert config.wan.num_heads >= 8 and config.wan.head_dim == 64
    model = nnx.eval_shape(lambda: WanTransformer3DModel(config.wan, rngs=nnx.Rngs(0), param_dtype=jnp.float32))
    cond = nnx.eval_shape(lambda: pretrained.ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(0)))
    transformer = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tables = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(cond, nnx.Param)))
    shipped = 2 * transformer + 4 * tables  # bf16 transformer, float32 conditioner
    assert shipped <= 31_000_000, shipped  # "about 30 MB in all"
    largest = max(2 * int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert largest < harness_weights.MAX_SHARD_BYTES // 4  # shards pack whole tensors


def test_sharded_save_load_roundtrip_and_checksums(tmp_path):
    import subprocess

    model, conditioner = _random_modules(21)
    path = tmp_path / "w.safetensors"
    limit = 200_000
    digests = harness_weights.save_small_video_dit(path, model, conditioner, pretrained.SMOKE_DIT_CONFIG, dtype=jnp.float32,
                                                   max_shard_bytes=limit)  # fmt: skip
    files = harness_weights.weights_files(path)
    assert len(files) >= 2 and not path.exists()
    assert [f.name for f in files] == sorted(digests) == [f"w-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert all(f.stat().st_size <= limit for f in files)
    assert harness_weights.read_weights_checksums(path) == digests == harness_weights.verify_weights(path)
    assert subprocess.run(["sha256sum", "-c", path.name + ".sha256"], cwd=tmp_path, capture_output=True).returncode == 0
    loaded, config = pretrained.load_small_video_dit(path, dtype=jnp.float32, param_dtype=jnp.float32)
    assert config == pretrained.SMOKE_DIT_CONFIG
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))  # fmt: skip
    photo, motion = jnp.array([1, 2]), jnp.array([0, 4])
    chex.assert_trees_all_equal(pretrained.load_clip_conditioner(path)(photo, motion), conditioner(photo, motion))
    # Rewriting as one file removes the shards; rewriting as shards removes the file.
    harness_weights.save_small_video_dit(path, model, conditioner, pretrained.SMOKE_DIT_CONFIG, dtype=jnp.float32)
    assert harness_weights.weights_files(path) == [path] and not list(tmp_path.glob("w-*"))
    harness_weights.save_small_video_dit(path, model, conditioner, pretrained.SMOKE_DIT_CONFIG, dtype=jnp.float32,
                                         max_shard_bytes=limit)  # fmt: skip
    assert not path.exists() and len(harness_weights.weights_files(path)) == len(files)


def test_sharded_weights_refuse_damage(tmp_path):
    model, conditioner = _random_modules(22)
    path = tmp_path / "w.safetensors"
    harness_weights.save_small_video_dit(path, model, conditioner, pretrained.SMOKE_DIT_CONFIG, dtype=jnp.float32,
                                         max_shard_bytes=200_000)  # fmt: skip
    files = harness_weights.weights_files(path)
    data = bytearray(files[1].read_bytes())
    data[-1] ^= 0x01
    files[1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{files[1].name}.*SHA-256"):
        pretrained.load_small_video_dit(path)
    files[1].unlink()
    with pytest.raises(ValueError, match=f"lack shards.*{files[1].name}"):
        pretrained.load_small_video_dit(path)
    path.write_bytes(b"not weights")
    with pytest.raises(ValueError, match="both as one file and as shards"):
        harness_weights.weights_files(path)
    with pytest.raises(ValueError, match="alone exceeds max_shard_bytes"):
        harness_weights.write_sharded(tmp_path / "big.safetensors", {"x": np.ones(1000, np.float32)}, {}, max_shard_bytes=2000)


# ---------------------------------------------------------------------------------------------
# One loader for the transformer, the conditioner and where they came from


def test_load_small_dit_reads_once_and_equals_the_two_loaders(tmp_path, monkeypatch):
    model, conditioner = _random_modules(23)
    path = tmp_path / "w.safetensors"
    digests = harness_weights.save_small_video_dit(path, model, conditioner, pretrained.SMOKE_DIT_CONFIG, dtype=jnp.float32,
                                                   max_shard_bytes=200_000)  # fmt: skip
    assert len(harness_weights.weights_files(path)) >= 2
    # the old path: the transformer loader, then the conditioner loader (each reads every shard)
    old_model, old_config = pretrained.load_small_video_dit(path, dtype=jnp.float32, param_dtype=jnp.float32)
    old_conditioner = pretrained.load_clip_conditioner(path, verify=False)
    reads, hashes = [], []
    real_read, real_hash = harness_weights.read_sharded, harness_weights.file_sha256
    monkeypatch.setattr(pretrained, "read_sharded", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    monkeypatch.setattr(harness_weights, "file_sha256", lambda f: hashes.append(f) or real_hash(f))
    new_model, new_conditioner, config, meta = pretrained.load_small_dit(path, dtype=jnp.float32, param_dtype=jnp.float32)
    assert reads == [path] and sorted(hashes) == harness_weights.weights_files(path)  # each file hashed once, read once
    assert config == old_config == pretrained.SMOKE_DIT_CONFIG
    assert meta["weights"] == path and meta["sha256"] == digests == harness_weights.read_weights_checksums(path)
    assert meta["metadata"]["format"] == "dfsattn-jax small video DiT v1" and "shard" not in meta["metadata"]
    expected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(old_model, nnx.Param)), expected)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(new_model, nnx.Param)), expected)
    photo, motion = jnp.array([5, clips.NUM_PHOTOS]), jnp.array([2, 1])
    chex.assert_trees_all_equal(new_conditioner(photo, motion), old_conditioner(photo, motion), conditioner(photo, motion))
    _, _, _, unverified = pretrained.load_small_dit(path, verify=False)
    assert unverified["sha256"] is None and len(hashes) == len(harness_weights.weights_files(path))  # no hashing
    data = bytearray(harness_weights.weights_files(path)[0].read_bytes())
    data[-1] ^= 0x01
    harness_weights.weights_files(path)[0].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        pretrained.load_small_dit(path)


def test_load_small_dit_takes_a_registered_name():
    _require_shipped()
    model, conditioner, config, meta = pretrained.load_small_dit("v1", dtype=jnp.float32, param_dtype=jnp.float32)
    assert config == pretrained.SMALL_DIT_CONFIG and meta["weights"] == SHIPPED
    assert meta["sha256"] == {SHIPPED.name: harness_weights.read_checksum(SHIPPED)}
    old = pretrained.load_clip_conditioner(SHIPPED, verify=False)
    photo, motion = jnp.array([0, 7]), jnp.array([4, 0])
    chex.assert_trees_all_equal(conditioner(photo, motion), old(photo, motion))


def test_random_small_dit_is_the_benches_random_model():
    config = pretrained.SMOKE_DIT_CONFIG
    model, conditioner = pretrained.random_small_dit(config, seed=41)
    old_model = WanTransformer3DModel(config.wan, rngs=nnx.Rngs(41))
    old_conditioner = pretrained.ClipConditioner(config.tokens_per_field, config.wan.text_dim, rngs=nnx.Rngs(42))
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(old_model, nnx.Param)))
    photo, motion = jnp.array([1, 3]), jnp.array([2, 4])
    chex.assert_trees_all_equal(conditioner(photo, motion), old_conditioner(photo, motion))
    assert float(jnp.std(conditioner(photo, motion))) > 0.1  # drawn, not zeros
