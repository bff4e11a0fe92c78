"""Dropout that also runs on meshes with Explicit axes ("sharding in types", ``jax.make_mesh``'s
default in jax 0.10).

``y = where(keep, x / (1 - rate), 0)`` with ``keep ~ Bernoulli(1 - rate)`` from the ``dropout`` rng,
as ``flax.linen.Dropout``. Flax draws the mask replicated and ``lax.select``-s it against the input,
which fails when the input is sharded in its type; here the mask is drawn with the input's sharding
(threefry bits do not depend on the sharding, so the mask is the same) and applied with
``jnp.where``. Elsewhere (Auto meshes, one device, ``shard_map``) it *is* ``flax.linen.Dropout``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def explicit_sharding(x: Any) -> NamedSharding | None:
    """``x``'s sharding when it lives on a mesh with Explicit axes, else None (plain jnp ops need
    no annotation there)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return sharding


def bernoulli_like(key: jax.Array, p: float, x: jax.Array, shape: tuple[int, ...] | None = None
                   ) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape or x.shape)``, drawn with ``x``'s sharding on an
    Explicit mesh (dimensions of ``shape`` that are 1 where ``x``'s are not are left unsharded)."""
    shape = tuple(x.shape if shape is None else shape)
    sharding = explicit_sharding(x)
    if sharding is None:
        return jax.random.bernoulli(key, p, shape)
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    spec = tuple(e if n == m else None for e, n, m in zip(spec, shape, x.shape))
    return jax.random.bernoulli(key, p, shape,
                                out_sharding=NamedSharding(sharding.mesh, PartitionSpec(*spec)))


class Dropout(nn.Dropout):
    """``flax.linen.Dropout`` (same attributes, rng stream and masks) that also works on Explicit
    meshes; see the module docstring."""

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if (explicit_sharding(inputs) is None or self.rate == 0.0 or deterministic
                or self.rate == 1.0):
            return super().__call__(inputs, deterministic=deterministic, rng=rng)
        keep_prob = 1.0 - self.rate
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        shape = [1 if d in self.broadcast_dims else n for d, n in enumerate(inputs.shape)]
        mask = bernoulli_like(rng, keep_prob, inputs, tuple(shape))
        return jnp.where(mask, inputs / keep_prob, jnp.zeros_like(inputs))
