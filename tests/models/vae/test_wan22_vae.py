"""The Wan2.2 VAE (models.vae with an ``is_residual``, ``patch_size=2`` config) against diffusers'
AutoencoderKLWan, and its loader.

The fixture ``tests/fixtures/wan22_vae_tiny`` was made by
``tests/fixtures/make_wan22_vae_fixture.py`` with diffusers' ``AutoencoderKLWan`` (random weights,
float32; versions in its metadata.json): the Wan2.2 structure (z_dim 48, residual blocks, 2 x 2
patchify, spatial factor 16) at a tiny width, its encode and decode outputs untiled (three
encoder and three decoder chunks, batch 2, and a single chunk) and tiled (3 x 2 tiles, partial
tiles and blends on both axes). The input videos are float16 values stored as float16.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FIXTURES, assert_rel_l2, watch_tensor_reads
from safetensors.numpy import load_file

from models.common.checkpoint import expected_tensors
from models.common.progress import TickBar
from models.vae import (
    CONFIGS,
    WAN22_LATENTS_STD,
    WanVAE,
    WanVAEConfig,
    WanVAETiling,
    decode_ticks,
    decode_video,
    denormalize_latents,
    encode_video,
    load_wan_vae,
    normalize_latents,
    read_wan_vae_config,
)
from models.vae.wan22_blocks import avg_down, dup_up, patchify, unpatchify

FIXTURE = FIXTURES / "wan22_vae_tiny"
META = json.loads((FIXTURE / "metadata.json").read_text())
TILING = WanVAETiling(**META["tiling"])
# float32 end to end, as for Wan2.1 (test_wan_vae.py): only the summation order differs from
# diffusers. Observed: 1.9e-7 to 7.6e-7 relative L2 (tiled encode logvar the largest).
RTOL = 1e-5
NORM_RTOL = 1e-6
# bfloat16 weights and activations against the float32 reference: the Wan2.1 test's bound (8 bf16
# units, 3.1e-2; see test_wan_vae.py). Observed: 9.9e-3 (decode), 5.6e-3 (encode).
BF16_RTOL = 8 * 2.0**-8


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    data = load_file(FIXTURE / "io.safetensors")
    # The videos are stored as float16 (exact float32 values).
    return {k: v.astype(np.float32) for k, v in data.items()}


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return load_wan_vae(FIXTURE, dtype=jnp.float32)


def _close(got, want, rtol=RTOL, what=""):
    assert_rel_l2(got, want, rtol, what)


# ------------------------------------------------------------------ equivalence with diffusers


@pytest.mark.parametrize("chunk_size", [1, None], ids=["chunks_of_1", "one_pass"])
def test_decode_matches_diffusers(vae, io, chunk_size):
    """Three latent frames (frame 0 alone, then a scan; or one pass: DupUp3D's first-chunk drop
    applied once), batch 2, untiled; 16 x 32 pixels from 1 x 2 latents."""
    video = decode_video(vae, jnp.asarray(io["latents"]), chunk_size=chunk_size)
    assert video.dtype == jnp.float32 and video.shape == (2, 3, 9, 16, 32)
    _close(video, io["decode"], what=f"decode chunk_size={chunk_size}")
    assert float(jnp.max(jnp.abs(video))) == 1.0 and META["clamped_fraction"]["decode"] > 0


@pytest.mark.parametrize("chunk_size", [4, None], ids=["chunks_of_4", "one_pass"])
def test_encode_matches_diffusers(vae, io, chunk_size):
    """Nine frames (frame 0, then chunks of 4; or one pass: AvgDown3D's front padding groups the
    frames alike), batch 2, untiled: mean and clamped logvar ``[2, 48, 3, 1, 2]``."""
    post = encode_video(vae, jnp.asarray(io["video"]), chunk_size=chunk_size)
    _close(post.mean, io["encode_mean"], what=f"encode mean chunk_size={chunk_size}")
    _close(post.logvar, io["encode_logvar"], what=f"encode logvar chunk_size={chunk_size}")


def test_single_chunk_matches_diffusers(vae, io):
    _close(decode_video(vae, jnp.asarray(io["latents"][:, :, :1])), io["decode_t1"], what="decode T=1")
    post = encode_video(vae, jnp.asarray(io["video"][:, :, :1]))
    _close(post.mean, io["encode_t1_mean"], what="encode T=1 mean")
    _close(post.logvar, io["encode_t1_logvar"], what="encode T=1 logvar")


def test_tiled_decode_matches_diffusers_and_ticks_each_chunk_of_each_tile(vae, io):
    """3 x 2 latent tiles of 2 x 3 (stride 1 x 2), blended over 8 patchified pixels before
    unpatchifying; the progress bar gets :func:`decode_ticks` calls (with spatial factor 16)."""
    assert META["relative_change_from_tiling"]["decode"] > 1e-2
    latents = jnp.asarray(io["latents_tiled"])
    total = decode_ticks(latents.shape, TILING, 1, spatial_factor=vae.config.spatial_factor)
    assert total == 3 * 2 * 2
    bar = TickBar("decode", show=False)
    bar.open(total)
    video = decode_video(vae, latents, tiling=TILING, progress=bar.tick)
    jax.effects_barrier()
    _close(video, io["decode_tiled"], what="tiled decode")
    assert bar.count == bar.total == total


def test_tiled_encode_matches_diffusers(vae, io):
    """diffusers tests the video's size (80 x 96) against the tile but cuts the patchified video
    (40 x 48) with the tile sizes: 3 x 2 tiles, latent blends of 2."""
    assert META["relative_change_from_tiling"]["encode"] > 1e-2
    post = encode_video(vae, jnp.asarray(io["video_tiled"]), tiling=TILING)
    _close(post.mean, io["encode_tiled_mean"], what="tiled encode mean")
    _close(post.logvar, io["encode_tiled_logvar"], what="tiled encode logvar")


def test_bfloat16_within_bf16_rounding(io):
    vae16 = load_wan_vae(FIXTURE, dtype=jnp.bfloat16)
    video = decode_video(vae16, jnp.asarray(io["latents"]))
    assert video.dtype == jnp.bfloat16
    _close(video, io["decode"], BF16_RTOL, "bf16 decode")
    post = encode_video(vae16, jnp.asarray(io["video"]))
    _close(post.mean, io["encode_mean"], BF16_RTOL, "bf16 encode mean")


def test_latent_normalization_matches_pipelines(vae, io):
    cfg = vae.config
    assert cfg.latents_std == WAN22_LATENTS_STD == CONFIGS["wan2.2"].latents_std and len(cfg.latents_std) == 48
    _close(denormalize_latents(jnp.asarray(io["latents"]), cfg), io["denormalized"], NORM_RTOL, "denormalize")
    _close(normalize_latents(jnp.asarray(io["encode_mean"]), cfg), io["normalized"], NORM_RTOL, "normalize")


# ------------------------------------------------------------------ the parameter-free pieces


def test_patchify_channel_order_and_round_trip():
    """Channel ``c * 4 + w_off * 2 + h_off`` (diffusers' order), and unpatchify inverts it."""
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6, 5), np.float32)  # [B, T, H, W, C]
    y = np.asarray(patchify(jnp.asarray(x), 2))
    assert y.shape == (2, 3, 2, 3, 20)
    for c, w_off, h_off in [(0, 0, 0), (0, 1, 0), (0, 0, 1), (3, 1, 1), (4, 0, 1)]:
        np.testing.assert_array_equal(y[..., c * 4 + w_off * 2 + h_off], x[:, :, h_off::2, w_off::2, c])
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(y), 2)), x)


def test_avg_down_and_dup_up_orders():
    """AvgDown3D: out channel ``o`` averages folded channels ``[o g, (o + 1) g)`` of index
    ``c f + t_off f_s^2 + h_off f_s + w_off`` after front zero padding; DupUp3D repeats each channel
    and unfolds in the same order, dropping ``factor_t - 1`` frames at the start of a video."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 4, 4, 2), np.float32)  # T=3: one zero frame in front
    y = np.asarray(avg_down(jnp.asarray(x), 4, 2, 2))  # factor 8, 2 -> 4 channels: groups of 4
    padded = np.concatenate([np.zeros_like(x[:, :1]), x], axis=1)
    for o in range(4):
        c, t_off = divmod(o * 4, 8)[0], (o * 4 % 8) // 4  # the group's channel and time offset
        want = padded[:, t_off::2, :, :, c].reshape(1, 2, 2, 2, 2, 2).mean(axis=(3, 5))
        np.testing.assert_allclose(y[..., o], want, rtol=1e-6, atol=1e-7)
    z = rng.standard_normal((1, 2, 2, 3, 4), np.float32)
    up = np.asarray(dup_up(jnp.asarray(z), 2, 2, 2, first_chunk=False))  # 4 -> 2 channels, repeats 4
    assert up.shape == (1, 4, 4, 6, 2)
    for o in range(2):
        for t_off in range(2):
            for h_off in range(2):
                for w_off in range(2):
                    src = (o * 8 + t_off * 4 + h_off * 2 + w_off) // 4
                    np.testing.assert_array_equal(up[:, t_off::2, h_off::2, w_off::2, o], z[..., src])
    first = np.asarray(dup_up(jnp.asarray(z), 2, 2, 2, first_chunk=True))
    np.testing.assert_array_equal(first, up[:, 1:])


def test_decode_ticks_for_the_wan22_vae():
    """TI2V-5B at 704 x 1280, 121 frames: latents 31 x 44 x 80; diffusers' default tiles (256,
    stride 192) are 16 latents with stride 12: 4 x 7 tiles."""
    shape = (1, 48, 31, 44, 80)
    assert decode_ticks(shape, WanVAETiling(), 1, spatial_factor=16) == 31 * 4 * 7
    assert decode_ticks(shape, WanVAETiling(), None, spatial_factor=16) == 4 * 7
    assert decode_ticks(shape, None, 1, spatial_factor=16) == 31
    assert decode_ticks((1, 48, 31, 16, 16), WanVAETiling(), 1, spatial_factor=16) == 31  # 256 px: untiled


# ------------------------------------------------------------------ configs and argument checks


def test_wan22_config():
    cfg = CONFIGS["wan2.2"]
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.video_in_channels, cfg.video_out_channels) == (16, 4, 3, 3)
    assert CONFIGS["wan2.1"].spatial_factor == 8
    with pytest.raises(ValueError, match=r"encoder level 2: AvgDown3D needs in_dim x factor \(2 x 8\)"):
        CONFIGS["tiny2.2"].replace(dim_mult=(1, 1, 3, 2))
    with pytest.raises(ValueError, match=r"out_channels \(10\) must be a multiple of patch_size\*\*2 \(4\)"):
        CONFIGS["tiny2.2"].replace(out_channels=10)
    with pytest.raises(ValueError, match="is_residual must be a bool"):
        WanVAEConfig(name="x", is_residual=1)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.decode(jnp.ones((1, 16, 3, 2, 2))), r"latents must be \[B, 48, F, H, W\]"),
        (lambda m: m.encode(jnp.ones((1, 12, 5, 16, 16))), r"video must be \[B, 3, F, H, W\] \(video_in_channels\)"),
        (lambda m: m.encode(jnp.ones((1, 3, 5, 16, 24))), "video height and width must be multiples of 16"),
        (lambda m: m.encode(jnp.ones((1, 3, 6, 16, 16))), "4k \\+ 1 frames, got 6"),
        (lambda m: m.decode(jnp.ones((1, 48, 1, 2, 2)), tiling=WanVAETiling(40, 48, 16, 32)), "multiple of 16"),
    ],
)
def test_argument_errors(vae, call, match):
    with pytest.raises(ValueError, match=match):
        call(vae)


# ------------------------------------------------------------------ the loader


def test_config_from_diffusers_json():
    cfg = read_wan_vae_config(FIXTURE)
    assert cfg == CONFIGS["tiny2.2"].replace(name="diffusers:wan22_vae_tiny")


def test_wan22_config_and_tensor_names(tmp_path):
    """diffusers' Wan2.2 config (its conversion script's, with the leftover ``clip_output``) reads
    as ``wan2.2``, and its model needs exactly the tensors, with the shapes, of diffusers' full-size
    Wan2.2 AutoencoderKLWan (listed in the fixture's metadata)."""
    raw = json.loads((FIXTURE / "vae" / "config.json").read_text())
    raw.update(base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2, clip_output=False)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(raw))
    cfg = read_wan_vae_config(tmp_path)
    assert cfg == CONFIGS["wan2.2"]
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    got = {name: list(spec.shape) for name, spec in expected_tensors(abstract).items()}
    assert got == META["wan2.2_tensors"]


def test_every_tensor_loaded(vae):
    stored = load_file(FIXTURE / "vae" / "diffusion_pytorch_model.safetensors")
    specs = expected_tensors(vae)
    assert set(stored) == set(specs)
    state = dict(nnx.to_flat_state(nnx.state(vae)))
    for name, spec in specs.items():
        want = stored[name] if spec.axes is None else np.transpose(stored[name], spec.axes)
        np.testing.assert_array_equal(np.asarray(state[spec.path].get_value()), want, err_msg=name)


@pytest.fixture
def tensor_reads(monkeypatch):
    reads = []
    watch_tensor_reads(monkeypatch, reads.append)
    return reads


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"is_residual": "true"}, "is_residual must be true or false"),
        ({"patch_size": "2"}, "patch_size must be an integer, got '2'"),
        ({"patch_size": 0}, "patch_size"),
        ({"in_channels": 10}, r"in_channels \(10\) must be a multiple of patch_size\*\*2 \(4\)"),
        ({"patch_size": None}, "scale_factor_spatial=16 disagrees with the structure, which gives 8"),
        ({"scale_factor_temporal": 8}, "scale_factor_temporal=8 disagrees"),
        ({"decoder_base_dim": 2.5}, "decoder_base_dim must be an integer"),
        ({"dim_mult": [1, 1, 3, 2]}, "encoder level 2: AvgDown3D needs"),
        ({"latents_mean": [0.0] * 16}, "latents_mean must hold z_dim=48"),
        ({"attn_scales": [0.5]}, "attn_scales"),
    ],
)
def test_loader_config_errors(tmp_path, tensor_reads, changes, match):
    dst = tmp_path / "ckpt" / "vae"
    dst.mkdir(parents=True)
    raw = json.loads((FIXTURE / "vae" / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    shutil.copy(FIXTURE / "vae" / "diffusion_pytorch_model.safetensors", dst)
    with pytest.raises(ValueError, match=match):
        load_wan_vae(tmp_path / "ckpt")
    assert tensor_reads == []
