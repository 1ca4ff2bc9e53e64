"""Synthetic clips: deterministic, offline, real content, valid ranges; the latent codec is exact."""

from __future__ import annotations

import socket

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.evaluation import clips
from models.evaluation import codec as latent_codec

SMALL = clips.ClipConfig(frames=6, height=24, width=32, supersample=2)


@pytest.fixture(scope="module")
def bank() -> clips.PhotoBank:
    return clips.load_photo_bank(SMALL.bank_size)


def test_photo_bank_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    bank = clips.load_photo_bank(32)
    assert bank.images.shape == (len(clips.BACKGROUND_PHOTOS) + len(clips.SPRITE_PHOTOS), 32, 32, 3)
    assert bank.images.dtype == np.float32
    assert bank.images.min() >= -1.0 and bank.images.max() <= 1.0
    assert bank.names[: clips.NUM_PHOTOS] == clips.BACKGROUND_PHOTOS
    # every photo has content (not a constant image), and the photos differ from each other
    assert np.all(bank.images.reshape(len(bank.names), -1).std(axis=1) > 0.05)
    flat = bank.images.reshape(len(bank.names), -1)
    dists = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert np.all(dists[~np.eye(len(bank.names), dtype=bool)] > 0.02)


@pytest.mark.parametrize("seed", [0, 12345])
def test_deterministic_in_seed(bank, seed):
    a = clips.make_clips(seed, 3, SMALL, bank=bank)
    b = clips.make_clips(seed, 3, SMALL, bank=bank)
    np.testing.assert_array_equal(a.video, b.video)
    np.testing.assert_array_equal(a.label, b.label)
    c = clips.make_clips(seed + 1, 3, SMALL, bank=bank)
    assert np.abs(a.video - c.video).mean() > 1e-3
    pa = clips.sample_clip_params((seed, 5), 4, SMALL)
    pb = clips.sample_clip_params((seed, 5), 4, SMALL)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_shapes_ranges_and_labels(bank):
    out = clips.make_clips(1, 4, SMALL, bank=bank)
    assert out.video.shape == (4, SMALL.frames, SMALL.height, SMALL.width, 3)
    assert out.video.dtype == np.float32
    assert out.video.min() >= -1.0 and out.video.max() <= 1.0
    np.testing.assert_array_equal(out.label, out.photo * clips.NUM_MOTIONS + out.motion)
    assert np.all((0 <= out.label) & (out.label < clips.NUM_CLASSES))
    video, label = clips.make_clip(3, SMALL, bank=bank, photo=2, motion=4)
    assert video.shape == (SMALL.frames, SMALL.height, SMALL.width, 3)
    assert label == clips.class_label(2, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_forced_classes_and_sprite_rules(seed):
    rng = np.random.default_rng(seed)
    for motion in range(clips.NUM_MOTIONS):
        photo = int(rng.integers(clips.NUM_PHOTOS))
        p = clips.sample_clip_params(rng, 8, SMALL, photo=photo, motion=motion)
        assert np.all(p.photo == photo) and np.all(p.motion == motion)
        assert np.all(p.sprite_photo != photo)  # sprites are cut from other photos
        visible = p.sprite_alpha.sum(axis=1)
        if clips.MOTIONS[motion] == "sprites":
            assert np.all(visible >= 2)
        else:
            assert np.all(visible <= 1)
    p = clips.sample_clip_params(rng, 64, SMALL)
    assert len(np.unique(p.photo)) > 1 and len(np.unique(p.motion)) > 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_camera_stays_inside_the_photo(seed):
    rng = np.random.default_rng(seed)
    p = clips.sample_clip_params(rng, 64, SMALL)
    ax, ay = SMALL.width / 32, SMALL.height / 32
    corners = np.array([[-ax, -ay], [ax, -ay], [-ax, ay], [ax, ay]])
    c, s = np.cos(p.cam_angle), np.sin(p.cam_angle)
    x = p.cam_center[..., None, 0] + p.cam_scale[..., None] * (c[..., None] * corners[:, 0] - s[..., None] * corners[:, 1])
    y = p.cam_center[..., None, 1] + p.cam_scale[..., None] * (s[..., None] * corners[:, 0] + c[..., None] * corners[:, 1])
    assert np.abs(x).max() <= 1.0 + 1e-5 and np.abs(y).max() <= 1.0 + 1e-5


def _shift_error(a: np.ndarray, b: np.ndarray, dx: int) -> float:
    """Mean |a[:, x] - b[:, x + dx]| over the overlap."""
    if dx >= 0:
        return float(np.abs(a[:, : a.shape[1] - dx] - b[:, dx:]).mean())
    return float(np.abs(a[:, -dx:] - b[:, : b.shape[1] + dx]).mean())


def test_pan_moves_content_coherently():
    # A horizontal pan with a known speed: consecutive frames are the previous frame shifted by
    # the camera step (in pixels), better explained by that shift than by no shift.
    config = clips.ClipConfig(frames=4, height=32, width=32, supersample=2)
    big_bank = clips.load_photo_bank(config.bank_size)
    p = clips.sample_clip_params(np.random.default_rng(2), 1, config, motion=0)
    t = np.linspace(0, 1, config.frames, dtype=np.float32)
    step = 0.3
    p = p._replace(
        cam_center=np.stack([-0.15 + step * t, np.zeros_like(t)], -1)[None].astype(np.float32),
        cam_scale=np.full((1, config.frames), 0.5, np.float32),
        cam_angle=np.zeros((1, config.frames), np.float32),
        sprite_alpha=np.zeros_like(p.sprite_alpha),
    )
    video = np.asarray(clips.render_clips(big_bank.images, p, config))[0]
    # screen x spans [-1, 1] over 32 px; the photo moves by step / scale screen units per clip
    px_per_frame = (step / (config.frames - 1)) / 0.5 * 16
    shift = int(round(px_per_frame))
    for f in range(config.frames - 1):
        moved = _shift_error(video[f + 1], video[f], shift)  # content moves left as the camera pans right
        still = _shift_error(video[f + 1], video[f], 0)
        assert moved < 0.5 * still
    assert np.abs(video[-1] - video[0]).mean() > 0.05


def test_every_motion_has_temporal_change_and_content(bank):
    rng = np.random.default_rng(3)
    for motion in range(clips.NUM_MOTIONS):
        out = clips.make_clips(rng, 2, SMALL, bank=bank, motion=motion)
        v = out.video
        assert np.all(v.reshape(2, -1).std(axis=1) > 0.03)  # real content, not flat
        change = np.abs(v[:, -1] - v[:, 0]).mean(axis=(1, 2, 3))
        assert np.all(change > 1e-3), (clips.MOTIONS[motion], change)
        # motion is smooth: adjacent frames are closer than the first and last
        adjacent = np.abs(v[:, 1:] - v[:, :-1]).mean(axis=(2, 3, 4)).mean(axis=1)
        assert np.all(adjacent < change + 1e-6)


def test_render_is_jittable_and_batch_consistent(bank):
    p = clips.sample_clip_params(np.random.default_rng(4), 3, SMALL)
    eager = clips.render_clips(bank.images, p, SMALL)
    jitted = jax.jit(clips.render_clips, static_argnums=2)(bank.images, p, SMALL)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)
    one = clips.render_clips(bank.images, jax.tree.map(lambda x: x[1:2], p), SMALL)
    chex.assert_trees_all_close(one[0], eager[1], atol=1e-5)


@pytest.mark.parametrize("s", [1, 2])
def test_latent_codec_roundtrip(bank, s):
    codec = latent_codec.LatentCodec(space_to_depth=s)
    video = clips.make_clips(5, 2, SMALL, bank=bank).video
    latent = latent_codec.encode_latent(video, codec)
    assert latent.shape == (2, SMALL.frames, SMALL.height // s, SMALL.width // s, 3 * s * s)
    back = latent_codec.decode_latent(latent, codec)
    # float32 affine map and its inverse: error of a few ulps of values of magnitude ≤ ~4.
    chex.assert_trees_all_close(back, jnp.asarray(video), atol=2e-6, rtol=0)
    if s == 2:  # space-to-depth layout: channel (dy * 2 + dx) * 3 + c holds pixel (2i + dy, 2j + dx, c)
        raw = np.asarray(latent) * np.tile(latent_codec._CHANNEL_STD, 4) + np.tile(latent_codec._CHANNEL_MEAN, 4)
        np.testing.assert_allclose(raw[..., 3 * 3 + 1], video[:, :, 1::2, 1::2, 1], atol=1e-6)
        np.testing.assert_allclose(raw[..., 1 * 3 + 2], video[:, :, 0::2, 1::2, 2], atol=1e-6)


def test_latent_statistics_are_normalised(bank):
    out = clips.make_clips(6, 8, SMALL, bank=bank)
    latent = np.asarray(latent_codec.encode_latent(out.video))
    mean = latent.mean(axis=(0, 1, 2, 3))
    std = latent.std(axis=(0, 1, 2, 3))
    assert np.all(np.abs(mean) < 0.6) and np.all((std > 0.5) & (std < 1.6)), (mean, std)


def test_token_grid_default_is_16k():
    grid = latent_codec.token_grid()
    assert grid == (16, 32, 32) and int(np.prod(grid)) == 16384
    assert latent_codec.token_grid(clips.ClipConfig(height=128, width=128), latent_codec.LatentCodec(2)) == (16, 32, 32)


def test_bad_inputs():
    with pytest.raises(ValueError, match="frames"):
        clips.ClipConfig(frames=1)
    with pytest.raises(ValueError, match="height"):
        clips.ClipConfig(height=0)
    with pytest.raises(ValueError, match="photo"):
        clips.sample_clip_params(0, 1, SMALL, photo=clips.NUM_PHOTOS)
    with pytest.raises(ValueError, match="motion"):
        clips.sample_clip_params(0, 1, SMALL, motion=-1)
    with pytest.raises(ValueError, match="num_clips"):
        clips.sample_clip_params(0, 0, SMALL)
    with pytest.raises(ValueError, match="space_to_depth"):
        latent_codec.LatentCodec(0)
    with pytest.raises(ValueError, match="multiples"):
        latent_codec.encode_latent(np.zeros((2, 5, 6, 3), np.float32) + 0.5, latent_codec.LatentCodec(2))
    with pytest.raises(ValueError, match="patch"):
        latent_codec.token_grid(clips.ClipConfig(frames=4, height=18, width=16), patch=(1, 4, 4))
