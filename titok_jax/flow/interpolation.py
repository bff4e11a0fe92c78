"""Rectified-flow interpolation and velocity (the convention of FlexTok and FlowMo: t = 1 is noise).

With data ``x``, Gaussian noise ``eps`` and time ``t`` in [0, 1] (one value per sample)::

    x_t = (1 - t) x + t eps                  interpolate(x, eps, t)
    v   = d x_t / dt = eps - x               velocity_target(x, eps)    (the regression target)
    x_0 = x_t - t v                          x0_from_velocity(x_t, v, t) (one-step clean estimate;
                                                                         FlowMo's perceptual term)
    eps = x_t + (1 - t) v                    noise_from_velocity(x_t, v, t)

The ODE ``dx/dt = v(x_t, t)`` integrated from t = 1 (pure noise) down to t = 0 gives data.
``t`` is a scalar or ``[B]`` and is broadcast over every trailing data axis of ``x [B, ...]``.

EDM noise levels ``sigma`` (``z = x + sigma n``) map to flow time by ``t = sigma / (1 + sigma)``
(:func:`edm_sigma_to_t`): FlowMo states its guidance interval in sigma and converts it this way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def broadcast_time(t: jax.Array | float, x: jax.Array) -> jax.Array:
    """``t`` (scalar or ``[B]``) reshaped to ``[B, 1, ..., 1]`` to broadcast against ``x [B, ...]``,
    in ``x``'s floating dtype."""
    t = jnp.asarray(t)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    if t.ndim == 0:
        return t.astype(dtype)
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"time must be a scalar or [batch] = [{x.shape[0]}], got shape {t.shape}")
    return t.reshape((t.shape[0],) + (1,) * (x.ndim - 1)).astype(dtype)


def _same_shape(a: jax.Array, b: jax.Array, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what} differ in shape: {a.shape} vs {b.shape}")


def interpolate(x: jax.Array, noise: jax.Array, t: jax.Array | float) -> jax.Array:
    """``x_t = (1 - t) x + t noise`` (t = 0: data, t = 1: noise)."""
    _same_shape(x, noise, "data and noise")
    tb = broadcast_time(t, x)
    return (1 - tb) * x + tb * noise


def velocity_target(x: jax.Array, noise: jax.Array) -> jax.Array:
    """``v = noise - x``, the time derivative of :func:`interpolate` (constant along the path)."""
    _same_shape(x, noise, "data and noise")
    return noise - x


def x0_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array | float) -> jax.Array:
    """One-step clean estimate ``x_0 = x_t - t v`` (exact when ``v`` is the true ``noise - x``)."""
    _same_shape(x_t, v, "x_t and velocity")
    return x_t - broadcast_time(t, x_t) * v


def noise_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array | float) -> jax.Array:
    """One-step noise estimate ``eps = x_t + (1 - t) v``."""
    _same_shape(x_t, v, "x_t and velocity")
    return x_t + (1 - broadcast_time(t, x_t)) * v


def edm_sigma_to_t(sigma: float) -> float:
    """EDM noise level -> flow time: ``t = sigma / (1 + sigma)`` (``sigma >= 0``)."""
    if sigma < 0:
        raise ValueError(f"EDM sigma must be >= 0, got {sigma}")
    return sigma / (1.0 + sigma)
