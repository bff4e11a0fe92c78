"""MaskGIT-VQGAN (Chang et al. 2022; the CNN tokenizer TiTok distils from and decodes with), NHWC.

A VQGAN without attention: images ``[B, H, W, 3]`` in **[0, 1]** (no mean/std normalisation) ->
``[B, H/f, W/f, z]`` latents (``f = 2**(len(channel_mult) - 1)``, 16 for the published model) ->
nearest-neighbour VQ (squared L2 on the raw ``z``-dim codes, no l2-normalisation) -> decoder ->
unclamped float32 pixels. With ``c_i = hidden_channels * channel_mult[i]`` and ``L`` levels::

    Encoder:  conv_in 3x3 (no bias) 3 -> c_0
              down_i (i = 0..L-1): block_j = ResnetBlock(-> c_i), j < num_res_blocks;
                                    then avg-pool 2x2 / 2 unless i == L-1
              mid_j: ResnetBlock(c_{L-1}); norm_out -> SiLU -> conv_out 1x1 (bias) -> z
    Decoder:  conv_in 3x3 (bias) z -> c_{L-1}; mid_j: ResnetBlock(c_{L-1})
              up_i for i = L-1 .. 0 (reversed): block_j = ResnetBlock(-> c_i);
                                    then nearest x2 + upsample_conv 3x3 (bias) unless i == 0
              norm_out -> SiLU -> conv_out 3x3 (bias) -> 3
    ResnetBlock(x -> c):  h = conv1(SiLU(norm1(x)));  h = conv2(SiLU(norm2(h)))   (3x3, no bias)
                          return h + (nin_shortcut(h) if C_in != c else x)      (1x1, no bias)

The shortcut quirk is deliberate: the released weights (converted from the JAX MaskGIT code) apply
``nin_shortcut`` to the *processed* features ``h``, not to the block input. Every GroupNorm has 32
groups and eps 1e-6 (so every ``c_i`` must be a multiple of 32). Every convolution uses TF-style
SAME padding (``titok_jax.nn.conv``: ``total = max((ceil(i/s) - 1) s + (k - 1) d + 1 - i, 0)``,
the smaller half before), as PyTorch's ``Conv2dSame`` of the official port does.

Quantizer: ``titok_jax.quantizers.VectorQuantizer`` named ``quantize`` (param ``codebook [K, z]``,
``U(+-1/K)`` init as the official one), tokens flattened row-major (``n = y * w + x``). Losses:
``commitment = beta * mean((sg(q) - z)^2)`` and ``codebook = codebook_weight * mean((q - sg(z))^2)``
(the JAX MaskGIT convention; the PyTorch port of the official repo swaps the two weights, which
``quantizer={"name": "vq", ..., "commitment_weight": 1, "codebook_weight": beta}`` reproduces).
Only inference weights exist officially. Feature maps are constrained at every block boundary to
"batch split, channels whole" (``nn.activation_sharding``), as the transformers' residual streams are.

Param names follow the PyTorch ``state_dict`` (``encoder.down.2.block.0.nin_shortcut.weight`` ->
``encoder/down_2/block_0/nin_shortcut/kernel``; see ``titok_jax.convert.vqgan``).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.grid_tokenizer import GridTokenizer
from titok_jax.nn import constrain
from titok_jax.nn.conv import Conv2dSame, avg_pool_2x2, check_channels, group_norm, upsample_nearest
from titok_jax.quantizers import build_quantizer, freeze_spec
from titok_jax.quantizers.factory import input_dim

Dtype = Any
DEFAULT_QUANTIZER = {"name": "vq", "codebook_size": 1024}   # the published f16 model's
# A feature map [B, H, W, C] at a block boundary: the batch split (``nn.activation_sharding``), the
# channels whole, the grid left to XLA.
FMAP = ("batch", None, None, "act_embed")


# ----------------------------------------------------------------------------- blocks
class ResnetBlock(nn.Module):
    """MaskGIT's ResnetBlock ``[B, H, W, C_in] -> [B, H, W, out_channels]`` (module docstring)."""

    out_channels: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    def _conv(self, k: int, name: str) -> Conv2dSame:
        return Conv2dSame(self.out_channels, k, use_bias=False, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = lambda n: group_norm(n, self.dtype, self.param_dtype)  # noqa: E731
        x = constrain(x, FMAP)
        h = self._conv(3, "conv1")(nn.silu(norm("norm1")(x)))
        h = self._conv(3, "conv2")(nn.silu(norm("norm2")(constrain(h, FMAP))))
        residual = x
        if x.shape[-1] != self.out_channels:
            residual = self._conv(1, "nin_shortcut")(h)   # the quirk: on h, not on x
        return constrain(h + residual, FMAP)


class DownBlock(nn.Module):
    """``num_res_blocks`` ResnetBlocks ``block_{j}`` to ``out_channels``, then avg-pool 2x2."""

    out_channels: int
    num_res_blocks: int
    downsample: bool
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_res_blocks):
            x = ResnetBlock(self.out_channels, self.dtype, self.param_dtype, name=f"block_{j}")(x)
        return constrain(avg_pool_2x2(x) if self.downsample else x, FMAP)


class UpBlock(nn.Module):
    """``num_res_blocks`` ResnetBlocks ``block_{j}``, then nearest x2 + ``upsample_conv``."""

    out_channels: int
    num_res_blocks: int
    upsample: bool
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_res_blocks):
            x = ResnetBlock(self.out_channels, self.dtype, self.param_dtype, name=f"block_{j}")(x)
        if self.upsample:
            x = Conv2dSame(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsample_conv")(upsample_nearest(x))
        return constrain(x, FMAP)


class MaskGITEncoder(nn.Module):
    """Images ``[B, H, W, 3]`` in [0, 1] -> latents ``[B, H/f, W/f, z_channels]`` float32."""

    hidden_channels: int = 128
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        mult = tuple(int(m) for m in self.channel_mult)
        check_channels(self.hidden_channels, mult)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv2dSame(self.hidden_channels, 3, use_bias=False, name="conv_in", **kw)(
            constrain(images.astype(self.dtype), FMAP))
        for i, m in enumerate(mult):
            x = DownBlock(self.hidden_channels * m, self.num_res_blocks, i != len(mult) - 1,
                          name=f"down_{i}", **kw)(x)
        for j in range(self.num_res_blocks):
            x = ResnetBlock(self.hidden_channels * mult[-1], name=f"mid_{j}", **kw)(x)
        x = nn.silu(group_norm("norm_out", self.dtype, self.param_dtype)(x))
        x = Conv2dSame(self.z_channels, 1, name="conv_out", **kw)(x)
        return constrain(x.astype(jnp.float32), FMAP)


class MaskGITDecoder(nn.Module):
    """Latents ``[B, h, w, z_channels]`` -> pixels ``[B, h f, w f, 3]`` float32, unclamped."""

    hidden_channels: int = 128
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        mult = tuple(int(m) for m in self.channel_mult)
        check_channels(self.hidden_channels, mult)
        if z.ndim != 4 or z.shape[-1] != self.z_channels:
            raise ValueError(f"MaskGITDecoder expects latents [B, h, w, {self.z_channels}], "
                             f"got shape {z.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_in = self.hidden_channels * mult[-1]
        x = Conv2dSame(block_in, 3, name="conv_in", **kw)(constrain(z.astype(self.dtype), FMAP))
        for j in range(self.num_res_blocks):
            x = ResnetBlock(block_in, name=f"mid_{j}", **kw)(x)
        for i in reversed(range(len(mult))):
            x = UpBlock(self.hidden_channels * mult[i], self.num_res_blocks, i != 0,
                        name=f"up_{i}", **kw)(x)
        x = nn.silu(group_norm("norm_out", self.dtype, self.param_dtype)(x))
        x = Conv2dSame(3, 3, name="conv_out", **kw)(x)
        return constrain(x.astype(jnp.float32), FMAP)


# ----------------------------------------------------------------------------- the tokenizer
class MaskGITVQGAN(GridTokenizer):
    """MaskGIT-VQGAN tokenizer with TiTok's interface (``quantizer_name``, ``codebook_size``...;
    ``models.grid_tokenizer``).

    ``encode(images, train)`` -> ``(codes [B, N, z] f32, QuantizerOutput)`` with ``N = (S/f)**2``
    tokens row-major and ``out.indices`` int32 ``[B, N]``; ``decode(codes [B, N, z])`` and
    ``decode_tokens(indices [B, N] | [B, 1, N] | [B, h, w])`` -> pixels ``[B, S, S, 3]`` f32
    (unclamped); ``__call__(images, train)`` -> ``(reconstruction, QuantizerOutput)``. Training
    with the EMA codebook: ``mutable=["quantizer_stats"]`` (and ``rngs={"quantizer": key}`` for
    dead-code restarts).

    Attributes (defaults = the published f16 model, ``maskgit-vqgan-imagenet-f16-256.bin``):
      image_size: square input side S (a multiple of f).
      hidden_channels, channel_mult, num_res_blocks, z_channels: the CNNs (module docstring).
      quantizer: the bottleneck's sub-config (``quantizers.build_quantizer``), default
        ``{"name": "vq", "codebook_size": 1024}``: ``VectorQuantizer``'s arguments (codebook_size
        K, commitment_weight beta, codebook_weight, use_ema / ema_decay / kmeans_init /
        dead_code_threshold for EMA codebook training; all off = gradient-learned as the official
        model), or ``{"name": "vae", "kl_weight": ...}`` (the encoder then emits 2z channels).
      dtype: compute dtype of the CNNs (the quantizer stays float32); param_dtype: float32.
    """

    image_size: int = 256
    hidden_channels: int = 128
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    NAME = "MaskGIT-VQGAN"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def setup(self) -> None:
        check_channels(self.hidden_channels, self.channel_mult)
        self.check_grid()
        cnn = dict(hidden_channels=self.hidden_channels, channel_mult=tuple(self.channel_mult),
                   num_res_blocks=self.num_res_blocks, z_channels=self.z_channels,
                   dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = MaskGITEncoder(**{**cnn, "z_channels": input_dim(self.quantizer,
                                                                        self.z_channels)})
        self.quantize = build_quantizer(self.quantizer, self.z_channels, dtype=jnp.float32,
                                        param_dtype=self.param_dtype)
        self.decoder = MaskGITDecoder(**cnn)


# Published shape (HF ``fun-research/TiTok: maskgit-vqgan-imagenet-f16-256.bin``).
MASKGIT_F16_256: dict[str, Any] = dict(image_size=256, hidden_channels=128,
                                       channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                       z_channels=256,   # VQ beta: 0.25, VectorQuantizer's default
                                       quantizer={"name": "vq", "codebook_size": 1024})
