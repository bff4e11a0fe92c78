"""adaLN(-zero) modulation (DiT, FlexTok decoder, FlowMo MMDiT).

``AdaLNModulation``: ``chunks = split_k(Dense(SiLU(c)))`` with ``c [B, Dc]`` (one condition per
sample) or ``[B, T, Dc]`` (per token, e.g. FlexTok's separate patch/register embeddings). The
kernel ``[Dc, k, D]`` (PyTorch ``Linear(Dc, k*D)`` weight transposed and reshaped) and bias
``[k, D]`` are zero at init ("adaLN-zero"), so every shift/scale/gate starts at 0 and a gated
residual block starts as the identity. ``zero_init=False`` uses ``kernel_init`` instead.

``modulate(x, shift, scale) = x * (1 + scale) + shift``, broadcasting ``[B, D]`` over tokens.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn.initializers import Initializer, boxed, default_kernel_init, flat_kernel_init


def _over_tokens(v: jax.Array, x: jax.Array) -> jax.Array:
    """``[B, D]`` -> ``[B, 1, D]`` for ``x [B, T, D]``; per-token ``[B, T, D]`` is unchanged."""
    return v[..., None, :] if v.ndim == x.ndim - 1 else v


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift``; ``shift``/``scale`` are ``[B, D]`` (broadcast over tokens) or
    ``[B, T, D]``."""
    return x * (1 + _over_tokens(scale, x)) + _over_tokens(shift, x)


def gate(x: jax.Array, g: jax.Array) -> jax.Array:
    """``g * x`` with ``g [B, D]`` broadcast over tokens (or ``[B, T, D]``)."""
    return _over_tokens(g, x) * x


class AdaLNModulation(nn.Module):
    """``SiLU -> Dense(num_chunks * features)``, split into ``num_chunks`` ``[..., features]``.

    DiT block order for ``num_chunks=6``: shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp,
    gate_mlp. Kernel names ``("embed", None, "mlp")``, bias ``(None, "mlp")``.
    """

    num_chunks: int
    features: int
    use_bias: bool = True
    zero_init: bool = True
    kernel_init: Initializer = default_kernel_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, cond: jax.Array) -> list[jax.Array]:
        k, d = self.num_chunks, self.features
        zeros = nn.initializers.zeros_init()
        kinit = zeros if self.zero_init else flat_kernel_init(self.kernel_init, 1)
        kernel = self.param("kernel", boxed(kinit, ("embed", None, "mlp")),
                            (cond.shape[-1], k, d), self.param_dtype)
        bias = (self.param("bias", boxed(zeros, (None, "mlp")), (k, d), self.param_dtype)
                if self.use_bias else None)
        h = nn.silu(cond)
        h, kernel, bias = nn.dtypes.promote_dtype(h, kernel, bias, dtype=self.dtype)
        y = jnp.tensordot(h, kernel, axes=((h.ndim - 1,), (0,)), precision=self.precision)
        if bias is not None:
            y = y + bias
        return [y[..., i, :] for i in range(k)]
