"""Convolution helpers of the CNN tokenizers (MaskGIT-VQGAN, the KL-VAE, the discriminators), NHWC.

- :func:`same_padding` / :func:`conv2d_same` / :class:`Conv2dSame`: TF-style SAME padding
  (``total = max((ceil(i/s) - 1) s + (k - 1) d + 1 - i, 0)``, the smaller half before), as PyTorch's
  ``Conv2dSame`` of the official MaskGIT port.
- :data:`torch_conv_init`: PyTorch's default ``Conv2d`` weight init ``U(+-1/sqrt(fan_in))``.
- :func:`group_norm` (32 groups, exact variance) and :func:`check_channels` (widths it accepts);
  :func:`upsample_nearest` and :func:`avg_pool_2x2` (``F.interpolate`` / ``F.avg_pool2d``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from titok_jax.nn.initializers import boxed

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default Conv2d weight init, U(+-1/sqrt(fan_in)); biases start at zero.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()
GROUPS = 32


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TF/``Conv2dSame`` padding of one spatial axis: ``(lo, hi)`` with
    ``total = max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)``,
    ``lo = total // 2`` and ``hi = total - lo`` (the extra pixel goes after)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def conv2d_same(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
                feature_group_count: int = 1, precision: Any = None) -> jax.Array:
    """``x [B, H, W, C_in]`` * ``kernel [kh, kw, C_in / groups, C_out]`` (+ ``bias [C_out]``) with
    TF-style SAME padding (:func:`same_padding` per axis, asymmetric for even kernels / strides).
    Output ``[B, ceil(H / s), ceil(W / s), C_out]``; cross-correlation as in PyTorch / lax."""
    s = (stride, stride) if isinstance(stride, int) else tuple(stride)
    d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    pads = [same_padding(x.shape[1 + a], kernel.shape[a], s[a], d[a]) for a in range(2)]
    y = lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=s, padding=pads,
                                 rhs_dilation=d, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=feature_group_count, precision=precision)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


class Conv2dSame(nn.Module):
    """``Conv2dSame`` of the official code: a conv with TF-style SAME padding (see
    :func:`conv2d_same`). Params ``kernel [k, k, C_in, C_out]`` (logical ``(None, None, conv_in,
    conv_out)``) and ``bias [C_out]``."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    use_bias: bool = True
    kernel_init: Initializer = torch_conv_init
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", boxed(self.kernel_init, (None, None, "conv_in", "conv_out")),
                            (k, k, x.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", boxed(zeros, ("conv_out",)), (self.features,), self.param_dtype)
                if self.use_bias else None)
        dtype = self.dtype or x.dtype
        return conv2d_same(x.astype(dtype), kernel.astype(dtype),
                           None if bias is None else bias.astype(dtype), self.stride,
                           precision=self.precision)


def group_norm(name: str, dtype: Dtype, param_dtype: Dtype, epsilon: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm(32 groups) with ``("norm",)`` params; exact (two-pass) variance as PyTorch."""
    return nn.GroupNorm(num_groups=GROUPS, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, scale_init=boxed(ones, ("norm",)),
                        bias_init=boxed(zeros, ("norm",)), name=name)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of ``[B, H, W, C]`` by ``factor`` (``F.interpolate``)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """``F.avg_pool2d(kernel 2, stride 2)`` (odd trailing rows / columns are dropped)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def check_channels(hidden_channels: int, channel_mult: Sequence[int], what: str = "MaskGIT-VQGAN"
                   ) -> None:
    """Every level width ``hidden_channels * m`` must be a positive multiple of 32 (GroupNorm)."""
    if not channel_mult:
        raise ValueError(f"{what}: channel_mult must not be empty")
    for m in channel_mult:
        c = hidden_channels * int(m)
        if c <= 0 or c % GROUPS:
            raise ValueError(f"{what}: hidden_channels * channel_mult = {hidden_channels} * {m} = {c} "
                             f"is not a positive multiple of {GROUPS} (GroupNorm({GROUPS}))")
