"""Sample fidelity of a sparse run against the dense run from the same noise (docs/spec.md §9).

Videos are channels-last arrays ``[..., T, H, W, C]`` (any leading batch axes) with values in a
known ``data_range`` (2.0 for videos in [-1, 1]; 255 for uint8 videos).

* :func:`psnr`: ``10 log10(data_range² / MSE)`` with the MSE over the whole video (all frames,
  pixels and channels), as ``skimage.metrics.peak_signal_noise_ratio`` computes it on the whole
  array; identical videos give ``+inf``. :func:`psnr_per_frame` gives one value per frame.
* :func:`ssim`: the SSIM of Wang et al. (2004) per frame and channel: Gaussian window of 11 taps
  (σ = 1.5), K1 = 0.01, K2 = 0.03, population (co)variances, evaluated where the window fits
  inside the frame, then averaged over positions, channels and frames. This equals
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=...)`` averaged over frames.

Both accumulate in float32 (float64 when the inputs are float64 and x64 is enabled) and are
jit-able.

LPIPS is not provided: it needs pretrained network weights (AlexNet/VGG plus the LPIPS linear
heads) that cannot be installed here without a download.

:func:`spread` summarises per-sample values (mean, min, max and the half-width of a 95 %
confidence interval of the mean).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["psnr", "psnr_per_frame", "ssim", "ssim_per_frame", "gaussian_window", "video_fidelity", "spread", "paired_spread"]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: Array, y: Array) -> tuple[Array, Array]:
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim < 4:
        raise ValueError(f"videos must have shape [..., T, H, W, C], got shape {x.shape}")
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return x.astype(dtype), y.astype(dtype)


def _check_range(data_range: float) -> float:
    try:
        value = float(data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return value


def _psnr_from_mse(mse: Array, data_range: float) -> Array:
    return 10.0 * jnp.log10(data_range**2 / mse)  # mse == 0 → +inf


def psnr(x: Float[Array, "... t h w c"], y: Float[Array, "... t h w c"], *, data_range: float) -> Float[Array, "..."]:
    """Peak signal-to-noise ratio of each video (MSE over frames, pixels and channels), in dB.

    Args:
      x, y: videos ``[..., T, H, W, C]`` of the same shape.
      data_range: the value range of the videos (2.0 for [-1, 1]).

    Returns:
      ``[...]`` PSNR in dB; ``+inf`` where the videos are identical.
    """
    data_range = _check_range(data_range)
    x, y = _check_pair(x, y)
    mse = jnp.mean(jnp.square(x - y), axis=(-4, -3, -2, -1))
    return _psnr_from_mse(mse, data_range)


def psnr_per_frame(
    x: Float[Array, "... t h w c"], y: Float[Array, "... t h w c"], *, data_range: float
) -> Float[Array, "... t"]:
    """PSNR of every frame, in dB: ``[..., T]``."""
    data_range = _check_range(data_range)
    x, y = _check_pair(x, y)
    mse = jnp.mean(jnp.square(x - y), axis=(-3, -2, -1))
    return _psnr_from_mse(mse, data_range)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1D Gaussian taps ``exp(-d² / 2σ²)``, d = -(size-1)/2 … (size-1)/2 (float64)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    d = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(d**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def _filter_valid(x: Float[Array, "... h w c"], taps: np.ndarray) -> Float[Array, "... h2 w2 c"]:
    """Separable correlation with ``taps`` along H and W, 'valid' positions only."""
    n = taps.shape[0]
    w = jnp.asarray(taps, x.dtype)
    h_out = x.shape[-3] - n + 1
    x = sum(w[k] * x[..., k : k + h_out, :, :] for k in range(n))
    w_out = x.shape[-2] - n + 1
    return sum(w[k] * x[..., :, k : k + w_out, :] for k in range(n))


def ssim_per_frame(
    x: Float[Array, "... t h w c"],
    y: Float[Array, "... t h w c"],
    *,
    data_range: float,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> Float[Array, "... t"]:
    """Mean SSIM of every frame (over valid window positions and channels): ``[..., T]``.

    Args:
      x, y: videos ``[..., T, H, W, C]`` with H, W ≥ ``window``.
      data_range: the value range of the videos (2.0 for [-1, 1]).
      window, sigma: Gaussian window taps and width.
      k1, k2: the SSIM stabilising constants (C1 = (k1 R)², C2 = (k2 R)²).
    """
    data_range = _check_range(data_range)
    x, y = _check_pair(x, y)
    if x.shape[-3] < window or x.shape[-2] < window:
        raise ValueError(f"frames must be at least {window}x{window} for SSIM, got {x.shape[-3]}x{x.shape[-2]}")
    taps = gaussian_window(window, sigma)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    mx = _filter_valid(x, taps)
    my = _filter_valid(y, taps)
    vx = _filter_valid(x * x, taps) - mx * mx
    vy = _filter_valid(y * y, taps) - my * my
    cxy = _filter_valid(x * y, taps) - mx * my
    num = (2.0 * mx * my + c1) * (2.0 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return jnp.mean(num / den, axis=(-3, -2, -1))


def ssim(
    x: Float[Array, "... t h w c"],
    y: Float[Array, "... t h w c"],
    *,
    data_range: float,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> Float[Array, "..."]:
    """Mean SSIM of each video (over positions, channels and frames): ``[...]``; see :func:`ssim_per_frame`."""
    per_frame = ssim_per_frame(x, y, data_range=data_range, window=window, sigma=sigma, k1=k1, k2=k2)
    return jnp.mean(per_frame, axis=-1)


def video_fidelity(
    video: Float[Array, "... t h w c"], reference: Float[Array, "... t h w c"], *, data_range: float = 2.0
) -> dict[str, Array]:
    """``{"psnr": [...], "ssim": [...]}`` of ``video`` against ``reference`` (e.g. sparse vs dense)."""
    return {
        "psnr": psnr(video, reference, data_range=data_range),
        "ssim": ssim(video, reference, data_range=data_range),
    }


def spread(values) -> dict[str, float | int | None]:
    """Mean, min, max and the 95 % confidence half-width of the mean of per-sample ``values``.

    The half-width is Student's ``t(0.975, n - 1) · s / sqrt(n)`` with the sample standard
    deviation ``s`` (``None`` for one value, or when a value is infinite: identical videos give
    a PSNR of ``+inf``). Infinite values are kept in min/max/mean as ``inf``.

    Returns:
      ``{"mean", "min", "max", "ci95", "n"}`` (Python floats; ``ci95`` may be ``None``).
    """
    from scipy.stats import t as student_t

    x = np.asarray(values, np.float64).ravel()
    if x.size == 0 or np.isnan(x).any():
        raise ValueError(f"values must be a non-empty sequence of numbers without NaN, got {values!r}")
    half = None
    if x.size > 1 and np.isfinite(x).all():
        half = float(student_t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": float(x.mean()), "min": float(x.min()), "max": float(x.max()), "ci95": half, "n": int(x.size)}


def paired_spread(a, b) -> dict[str, float | int | None] | None:
    """:func:`spread` of the per-sample differences ``a - b`` (two runs on the same samples, e.g.
    PSNRs in dB); ``None`` when the lengths differ or a value is missing (``None``) or stored as a
    string (``"inf"``: identical videos)."""
    if len(a) != len(b) or any(isinstance(v, str) or v is None for v in (*a, *b)):
        return None
    return spread(np.asarray(a, np.float64) - np.asarray(b, np.float64))
