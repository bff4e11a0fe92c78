"""Convolution helpers of the CNN tokenizers (MaskGIT-VQGAN, the KL-VAE, the taming VQGAN, the
discriminators), NHWC.

- :func:`same_padding` / :func:`conv2d_same` / :class:`Conv2dSame`: TF-style SAME padding
  (``total = max((ceil(i/s) - 1) s + (k - 1) d + 1 - i, 0)``, the smaller half before), as PyTorch's
  ``Conv2dSame`` of the official MaskGIT port.
- :data:`torch_conv_init`: PyTorch's default ``Conv2d`` weight init ``U(+-1/sqrt(fan_in))``
  (:func:`torch_bias_init` its bias init, ``torch_bias=True`` on the two conv modules);
  :func:`torch_conv`: a PyTorch-padded ``Conv2d`` with bias (KL-VAE, taming VQGAN).
- :func:`conv_transpose2d` / :class:`ConvTranspose2d`: PyTorch's ``ConvTranspose2d`` (stride ``s``,
  padding ``p``: ``out = (i - 1) s - 2 p + k``; 4x4 / 2 / 1 doubles a side), VQ-VAE's upsampler.
- :func:`group_norm` (32 groups, exact variance) and :func:`check_channels` (widths it accepts);
  :func:`upsample_nearest` and :func:`avg_pool_2x2` (``F.interpolate`` / ``F.avg_pool2d``);
  :func:`depth_to_space` (DCR order, Open-MAGVIT2's upsampler).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from titok_jax.nn.activation_sharding import constrain
from titok_jax.nn.initializers import boxed

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default Conv2d weight init, U(+-1/sqrt(fan_in)); biases start at zero.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default conv bias init, ``U(+-1/sqrt(fan_in))`` (``fan_in`` of the layer's weight)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


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
    torch_bias: bool = False   # bias U(+-1/sqrt(k k C_in)) as PyTorch's default; False: zeros
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", boxed(self.kernel_init, (None, None, "conv_in", "conv_out")),
                            (k, k, x.shape[-1], self.features), self.param_dtype)
        bias_init = torch_bias_init(k * k * x.shape[-1]) if self.torch_bias else zeros
        bias = (self.param("bias", boxed(bias_init, ("conv_out",)), (self.features,),
                           self.param_dtype) if self.use_bias else None)
        dtype = self.dtype or x.dtype
        return conv2d_same(x.astype(dtype), kernel.astype(dtype),
                           None if bias is None else bias.astype(dtype), self.stride,
                           precision=self.precision)


# PyTorch's default ConvTranspose2d weight init: U(+-1/sqrt(fan_in)) with fan_in = C_out * k * k
# (torch reads the fans of its [C_in, C_out, k, k] weight as for a conv).
torch_conv_transpose_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                             in_axis=-1, out_axis=-2)


def _phase_taps(k: int, stride: int, padding: int) -> tuple[np.ndarray, int, int]:
    """The sub-pixel form of a transposed conv whose output is exactly ``stride`` x the input
    (``k - 2 padding == stride``): output pixel ``stride m + r`` (phase ``r``) is
    ``sum_t x[m - t] kernel[stride t + r + padding]`` over the ``t`` that index the kernel.
    Returns ``select [stride, J, k]`` (one-hot: phase ``r``, correlation tap ``j = t_max - t`` ->
    kernel tap) and the input padding ``(t_max, -t_min)`` of the ``J``-tap correlation."""
    taps = [(r, (a - r - padding) // stride, a) for r in range(stride) for a in range(k)
            if (a - r - padding) % stride == 0]
    t_min, t_max = min(t for _, t, _ in taps), max(t for _, t, _ in taps)
    select = np.zeros((stride, t_max - t_min + 1, k), np.float32)
    for r, t, a in taps:
        select[r, t_max - t, a] = 1.0
    return select, t_max, -t_min


def conv_transpose2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                     stride: int = 2, padding: int = 1, precision: Any = None) -> jax.Array:
    """PyTorch's ``conv_transpose2d``: ``x [B, H, W, C_in]``, ``kernel [k, k, C_in, C_out]`` (the
    torch weight ``[C_in, C_out, k, k]`` transposed to ``(2, 3, 0, 1)``) -> ``[B, H', W', C_out]``
    with ``H' = (H - 1) stride - 2 padding + k``, i.e. every input pixel ``(i, j)`` adds
    ``x[i, j] @ kernel[a, b]`` at ``(stride i + a - padding, stride j + b - padding)``.

    When ``H' = stride H`` (``k - 2 padding = stride``, e.g. 4x4 / 2 / 1) it runs as one ordinary
    ``J x J`` conv with ``stride**2 C_out`` outputs (a phase each, :func:`_phase_taps`) and a
    depth-to-space: no multiplications by the zeros of a dilated input (forward + backward on
    XLA:CPU, vqvae_tiny's two upsamplers at batch 16: 17 vs 150 ms and 10 vs 32 ms of CPU time
    against the dilated form). Otherwise: the input dilated by ``stride``, padded by
    ``k - 1 - padding`` and correlated with the flipped kernel."""
    k = kernel.shape[0]
    if kernel.shape[1] != k or not 0 <= padding <= k - 1:
        raise ValueError(f"conv_transpose2d: needs a square kernel and 0 <= padding <= k - 1, got "
                         f"kernel {kernel.shape} and padding {padding}")
    kernel = kernel.astype(x.dtype)
    if k - 2 * padding == stride:
        select, lo, hi = _phase_taps(k, stride, padding)
        sel = jnp.asarray(select, x.dtype)
        taps = select.shape[1]
        c_in, c_out = kernel.shape[2:]
        # [J, J, C_in, r_y, r_x, C_out]: tap (j, l) of phase (r_y, r_x)
        phased = jnp.einsum("pja,qlb,abio->jlipqo", sel, sel, kernel,
                            precision=lax.Precision.HIGHEST)
        y = lax.conv_general_dilated(x, phased.reshape(taps, taps, c_in, stride * stride * c_out),
                                     window_strides=(1, 1), padding=[(lo, hi), (lo, hi)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=precision)
        b, h, w, _ = y.shape
        y = y.reshape(b, h, w, stride, stride, c_out).transpose(0, 1, 3, 2, 4, 5)
        y = y.reshape(b, h * stride, w * stride, c_out)
    else:
        pad = (k - 1 - padding, k - 1 - padding)
        y = lax.conv_general_dilated(x, jnp.flip(kernel, (0, 1)), window_strides=(1, 1),
                                     padding=[pad, pad], lhs_dilation=(stride, stride),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=precision)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


class ConvTranspose2d(nn.Module):
    """PyTorch's ``ConvTranspose2d`` (:func:`conv_transpose2d`). Params ``kernel [k, k, C_in,
    C_out]`` (logical ``(None, None, conv_in, conv_out)``) and ``bias [C_out]``."""

    features: int
    kernel_size: int = 4
    stride: int = 2
    padding: int = 1
    use_bias: bool = True
    kernel_init: Initializer = torch_conv_transpose_init
    torch_bias: bool = False   # bias U(+-1/sqrt(k k C_out)) as PyTorch's default; False: zeros
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", boxed(self.kernel_init, (None, None, "conv_in", "conv_out")),
                            (k, k, x.shape[-1], self.features), self.param_dtype)
        bias_init = torch_bias_init(k * k * self.features) if self.torch_bias else zeros
        bias = (self.param("bias", boxed(bias_init, ("conv_out",)), (self.features,),
                           self.param_dtype) if self.use_bias else None)
        dtype = self.dtype or x.dtype
        return conv_transpose2d(x.astype(dtype), kernel.astype(dtype),
                                None if bias is None else bias.astype(dtype), self.stride,
                                self.padding, precision=self.precision)


def torch_conv(features: int, k: int, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1,
               padding: Any = "SAME", use_bias: bool = True) -> nn.Conv:
    """PyTorch's ``Conv2d(k, stride, padding=k // 2)`` with bias: a ``k x k`` conv, symmetric
    ``k // 2`` zero padding for ``"SAME"`` (else ``padding`` as ``nn.Conv`` takes it), PyTorch's
    default init; params ``kernel [k, k, C_in, C_out]`` (logical ``(None, None, conv_in,
    conv_out)``) and ``bias [C_out]`` (the KL-VAE and the taming VQGAN; ``use_bias=False``: no
    bias, Open-MAGVIT2's ResBlock convs)."""
    pad = ((k // 2, k // 2), (k // 2, k // 2)) if padding == "SAME" else padding
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=pad, dtype=dtype,
                   param_dtype=param_dtype, use_bias=use_bias,
                   kernel_init=boxed(torch_conv_init, (None, None, "conv_in", "conv_out")),
                   bias_init=boxed(zeros, ("conv_out",)), name=name)


def group_norm(name: str, dtype: Dtype, param_dtype: Dtype, epsilon: float = 1e-6,
               groups: int = GROUPS) -> nn.GroupNorm:
    """GroupNorm(``groups``, default 32) with ``("norm",)`` params; exact (two-pass) variance as
    PyTorch."""
    return nn.GroupNorm(num_groups=groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, scale_init=boxed(ones, ("norm",)),
                        bias_init=boxed(zeros, ("norm",)), name=name)


class CompVisResnet(nn.Module):
    """The CompVis ResnetBlock without a time embedding (SD's KL-VAE, taming's VQGAN):
    ``[B, H, W, C_in] -> [B, H, W, out_channels]``, ``conv2(silu(norm2(conv1(silu(norm1(x))))))``
    plus ``x``, through a 1x1 conv named ``shortcut_name`` where the channels change. ``fmap``: an
    activation-sharding spec put on the input and the output (None: none). ``use_bias=False``:
    the three convs have no bias (Open-MAGVIT2's ``ResBlock``, the same block otherwise).
    ``groups``: the GroupNorms' group count (32 in every release)."""

    out_channels: int
    shortcut_name: str = "conv_shortcut"
    fmap: Any = None
    use_bias: bool = True
    groups: int = GROUPS
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.fmap is not None:
            x = constrain(x, self.fmap)
        conv = dict(kw, use_bias=self.use_bias)
        g = self.groups
        h = torch_conv(self.out_channels, 3, "conv1", **conv)(
            nn.silu(group_norm("norm1", groups=g, **kw)(x)))
        h = torch_conv(self.out_channels, 3, "conv2", **conv)(
            nn.silu(group_norm("norm2", groups=g, **kw)(h)))
        if x.shape[-1] != self.out_channels:
            x = torch_conv(self.out_channels, 1, self.shortcut_name, **conv)(x)
        return x + h if self.fmap is None else constrain(x + h, self.fmap)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of ``[B, H, W, C]`` by ``factor`` (``F.interpolate``)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
    """``[B, H, W, block**2 C] -> [B, block H, block W, C]`` in DCR order (TF's ``depth_to_space``,
    Open-MAGVIT2's ``depth_to_space``): output ``(block h + i, block w + j, c)`` is input channel
    ``(block i + j) C + c`` at ``(h, w)``. (PyTorch's ``pixel_shuffle`` is the CRD order,
    channel ``c block**2 + block i + j``.)"""
    b, h, w, c = x.shape
    if c % (block * block):
        raise ValueError(f"depth_to_space: {c} channels are not a multiple of {block}**2")
    c_out = c // (block * block)
    x = x.reshape(b, h, w, block, block, c_out).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * block, w * block, c_out)


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
