"""Sampling time grids from t = 1 (noise) to t = 0 (data): ``steps + 1`` decreasing points.

With ``u_i = (n - i) / n`` for ``i = 0 .. n`` (so ``u_0 = 1``, ``u_n = 0``)::

    uniform    t_i = u_i                          (FlexTok: t = i/T for i = T .. 1, then 0)
    power      t_i = u_i ** rho                   (FlowMo's "pow_0.25" schedule is rho = 4: the grid
                                                   points (j/n)^4 crowd near t = 0, the data end)
    shifted    t_i = s u_i / (1 + (s - 1) u_i)    (SD3 shift; s > 1 crowds steps near t = 1)

The grid is computed in float64 and returned as float32; the endpoints are exactly 1 and 0.
Sampling step ``i`` moves from ``t_i`` to ``t_{i+1}``, so ``steps`` Euler steps make ``steps``
network calls.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

GRIDS = ("uniform", "power", "shifted")


def _positive(name: str, value: float | None, kind: str) -> float:
    if value is None or not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"time grid {kind!r} needs {name} > 0, got {value!r}")
    return float(value)


def time_grid_np(steps: int, kind: str = "uniform", *, rho: float | None = None,
                 shift: float | None = None) -> np.ndarray:
    """float64 numpy version of :func:`time_grid` (same arguments)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"number of sampling steps must be an int >= 1, got {steps!r}")
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid {kind!r}; known: {', '.join(GRIDS)}")
    if kind != "power" and rho is not None:
        raise ValueError(f"rho is only used by the 'power' grid, not {kind!r}")
    if kind != "shifted" and shift is not None:
        raise ValueError(f"shift is only used by the 'shifted' grid, not {kind!r}")
    u = np.arange(steps, -1, -1, dtype=np.float64) / steps
    if kind == "power":
        return u ** _positive("rho", rho, kind)
    if kind == "shifted":
        s = _positive("shift", shift, kind)
        return s * u / (1 + (s - 1) * u)
    return u


def time_grid(steps: int, kind: str = "uniform", *, rho: float | None = None,
              shift: float | None = None) -> jax.Array:
    """float32 ``[steps + 1]`` times from 1 down to 0 (see the module docstring for the kinds)."""
    return jnp.asarray(time_grid_np(steps, kind, rho=rho, shift=shift), jnp.float32)


def check_grid(grid: jax.Array | np.ndarray) -> None:
    """Raise a ValueError unless ``grid`` is 1-D with >= 2 points; concrete grids must also be
    strictly decreasing and inside [0, 1] (traced grids are checked for shape only)."""
    shape = np.shape(grid)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"time grid must be 1-D with at least 2 points, got shape {shape}")
    if isinstance(grid, jax.core.Tracer):
        return
    g = np.asarray(grid, np.float64)
    if not np.all(np.isfinite(g)) or g.min() < 0 or g.max() > 1:
        raise ValueError(f"time grid values must lie in [0, 1], got min {g.min()} max {g.max()}")
    if not np.all(np.diff(g) < 0):
        raise ValueError("time grid must be strictly decreasing (from noise t=1 towards data t=0)")
