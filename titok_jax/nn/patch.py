"""Patchify / unpatchify and the patch embedding.

Images are NHWC ``[B, H, W, C]``; tokens ``[B, (H/p)*(W/p), p*p*C]`` in row-major patch order
(token ``r*(W/p) + c``). Inside a patch of pixels ``(i, j)`` (row, column) and channel ``k``:

- ``"hwc"``: feature ``(i*p + j)*C + k`` (pixel-major, channel last). This is the flattening of a
  Flax conv kernel ``[p, p, C, D]`` and of TiTok's non-legacy decoder head, whose
  ``Conv1x1(W -> p*p*3)`` output is read by ``Rearrange('b (p1 p2 c) h w -> ...')``.
- ``"chw"``: feature ``k*p*p + i*p + j`` (channel-major): PyTorch's conv weight ``[D, C, p, p]``
  flattened, so ``torch_patch_embed.weight.reshape(D, -1).T`` is the ``PatchEmbed`` kernel.

``unpatchify(patchify(x, p, o), p, H, W, C, o) == x`` for both orders.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn.initializers import Initializer, boxed, default_kernel_init, zeros_init

CHANNEL_ORDERS = ("hwc", "chw")


def _check_order(channel_order: str) -> None:
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")


def check_images(images: jax.Array, image_size: int, model: str) -> None:
    """One-line ValueError unless ``images`` is a float batch ``[B, S, S, 3]`` (``S = image_size``)
    in [0, 1], the input every tokenizer model takes."""
    s = image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
        raise ValueError(f"{model} expects images [B, {s}, {s}, 3] in [0, 1], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{model} expects float images in [0, 1], got dtype {images.dtype}")


def patchify(images: jax.Array, p: int, channel_order: str = "hwc") -> jax.Array:
    """``[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]`` (H and W must be multiples of ``p``)."""
    _check_order(channel_order)
    b, h, w, c = images.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
    # One axis split or merge per reshape: on a mesh with Explicit axes (batch sharded in the type)
    # jax infers the output sharding of a single split / merge, not of two at once.
    x = images.reshape(b, h // p, p, w, c).reshape(b, h // p, p, w // p, p, c)  # b,gh,i,gw,j,k
    if channel_order == "hwc":
        x = x.transpose(0, 1, 3, 2, 4, 5)                      # b, gh, gw, i, j, k
    else:
        x = x.transpose(0, 1, 3, 5, 2, 4)                      # b, gh, gw, k, i, j
    x = x.reshape((b, (h // p) * (w // p)) + x.shape[3:])
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int, c: int,
               channel_order: str = "hwc") -> jax.Array:
    """Inverse of :func:`patchify`: ``[B, (h/p)*(w/p), p*p*c] -> [B, h, w, c]``.

    ``h``, ``w`` are the output image height and width **in pixels**; ``c`` its channels.
    """
    _check_order(channel_order)
    b, n, f = tokens.shape
    gh, gw = h // p, w // p
    if n != gh * gw or f != p * p * c:
        raise ValueError(f"tokens {tokens.shape} do not match a {h}x{w}x{c} image with patch {p}")
    x = tokens.reshape(b, gh, gw, f)      # one split / merge per reshape (see patchify)
    if channel_order == "hwc":
        x = x.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    else:
        x = x.reshape(b, gh, gw, c, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, gw, p, c).reshape(b, h, w, c)


class PatchEmbed(nn.Module):
    """Patch embedding ``[B, H, W, C] -> [B, (H/p)*(W/p), features]``.

    ``Dense(patchify(images, p, channel_order))``, identical to a conv with kernel = stride = p.
    Kernel ``[p*p*C, features]`` named ``("patch", "embed")``; bias ``("embed",)``. The default
    ``"chw"`` order loads a PyTorch ``Conv2d`` weight ``[D, C, p, p]`` as ``reshape(D, -1).T``.
    """

    patch_size: int
    features: int
    channel_order: str = "chw"
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = patchify(images, self.patch_size, self.channel_order)
        return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, precision=self.precision,
                        kernel_init=boxed(self.kernel_init, ("patch", "embed")),
                        bias_init=boxed(self.bias_init, ("embed",)), name="proj")(x)
