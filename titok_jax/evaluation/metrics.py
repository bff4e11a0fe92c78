"""Image-fidelity metrics: PSNR and SSIM, pure ``jax.numpy`` functions, batched and jit-able.

Inputs are ``[B, H, W, C]`` images (float in ``[0, max_val]``; integer arrays are cast); every
function computes in float32 and returns one value per image (``[B]``) unless it says ``mean_``.

PSNR (per image, like ``skimage.metrics.peak_signal_noise_ratio(x_b, y_b, data_range=max_val)``)::

    mse_b  = mean_{h,w,c} (x_b - y_b)^2
    psnr_b = 10 log10(max_val^2 / mse_b)            (dB)

Identical images (``mse == 0``) give ``+inf``, as scikit-image does; pass ``max_db`` (e.g. 100.0)
to cap the value instead (wanted when the result goes to JSON, where ``inf`` is not valid).

SSIM (per image, per channel, then averaged over channels and over the cropped image)::

    mu_x = w * x,  mu_y = w * y                      (w: a normalised window, '*' = 2-D filtering)
    v_x  = n (w * x^2 - mu_x^2),  v_y = n (w * y^2 - mu_y^2),  v_xy = n (w * xy - mu_x mu_y)
    S    = (2 mu_x mu_y + C1)(2 v_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(v_x + v_y + C2))
    C1 = (K1 max_val)^2,  C2 = (K2 max_val)^2,  n = NP / (NP - 1) with sample covariance, else 1
    ssim_b = mean of S over channels and over pixels at least (win_size - 1) // 2 from the border

Filtering pads by reflection (scipy's ``mode='reflect'``, edge sample repeated), exactly as
``scipy.ndimage`` does inside scikit-image.

**Default (scikit-image's defaults)**: a 7x7 uniform window with the sample-covariance correction
(``NP = 49``, ``n = 49/48``), i.e. ``skimage.metrics.structural_similarity(x_b, y_b,
channel_axis=-1, data_range=max_val)`` - the number anyone can reproduce with one library call
and no extra arguments, which is what most reconstruction-evaluation scripts report.
The "paper" setting of Wang et al. 2004 is ``gaussian_weights=True, sigma=1.5,
use_sample_covariance=False``: an 11-tap Gaussian (radius ``int(3.5 sigma + 0.5)`` = 5) with the
population covariance; it matches scikit-image called with the same three arguments.
The Gaussian variant gives systematically somewhat different numbers, so say which one you report.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["psnr", "mean_psnr", "mse", "ssim", "mean_ssim", "ssim_window"]

_GAUSSIAN_TRUNCATE = 3.5  # scikit-image's truncate for gaussian_weights=True (11 taps at sigma 1.5)


def _check_pair(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim != 4:
        raise ValueError(f"expected images [B, H, W, C], got shape {x.shape}")
    return x.astype(jnp.float32), y.astype(jnp.float32)


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image mean squared error ``[B]`` (float32) over ``H, W, C``."""
    x, y = _check_pair(x, y)
    return jnp.mean(jnp.square(x - y), axis=(1, 2, 3))


def psnr(x: jax.Array, y: jax.Array, max_val: float = 1.0,
         max_db: float | None = None) -> jax.Array:
    """Per-image PSNR in dB, ``[B]`` float32: ``10 log10(max_val^2 / mse)``.

    ``mse == 0`` (identical images) gives ``+inf`` (as scikit-image), or ``max_db`` when given:
    the result is then ``min(psnr, max_db)``.
    """
    err = mse(x, y)
    out = 10.0 * jnp.log10(jnp.float32(max_val) ** 2 / err)  # err == 0 -> +inf, no NaN
    if max_db is not None:
        out = jnp.minimum(out, jnp.float32(max_db))
    return out


def mean_psnr(x: jax.Array, y: jax.Array, max_val: float = 1.0,
              max_db: float | None = None) -> jax.Array:
    """Mean over the batch of the per-image PSNR (not the PSNR of the batch-mean MSE)."""
    return jnp.mean(psnr(x, y, max_val=max_val, max_db=max_db))


def ssim_window(win_size: int | None = None, gaussian_weights: bool = False,
                sigma: float = 1.5) -> tuple[np.ndarray, int]:
    """The 1-D filter taps (float64, summing to 1) and the window size used for the crop and
    ``NP = win_size**2``, following scikit-image.

    Uniform: ``win_size`` taps of ``1/win_size`` (default 7). Gaussian: ``exp(-t^2 / (2 sigma^2))``
    for ``|t| <= int(3.5 sigma + 0.5)``, normalised; ``win_size`` defaults to the number of taps
    (11 at sigma 1.5) and, as in scikit-image, only sets the crop and ``NP`` if given.
    """
    if sigma < 0:
        raise ValueError("sigma must be positive")
    if gaussian_weights:
        radius = int(_GAUSSIAN_TRUNCATE * sigma + 0.5)
        t = np.arange(-radius, radius + 1, dtype=np.float64)
        taps = np.exp(-0.5 / (sigma * sigma) * t * t) if sigma > 0 else (t == 0).astype(np.float64)
        taps = taps / taps.sum()
        if win_size is None:
            win_size = 2 * radius + 1
    else:
        if win_size is None:
            win_size = 7
        taps = np.full((win_size,), 1.0 / win_size)
    if win_size % 2 != 1:
        raise ValueError(f"win_size must be odd, got {win_size}")
    return taps, win_size


def _filter_axis(x: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
    """Correlate ``x`` with the symmetric ``taps`` along ``axis``, same size, reflect padding
    (``d c b a | a b c d | d c b a`` = numpy 'symmetric' = scipy.ndimage 'reflect')."""
    r = (len(taps) - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    xp = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    out = None
    for k, w in enumerate(taps):
        term = jnp.float32(w) * jax.lax.slice_in_dim(xp, k, k + n, axis=axis)
        out = term if out is None else out + term
    return out


def ssim(x: jax.Array, y: jax.Array, max_val: float = 1.0, *, win_size: int | None = None,
         gaussian_weights: bool = False, sigma: float = 1.5,
         use_sample_covariance: bool = True, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Per-image mean SSIM ``[B]`` (float32) of ``[B, H, W, C]`` images; see the module docstring.

    Defaults equal ``skimage.metrics.structural_similarity(x_b, y_b, channel_axis=-1,
    data_range=max_val)``; ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False`` is
    the Wang et al. (2004) setting. ``H`` and ``W`` must be at least ``win_size``.
    """
    return _ssim(x, y, max_val, win_size, bool(gaussian_weights), float(sigma),
                 bool(use_sample_covariance), float(k1), float(k2))


@functools.partial(jax.jit, static_argnums=tuple(range(3, 9)))  # max_val may be traced
def _ssim(x, y, max_val, win_size, gaussian_weights, sigma, use_sample_covariance, k1, k2):
    x, y = _check_pair(x, y)
    if k1 < 0 or k2 < 0:
        raise ValueError("k1 and k2 must be non-negative")
    taps, win = ssim_window(win_size, gaussian_weights, sigma)
    _, h, w, _ = x.shape
    if h < win or w < win:
        raise ValueError(f"images of {h}x{w} are smaller than the {win}x{win} SSIM window")
    np_ = win * win
    cov_norm = np_ / (np_ - 1.0) if use_sample_covariance else 1.0

    # Second moments from images centred on their per-image, per-channel mean: the same maths
    # (variances are shift-invariant) with much less float32 cancellation in E[x^2] - E[x]^2.
    mx = jnp.mean(x, axis=(1, 2), keepdims=True)
    my = jnp.mean(y, axis=(1, 2), keepdims=True)
    xc, yc = x - mx, y - my
    stack = jnp.stack([xc, yc, xc * xc, yc * yc, xc * yc], axis=0)  # [5, B, H, W, C]
    f = _filter_axis(_filter_axis(stack, taps, axis=2), taps, axis=3)
    uxc, uyc, uxx, uyy, uxy = f[0], f[1], f[2], f[3], f[4]
    vx = cov_norm * (uxx - uxc * uxc)
    vy = cov_norm * (uyy - uyc * uyc)
    vxy = cov_norm * (uxy - uxc * uyc)
    ux, uy = uxc + mx, uyc + my

    max_val = jnp.asarray(max_val, jnp.float32)
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    a1 = 2.0 * ux * uy + c1
    a2 = 2.0 * vxy + c2
    b1 = ux * ux + uy * uy + c1
    b2 = vx + vy + c2
    s = (a1 * a2) / (b1 * b2)
    pad = (win - 1) // 2
    s = s[:, pad:h - pad, pad:w - pad, :]
    return jnp.mean(s, axis=(1, 2, 3))


def mean_ssim(x: jax.Array, y: jax.Array, max_val: float = 1.0, **kwargs) -> jax.Array:
    """Mean over the batch of ``ssim(x, y, max_val, **kwargs)``."""
    return jnp.mean(ssim(x, y, max_val, **kwargs))

