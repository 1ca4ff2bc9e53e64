"""The Wan2.1 VAE (models.vae) against diffusers' AutoencoderKLWan, and its loader.

The fixture ``tests/fixtures/wan_vae_tiny`` was made by ``tests/fixtures/make_wan_vae_fixture.py``
with diffusers' ``AutoencoderKLWan`` (random weights, float32; versions in its metadata.json): a
``vae/`` folder saved with ``save_pretrained`` plus diffusers' encode and decode outputs, untiled
(three encoder and three decoder chunks, and a single chunk) and tiled (2 x 3 tiles).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from helpers import FIXTURES, assert_rel_l2, rel_l2, watch_tensor_reads

from models.common.checkpoint import expected_tensors
from models.vae import (
    CONFIGS,
    WanVAE,
    WanVAEConfig,
    WanVAETiling,
    decode_video,
    denormalize_latents,
    encode_video,
    load_wan_vae,
    normalize_latents,
    read_wan_vae_config,
)
from models.vae.wan_vae_layers import WanResample

FIXTURE = FIXTURES / "wan_vae_tiny"
META = json.loads((FIXTURE / "metadata.json").read_text())
TILING = WanVAETiling(**META["tiling"])
# float32 end to end; diffusers (PyTorch convs) and XLA differ in summation order only: observed
# <= 8e-7 relative L2. The bound:
RTOL = 1e-5
# The pipeline's normalization is one float32 multiply or divide and one add per element: a few
# float32 ulps (2^-24 = 6e-8) relative.
NORM_RTOL = 1e-6
# bfloat16 weights and activations against the float32 reference: each conv rounds its output to
# bf16 (unit roundoff 2^-8 = 3.9e-3); the ~30 convs on the tiny decoder's path add up like a random
# walk to about sqrt(30) = 5.5 units. A bound of 8 units (3.1e-2) still rejects any structural
# error (a wrong weight, a broken cache or blend gives O(0.1) or more). Observed: 1.3e-2 (decode),
# 0.9e-2 (encode).
BF16_RTOL = 8 * 2.0**-8


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_file(FIXTURE / "io.safetensors")


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return load_wan_vae(FIXTURE, dtype=jnp.float32)


@pytest.fixture(scope="module")
def decoded(vae, io) -> jax.Array:
    """``decode(latents)`` with the defaults (frame 0, then one latent frame per scan step)."""
    return decode_video(vae, jnp.asarray(io["latents"]))


@pytest.fixture(scope="module")
def encoded(vae, io):
    """``encode(video)`` with the defaults (frame 0, then chunks of 4 frames)."""
    return encode_video(vae, jnp.asarray(io["video"]))


def _close(got, want, rtol=RTOL, what=""):
    assert_rel_l2(got, want, rtol, what)


# ------------------------------------------------------------------ equivalence with diffusers


def test_decode_matches_diffusers(decoded, io):
    """Three latent frames (frame 0 alone, then two scan steps), batch 2, untiled."""
    video = decoded
    assert video.dtype == jnp.float32 and video.shape == (2, 3, 9, 16, 24)
    _close(video, io["decode"], what="decode")
    # The clamp to [-1, 1] is part of decode and the fixture reaches it.
    assert float(jnp.max(jnp.abs(video))) == 1.0 and META["clamped_fraction"]["decode"] > 0


def test_encode_matches_diffusers(encoded, io):
    """Nine frames (frame 0 alone, then two chunks of 4), batch 2, untiled: mean and clamped logvar."""
    post = encoded
    _close(post.mean, io["encode_mean"], what="encode mean")
    _close(post.logvar, io["encode_logvar"], what="encode logvar")
    assert post.mode() is post.mean


def test_single_chunk_matches_diffusers(vae, io):
    """One latent frame -> one video frame; one video frame -> one latent frame (no scan)."""
    _close(decode_video(vae, jnp.asarray(io["latents"][:, :, :1])), io["decode_t1"], what="decode T=1")
    post = encode_video(vae, jnp.asarray(io["video"][:, :, :1]))
    _close(post.mean, io["encode_t1_mean"], what="encode T=1 mean")
    _close(post.logvar, io["encode_t1_logvar"], what="encode T=1 logvar")


def test_tiled_decode_matches_diffusers(vae, io):
    """2 x 3 latent tiles with partial tiles at the bottom and right (tiling changed diffusers'
    output by ``relative_change_from_tiling`` > 1e-2, so the untiled path cannot pass)."""
    assert META["relative_change_from_tiling"]["decode"] > 1e-2
    video = decode_video(vae, jnp.asarray(io["latents_tiled"]), tiling=TILING)
    _close(video, io["decode_tiled"], what="tiled decode")


def test_tiled_encode_matches_diffusers(vae, io):
    assert META["relative_change_from_tiling"]["encode"] > 1e-2
    post = encode_video(vae, jnp.asarray(io["video_tiled"]), tiling=TILING)
    _close(post.mean, io["encode_tiled_mean"], what="tiled encode mean")
    _close(post.logvar, io["encode_tiled_logvar"], what="tiled encode logvar")


def test_bfloat16_within_bf16_rounding(io):
    vae16 = load_wan_vae(FIXTURE, dtype=jnp.bfloat16)
    assert vae16.decoder.conv_in.kernel.get_value().dtype == jnp.bfloat16
    video = decode_video(vae16, jnp.asarray(io["latents"]))
    assert video.dtype == jnp.bfloat16
    _close(video, io["decode"], BF16_RTOL, "bf16 decode")
    post = encode_video(vae16, jnp.asarray(io["video"]))
    _close(post.mean, io["encode_mean"], BF16_RTOL, "bf16 encode mean")


# ------------------------------------------------------------------ the causal cache (research note §2.4)


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["one_pass", "chunks_of_2"])
def test_decode_chunking_equals_one_pass(vae, io, decoded, chunk_size):
    """The cached chunked decode equals one pass of causal convs over the whole video (with
    upsample3d's frame-0 rule), and any other chunking; each also equals diffusers. Between two
    of our programs only the float32 summation order differs, as against diffusers (observed
    <= 6e-7), hence the same bound."""
    video = decode_video(vae, jnp.asarray(io["latents"]), chunk_size=chunk_size)
    _close(video, decoded, RTOL, f"decode chunk_size={chunk_size} vs 1")
    _close(video, io["decode"], what=f"decode chunk_size={chunk_size} vs diffusers")


@pytest.mark.parametrize("chunk_size", [None, 8], ids=["one_pass", "chunks_of_8"])
def test_encode_chunking_equals_one_pass(vae, io, encoded, chunk_size):
    """Likewise for the encoder (downsample3d's frame-0 rule; chunks of any multiple of 4)."""
    post = encode_video(vae, jnp.asarray(io["video"]), chunk_size=chunk_size)
    _close(post.mean, encoded.mean, RTOL, f"encode chunk_size={chunk_size} vs 4")
    _close(post.mean, io["encode_mean"], what=f"encode chunk_size={chunk_size} vs diffusers")


def _resample(mode: str) -> WanResample:
    """A resampler with 6 channels and seeded random parameters (drawn with NumPy: faster than
    compiling JAX's initializers)."""
    abstract = nnx.eval_shape(lambda: WanResample(6, mode, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(3)
    state = jax.tree.map(lambda v: jnp.asarray(0.3 * rng.standard_normal(v.shape, np.float32)), state)
    return nnx.merge(graphdef, state)


def _dependencies(fn, x: np.ndarray) -> np.ndarray:
    """``deps[k, j]``: whether output frame j changes when input frame k is perturbed."""
    fn = jax.jit(fn)
    base = np.asarray(fn(x))
    deps = []
    for k in range(x.shape[1]):
        perturbed = np.array(x)
        perturbed[:, k] += 1.0
        moved = np.asarray(fn(perturbed))
        deps.append(np.abs(moved - base).reshape(base.shape[0], base.shape[1], -1).max(axis=(0, 2)) > 0)
    return np.array(deps)


def _assert_chunks_equal_one_pass(layer, x: np.ndarray, sizes: tuple[int, ...]) -> None:
    """``layer`` run chunk by chunk (``sizes`` frames each) with its cache equals one pass."""

    @jax.jit
    def both(x):
        outs, cache, start = [], None, 0
        for size in sizes:
            y, cache = layer(x[:, start : start + size], cache)
            outs.append(y)
            start += size
        return jnp.concatenate(outs, axis=1), layer(x, None)[0]

    chunked, whole = both(x)
    assert rel_l2(chunked, whole) <= 1e-6


def test_upsample3d_frame_zero_rule():
    """Frame 0 yields one frame and is never temporal context; frame k >= 1 yields frames
    2k - 1 and 2k and is context for the next two input frames (causal from frame 1 on)."""
    up = _resample("upsample3d")
    x = np.random.default_rng(0).standard_normal((1, 5, 3, 4, 6), np.float32)
    deps = _dependencies(lambda v: up(v, None)[0], x)
    want = np.zeros((5, 9), bool)
    want[0, 0] = True
    for k in range(1, 5):
        for src in range(k, min(k + 3, 5)):  # input frame src sees frames src-2..src (from frame 1)
            want[k, 2 * src - 1 : 2 * src + 1] = True
    np.testing.assert_array_equal(deps, want)
    # Chunked with the cache (1, then 2, then 2 frames) equals the one pass.
    _assert_chunks_equal_one_pass(up, x, (1, 2, 2))


def test_downsample3d_frame_zero_rule():
    """Output frame 0 is input frame 0 (spatially downsampled); output j >= 1 is a stride-2 time
    conv over input frames 2j - 2, 2j - 1, 2j."""
    down = _resample("downsample3d")
    x = np.random.default_rng(1).standard_normal((1, 9, 4, 6, 6), np.float32)
    deps = _dependencies(lambda v: down(v, None)[0], x)
    want = np.zeros((9, 5), bool)
    want[0, 0] = True
    for j in range(1, 5):
        want[2 * j - 2 : 2 * j + 1, j] = True
    np.testing.assert_array_equal(deps, want)
    _assert_chunks_equal_one_pass(down, x, (1, 4, 4))


# ------------------------------------------------------------------ latent normalization


def test_latent_normalization_matches_pipelines(vae, io):
    cfg = vae.config
    assert cfg.latents_mean == tuple(json.loads((FIXTURE / "vae" / "config.json").read_text())["latents_mean"])
    _close(denormalize_latents(jnp.asarray(io["latents"]), cfg), io["denormalized"], NORM_RTOL, "denormalize")
    _close(normalize_latents(jnp.asarray(io["encode_mean"]), cfg), io["normalized"], NORM_RTOL, "normalize")
    x = jnp.asarray(io["latents"])
    _close(normalize_latents(denormalize_latents(x, cfg), cfg), x, NORM_RTOL, "round trip")
    # The Wan2.1 statistics are the default config's.
    assert CONFIGS["wan2.1"].latents_std == cfg.latents_std and len(cfg.latents_std) == 16


# ------------------------------------------------------------------ argument checks


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.decode(jnp.ones((1, 4, 3, 2, 2))), r"latents must be \[B, 16, F, H, W\]"),
        (lambda m: m.decode(jnp.ones((1, 16, 3, 2, 2), jnp.int32)), "latents must be floating point"),
        (lambda m: m.decode(jnp.ones((1, 16, 4, 2, 2)), chunk_size=2), r"chunk_size \(2\) must divide .* \(3\)"),
        (lambda m: m.decode(jnp.ones((1, 16, 3, 2, 2)), chunk_size=0), "chunk_size"),
        (lambda m: m.decode(jnp.ones((1, 16, 1, 2, 2)), tiling=WanVAETiling(36, 40, 16, 24)), "multiple of 8"),
        (lambda m: m.decode(jnp.ones((1, 16, 1, 2, 2)), tiling=(32, 32, 16, 16)), "tiling must be a WanVAETiling"),
        (lambda m: m.encode(jnp.ones((1, 3, 6, 16, 16))), "4k \\+ 1 frames, got 6"),
        (lambda m: m.encode(jnp.ones((1, 3, 9, 16, 16)), chunk_size=2), "multiple of 4"),
        (lambda m: m.encode(jnp.ones((1, 3, 9, 16, 16)), chunk_size=12), "multiple of 4 that divides"),
    ],
)
def test_argument_errors(vae, call, match):
    with pytest.raises(ValueError, match=match):
        call(vae)


def test_tiling_and_config_errors():
    with pytest.raises(ValueError, match="tile_sample_stride_width .* must be <="):
        WanVAETiling(tile_sample_stride_width=320)
    with pytest.raises(ValueError, match="tiling.tile_sample_min_height"):
        WanVAETiling(tile_sample_min_height=0)
    with pytest.raises(ValueError, match="latents_std must hold z_dim=16"):
        WanVAEConfig(name="x", latents_std=(1.0,))
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAEConfig(name="x", temporal_downsample=(False,))


# ------------------------------------------------------------------ the loader


def test_config_from_diffusers_json():
    cfg = read_wan_vae_config(FIXTURE)
    assert cfg == CONFIGS["tiny"].replace(name="diffusers:wan_vae_tiny")
    assert read_wan_vae_config(FIXTURE / "vae") == cfg == read_wan_vae_config(FIXTURE / "vae" / "config.json")
    assert (cfg.spatial_factor, cfg.temporal_factor) == (8, 4)


def test_wan21_config_and_tensor_names(tmp_path):
    """The default (Wan2.1) config reads as ``wan2.1`` and its model needs exactly the tensors,
    with the shapes, of diffusers' default AutoencoderKLWan (listed in the fixture's metadata)."""
    raw = json.loads((FIXTURE / "vae" / "config.json").read_text())
    raw.update(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(raw))
    cfg = read_wan_vae_config(tmp_path)
    assert cfg == CONFIGS["wan2.1"]
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    got = {name: list(spec.shape) for name, spec in expected_tensors(abstract).items()}
    assert got == META["wan2.1_tensors"]


def test_every_tensor_loaded(vae):
    stored = load_file(FIXTURE / "vae" / "diffusion_pytorch_model.safetensors")
    specs = expected_tensors(vae)
    assert set(stored) == set(specs)
    state = dict(nnx.to_flat_state(nnx.state(vae)))
    for name, spec in specs.items():
        want = stored[name] if spec.axes is None else np.transpose(stored[name], spec.axes)
        np.testing.assert_array_equal(np.asarray(state[spec.path].get_value()), want, err_msg=name)


def _copy_with(tmp_path, edit=None, config_changes=None):
    """The fixture's vae/ at ``tmp_path/ckpt/vae`` with ``edit(name, array) -> {name: array}``
    applied to every tensor and ``config_changes`` to config.json."""
    dst = tmp_path / "ckpt" / "vae"
    dst.mkdir(parents=True)
    raw = json.loads((FIXTURE / "vae" / "config.json").read_text())
    raw.update(config_changes or {})
    (dst / "config.json").write_text(json.dumps(raw))
    src = FIXTURE / "vae" / "diffusion_pytorch_model.safetensors"
    if edit is None:
        shutil.copy(src, dst / src.name)
    else:
        tensors = {}
        for name, arr in load_file(src).items():
            tensors.update(edit(name, arr))
        save_file(tensors, dst / src.name)
    return tmp_path / "ckpt"


@pytest.fixture
def tensor_reads(monkeypatch):
    """Counts the tensors the loader reads (``get_tensor`` calls on safetensors files)."""
    reads = []
    watch_tensor_reads(monkeypatch, reads.append)
    return reads


@pytest.mark.parametrize(
    "edit, problems",
    [
        (lambda k, a: {} if k == "decoder.conv_in.bias" else {k: a}, ["missing tensors", "'decoder.conv_in.bias'"]),
        (lambda k, a: {k.replace("to_qkv", "qkv"): a}, ["missing tensors", "unexpected tensors",
                                                        "'encoder.mid_block.attentions.0.qkv.weight'"]),
        (lambda k, a: {k: a[:, :, :1] if k == "decoder.up_blocks.0.upsamplers.0.time_conv.weight" else a},
         ["mis-shaped tensors", "'decoder.up_blocks.0.upsamplers.0.time_conv.weight'", "expected [32, 16, 3, 1, 1]"]),
        (lambda k, a: {k: a.astype(np.int32) if k == "quant_conv.bias" else a}, ["not floating point", "'quant_conv.bias'"]),
    ],
    ids=["missing", "renamed", "misshaped", "integer"],
)
def test_loader_names_problems_before_reading_any_tensor(tmp_path, tensor_reads, edit, problems):
    path = _copy_with(tmp_path, edit)
    with pytest.raises(ValueError) as err:
        load_wan_vae(path, dtype=jnp.float32)
    for text in problems:
        assert text in str(err.value), str(err.value)
    assert tensor_reads == []
    load_wan_vae(FIXTURE, dtype=jnp.float32)  # the counter does see a good checkpoint's reads
    assert len(tensor_reads) == len(load_file(FIXTURE / "vae" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"is_residual": "yes"}, "is_residual must be true or false"),
        ({"patch_size": 2}, r"in_channels \(3\) must be a multiple of patch_size\*\*2 \(4\)"),
        ({"attn_scales": [0.5]}, "attn_scales"),
        ({"_class_name": "AutoencoderKLHunyuanVideo"}, "expected 'AutoencoderKLWan'"),
        ({"base_dim": 8.5}, "base_dim must be an integer"),
        ({"dim_mult": [1, 2, "2", 2]}, "dim_mult must be an integer"),
        ({"temperal_downsample": [False, 1, True]}, "temperal_downsample must be a list of booleans"),
        ({"latents_std": [1.0] * 15}, "latents_std must hold z_dim=16"),
        ({"scale_factor_spatial": 16}, "scale_factor_spatial=16 disagrees"),
        ({"scale_factor_temporal": 2}, "scale_factor_temporal=2 disagrees"),
    ],
)
def test_loader_config_errors(tmp_path, tensor_reads, changes, match):
    path = _copy_with(tmp_path, config_changes=changes)
    with pytest.raises(ValueError, match=match):
        load_wan_vae(path)
    assert tensor_reads == []


def test_loader_path_and_dtype_errors(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers Wan VAE checkpoint"):
        load_wan_vae(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        load_wan_vae(FIXTURE, dtype=jnp.int32)
    with pytest.raises(ValueError, match="config must be a WanVAEConfig"):
        load_wan_vae(FIXTURE, config="tiny")
