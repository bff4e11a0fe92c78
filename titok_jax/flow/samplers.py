"""ODE samplers for rectified flow: Euler and Heun over a time grid, as one ``lax.scan``.

The probability-flow ODE ``dx/dt = v(x, t)`` runs from ``t_0 = 1`` (``x = noise``) down the grid
to ``t_n`` (0 for the grids of :mod:`titok_jax.flow.grids`). Step ``i`` goes from ``t = t_i`` to
``t' = t_{i+1}`` with ``h = t' - t < 0``::

    Euler   x' = x + h v(x, t)                                   1 evaluation per step
    Heun    x~ = x + h v(x, t);  x' = x + h/2 (v(x, t) + v(x~, t'))
                                                                 2 evaluations per step; a step onto
                                                                 t' = 0 is an Euler step (EDM's rule),
                                                                 so n Heun steps to 0 make 2n - 1

``velocity_fn(x_t, t, cond) -> v`` takes ``x_t [N, ...]``, ``t`` float32 ``[N]`` and ``cond`` bool
``[N]`` (True: the sample's condition, False: the null condition) and returns ``v`` shaped like
``x_t``. An "evaluation" is exactly one ``velocity_fn`` call:

- no guidance (or ``scale == 1``): ``N = B``, ``cond`` all True;
- guided, ``t`` inside the interval: ``N = 2B``, rows ``[:B]`` conditional and ``[B:]`` the same
  states unconditional (one batched forward), split and combined by :func:`guide`;
- guided, ``t`` outside the interval: ``N = B``, conditional only (``lax.cond`` picks the branch at
  run time, so only its call is computed; under ``vmap`` both branches run).

A ``velocity_fn`` that closes over per-sample conditioning ``c [B, ...]`` tiles it to ``N`` rows
with :func:`match_batch`. The whole loop is traced once (``velocity_fn`` is traced a fixed number
of times whatever the step count), runs inside ``jit`` and has no host round-trip. The state is
kept in ``noise.dtype`` (use float32); updates are computed in float32. Decoding is reproducible:
the only randomness is ``noise``, which :func:`initial_noise` draws from an explicit seed.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from titok_jax.flow.grids import check_grid
from titok_jax.flow.guidance import GuidanceConfig, guide

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
METHODS = ("euler", "heun")


def match_batch(c: jax.Array, n: int) -> jax.Array:
    """Tile per-sample conditioning ``c [B, ...]`` along axis 0 to ``n`` rows (``n`` a multiple
    of ``B``): row ``j`` of the result is ``c[j % B]``."""
    b = c.shape[0]
    if n % b:
        raise ValueError(f"cannot tile a batch of {b} conditions to {n} rows")
    return jnp.tile(c, (n // b,) + (1,) * (c.ndim - 1))


def initial_noise(seed: int | jax.Array, shape: tuple[int, ...],
                  dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Standard normal start ``x_1 ~ N(0, I)`` from an int seed or a ``jax.random.key``."""
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        key = seed
    else:
        key = jax.random.key(seed)
    return jax.random.normal(key, shape, dtype)


def start_noise(shape: tuple[int, ...], key: jax.Array | None = None, noise: jax.Array | None = None,
                what: str = "") -> jax.Array:
    """The sampler's start: ``noise`` when given (checked against ``shape``), else ``N(0, I)``
    drawn from ``key``; one-line ValueErrors (``what`` says what the noise is)."""
    shape = tuple(int(d) for d in shape)
    if noise is None:
        if key is None:
            raise ValueError("decode needs a PRNG key (or explicit noise)")
        return jax.random.normal(key, shape, jnp.float32)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}{f' ({what})' if what else ''}, got {tuple(noise.shape)}")
    return noise.astype(jnp.float32)


def _evaluator(velocity_fn: VelocityFn, batch: int, guidance: GuidanceConfig | None):
    """``evaluate(x, t, state) -> (v float32, state)``: one ``velocity_fn`` call (see module doc)."""
    guided = guidance is not None and guidance.active
    ones = jnp.ones((batch,), bool)

    def call(x: jax.Array, t: jax.Array, cond: jax.Array) -> jax.Array:
        v = velocity_fn(x, t, cond)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {v.shape} for x_t of shape {x.shape}")
        return v.astype(jnp.float32)

    def cond_only(x, t, state):
        return call(x, jnp.full((batch,), t, jnp.float32), ones), state

    if not guided:
        return cond_only

    def both(x, t, state):
        tb = jnp.full((2 * batch,), t, jnp.float32)
        v = call(jnp.concatenate([x, x]), tb, jnp.concatenate([ones, ~ones]))
        return guide(v[:batch], v[batch:], guidance, state)

    if guidance.interval is None:
        return both
    lo, hi = guidance.interval

    def evaluate(x, t, state):
        return lax.cond((t >= lo) & (t <= hi), both, cond_only, x, t, state)

    return evaluate


def sample(velocity_fn: VelocityFn, noise: jax.Array, grid: jax.Array, method: str = "euler",
           guidance: GuidanceConfig | None = None, *,
           return_trajectory: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Integrate ``dx/dt = v`` from ``noise`` (at ``grid[0]``) along ``grid`` (see module doc).

    Args:
      velocity_fn: ``(x_t [N, ...], t [N], cond bool [N]) -> v [N, ...]``.
      noise: ``[B, ...]`` start state (e.g. :func:`initial_noise`).
      grid: decreasing times ``[n + 1]`` (:func:`titok_jax.flow.grids.time_grid`).
      method: ``"euler"`` or ``"heun"``.
      guidance: optional :class:`GuidanceConfig` (cond and uncond in one batched call).
      return_trajectory: also return the states after every step, ``[n, B, ...]``.

    Returns:
      the final state ``[B, ...]`` (and the trajectory when asked).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler method {method!r}; known: {', '.join(METHODS)}")
    if guidance is not None and not isinstance(guidance, GuidanceConfig):
        raise ValueError(f"guidance must be a GuidanceConfig or None, got {type(guidance).__name__}")
    if noise.ndim < 1 or not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(f"noise must be a floating array [batch, ...], got {noise.dtype} {noise.shape}")
    check_grid(grid)
    grid = jnp.asarray(grid, jnp.float32)
    batch = noise.shape[0]
    evaluate = _evaluator(velocity_fn, batch, guidance)
    state = (jnp.zeros(noise.shape, jnp.float32)
             if guidance is not None and guidance.active and guidance.uses_momentum else None)

    def step(carry, ts):
        x, state = carry
        t, t_next = ts
        h = t_next - t
        xf = x.astype(jnp.float32)
        v, state = evaluate(x, t, state)
        x_euler = xf + h * v
        if method == "heun":
            def heun(x_euler, state):
                v_next, state = evaluate(x_euler.astype(x.dtype), t_next, state)
                return xf + (0.5 * h) * (v + v_next), state

            x_euler, state = lax.cond(t_next > 0, heun, lambda xe, s: (xe, s), x_euler, state)
        x_new = x_euler.astype(x.dtype)
        return (x_new, state), (x_new if return_trajectory else None)

    (x, _), trajectory = lax.scan(step, (noise, state), (grid[:-1], grid[1:]))
    return (x, trajectory) if return_trajectory else x
