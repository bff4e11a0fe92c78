"""PatchGAN discriminator (``NLayerDiscriminator`` of pix2pix / taming-transformers), NHWC.

Layers for ``n_layers = 3``, ``ndf = 64`` (every conv 4x4 with padding 1; LeakyReLU slope 0.2)::

    conv  3 -> 64,   stride 2, bias                 -> LeakyReLU
    conv 64 -> 128,  stride 2, no bias -> norm       -> LeakyReLU
    conv 128 -> 256, stride 2, no bias -> norm       -> LeakyReLU
    conv 256 -> 512, stride 1, no bias -> norm       -> LeakyReLU
    conv 512 -> 1,   stride 1, bias                  -> logits

(channels ``ndf * min(2**n, 8)``). The output is a map of patch logits ``[B, h, w, 1]``:
30x30 for 256x256 inputs, 6x6 for 64x64 (each stride-2 conv halves, each stride-1 4x4 conv with
padding 1 removes one pixel).

``norm``:
- ``"batch"``: taming's BatchNorm (momentum 0.1 in PyTorch terms, eps 1e-5); running statistics in
  the ``batch_stats`` collection, updated when ``train=True`` (``mutable=["batch_stats"]``).
- ``"group"`` (default): GroupNorm with ``min(num_groups, C)`` groups (their gcd if that does not
  divide C), eps 1e-5. Batch-independent, so no state and no cross-device statistics;
  MaskBit / TiTok use GroupNorm(32) in their discriminator.
- ``"none"``: no normalisation; the three middle convs then get a bias.

Param count for the standard config (ndf 64, n_layers 3): 2,765,633 with ``"batch"`` or ``"group"``
(taming's count; the normed convs have no bias and the norm has scale + bias, 2C params, either
way; BatchNorm's running mean/var are state, not params), 2,764,737 with ``"none"`` (conv biases
128 + 256 + 512 instead of 2 * (128 + 256 + 512) norm params).

Init as taming's ``weights_init``: conv kernels N(0, 0.02), norm scales N(1, 0.02), biases 0.

Note: TiTok's stage-2 discriminator is the MaskBit-style one (5x5 conv 3->128, three
[conv 3x3, blur-pool down 2, GroupNorm(32), LeakyReLU] stages, adaptive max-pool to 16x16, then
1x1 and 5x5 convs to one 16x16 logit map); it is not built here. This PatchGAN is the VQGAN /
taming discriminator.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn.initializers import boxed

NORMS = ("batch", "group", "none")


def _normal(mean: float, stddev: float):
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return mean + stddev * jax.random.normal(key, shape, dtype)
    return init


class NLayerDiscriminator(nn.Module):
    """PatchGAN ``[B, H, W, C] -> [B, h, w, 1]`` float32 logits (see the module docstring)."""

    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"
    num_groups: int = 32
    negative_slope: float = 0.2
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def _conv(self, features: int, stride: int, use_bias: bool, name: str,
              last: bool = False) -> nn.Conv:
        out_name = None if last else "conv_out"
        return nn.Conv(features, kernel_size=(4, 4), strides=(stride, stride),
                       padding=((1, 1), (1, 1)), use_bias=use_bias, dtype=self.dtype,
                       param_dtype=self.param_dtype, precision=self.precision,
                       kernel_init=boxed(_normal(0.0, 0.02), (None, None, "conv_in", out_name)),
                       bias_init=boxed(nn.initializers.zeros_init(), (out_name,)), name=name)

    def _norm(self, channels: int, train: bool, name: str) -> nn.Module:
        scale_init = boxed(_normal(1.0, 0.02), ("norm",))
        bias_init = boxed(nn.initializers.zeros_init(), ("norm",))
        if self.norm == "batch":
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=self.dtype, param_dtype=self.param_dtype,
                                scale_init=scale_init, bias_init=bias_init, name=name)
        groups = min(self.num_groups, channels)
        if channels % groups:
            groups = math.gcd(groups, channels)
        return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype,
                            param_dtype=self.param_dtype, scale_init=scale_init,
                            bias_init=bias_init, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"unknown discriminator norm {self.norm!r}; expected one of {NORMS}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if x.ndim != 4:
            raise ValueError(f"NLayerDiscriminator expects [B, H, W, C] images, got {x.shape}")
        normed = self.norm != "none"
        act = lambda h: nn.leaky_relu(h, self.negative_slope)  # noqa: E731
        x = act(self._conv(self.ndf, 2, True, "conv0")(x))
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1
            channels = self.ndf * min(2 ** n, 8)
            x = self._conv(channels, stride, not normed, f"conv{n}")(x)
            if normed:
                x = self._norm(channels, train, f"norm{n}")(x)
            x = act(x)
        x = self._conv(1, 1, True, f"conv{self.n_layers + 1}", last=True)(x)
        return x.astype(jnp.float32)
