"""Initialisers with logical axis names, shared by every layer in ``titok_jax.nn``.

Every parameter in the package is created through :func:`boxed`, so ``model.init`` returns
``nn.LogicallyPartitioned`` leaves whose ``names`` (one per array axis) come from the fixed
vocabulary ``embed, heads, kv, mlp, vocab, patch, tokens, conv_in, conv_out, norm, codebook``
(``None`` = never sharded). The config's logical-axis rules map them to mesh axes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
Names = tuple[str | None, ...]

# Names the package uses; anything else in a `names` tuple is a bug.
LOGICAL_AXES = frozenset(
    {"embed", "heads", "kv", "mlp", "vocab", "patch", "tokens", "conv_in", "conv_out", "norm",
     "codebook", "layers"})


def boxed(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """``nn.with_logical_partitioning(init, names)`` after checking the names are known."""
    names = tuple(names)
    unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; use {sorted(LOGICAL_AXES)}")
    return nn.with_logical_partitioning(init, names)


def flat_kernel_init(init: Initializer, num_in_axes: int) -> Initializer:
    """Initialise a multi-axis kernel as the 2-D matrix ``[prod(in axes), prod(out axes)]``.

    A kernel ``[embed, 3, heads, kv]`` is then drawn exactly like the PyTorch ``Linear`` weight
    ``[3*heads*kv, embed]`` (transposed), so fan-in/fan-out based initialisers (xavier, lecun)
    see the same fans as in the reference implementations.
    """

    def wrapped(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        shape = tuple(shape)
        flat = (math.prod(shape[:num_in_axes]), math.prod(shape[num_in_axes:]))
        return jnp.reshape(init(key, flat, dtype), shape)

    return wrapped


def width_scaled_normal(width: int) -> Initializer:
    """``width**-0.5 * N(0, 1)``: TiTok's init of class/mask/latent tokens and position tables."""
    return nn.initializers.normal(stddev=width ** -0.5)


# Defaults used across the package.
default_kernel_init: Initializer = nn.initializers.xavier_uniform()
zeros_init: Initializer = nn.initializers.zeros_init()
ones_init: Initializer = nn.initializers.ones_init()
