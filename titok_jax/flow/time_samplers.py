"""Training-time distributions of the flow time ``t`` in [0, 1] (t = 1 is noise).

``sample_time(key, batch, kind, **params) -> float32 [batch]``:

=================  ==========================================  ===================================
kind               t                                           CDF F(t)
=================  ==========================================  ===================================
``uniform``        u ~ U(0, 1)                                 t
``logit_normal``   sigmoid(loc + scale n), n ~ N(0, 1)          Phi((logit t - loc) / scale)
``mixture``        U(0, 1) with prob ``uniform_prob``, else    p t + (1 - p) Phi((logit t - loc)
                   logit-normal(loc, scale)                    / scale)
``shift``          shift_time(t_base, s), t_base from ``base``  F_base(t / (s - (s - 1) t))
=================  ==========================================  ===================================

``shift_time(t, s) = s t / (1 + (s - 1) t)`` is the SD3 time shift (s > 1 moves mass towards the
noise end t = 1; s = 1 is the identity). ``logit_normal(stratified=True)`` draws the normal by
stratified inverse-CDF sampling (FlexTok's option): sample ``i`` of a random permutation gets
``Phi^-1((i + u_i) / batch)``, so each of the ``batch`` equal-probability strata holds exactly one t.

Published defaults (``TIME_SAMPLER_PRESETS``):

- ``flextok``: logit-normal, loc 0, scale 1 (``MinRFNoiseModule(ln=True)``; the released
  models' exact choice is not visible, the module default is used).
- ``flowmo``: "fat_lognormal": sigmoid(N(0, 1)) with probability 0.9, else U(0, 1)
  -> ``mixture(loc=0, scale=1, uniform_prob=0.1)``.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

TIME_SAMPLERS = ("uniform", "logit_normal", "mixture", "shift")

_DEFAULTS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "logit_normal": {"loc": 0.0, "scale": 1.0, "stratified": False},
    "mixture": {"loc": 0.0, "scale": 1.0, "uniform_prob": 0.1},
}

TIME_SAMPLER_PRESETS: dict[str, dict[str, Any]] = {
    "flextok": {"kind": "logit_normal", "loc": 0.0, "scale": 1.0},
    "flowmo": {"kind": "mixture", "loc": 0.0, "scale": 1.0, "uniform_prob": 0.1},
}


def time_sampler_preset(name: str) -> dict[str, Any]:
    """A copy of a published time sampler as keyword arguments for :func:`sample_time`
    (``sample_time(key, b, **time_sampler_preset("flowmo"))``)."""
    if name not in TIME_SAMPLER_PRESETS:
        raise ValueError(f"unknown time sampler preset {name!r}; known: {sorted(TIME_SAMPLER_PRESETS)}")
    return dict(TIME_SAMPLER_PRESETS[name])


def shift_time(t: jax.Array | float, shift: float) -> jax.Array:
    """SD3 time shift ``s t / (1 + (s - 1) t)``: maps [0, 1] onto itself monotonically, fixes 0
    and 1; ``s > 1`` pushes times towards 1 (noise)."""
    _check_shift(shift)
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    return shift * t / (1 + (shift - 1) * t)


def _check_shift(shift: Any) -> None:
    if shift is None or not (float(shift) > 0 and math.isfinite(float(shift))):
        raise ValueError(f"time shift must be a finite number > 0, got {shift!r}")


def _params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Defaults merged with ``params``; unknown names and bad values raise one-line ValueErrors."""
    if kind not in _DEFAULTS:
        raise ValueError(f"unknown time sampler kind {kind!r}; known: {', '.join(TIME_SAMPLERS)}")
    unknown = set(params) - set(_DEFAULTS[kind])
    if unknown:
        raise ValueError(f"time sampler {kind!r} got unknown parameter(s) {sorted(unknown)}; "
                         f"it takes {sorted(_DEFAULTS[kind]) or 'none'}")
    p = {**_DEFAULTS[kind], **params}
    if "scale" in p and not float(p["scale"]) > 0:
        raise ValueError(f"logit-normal scale must be > 0, got {p['scale']!r}")
    if "uniform_prob" in p and not 0.0 <= float(p["uniform_prob"]) <= 1.0:
        raise ValueError(f"mixture uniform_prob must be in [0, 1], got {p['uniform_prob']!r}")
    return p


def _logit_normal(key: jax.Array, batch: int, loc: float, scale: float,
                  stratified: bool) -> jax.Array:
    if stratified:
        k_u, k_perm = jax.random.split(key)
        u = (jnp.arange(batch, dtype=jnp.float32) + jax.random.uniform(k_u, (batch,))) / batch
        n = ndtri(jax.random.permutation(k_perm, u))
    else:
        n = jax.random.normal(key, (batch,), jnp.float32)
    return jax.nn.sigmoid(loc + scale * n)


def sample_time(key: jax.Array, batch: int, kind: str = "logit_normal", **params: Any) -> jax.Array:
    """Draw ``batch`` flow times (float32 ``[batch]``) from the distribution ``kind`` (see the
    module docstring). ``kind="shift"`` takes ``shift`` (required), ``base`` (a kind, default
    ``"uniform"``) and that base's parameters."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if kind == "shift":
        params = dict(params)
        if "shift" not in params:
            raise ValueError("time sampler 'shift' needs a shift=s parameter (s > 0)")
        shift = params.pop("shift")
        _check_shift(shift)
        base = params.pop("base", "uniform")
        if base == "shift":
            raise ValueError("time sampler 'shift' cannot use base='shift'")
        return shift_time(sample_time(key, batch, base, **params), float(shift))
    p = _params(kind, params)
    if kind == "uniform":
        return jax.random.uniform(key, (batch,), jnp.float32)
    if kind == "logit_normal":
        return _logit_normal(key, batch, float(p["loc"]), float(p["scale"]), bool(p["stratified"]))
    # mixture
    k_ln, k_u, k_pick = jax.random.split(key, 3)
    t_ln = _logit_normal(k_ln, batch, float(p["loc"]), float(p["scale"]), False)
    t_u = jax.random.uniform(k_u, (batch,), jnp.float32)
    pick_uniform = jax.random.uniform(k_pick, (batch,)) < float(p["uniform_prob"])
    return jnp.where(pick_uniform, t_u, t_ln)
