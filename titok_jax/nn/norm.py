"""Normalisation layers with logical axis names on their scale/bias.

LayerNorm:  y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias      (over the last axis)
RMSNorm:    y = x / sqrt(mean(x**2) + eps) * scale
Statistics are reduced in float32 whatever the compute dtype (flax ``force_float32_reductions``).
PyTorch's ``nn.LayerNorm`` default eps is 1e-5 (TiTok/open_clip); DiT-style blocks use 1e-6.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from titok_jax.nn.initializers import boxed, ones_init, zeros_init

NORM_TYPES = ("layernorm", "rmsnorm")


def make_norm(
    kind: str = "layernorm",
    *,
    epsilon: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    name: str | None = None,
) -> nn.Module:
    """A ``nn.LayerNorm`` or ``nn.RMSNorm`` whose params carry the logical name ``("norm",)``.

    ``use_scale=False, use_bias=False`` gives the affine-free LayerNorm of DiT/FlexTok blocks.
    ``use_bias`` is ignored for RMSNorm (it has none).
    """
    if kind == "layernorm":
        return nn.LayerNorm(
            epsilon=epsilon, use_scale=use_scale, use_bias=use_bias, dtype=dtype,
            param_dtype=param_dtype, scale_init=boxed(ones_init, ("norm",)),
            bias_init=boxed(zeros_init, ("norm",)), name=name)
    if kind == "rmsnorm":
        return nn.RMSNorm(
            epsilon=epsilon, use_scale=use_scale, dtype=dtype, param_dtype=param_dtype,
            scale_init=boxed(ones_init, ("norm",)), name=name)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORM_TYPES}")
