"""models.common.video.to_uint8_frames: float frames in [0, 1] to 8-bit levels."""

from __future__ import annotations

import numpy as np

from models.common.video import to_uint8_frames


def test_levels_round_to_nearest_and_clip():
    levels = np.arange(256, dtype=np.float64)
    # Each level, and points a third of a level either side of it, in float32 as the VAE gives.
    values = np.stack([levels, levels - 1 / 3, levels + 1 / 3]) / 255.0
    video = values.astype(np.float32).reshape(1, 3, 256, 1) * np.ones((1, 1, 1, 3), np.float32)
    (frame,) = to_uint8_frames(video)
    want = np.clip(np.stack([levels, levels, levels]), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(frame[..., 0], want)
    assert frame.dtype == np.uint8 and frame.shape == (3, 256, 3)
    (clipped,) = to_uint8_frames(np.array([[[[-0.5, 1.5, np.float32(0.5)]]]]))
    np.testing.assert_array_equal(clipped, [[[0, 255, 128]]])


def test_agrees_with_float64_rounding_away_from_half_levels():
    rng = np.random.default_rng(0)
    video = rng.random((4, 16, 24, 3), dtype=np.float32)
    exact = np.rint(video.astype(np.float64) * 255.0)
    near_half = np.abs(video.astype(np.float64) * 255.0 % 1.0 - 0.5) < 1e-4
    got = np.stack(to_uint8_frames(video)).astype(np.float64)
    np.testing.assert_array_equal(got[~near_half], exact[~near_half])
    assert np.abs(got - exact).max() <= 1.0
