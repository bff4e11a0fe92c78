"""Classifier-free guidance schedules of the TiTok MaskGIT sampler (``ImageBert.generate``).

With ``g`` the guidance scale, step ``s = 0..S-1`` of ``S``, the per-step weight ``w_s`` and the
combination of the conditional and unconditional logits are::

    constant:      w_s = g                                      logits = cond + w_s (cond - uncond)
    linear:        w_s = g * s / S     (MUSE; 0 at step 0)      logits = cond + w_s (cond - uncond)
    power-cosine:  w_s = (g - 1) * (1 - cos(pi (s/S)^p)) / 2 + 1                     (MDT, p = 3)
                                                                logits = uncond + w_s (cond - uncond)

For ``constant`` and ``linear`` ``w = 0`` is the unguided sampler; for ``power-cosine`` ``w = 1`` is
(its first step always has ``w_0 = 1``). The official ``linear`` starts from 0 and sets
``w = g * (s+1)/S`` *after* step ``s``, so step ``s`` uses ``g * s / S``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

GUIDANCE_SCHEDULES = ("constant", "linear", "power-cosine")


def check_guidance_schedule(schedule: str) -> None:
    """Raise a one-line ValueError for an unknown schedule name."""
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"unknown guidance schedule {schedule!r}; expected one of "
                         f"{GUIDANCE_SCHEDULES}")


def guidance_weight(schedule: str, scale: float | jax.Array, step: int | jax.Array, steps: int,
                    power: float = 3.0) -> jax.Array:
    """``w_s`` of the module docstring (float32; ``step`` may be traced)."""
    check_guidance_schedule(schedule)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scale = jnp.asarray(scale, jnp.float32)
    frac = jnp.asarray(step, jnp.float32) / steps
    if schedule == "constant":
        return scale * jnp.ones_like(frac)
    if schedule == "linear":
        return scale * frac
    return (scale - 1.0) * (1.0 - jnp.cos(math.pi * frac ** power)) / 2.0 + 1.0


def apply_guidance(cond: jax.Array, uncond: jax.Array, weight: jax.Array, schedule: str
                   ) -> jax.Array:
    """Combine the logits as the module docstring says for ``schedule``."""
    check_guidance_schedule(schedule)
    if schedule == "power-cosine":
        return uncond + weight * (cond - uncond)
    return cond + weight * (cond - uncond)


def needs_uncond(schedule: str, scale: float | jax.Array) -> bool:
    """Whether the sampler must evaluate the unconditional logits: False only for a Python-number
    ``scale == 0`` with ``constant`` / ``linear`` (then every step is exactly the cond logits)."""
    check_guidance_schedule(schedule)
    if schedule == "power-cosine":
        return True
    return not (isinstance(scale, (int, float)) and scale == 0)
