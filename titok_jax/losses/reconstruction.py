"""Pixel reconstruction losses (pure functions, float32 whatever the input dtype).

    l2_loss(x, y) = mean((x - y)**2)     (TiTok stage 2 / single stage: weight 1, images in [0, 1])
    l1_loss(x, y) = mean(|x - y|)

The mean is over every element (batch, pixels and channels), like ``F.mse_loss`` / ``F.l1_loss``
with ``reduction="mean"``. ``reduction="none"`` returns the per-example mean ``[B]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

RECONSTRUCTION_LOSSES = ("l2", "l1")


def _reduce(err: jax.Array, reduction: str) -> jax.Array:
    if reduction == "mean":
        return jnp.mean(err)
    if reduction == "none":
        return jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check(x: jax.Array, y: jax.Array) -> None:
    if x.shape != y.shape:
        raise ValueError(f"reconstruction loss inputs differ in shape: {x.shape} vs {y.shape}")


def l2_loss(x: jax.Array, y: jax.Array, reduction: str = "mean") -> jax.Array:
    """``mean((x - y)**2)``; ``reduction="none"`` gives one value per example ``[B]``."""
    _check(x, y)
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    return _reduce(jnp.square(d), reduction)


def l1_loss(x: jax.Array, y: jax.Array, reduction: str = "mean") -> jax.Array:
    """``mean(|x - y|)``; ``reduction="none"`` gives one value per example ``[B]``."""
    _check(x, y)
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    return _reduce(jnp.abs(d), reduction)


def reconstruction_loss(x: jax.Array, y: jax.Array, kind: str = "l2",
                        reduction: str = "mean") -> jax.Array:
    """:func:`l2_loss` or :func:`l1_loss` chosen by name (``"l2"`` / ``"l1"``)."""
    if kind == "l2":
        return l2_loss(x, y, reduction)
    if kind == "l1":
        return l1_loss(x, y, reduction)
    raise ValueError(f"unknown reconstruction loss {kind!r}; "
                     f"expected one of {RECONSTRUCTION_LOSSES}")
