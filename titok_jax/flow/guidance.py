"""Classifier-free guidance (CFG) and adaptive projected guidance (APG) for velocity predictions.

With the conditional and unconditional velocities ``c = v(x_t, t, cond)``, ``u = v(x_t, t, null)``
and scale ``w`` (``w = 1``: no guidance, the conditional prediction):

CFG::

    v = u + w (c - u)

APG (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales in
Diffusion Models", arXiv 2410.02416), per sample, norms and inner products over all non-batch axes::

    d   = c - u
    m   = d + beta m_prev ;  d = m           momentum running average (beta = apg_momentum;
                                             the state m is carried across sampling steps, m_0 = 0)
    d   = d * min(1, r / ||d||)              norm threshold r = apg_norm_threshold (r <= 0: off)
    d_par = <d, c_hat> c_hat,  c_hat = c / ||c||
    d_orth = d - d_par
    v   = c + (w - 1) (d_orth + eta d_par)   eta = apg_eta

With ``eta = 1``, ``beta = 0`` and no threshold, APG is exactly CFG: ``c + (w - 1)(c - u)``.

``interval = (t_lo, t_hi)`` applies guidance only at velocity evaluations whose time ``t``
satisfies ``t_lo <= t <= t_hi`` (inclusive, FlowMo's test); elsewhere only the conditional
velocity is computed and used, and the APG momentum state is left unchanged.

Published settings (``GUIDANCE_PRESETS``):

- ``flextok``: APG, w = 7.5 (README), beta = -0.5, r = 2.5, eta = 0, at every step (no interval).
- ``flowmo``: CFG, w = 1.5, interval given in EDM sigma as (0.17, 1.02) and mapped by
  ``t = sigma / (1 + sigma)`` to t in [0.1453, 0.5050] (6 of its 25 power-grid steps).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from titok_jax.flow.interpolation import edm_sigma_to_t

GUIDANCE_KINDS = ("cfg", "apg")


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Guidance settings (see the module docstring for the maths).

    Attributes:
      scale: guidance weight ``w`` (1 = conditional only; the sampler then skips the null pass).
      interval: ``(t_lo, t_hi)`` in flow time, inclusive; ``None`` guides at every evaluation.
      kind: ``"cfg"`` or ``"apg"``.
      apg_momentum: APG momentum ``beta`` (0 = none; FlexTok uses -0.5).
      apg_norm_threshold: APG norm threshold ``r`` (<= 0 = none; FlexTok uses 2.5).
      apg_eta: APG weight of the parallel component (FlexTok uses 0).
    """

    scale: float = 1.0
    interval: tuple[float, float] | None = None
    kind: str = "cfg"
    apg_momentum: float = 0.0
    apg_norm_threshold: float = 0.0
    apg_eta: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"unknown guidance kind {self.kind!r}; known: {', '.join(GUIDANCE_KINDS)}")
        for name in ("scale", "apg_momentum", "apg_norm_threshold", "apg_eta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"guidance {name} must be a finite number, got {value!r}")
        if self.kind == "cfg" and (self.apg_momentum or self.apg_norm_threshold or self.apg_eta):
            raise ValueError("apg_* guidance settings need kind='apg' (they are ignored by 'cfg')")
        if self.interval is not None:
            try:
                lo, hi = (float(v) for v in self.interval)
            except (TypeError, ValueError):
                raise ValueError(
                    f"guidance interval must be (t_lo, t_hi), got {self.interval!r}") from None
            if not lo <= hi:
                raise ValueError(f"guidance interval needs t_lo <= t_hi, got {self.interval!r}")
            object.__setattr__(self, "interval", (lo, hi))

    @property
    def active(self) -> bool:
        """Whether guidance changes anything (``scale != 1``); inactive guidance costs nothing."""
        return self.scale != 1.0

    @property
    def uses_momentum(self) -> bool:
        return self.kind == "apg" and self.apg_momentum != 0.0


GUIDANCE_PRESETS: dict[str, GuidanceConfig] = {
    "flextok": GuidanceConfig(scale=7.5, kind="apg", apg_momentum=-0.5, apg_norm_threshold=2.5,
                              apg_eta=0.0),
    "flowmo": GuidanceConfig(scale=1.5, kind="cfg",
                             interval=(edm_sigma_to_t(0.17), edm_sigma_to_t(1.02))),
}


def guidance_preset(name: str, **overrides: Any) -> GuidanceConfig:
    """A published guidance setting, optionally with fields replaced (``scale=3.0``)."""
    if name not in GUIDANCE_PRESETS:
        raise ValueError(f"unknown guidance preset {name!r}; known: {sorted(GUIDANCE_PRESETS)}")
    return dataclasses.replace(GUIDANCE_PRESETS[name], **overrides)


class _TracedScale(GuidanceConfig):
    """A guidance config whose ``scale`` is a traced value: always takes the guided path."""

    @property
    def active(self) -> bool:
        return True


def with_scale(config: GuidanceConfig, scale: Any) -> GuidanceConfig:
    """``config`` at guidance weight ``scale``. A Python number (or a concrete array) goes through
    the usual checks; a traced scalar (a jit argument, as ``Tokenizer.decode`` passes it) gives a
    config that always takes the guided path (at ``scale == 1`` it returns the conditional velocity,
    at twice the cost)."""
    try:
        return dataclasses.replace(config, scale=float(scale))
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        traced = _TracedScale(**{**dataclasses.asdict(config), "scale": 2.0})
        object.__setattr__(traced, "scale", jnp.asarray(scale, jnp.float32))
        return traced


def _per_sample_sum(a: jax.Array) -> jax.Array:
    """Sum over every non-batch axis, kept for broadcasting: ``[B, 1, ..., 1]``."""
    return jnp.sum(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def cfg(cond: jax.Array, uncond: jax.Array, scale: float) -> jax.Array:
    """``uncond + scale (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def apg(cond: jax.Array, uncond: jax.Array, scale: float, momentum_state: jax.Array | None, *,
        momentum: float = 0.0, norm_threshold: float = 0.0, eta: float = 0.0,
        ) -> tuple[jax.Array, jax.Array | None]:
    """Adaptive projected guidance in float32 -> ``(guided velocity in cond's dtype, new state)``.

    ``momentum_state`` is the running average ``m`` (shape of ``cond``; ``None`` when
    ``momentum == 0``, and then returned unchanged)."""
    c = cond.astype(jnp.float32)
    d = c - uncond.astype(jnp.float32)
    if momentum != 0.0:
        if momentum_state is None:
            raise ValueError("APG with momentum needs a momentum state (zeros at the first step)")
        d = d + momentum * momentum_state
        momentum_state = d
    if norm_threshold > 0:
        d_norm = jnp.sqrt(_per_sample_sum(d * d))
        d = d * jnp.minimum(1.0, norm_threshold / jnp.maximum(d_norm, 1e-12))
    c_hat = c / jnp.maximum(jnp.sqrt(_per_sample_sum(c * c)), 1e-12)
    d_par = _per_sample_sum(d * c_hat) * c_hat
    update = (d - d_par) + eta * d_par
    return (c + (scale - 1.0) * update).astype(cond.dtype), momentum_state


def guide(cond: jax.Array, uncond: jax.Array, config: GuidanceConfig,
          momentum_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Combine conditional and unconditional velocities by ``config`` ->
    ``(velocity, new APG momentum state)`` (the state passes through unchanged for CFG)."""
    if config.kind == "cfg":
        return cfg(cond, uncond, config.scale), momentum_state
    return apg(cond, uncond, config.scale, momentum_state, momentum=config.apg_momentum,
               norm_threshold=config.apg_norm_threshold, eta=config.apg_eta)
