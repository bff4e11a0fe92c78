"""VQ-VAE (van den Oord et al. 2017, arXiv 1711.00937): the first VQ image tokenizer, NHWC.

Images ``[B, S, S, 3]`` in **[0, 1]** are centred to ``x - 0.5`` (the paper's and Sonnet's
[-0.5, 0.5] data), encoded to ``[B, S/f, S/f, z]`` latents (``f = 2**num_downsamples``, the paper's
f4: 128x128 -> a 32x32 grid), quantized (default: nearest-neighbour VQ, K = 512, beta 0.25) and
decoded back; reconstructions are ``decoder(codes) + 0.5``, float32, unclamped. With ``C`` =
``hidden_channels``, ``R`` = ``residual_channels``, ``n`` = ``num_downsamples`` (down_i / up_i
widths ``C/2`` except the last down (``C``) and the last up (``3``), as Sonnet's example)::

    Encoder:  down_i (i < n): conv 4x4 stride 2 -> ReLU      (widths C/2, ..., C/2, C)
              conv 3x3 C -> C;  res_j (j < num_res_blocks);  ReLU
              conv_out 1x1 C -> input_dim(quantizer, z)   (z; 2z for a Gaussian bottleneck)
    Decoder:  conv_in 3x3 z -> C;  res_j (j < num_res_blocks);  ReLU
              up_i (i < n): transposed conv 4x4 stride 2 padding 1 (doubles the side), ReLU
                            unless the last               (widths C/2, ..., C/2, 3)
    Residual block (x -> x):  x + conv_1x1(ReLU(conv_3x3(ReLU(x))))      (3x3: C -> R; 1x1: R -> C)

Every conv has a bias and PyTorch's default init (weights and biases ``U(+-1/sqrt(fan_in))``:
with zero biases a ReLU decoder fed all-zero codes, FSQ's at init, passes no gradient at all); the
strided 4x4 convs pad one pixel each side (TF SAME on an even side, as PyTorch's ``padding=1``),
the transposed ones one pixel (PyTorch's ``ConvTranspose2d(4, 2, 1)``). The loss is the task's
pixel L2 plus the quantizer's terms (``beta * |sg(q) - z|^2 + |q - sg(z)|^2`` for VQ; the
appendix's EMA codebook is ``quantizer={"name": "vq", "codebook_size": 512, "use_ema": True,
"ema_decay": 0.99}``); any quantizer of ``quantizers.factory`` fits (``fsq``, ``lfq``, ``bsq``,
``vae``; ``z`` must match it).

Tokens are the grid flattened row-major (``models.grid_tokenizer``, the interface shared with
MaskGIT-VQGAN). Feature maps are constrained at every block boundary to "batch split, channels
whole" (``nn.activation_sharding``); params carry ``(., ., conv_in, conv_out)`` logical names.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.grid_tokenizer import GridTokenizer
from titok_jax.nn import constrain
from titok_jax.nn.conv import Conv2dSame, ConvTranspose2d
from titok_jax.quantizers import build_quantizer, freeze_spec
from titok_jax.quantizers.factory import input_dim

Dtype = Any
DEFAULT_QUANTIZER = {"name": "vq", "codebook_size": 512}   # the paper's K (beta 0.25: the default)
FMAP = ("batch", None, None, "act_embed")   # a feature map at a block boundary (see vqgan.py)
CENTRE = 0.5   # images in [0, 1] <-> the network's [-0.5, 0.5]


class ResidualBlock(nn.Module):
    """``x + conv_1x1(ReLU(conv_3x3(ReLU(x))))``: ``[B, H, W, C] -> [B, H, W, C]``, the 3x3 conv
    ``C -> residual_channels``, the 1x1 conv back to ``C``."""

    residual_channels: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, torch_bias=True)
        x = constrain(x, FMAP)
        h = Conv2dSame(self.residual_channels, 3, name="conv_3x3", **kw)(nn.relu(x))
        h = Conv2dSame(x.shape[-1], 1, name="conv_1x1", **kw)(nn.relu(h))
        return constrain(x + h, FMAP)


def residual_stack(x: jax.Array, num_blocks: int, residual_channels: int, dtype: Dtype,
                   param_dtype: Dtype) -> jax.Array:
    """``res_0 .. res_{num_blocks-1}`` (:class:`ResidualBlock`), then ReLU (called inside a compact
    module: the blocks are its children)."""
    for j in range(num_blocks):
        x = ResidualBlock(residual_channels, dtype, param_dtype, name=f"res_{j}")(x)
    return nn.relu(x)


def _widths(hidden_channels: int, n: int, last: int) -> list[int]:
    """``[C/2] * (n - 1) + [last]``: the strided layers' widths (Sonnet's example halves the outer
    ones)."""
    return [max(hidden_channels // 2, 1)] * (n - 1) + [last]


class VQVAEEncoder(nn.Module):
    """Images ``[B, S, S, 3]`` in [0, 1] -> latents ``[B, S/f, S/f, out_channels]`` float32."""

    hidden_channels: int = 256
    residual_channels: int = 256
    num_res_blocks: int = 2
    num_downsamples: int = 2
    out_channels: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = dict(kw, torch_bias=True)
        x = constrain((images - CENTRE).astype(self.dtype), FMAP)
        for i, width in enumerate(_widths(self.hidden_channels, self.num_downsamples,
                                          self.hidden_channels)):
            x = constrain(nn.relu(Conv2dSame(width, 4, stride=2, name=f"down_{i}", **conv)(x)), FMAP)
        x = Conv2dSame(self.hidden_channels, 3, name="conv", **conv)(x)
        x = residual_stack(x, self.num_res_blocks, self.residual_channels, **kw)
        x = Conv2dSame(self.out_channels, 1, name="conv_out", **conv)(x)
        return constrain(x.astype(jnp.float32), FMAP)


class VQVAEDecoder(nn.Module):
    """Codes ``[B, h, w, z_channels]`` -> pixels ``[B, h f, w f, 3]`` float32, unclamped."""

    hidden_channels: int = 256
    residual_channels: int = 256
    num_res_blocks: int = 2
    num_downsamples: int = 2
    z_channels: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        if z.ndim != 4 or z.shape[-1] != self.z_channels:
            raise ValueError(f"VQVAEDecoder expects codes [B, h, w, {self.z_channels}], "
                             f"got shape {z.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = dict(kw, torch_bias=True)
        x = Conv2dSame(self.hidden_channels, 3, name="conv_in", **conv)(
            constrain(z.astype(self.dtype), FMAP))
        x = residual_stack(x, self.num_res_blocks, self.residual_channels, **kw)
        widths = _widths(self.hidden_channels, self.num_downsamples, 3)
        for i, width in enumerate(widths):
            x = ConvTranspose2d(width, 4, stride=2, padding=1, name=f"up_{i}", **conv)(x)
            if i < len(widths) - 1:
                x = constrain(nn.relu(x), FMAP)
        return constrain(x.astype(jnp.float32) + CENTRE, FMAP)


class VQVAE(GridTokenizer):
    """VQ-VAE tokenizer (module docstring) with the CNN tokenizers' interface
    (``models.grid_tokenizer``): ``encode(images, train)`` -> ``(codes [B, N, z] f32,
    QuantizerOutput)``, ``N = (S/f)**2`` row-major; ``decode(codes)`` / ``decode_tokens(indices
    [B, N] | [B, h, w])`` -> pixels ``[B, S, S, 3]`` f32; ``__call__`` -> ``(reconstruction,
    QuantizerOutput)``. An EMA codebook trains with ``mutable=["quantizer_stats"]``.

    Attributes (defaults = the paper's ImageNet model):
      image_size: square input side S (a multiple of ``f = 2**num_downsamples``); 128.
      hidden_channels C (256), residual_channels R (256), num_res_blocks (2), num_downsamples (2):
        the CNNs (module docstring).
      z_channels: the code dim (64; the paper does not give it, Sonnet's example uses 64).
      quantizer: the bottleneck's sub-config (``quantizers.build_quantizer``), default
        ``{"name": "vq", "codebook_size": 512}``.
      dtype: compute dtype of the CNNs (the quantizer stays float32); param_dtype: float32.
    """

    image_size: int = 128
    hidden_channels: int = 256
    residual_channels: int = 256
    num_res_blocks: int = 2
    num_downsamples: int = 2
    z_channels: int = 64
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    NAME = "VQ-VAE"

    @property
    def downsample_factor(self) -> int:
        return 2 ** self.num_downsamples

    def setup(self) -> None:
        if self.num_downsamples < 1 or min(self.hidden_channels, self.residual_channels) < 1:
            raise ValueError(f"VQ-VAE: num_downsamples, hidden_channels and residual_channels must "
                             f"be >= 1, got {self.num_downsamples}, {self.hidden_channels}, "
                             f"{self.residual_channels}")
        self.check_grid()
        cnn = dict(hidden_channels=self.hidden_channels, residual_channels=self.residual_channels,
                   num_res_blocks=self.num_res_blocks, num_downsamples=self.num_downsamples,
                   dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = VQVAEEncoder(out_channels=input_dim(self.quantizer, self.z_channels), **cnn)
        self.quantize = build_quantizer(self.quantizer, self.z_channels, dtype=jnp.float32,
                                        param_dtype=self.param_dtype)
        self.decoder = VQVAEDecoder(z_channels=self.z_channels, **cnn)


# The paper's ImageNet model (section 4.1 / reference/lineage_2d.md 4.1): 128 px -> 32x32 codes.
VQVAE_IMAGENET_128: dict[str, Any] = dict(image_size=128, hidden_channels=256, residual_channels=256,
                                          num_res_blocks=2, num_downsamples=2, z_channels=64,
                                          quantizer={"name": "vq", "codebook_size": 512})
