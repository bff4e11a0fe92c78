"""REPA (representation alignment, arXiv 2410.06940) as used by FlexTok's decoder.

With ``h [B, N, D]`` the projected intermediate features of the model's ``N`` patch tokens and
``y [B, N, D]`` a frozen teacher's patch features on the same grid::

    repa_loss(h, y) = - (1 / (B N)) sum_{b, n} <h_bn, y_bn> / (max(||h_bn||, eps) max(||y_bn||, eps))

(negative mean cosine similarity, in float32; the teacher features carry no gradient).
``match_grid`` resizes teacher features ``[B, g_t^2, D]`` to the model's ``g^2`` tokens (bilinear on
the row-major square grid), for teachers with another patch grid (DINOv2-L/14 at 224 px: 16 x 16).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from titok_jax.nn.resize import resize_bilinear


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def repa_loss(projected: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``-mean cos(projected, stop_gradient(target))`` over batch and tokens (module docstring)."""
    if projected.shape != target.shape:
        raise ValueError(f"REPA features {projected.shape} and teacher features {target.shape} "
                         "differ in shape (set model.repa_dim to the teacher's width)")
    cos = jnp.sum(_normalize(projected, eps) * _normalize(jax.lax.stop_gradient(target), eps), -1)
    return -jnp.mean(cos)


def match_grid(features: jax.Array, num_tokens: int) -> jax.Array:
    """Teacher features ``[B, n, D]`` on a square row-major grid -> ``[B, num_tokens, D]``
    (identity when ``n == num_tokens``, else a bilinear resize of the grid)."""
    b, n, d = features.shape
    if n == num_tokens:
        return features
    g_in, g_out = math.isqrt(n), math.isqrt(num_tokens)
    if g_in * g_in != n or g_out * g_out != num_tokens:
        raise ValueError(f"REPA needs square token grids, got {n} teacher and {num_tokens} model tokens")
    grid = features.reshape(b, g_in, g_in, d).astype(jnp.float32)
    return resize_bilinear(grid, (g_out, g_out)).reshape(b, num_tokens, d)
