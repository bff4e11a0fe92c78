"""Open-MAGVIT2's image tokenizer (TencentARC/SEED-Voken ``src/Open_MAGVIT2``: the "improved" CNN
of ``modules/diffusionmodules/improved_model.py`` and the LFQ bottleneck of MAGVIT-v2), NHWC.

Images ``[B, S, S, 3]`` in **[0, 1]** are mapped to ``x = 2 img - 1`` (OM2's data are in [-1, 1]),
encoded to ``z [B, S/f, S/f, z_channels]`` (``f = 2**(len(ch_mult) - 1)``), quantized by LFQ
(``q = sign(z)`` in {-1, +1}, 18 bits = 262 144 codes in the releases; no ``quant_conv``) and
decoded to ``y``; reconstructions are ``(y + 1) / 2`` (unclamped float32). With ``c_i = ch *
ch_mult[i]``, ``L`` levels and ``n = num_res_blocks``::

    Encoder:  conv_in 3x3 (no bias): 3 -> ch
              down_i (i = 0..L-1): block_j = ResBlock(-> c_i), j < n; then unless i = L-1
                                   downsample = conv 3x3 stride 2, padding (1, 1), bias
              mid_block_j = ResBlock(c_{L-1}), j < n
              norm_out -> swish -> conv_out 1x1 (bias) -> z_channels
    Decoder:  conv_in 3x3 (bias): z_channels -> c_{L-1};  mid_block_j, j < n
              for i = L-1 .. 0:  adaptive_i = AdaGN(x, q);  up_i block_j = ResBlock(-> c_i), j < n;
                                 then unless i = 0 up_i upsample: conv 3x3 C -> 4C (bias),
                                 depth_to_space 2 (DCR)
              norm_out -> swish -> conv_out 3x3 (bias) -> 3
    ResBlock(x -> c):  h = conv2(swish(norm2(conv1(swish(norm1(x))))))  (3x3, NO bias)
                       return (nin_shortcut(x) if C_in != c else x) + h  (1x1, no bias)
    AdaGN(x, q):       GN(x) (no affine) * gamma(std_hw(q)) + beta(mean_hw(q))
                       std = sqrt(var + 1e-6), var the UNBIASED (N - 1) variance over the h*w
                       positions of each channel of the quantized latent q; gamma, beta: Linear
                       z_channels -> C with bias; no "1 +".

Every GroupNorm has 32 groups and eps 1e-6 (``ch`` and every ``c_i`` must be multiples of 32);
swish = SiLU; padding is PyTorch's ``k // 2`` zeros each side (``nn.conv.torch_conv``; the stride-2
convs too: JAX's "SAME" would pad (0, 1)). ``depth_to_space`` is TF's DCR order (``nn.conv``), not
``pixel_shuffle``. Only the AdaGN layers see ``q`` (the decoder's input, the codes). A 1x1 grid has
no unbiased variance (PyTorch gives NaN); here its N - 1 is clamped to 1.

Quantizer (the ``quantizer`` sub-config, ``quantizers.factory``): default OM2's LFQ with its loss
(``quantizers.lfq`` module docstring): entropy 0.1 x (per-sample - codebook entropy, T 0.01,
the exact 2^18 mixture, 1e-5 inside the codebook log), commitment 0.25 x MSE(z, sg(q)); index
``sum_d [z_d > 0] 2^d`` (channel 0 the least significant bit; z = 0 maps to -1). Tokens are the
grid flattened row-major (``models.grid_tokenizer``). Any quantizer of the factory fits (``vae``:
the encoder emits ``2 z_channels`` channels).

Param names follow the PyTorch ``state_dict`` (``encoder.down.1.block.0.conv1.weight`` ->
``encoder/down_1_block_0/conv1/kernel``, ``decoder.adaptive.2.gamma`` -> ``decoder/adaptive_2/
gamma``, ``decoder.up.1.upsample.conv1`` -> ``decoder/up_1_upsample``; ``convert.magvit2``).
Feature maps are constrained at block boundaries to "batch split, channels whole"
(``nn.activation_sharding``), as in ``models.taming``.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.grid_tokenizer import GridTokenizer
from titok_jax.nn import boxed, check_images, constrain
from titok_jax.nn.conv import (GROUPS, CompVisResnet, check_channels, depth_to_space, group_norm,
                               torch_bias_init, torch_conv, torch_conv_init)
from titok_jax.quantizers import build_quantizer, freeze_spec
from titok_jax.quantizers.factory import input_dim

Dtype = Any
# OM2's LFQ and loss weights (imagenet_lfqgan_{128,256}_L.yaml; quantizers.lfq module docstring).
DEFAULT_QUANTIZER = {"name": "lfq", "bits": 18, "entropy_weight": 0.1, "commitment_weight": 0.25,
                     "temperature": 0.01, "batch_entropy_group_size": 18,
                     "batch_entropy_eps": 1e-5}
FMAP = ("batch", None, None, "act_embed")   # a feature map at a block boundary (models.vqgan's)
ADAGN_EPS = 1e-6


def ResBlock(out_channels: int, **kwargs: Any) -> nn.Module:
    """OM2's ``ResBlock``: the CompVis block with no conv bias (``nn.conv.CompVisResnet``, its
    shortcut ``nin_shortcut``, feature maps constrained)."""
    return CompVisResnet(out_channels, shortcut_name="nin_shortcut", fmap=FMAP, use_bias=False,
                         **kwargs)


def _torch_linear(features: int, fan_in: int, name: str, dtype: Dtype, param_dtype: Dtype
                  ) -> nn.Dense:
    """PyTorch's ``nn.Linear`` (weight and bias ``U(+-1/sqrt(fan_in))``), kernel ``[in, out]``."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=boxed(torch_conv_init, (None, "conv_out")),
                    bias_init=boxed(torch_bias_init(fan_in), ("conv_out",)), name=name)


class AdaptiveGroupNorm(nn.Module):
    """OM2's ``AdaptiveGroupNorm``: ``GN(x) * gamma(std(q)) + beta(mean(q))`` (module docstring);
    ``x [B, H, W, C]``, ``q [B, h, w, z]``; the statistics of ``q`` in float32."""

    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, q: jax.Array) -> jax.Array:
        c, z = x.shape[-1], q.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6, use_bias=False, use_scale=False,
                         use_fast_variance=False, name="gn", **kw)(x)
        s = q.astype(jnp.float32).reshape(q.shape[0], -1, z)
        mean = jnp.mean(s, axis=1)
        var = jnp.sum(jnp.square(s - mean[:, None]), axis=1) / max(s.shape[1] - 1, 1)
        scale = _torch_linear(c, z, "gamma", **kw)(jnp.sqrt(var + ADAGN_EPS))
        bias = _torch_linear(c, z, "beta", **kw)(mean)
        return constrain(h * scale[:, None, None, :].astype(h.dtype)
                         + bias[:, None, None, :].astype(h.dtype), FMAP)


class Magvit2Encoder(nn.Module):
    """``images [B, S, S, 3]`` in [0, 1] -> ``z [B, S/f, S/f, out_channels]`` (module docstring)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = 2.0 * images.astype(jnp.float32) - 1.0
        x = torch_conv(self.ch, 3, "conv_in", use_bias=False, **kw)(
            constrain(x.astype(self.dtype or x.dtype), FMAP))
        levels = len(self.ch_mult)
        for i, m in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                x = ResBlock(self.ch * int(m), name=f"down_{i}_block_{j}", **kw)(x)
            if i != levels - 1:
                x = torch_conv(x.shape[-1], 3, f"down_{i}_downsample", stride=2, **kw)(x)
        for j in range(self.num_res_blocks):
            x = ResBlock(x.shape[-1], name=f"mid_block_{j}", **kw)(x)
        x = nn.silu(group_norm("norm_out", **kw)(x))
        x = torch_conv(self.out_channels, 1, "conv_out", **kw)(x)
        return constrain(x.astype(jnp.float32), FMAP)


class Magvit2Decoder(nn.Module):
    """Codes ``q [B, h, w, z]`` -> pixels ``[B, h f, w f, 3]`` in ~[0, 1], float32 (unclamped)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        style = q.astype(jnp.float32)
        x = torch_conv(self.ch * int(self.ch_mult[-1]), 3, "conv_in", **kw)(
            constrain(q.astype(self.dtype or q.dtype), FMAP))
        for j in range(self.num_res_blocks):
            x = ResBlock(x.shape[-1], name=f"mid_block_{j}", **kw)(x)
        for i in reversed(range(len(self.ch_mult))):
            x = AdaptiveGroupNorm(name=f"adaptive_{i}", **kw)(x, style)
            for j in range(self.num_res_blocks):
                x = ResBlock(self.ch * int(self.ch_mult[i]), name=f"up_{i}_block_{j}", **kw)(x)
            if i != 0:
                x = torch_conv(4 * x.shape[-1], 3, f"up_{i}_upsample", **kw)(x)
                x = constrain(depth_to_space(x, 2), FMAP)
        x = nn.silu(group_norm("norm_out", **kw)(x))
        y = torch_conv(3, 3, "conv_out", **kw)(x).astype(jnp.float32)
        return (y + 1.0) / 2.0


class Magvit2(GridTokenizer):
    """Open-MAGVIT2 tokenizer with the tokenizer interface (``models.grid_tokenizer``).

    ``encode(images, train)`` -> ``(codes [B, N, z_channels] f32, QuantizerOutput)``, ``N =
    (S/f)**2`` row-major, ``out.indices`` int32 ``[B, N]``; ``decode(codes)`` and
    ``decode_tokens(indices [B, N] | [B, h, w])`` -> pixels ``[B, S, S, 3]`` f32 in ~[0, 1]
    (unclamped); ``__call__(images, train)`` -> ``(reconstruction, QuantizerOutput)``;
    ``pre_quant(images)`` -> the encoder's output ``[B, S/f, S/f, .]`` (what LFQ quantizes).

    Attributes (defaults = the ImageNet 128 release, ``imagenet_lfqgan_128_L.yaml``):
      image_size: square input side S (a multiple of f).
      ch, ch_mult, num_res_blocks, z_channels: OM2's ``ddconfig`` (z_channels = the LFQ bits).
      quantizer: the bottleneck's sub-config (default OM2's LFQ, ``DEFAULT_QUANTIZER``).
      dtype: compute dtype of the CNNs (the quantizer stays float32); param_dtype: float32.
    """

    image_size: int = 128
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 18
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    NAME = "Open-MAGVIT2"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def setup(self) -> None:
        check_channels(self.ch, self.ch_mult, self.NAME)
        if self.ch % GROUPS:
            raise ValueError(f"{self.NAME}: ch {self.ch} is not a multiple of {GROUPS} "
                             f"(GroupNorm({GROUPS}) of the first block)")
        if self.num_res_blocks < 1 or self.z_channels < 1:
            raise ValueError(f"{self.NAME}: num_res_blocks and z_channels must be >= 1")
        self.check_grid()
        trunk = dict(ch=self.ch, ch_mult=tuple(int(m) for m in self.ch_mult),
                     num_res_blocks=self.num_res_blocks, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        self.encoder = Magvit2Encoder(out_channels=input_dim(self.quantizer, self.z_channels),
                                      **trunk)
        self.quantize = build_quantizer(self.quantizer, self.z_channels, dtype=jnp.float32,
                                        param_dtype=self.param_dtype)
        self.decoder = Magvit2Decoder(**trunk)

    def pre_quant(self, images: jax.Array) -> jax.Array:
        """``images`` in [0, 1] -> ``encoder(2 images - 1)`` float32 (a grid)."""
        check_images(images, self.image_size, self.NAME)
        return self.encoder(images)


# The published ImageNet models (imagenet_lfqgan_128_L.yaml / imagenet_lfqgan_256_L.yaml): 16x16
# tokens of 2^18 codes. Released as TencentARC/Open-MAGVIT2-Tokenizer-{128,256}-resolution.
OPEN_MAGVIT2_128: dict[str, Any] = dict(image_size=128, ch=128, ch_mult=(1, 2, 2, 4),
                                        num_res_blocks=4, z_channels=18,
                                        quantizer=dict(DEFAULT_QUANTIZER))
OPEN_MAGVIT2_256: dict[str, Any] = dict(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4),
                                        num_res_blocks=4, z_channels=18,
                                        quantizer=dict(DEFAULT_QUANTIZER))
