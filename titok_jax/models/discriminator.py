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

MaskBit discriminator (:class:`MaskBitDiscriminator`; TiTok stage 2 / MaskBit; the official
``modeling/modules/discriminator.py::NLayerDiscriminator``), every conv TF-SAME padded
(``nn.conv.Conv2dSame``, with bias), LeakyReLU slope 0.1, ``h = hidden_channels``::

    block_in:       conv 5x5 3 -> h                                          -> LeakyReLU
    blocks_{i}, i < num_stages (channels h * (1, 1, 2, 4, ...)[i] -> h * 2**i):
                    conv 3x3 -> blur-pool /2 -> GroupNorm(32, eps 1e-5)     -> LeakyReLU
    adaptive max-pool to 16x16 (PyTorch windows [floor(i n/16), ceil((i+1) n/16)); pools *up* too)
    to_logits_0:    conv 1x1 C -> C -> LeakyReLU;   to_logits_2: conv 5x5 C -> 1

Blur-pool: depthwise correlation with ``outer(k, k) / sum``, ``k = (1, 3, 3, 1)`` (or (1, 2, 1) /
(1, 4, 6, 4, 1)), stride 2, after SAME padding computed as for a 4-tap kernel whatever ``k`` is (as
the official code); ``blur_resample=False`` uses 2x2 average pooling instead. Output: a
``[B, 16, 16, 1]`` logit map for any input size. Init: PyTorch's conv default
``U(+-1/sqrt(fan_in))`` kernels, zero biases, GroupNorm 1 / 0. 1,909,889 params at ``h = 128``
(3 stages).

``models.discriminators.build_discriminator`` picks one by ``name``: ``"patchgan"`` (this
PatchGAN, the VQGAN / taming discriminator; the default) or ``"maskbit"`` (or a 3-D one).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.nn.conv import Conv2dSame, same_padding, torch_conv_init
from titok_jax.nn.initializers import boxed

NORMS = ("batch", "group", "none")


def _normal(mean: float, stddev: float):
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return mean + stddev * jax.random.normal(key, shape, dtype)
    return init


def patchgan_norm(kind: str, channels: int, train: bool, name: str, *, num_groups: int,
                  dtype: Any, param_dtype: Any) -> nn.Module:
    """The PatchGAN's norm layer (2-D or 3-D alike: both normalise the last axis): ``"batch"``
    (PyTorch's BatchNorm: momentum 0.1, eps 1e-5; batch statistics when ``train``) or GroupNorm
    of ``min(num_groups, channels)`` groups (their gcd when that does not divide); scales
    N(1, 0.02), biases 0, as taming's ``weights_init``."""
    scale_init = boxed(_normal(1.0, 0.02), ("norm",))
    bias_init = boxed(nn.initializers.zeros_init(), ("norm",))
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            dtype=dtype, param_dtype=param_dtype,
                            scale_init=scale_init, bias_init=bias_init, name=name)
    groups = min(num_groups, channels)
    if channels % groups:
        groups = math.gcd(groups, channels)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                        scale_init=scale_init, bias_init=bias_init, name=name)


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
        return patchgan_norm(self.norm, channels, train, name, num_groups=self.num_groups,
                             dtype=self.dtype, param_dtype=self.param_dtype)

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


# ----------------------------------------------------------------------------- MaskBit
BLUR_KERNELS = {3: (1.0, 2.0, 1.0), 4: (1.0, 3.0, 3.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}


def blur_kernel(size: int = 4) -> np.ndarray:
    """The normalised 2-D blur ``outer(k, k) / sum(outer(k, k))`` for ``k = BLUR_KERNELS[size]``."""
    if size not in BLUR_KERNELS:
        raise ValueError(f"blur_kernel_size must be one of {sorted(BLUR_KERNELS)}, got {size}")
    k = np.asarray(BLUR_KERNELS[size], np.float32)
    k2 = np.outer(k, k)
    return k2 / k2.sum()


def blur_downsample(x: jax.Array, size: int = 4) -> jax.Array:
    """MaskBit ``BlurBlock``: SAME padding as for a 4-tap stride-2 kernel, then a depthwise
    stride-2 correlation of every channel of ``x [B, H, W, C]`` with :func:`blur_kernel`."""
    c = x.shape[-1]
    pads = [same_padding(x.shape[a], 4, 2) for a in (1, 2)]
    x = jnp.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    k = jnp.asarray(blur_kernel(size), x.dtype)
    kernel = jnp.broadcast_to(k[:, :, None, None], k.shape + (1, c))
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c)


def adaptive_max_pool(x: jax.Array, out_size: int) -> jax.Array:
    """``nn.AdaptiveMaxPool2d(out_size)`` on ``[B, H, W, C]``: output ``i`` of an axis of length
    ``n`` is the max over ``[floor(i n / out), ceil((i + 1) n / out))`` (separable, so rows then
    columns); windows overlap when ``out`` does not divide ``n`` and repeat when ``n < out``.
    Done as one gather per axis: window ``i`` is read at ``min(start_i + t, end_i - 1)``,
    ``t < max window length`` (repeating an element does not change a max)."""
    for axis in (1, 2):
        n = x.shape[axis]
        if n == out_size:
            continue
        if n % out_size == 0:
            f = n // out_size
            x = jnp.max(x.reshape(x.shape[:axis] + (out_size, f) + x.shape[axis + 1:]),
                        axis=axis + 1)
            continue
        starts = np.array([(i * n) // out_size for i in range(out_size)])
        ends = np.array([-(-((i + 1) * n) // out_size) for i in range(out_size)])
        width = int((ends - starts).max())
        idx = np.minimum(starts[:, None] + np.arange(width)[None], ends[:, None] - 1)
        x = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=axis)
        x = jnp.max(x.reshape(x.shape[:axis] + (out_size, width) + x.shape[axis + 1:]),
                    axis=axis + 1)
    return x


class MaskBitDiscriminator(nn.Module):
    """MaskBit discriminator ``[B, H, W, C] -> [B, 16, 16, 1]`` float32 logits (module docstring)."""

    hidden_channels: int = 128
    num_stages: int = 3
    blur_resample: bool = True
    blur_kernel_size: int = 4
    pool_size: int = 16
    negative_slope: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _conv(self, features: int, k: int, name: str) -> Conv2dSame:
        return Conv2dSame(features, k, kernel_init=torch_conv_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"MaskBitDiscriminator expects [B, H, W, C] images, got {x.shape}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.blur_resample:
            blur_kernel(self.blur_kernel_size)  # validates the size
        h = self.hidden_channels
        mult = (1,) + tuple(2 ** t for t in range(self.num_stages))
        if any((h * m) % 32 for m in mult):
            raise ValueError(f"MaskBitDiscriminator: hidden_channels={h} times {mult} must be "
                             "multiples of 32 (GroupNorm(32))")
        act = lambda t: nn.leaky_relu(t, self.negative_slope)  # noqa: E731
        x = act(self._conv(h, 5, "block_in")(x.astype(self.dtype or x.dtype)))
        for i in range(self.num_stages):
            c = h * mult[i + 1]
            x = self._conv(c, 3, f"blocks_{i}_conv")(x)
            x = (blur_downsample(x, self.blur_kernel_size) if self.blur_resample
                 else nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID"))
            x = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=self.dtype,
                             param_dtype=self.param_dtype, use_fast_variance=False,
                             scale_init=boxed(nn.initializers.ones_init(), ("norm",)),
                             bias_init=boxed(nn.initializers.zeros_init(), ("norm",)),
                             name=f"blocks_{i}_norm")(x)
            x = act(x)
        x = adaptive_max_pool(x, self.pool_size)
        c = x.shape[-1]
        x = act(self._conv(c, 1, "to_logits_0")(x))
        x = self._conv(1, 5, "to_logits_2")(x)
        return x.astype(jnp.float32)


DISCRIMINATORS = {"patchgan": NLayerDiscriminator, "maskbit": MaskBitDiscriminator}
