"""PSNR / SSIM of videos against scikit-image's implementations and constructed inputs."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models.evaluation import fidelity


def _smooth_video(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A video in [-1, 1] with spatial structure (random noise blurred), so SSIM is informative."""
    noise = rng.standard_normal(shape)
    kernel = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    for axis in (-3, -2):
        noise = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), axis, noise)
    return np.tanh(2.0 * noise)


def _skimage_video_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    values = [
        structural_similarity(
            x[t], y[t], data_range=data_range, channel_axis=-1,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )  # fmt: skip
        for t in range(x.shape[0])
    ]
    return float(np.mean(values))


@pytest.mark.parametrize("shape", [(3, 24, 20, 3), (2, 16, 33, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_skimage(shape, seed):
    rng = np.random.default_rng(seed)
    x = _smooth_video(rng, shape)
    y = np.clip(x + 0.2 * rng.standard_normal(shape), -1.0, 1.0)
    ours = fidelity.ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), data_range=2.0)
    theirs = _skimage_video_ssim(x, y, 2.0)
    assert 0.05 < theirs < 0.99  # an informative comparison, not a degenerate one
    # float32 inputs and moments: moment errors ~1e-7 against C2 = 3.6e-3 → SSIM error ≲ 1e-5.
    np.testing.assert_allclose(float(ours), theirs, rtol=0, atol=2e-5)


def test_ssim_per_frame_matches_skimage_uint8_range():
    rng = np.random.default_rng(2)
    x = np.round((_smooth_video(rng, (2, 20, 20, 3)) + 1) * 127.5)
    y = np.clip(x + rng.integers(-30, 31, size=x.shape), 0, 255)
    ours = fidelity.ssim_per_frame(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), data_range=255.0)
    for t in range(2):
        theirs = structural_similarity(
            x[t], y[t], data_range=255.0, channel_axis=-1,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )  # fmt: skip
        np.testing.assert_allclose(float(ours[t]), theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(2, 4, 16, 16, 3))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), -1.0, 1.0)
    ours = fidelity.psnr(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), data_range=2.0)
    assert ours.shape == (2,)
    for b in range(2):
        theirs = peak_signal_noise_ratio(x[b], y[b], data_range=2.0)
        # float32 MSE: relative error ~1e-6 → PSNR error ~1e-5 dB.
        np.testing.assert_allclose(float(ours[b]), theirs, rtol=0, atol=1e-4)
    per_frame = fidelity.psnr_per_frame(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), data_range=2.0)
    assert per_frame.shape == (2, 4)
    for t in range(4):
        np.testing.assert_allclose(float(per_frame[1, t]), peak_signal_noise_ratio(x[1, t], y[1, t], data_range=2.0), atol=1e-4)


def test_identical_videos():
    rng = np.random.default_rng(3)
    x = jnp.asarray(_smooth_video(rng, (2, 3, 16, 16, 3)), jnp.float32)
    p = fidelity.psnr(x, x, data_range=2.0)
    assert p.shape == (2,)
    assert bool(jnp.all(jnp.isposinf(p)))
    assert bool(jnp.all(jnp.isposinf(fidelity.psnr_per_frame(x, x, data_range=2.0))))
    s = fidelity.ssim(x, x, data_range=2.0)
    chex.assert_trees_all_close(s, jnp.ones(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_noise_level_gives_its_psnr(seed):
    rng = np.random.default_rng(seed)
    sigma = float(rng.uniform(0.01, 0.2))
    x = rng.uniform(-1.0, 1.0, size=(4, 16, 16, 3))
    signs = rng.choice([-1.0, 1.0], size=x.shape)  # |noise| = sigma everywhere → MSE = sigma² exactly
    y = x + sigma * signs
    expected = 20.0 * math.log10(2.0 / sigma)
    got = fidelity.psnr(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), data_range=2.0)
    np.testing.assert_allclose(float(got), expected, rtol=0, atol=1e-3)  # float32 rounding of x + noise
    # Gaussian noise: the PSNR is that of the realised noise power.
    noise = sigma * rng.standard_normal(x.shape)
    x32 = x.astype(np.float32)
    g32 = (x + noise).astype(np.float32)
    realised = float(np.mean((g32.astype(np.float64) - x32) ** 2))
    got = fidelity.psnr(jnp.asarray(x32), jnp.asarray(g32), data_range=2.0)
    np.testing.assert_allclose(float(got), 10.0 * math.log10(4.0 / realised), rtol=0, atol=1e-4)


def test_ssim_decreases_with_noise_and_is_symmetric():
    rng = np.random.default_rng(4)
    x = _smooth_video(rng, (2, 20, 20, 3))
    noise = rng.standard_normal(x.shape)
    values = [float(fidelity.ssim(jnp.asarray(x), jnp.asarray(x + a * noise), data_range=2.0)) for a in (0.02, 0.1, 0.4)]
    assert values[0] > values[1] > values[2]
    assert values[0] < 1.0
    y = jnp.asarray(x + 0.1 * noise, jnp.float32)
    chex.assert_trees_all_close(
        fidelity.ssim(jnp.asarray(x, jnp.float32), y, data_range=2.0),
        fidelity.ssim(y, jnp.asarray(x, jnp.float32), data_range=2.0),
        atol=1e-6,
    )


def test_jit_and_batch_axes():
    rng = np.random.default_rng(5)
    x = jnp.asarray(_smooth_video(rng, (2, 3, 2, 16, 16, 3)), jnp.float32)
    y = x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    out = jax.jit(lambda a, b: fidelity.video_fidelity(a, b, data_range=2.0))(x, y)
    assert out["psnr"].shape == (2, 3) and out["ssim"].shape == (2, 3)
    chex.assert_trees_all_close(out["ssim"][1, 2], fidelity.ssim(x[1, 2], y[1, 2], data_range=2.0), atol=1e-6)
    chex.assert_trees_all_close(out["psnr"][0, 1], fidelity.psnr(x[0, 1], y[0, 1], data_range=2.0), atol=1e-4)


def test_gaussian_window_matches_scipy_truncation():
    taps = fidelity.gaussian_window(11, 1.5)
    assert taps.shape == (11,)
    np.testing.assert_allclose(taps.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(taps, taps[::-1], rtol=1e-12)
    np.testing.assert_allclose(taps[5] / taps[6], math.exp(1.0 / (2 * 1.5**2)), rtol=1e-12)


def test_bad_inputs():
    x = jnp.ones((2, 16, 16, 3)) * 0.5
    with pytest.raises(ValueError, match="same shape"):
        fidelity.psnr(x, x[:1], data_range=2.0)
    with pytest.raises(ValueError, match="data_range"):
        fidelity.psnr(x, x, data_range=0.0)
    with pytest.raises(ValueError, match=r"\[..., T, H, W, C\]"):
        fidelity.ssim(x[0], x[0], data_range=2.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        fidelity.ssim(x[:, :8, :8], x[:, :8, :8], data_range=2.0)
