"""VGG16 convolutional trunk (the ``features`` part of torchvision's ``vgg16``), for LPIPS.

Images are NHWC ``[B, H, W, 3]``; no input normalisation happens here (LPIPS applies its own
shift/scale first, see :mod:`titok_jax.losses.perceptual`).

Architecture (torchvision ``features`` index in brackets; every conv is 3x3, stride 1, padding 1,
with bias, followed by ReLU; every pool is a 2x2 max-pool with stride 2, floor on odd sizes)::

    block 1: conv1_1 [0]  3->64    conv1_2 [2]  64->64                 -> relu1_2 (tap 0)   pool [4]
    block 2: conv2_1 [5]  64->128  conv2_2 [7]  128->128               -> relu2_2 (tap 1)   pool [9]
    block 3: conv3_1 [10] ->256    conv3_2 [12] conv3_3 [14]         -> relu3_3 (tap 2)   pool [16]
    block 4: conv4_1 [17] ->512    conv4_2 [19] conv4_3 [21]         -> relu4_3 (tap 3)   pool [23]
    block 5: conv5_1 [24] ->512    conv5_2 [26] conv5_3 [28]           -> relu5_3 (tap 4)

The final pool (``features.30``) is not needed by LPIPS and is not applied. Param names are
``conv{block}_{i}/kernel`` ``[3, 3, C_in, C_out]`` and ``conv{block}_{i}/bias`` ``[C_out]``;
a torchvision weight ``[C_out, C_in, 3, 3]`` maps to the kernel by ``transpose(2, 3, 1, 0)``
(:data:`VGG16_CONVS` is the name table the converter uses).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# (our conv name, torchvision `features` index, in channels, out channels), in forward order.
VGG16_CONVS: tuple[tuple[str, int, int, int], ...] = (
    ("conv1_1", 0, 3, 64), ("conv1_2", 2, 64, 64),
    ("conv2_1", 5, 64, 128), ("conv2_2", 7, 128, 128),
    ("conv3_1", 10, 128, 256), ("conv3_2", 12, 256, 256), ("conv3_3", 14, 256, 256),
    ("conv4_1", 17, 256, 512), ("conv4_2", 19, 512, 512), ("conv4_3", 21, 512, 512),
    ("conv5_1", 24, 512, 512), ("conv5_2", 26, 512, 512), ("conv5_3", 28, 512, 512),
)
# Convs per block; the last conv of each block (after its ReLU) is an LPIPS tap.
VGG16_BLOCKS: tuple[int, ...] = (2, 2, 3, 3, 3)
# Channels of the five taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """VGG16 conv trunk returning the LPIPS taps ``(relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)``.

    Tap ``k`` has shape ``[B, H / 2**k, W / 2**k, VGG16_TAP_CHANNELS[k]]`` (floor division at each
    pool). ``dtype`` is the compute dtype of every conv, ReLU and pool, so the taps come out in it
    (bfloat16 halves the trunk's activation memory; LPIPS normalises and compares the taps in
    float32); params stay ``param_dtype``. ``precision`` is passed to every conv (``None`` =
    backend default, which may be TF32 on GPUs).
    """

    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"VGG16Features expects [B, H, W, 3] images, got shape {x.shape}")
        taps = []
        convs = iter(VGG16_CONVS)
        for block, n_convs in enumerate(VGG16_BLOCKS):
            if block > 0:
                x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
            for _ in range(n_convs):
                name, _, _, c_out = next(convs)
                x = nn.Conv(c_out, kernel_size=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                            use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                            precision=self.precision, name=name)(x)
                x = nn.relu(x)
            taps.append(x)
        return tuple(taps)
