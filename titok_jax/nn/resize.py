"""Bilinear image resizing with PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
semantics, with and without ``antialias``, as two small interpolation matrices.

A resize of ``[B, H, W, C]`` to ``[B, h, w, C]`` is separable::

    y[b, i, j, c] = sum_{p, q} A_h[i, p] * A_w[j, q] * x[b, p, q, c]

Row ``i`` of ``A`` (for an axis of ``n`` input and ``m`` output samples, ``s = n / m``):

- ``antialias=False`` (plain bilinear): ``u = max((i + 0.5) * s - 0.5, 0)``, ``p0 = floor(u)``,
  ``p1 = min(p0 + 1, n - 1)``; weights ``1 - (u - p0)`` on ``p0`` and ``u - p0`` on ``p1``.
- ``antialias=True`` (PIL-style, PyTorch's ``_upsample_bilinear2d_aa``): centre ``c = s * (i + 0.5)``,
  support ``r = max(s, 1)``; input samples ``p`` with ``int(c - r + .5) <= p < int(c + r + .5)``
  (clipped to ``[0, n)``) get ``tri((p + 0.5 - c) / max(s, 1))`` with ``tri(t) = max(0, 1 - |t|)``,
  and the row is normalised to sum 1. For upsampling (``s <= 1``) this equals the plain case.

The matrices are built in NumPy float64 at trace time (the shapes are static) and applied with
``precision=HIGHEST``; the result is differentiable with respect to the image.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
    """The ``[n_out, n_in]`` float64 interpolation matrix of one axis (see the module docstring)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize sizes must be >= 1, got {n_in} -> {n_out}")
    scale = n_in / n_out
    a = np.zeros((n_out, n_in), np.float64)
    if antialias and scale > 1.0:
        support = scale
        for i in range(n_out):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), n_in)
            p = np.arange(lo, hi)
            w = np.maximum(0.0, 1.0 - np.abs((p + 0.5 - center) / scale))
            total = w.sum()
            a[i, lo:hi] = w / total if total > 0 else w
        return a
    for i in range(n_out):
        u = max((i + 0.5) * scale - 0.5, 0.0)
        p0 = min(int(np.floor(u)), n_in - 1)
        p1 = min(p0 + 1, n_in - 1)
        frac = u - p0
        a[i, p0] += 1.0 - frac
        a[i, p1] += frac
    return a


def resize_bilinear(x: jax.Array, size: tuple[int, int], antialias: bool = False) -> jax.Array:
    """Resize NHWC images ``[B, H, W, C]`` to ``[B, size[0], size[1], C]`` like PyTorch's
    ``F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=antialias)``.

    The output is float32 (or ``x``'s floating dtype); an identity resize returns ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear expects [B, H, W, C], got shape {x.shape}")
    h, w = int(size[0]), int(size[1])
    if (h, w) == tuple(x.shape[1:3]):
        return x
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    ah = jnp.asarray(bilinear_matrix(int(x.shape[1]), h, bool(antialias)), dtype)
    aw = jnp.asarray(bilinear_matrix(int(x.shape[2]), w, bool(antialias)), dtype)
    hp = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ip,bpqc->biqc", ah, x.astype(dtype), precision=hp)
    return jnp.einsum("jq,biqc->bijc", aw, y, precision=hp)
