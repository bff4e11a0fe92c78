"""3-D discriminators for video tokenizers: clips ``[B, T, H, W, C]`` (NTHWC) -> float32 logits.

:class:`StyleGANDiscriminator3D` (``"stylegan3d"``): MAGVIT v1's discriminator
(google-research/magvit ``videogvt/models/stylegan_discriminator_3d.py``; reference/magvit.md 1.5),
LeakyReLU slope 0.2, every conv ``'SAME'`` with bias unless said, ``f = filters``::

    conv 3x3x3 3 -> f                                                   -> LeakyReLU
    ResBlock(f m_i) for each multiplier m_i (UCF: (2, 4, 4, 4, 4)):
        main:     conv 3x3x3 C -> C -> norm -> LeakyReLU -> down /2 in (T, H, W)
                  -> conv 3x3x3 C -> f m_i -> norm -> LeakyReLU
        shortcut: down /2 in (T, H, W) -> conv 1x1x1 C -> f m_i (no bias)
        out = (main + shortcut) / sqrt(2)
    conv 3x3x3 -> norm -> LeakyReLU -> flatten -> Dense(f m_last) -> LeakyReLU -> Dense(1)

Output ``[B, 1]``: one logit per clip. ``downsample="avg"`` (default, MAGVIT v1's code): 2x2x2
average pooling with TF-style SAME padding, padding excluded from the divisor (``avg_pool_3d``:
an odd or 1-frame T pools to ``ceil(T / 2)``; UCF 16 frames: 16 -> 8 -> 4 -> 2 -> 1 -> 1).
``downsample="blur"``: MAGVIT-v2's (paper-only) 3D blur pooling, a separable ``(1, 3, 3, 1)`` blur
in T, H and W at stride 2 after SAME padding for a 4-tap stride-2 kernel (the 3-D form of the
MaskBit / StyleGAN blur, ``discriminator.blur_downsample``); an axis of length 1 stays 1.
``norm``: ``"none"`` (MAGVIT v1's released configs: ``norm_type`` unset) or ``"group"``
(GroupNorm(32)). Init: xavier-uniform kernels, zero biases. Batch-independent (no BatchNorm), so
the R1 penalty (``losses.gan.r1_penalty``) is per clip, as MAGVIT v1 requires.

:class:`NLayerDiscriminator3D` (``"patchgan3d"``): Open-MAGVIT2's video discriminator (SEED-Voken
``modules/discriminator/model.py::NLayerDiscriminator3D``; reference/magvit.md 5): taming's
PatchGAN with 3-D convs, kernel ``k = 3`` with padding 1 (not the 2-D PatchGAN's 4/1)::

    conv  3 -> ndf,  stride (2, 2, 2), bias                               -> LeakyReLU
    conv n = 1 .. n_layers - 1 -> ndf min(2^n, 8), stride (2 if n == 1 else 1, 2, 2), no bias
                                                                  -> norm -> LeakyReLU
    conv -> ndf min(2^n_layers, 8), stride 1, no bias             -> norm -> LeakyReLU
    conv -> 1, stride 1, bias                                                -> logits

so time is halved twice (17 -> 9 -> 5) and space ``n_layers`` times (128 -> 16): a ``[B, t, h,
w, 1]`` patch-logit map. ``norm``: ``"batch"`` (Open-MAGVIT2's BatchNorm3d, running statistics
in ``batch_stats`` as the 2-D PatchGAN's: the task's ``_disc`` plumbing serves both), ``"group"``
(default, batch-independent) or ``"none"``. Init as taming's ``weights_init``: kernels N(0,
0.02), norm scales N(1, 0.02), biases 0. ``temporal_strides`` overrides the per-conv time
strides (``n_layers + 1`` ints for conv0 .. conv{n_layers}).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.models.discriminator import BLUR_KERNELS, NORMS, _normal, patchgan_norm
from titok_jax.nn.conv import same_padding
from titok_jax.nn.conv3d import avg_pool_3d
from titok_jax.nn.initializers import boxed

DOWNSAMPLES = ("avg", "blur")


def blur_downsample_3d(x: jax.Array, size: int = 4) -> jax.Array:
    """Separable blur of ``x [B, T, H, W, C]`` with ``k / sum(k)``, ``k = BLUR_KERNELS[size]``, at
    stride 2 along T, H and W (SAME padding for a 4-tap stride-2 kernel; an axis of length 1 is
    left alone): ``[B, ceil(T / 2), ceil(H / 2), ceil(W / 2), C]``."""
    if size not in BLUR_KERNELS:
        raise ValueError(f"blur kernel size must be one of {sorted(BLUR_KERNELS)}, got {size}")
    k = np.asarray(BLUR_KERNELS[size], np.float32)
    k = k / k.sum()
    c = x.shape[-1]
    for axis in (1, 2, 3):
        n = x.shape[axis]
        if n == 1:
            continue
        pads = [(0, 0)] * 5
        pads[axis] = same_padding(n, 4, 2)
        y = jnp.pad(x, pads)
        shape = [1, 1, 1]
        shape[axis - 1] = len(k)
        kernel = jnp.broadcast_to(jnp.asarray(k, x.dtype).reshape(*shape, 1, 1), (*shape, 1, c))
        strides = [1, 1, 1]
        strides[axis - 1] = 2
        x = jax.lax.conv_general_dilated(y, kernel, strides, "VALID",
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                         feature_group_count=c)
    return x


def _group_norm(channels: int, groups: int, dtype: Any, param_dtype: Any,
                name: str) -> nn.GroupNorm:
    g = min(groups, channels)
    if channels % g:
        g = math.gcd(g, channels)
    return nn.GroupNorm(num_groups=g, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                        scale_init=boxed(nn.initializers.ones_init(), ("norm",)),
                        bias_init=boxed(nn.initializers.zeros_init(), ("norm",)), name=name)


class StyleGANDiscriminator3D(nn.Module):
    """MAGVIT v1's 3-D StyleGAN discriminator ``[B, T, H, W, C] -> [B, 1]`` (module docstring)."""

    filters: int = 64
    channel_multipliers: Sequence[int] = (2, 4, 4, 4, 4)
    downsample: str = "avg"
    blur_kernel_size: int = 4
    norm: str = "none"
    num_groups: int = 32
    negative_slope: float = 0.2
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _conv(self, features: int, k: int, name: str, use_bias: bool = True) -> nn.Conv:
        return nn.Conv(features, (k, k, k), padding="SAME", use_bias=use_bias, dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       kernel_init=boxed(nn.initializers.xavier_uniform(),
                                         (None, None, None, "conv_in", "conv_out")),
                       bias_init=boxed(nn.initializers.zeros_init(), ("conv_out",)), name=name)

    def _norm(self, x: jax.Array, name: str) -> jax.Array:
        if self.norm == "none":
            return x
        return _group_norm(x.shape[-1], self.num_groups, self.dtype, self.param_dtype, name)(x)

    def _down(self, x: jax.Array) -> jax.Array:
        if self.downsample == "blur":
            return blur_downsample_3d(x, self.blur_kernel_size)
        return avg_pool_3d(x, (2, 2, 2))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train   # no batch statistics
        if x.ndim != 5:
            raise ValueError(f"StyleGANDiscriminator3D expects clips [B, T, H, W, C], "
                             f"got {x.shape}")
        if self.norm not in ("none", "group"):
            raise ValueError(f"stylegan3d norm must be 'none' or 'group', got {self.norm!r}")
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"stylegan3d downsample must be one of {DOWNSAMPLES}, "
                             f"got {self.downsample!r}")
        if not self.channel_multipliers:
            raise ValueError("stylegan3d needs at least one channel multiplier")
        act = lambda h: nn.leaky_relu(h, self.negative_slope)  # noqa: E731
        x = act(self._conv(self.filters, 3, "conv_in")(x.astype(self.dtype or x.dtype)))
        filters = self.filters
        for i, m in enumerate(self.channel_multipliers):
            filters = int(self.filters * m)
            c = x.shape[-1]
            h = act(self._norm(self._conv(c, 3, f"block{i}_conv1")(x), f"block{i}_norm1"))
            h = self._down(h)
            h = act(self._norm(self._conv(filters, 3, f"block{i}_conv2")(h), f"block{i}_norm2"))
            s = self._conv(filters, 1, f"block{i}_shortcut", use_bias=False)(self._down(x))
            x = (s + h) / math.sqrt(2.0)
        x = act(self._norm(self._conv(filters, 3, "conv_out")(x), "norm_out"))
        x = x.reshape((x.shape[0], -1))
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                     bias_init=boxed(nn.initializers.zeros_init(), ("conv_out",)))
        x = act(nn.Dense(filters, kernel_init=boxed(nn.initializers.xavier_uniform(),
                                                    ("conv_in", "conv_out")),
                         name="dense", **dense)(x))
        x = nn.Dense(1, kernel_init=boxed(nn.initializers.xavier_uniform(), ("conv_in", None)),
                     name="logits", **{**dense, "bias_init": boxed(nn.initializers.zeros_init(),
                                                                   (None,))})(x)
        return x.astype(jnp.float32)


class NLayerDiscriminator3D(nn.Module):
    """3-D PatchGAN ``[B, T, H, W, C] -> [B, t, h, w, 1]`` float32 logits (module docstring)."""

    ndf: int = 64
    n_layers: int = 3
    kernel_size: int = 3
    norm: str = "group"
    num_groups: int = 32
    temporal_strides: Sequence[int] | None = None
    negative_slope: float = 0.2
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def _strides(self) -> list[int]:
        if self.temporal_strides is not None:
            ts = [int(s) for s in self.temporal_strides]
            if len(ts) != self.n_layers + 1:
                raise ValueError(f"patchgan3d temporal_strides needs n_layers + 1 = "
                                 f"{self.n_layers + 1} ints, got {list(self.temporal_strides)}")
            return ts
        # Open-MAGVIT2: conv0 and conv1 halve T, the rest keep it
        return [2] + [2 if n == 1 else 1 for n in range(1, self.n_layers)] + [1]

    def _conv(self, features: int, strides: tuple[int, int, int], use_bias: bool, name: str,
              last: bool = False) -> nn.Conv:
        k, p = self.kernel_size, (self.kernel_size - 1) // 2
        out_name = None if last else "conv_out"
        return nn.Conv(features, (k, k, k), strides=strides, padding=((p, p),) * 3,
                       use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       precision=self.precision,
                       kernel_init=boxed(_normal(0.0, 0.02),
                                         (None, None, None, "conv_in", out_name)),
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
        if x.ndim != 5:
            raise ValueError(f"NLayerDiscriminator3D expects clips [B, T, H, W, C], got {x.shape}")
        ts = self._strides()
        normed = self.norm != "none"
        act = lambda h: nn.leaky_relu(h, self.negative_slope)  # noqa: E731
        x = act(self._conv(self.ndf, (ts[0], 2, 2), True, "conv0")(x))
        for n in range(1, self.n_layers + 1):
            s = 2 if n < self.n_layers else 1
            channels = self.ndf * min(2 ** n, 8)
            x = self._conv(channels, (ts[n], s, s), not normed, f"conv{n}")(x)
            if normed:
                x = self._norm(channels, train, f"norm{n}")(x)
            x = act(x)
        x = self._conv(1, (1, 1, 1), True, f"conv{self.n_layers + 1}", last=True)(x)
        return x.astype(jnp.float32)


# name -> class, merged into ``discriminators.build_discriminator``'s table; a video tokenizer's GAN
# needs one of these (the task refuses a 2-D one on clips)
VIDEO_DISCRIMINATORS = {"stylegan3d": StyleGANDiscriminator3D, "patchgan3d": NLayerDiscriminator3D}
