"""The rectified-flow training loss (FlexTok / FlowMo convention, t = 1 is noise).

For data ``x [B, ...]``, noise ``eps ~ N(0, I)`` and times ``t ~ p(t)`` (:func:`sample_time`)::

    x_t      = (1 - t) x + t eps
    l_b      = mean over the non-batch axes of (v_theta(x_t, t) - (eps - x))^2
    loss     = (1 / B) sum_b w_b l_b          (w_b = 1 without weights: the plain MSE both use)

The minimiser is ``v* = E[eps - x | x_t]``; e.g. for ``x ~ N(mu, s^2 I)`` the per-element minimum
at time ``t`` is ``s^2 / ((1 - t)^2 s^2 + t^2)``. ``aux`` carries ``t``, ``noise``, ``x_t``, the
prediction and the one-step clean estimate ``x0_pred = x_t - t v_theta`` (FlowMo's LPIPS input).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from titok_jax.flow.interpolation import interpolate, velocity_target, x0_from_velocity
from titok_jax.flow.time_samplers import sample_time


class FlowLossAux(NamedTuple):
    """What the loss computed on the way (all per sample, ``[B]`` or ``[B, ...]``)."""

    t: jax.Array
    noise: jax.Array
    x_t: jax.Array
    v_pred: jax.Array
    x0_pred: jax.Array
    per_sample: jax.Array


def rectified_flow_loss(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                        key: jax.Array | None = None, *, time_sampler: str = "logit_normal",
                        time_params: dict[str, Any] | None = None, t: jax.Array | None = None,
                        noise: jax.Array | None = None, weights: jax.Array | None = None,
                        ) -> tuple[jax.Array, FlowLossAux]:
    """Mean squared error of ``velocity_fn(x_t, t)`` against ``eps - x`` -> ``(loss, aux)``.

    Args:
      velocity_fn: ``(x_t [B, ...], t float32 [B]) -> v [B, ...]`` (the model, conditioning and
        CFG dropout already bound).
      x: clean data ``[B, ...]``.
      key: drawn from for ``t`` and ``noise`` when they are not given (two independent streams).
      time_sampler, time_params: the :func:`sample_time` kind and its parameters.
      t, noise: explicit times ``[B]`` / noise (shape of ``x``) instead of sampling them.
      weights: optional per-sample weights ``[B]``; the loss is ``mean(weights * l_b)``.
    """
    batch = x.shape[0]
    if (t is None or noise is None) and key is None:
        raise ValueError("rectified_flow_loss needs a key unless both t and noise are given")
    k_t, k_noise = jax.random.split(key) if key is not None else (None, None)
    if t is None:
        t = sample_time(k_t, batch, time_sampler, **(time_params or {}))
    t = jnp.asarray(t, jnp.float32)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape [batch] = ({batch},), got {t.shape}")
    if noise is None:
        noise = jax.random.normal(k_noise, x.shape, jnp.float32).astype(x.dtype)
    x_t = interpolate(x, noise, t)
    v_pred = velocity_fn(x_t, t)
    if v_pred.shape != x.shape:
        raise ValueError(f"velocity_fn returned shape {v_pred.shape} for data of shape {x.shape}")
    err = v_pred.astype(jnp.float32) - velocity_target(x, noise).astype(jnp.float32)
    per_sample = jnp.mean(jnp.square(err).reshape(batch, -1), axis=1)
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != (batch,):
            raise ValueError(f"loss weights must have shape [batch] = ({batch},), got {weights.shape}")
        loss = jnp.mean(weights * per_sample)
    else:
        loss = jnp.mean(per_sample)
    x0_pred = x0_from_velocity(x_t, v_pred.astype(x_t.dtype), t)
    return loss, FlowLossAux(t, noise, x_t, v_pred, x0_pred, per_sample)
