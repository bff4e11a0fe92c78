"""The taming-transformers VQGAN (Esser et al. 2021, CompVis/taming-transformers ``VQModel``), NHWC.

Images ``[B, S, S, 3]`` in **[0, 1]** are mapped to ``x = 2 img - 1`` (taming's data are in
[-1, 1]), encoded to ``z [B, S/f, S/f, z_channels]`` (``f = 2**(len(ch_mult) - 1)``, 16 for the
ImageNet release), projected by ``quant_conv`` (1x1) to ``embed_dim`` channels, quantized, projected
back by ``post_quant_conv`` (1x1) and decoded to ``y``; reconstructions are ``(y + 1) / 2``
(unclamped float32). With ``c_i = ch * ch_mult[i]``, ``L`` levels and ``r_i = S / 2**i`` the
resolution of level ``i``::

    Encoder:  conv_in 3x3: 3 -> ch
              down_i (i = 0..L-1): block_j = ResnetBlock(-> c_i), j < num_res_blocks, each followed
                                   by attn_j = AttnBlock when r_i in attn_resolutions;
                                   then downsample (pad right/bottom by 1, conv 3x3 stride 2) unless i = L-1
              mid: block_1, attn_1, block_2 (c_{L-1});  norm_out -> swish -> conv_out 3x3 -> z_channels
    Decoder:  conv_in 3x3: z_channels -> c_{L-1};  mid as above
              up_i for i = L-1 .. 0: block_j = ResnetBlock(-> c_i), j <= num_res_blocks (one more than
                                   the encoder), each followed by attn_j when r_i in attn_resolutions;
                                   then nearest x2 + conv 3x3 unless i = 0
              norm_out -> swish -> conv_out 3x3 -> 3
    ResnetBlock(x -> c):  h = conv1(swish(norm1(x)));  h = conv2(swish(norm2(h)))   (3x3, bias)
                          return (nin_shortcut(x) if C_in != c else x) + h         (1x1, bias)
    AttnBlock:            single head over the H*W positions, q, k, v = 1x1 convs of norm(x):
                          x + proj_out(softmax(q k^T / sqrt(C)) v)

Every conv has a bias and PyTorch padding (``k // 2`` each side; ``nn.conv.torch_conv``); every
GroupNorm has 32 groups and eps 1e-6 (so ``ch`` and every ``c_i`` must be multiples of 32);
swish = SiLU. ``dropout`` of the official config is 0.0 and not modelled.

Quantizer (the ``quantizer`` sub-config, ``quantizers.factory``; default the official
``VectorQuantizer2(n_embed, embed_dim, beta=0.25)`` with ``legacy=True``): nearest code by squared
L2, no l2-normalisation, ``U(+-1/K)`` init, and the legacy loss ``mean((sg(q) - h)^2) + 0.25 *
mean((q - sg(h))^2)`` - weight 1 on the commitment term and beta on the codebook term, the reverse
of the paper - which is ``{"name": "vq", "commitment_weight": 1.0, "codebook_weight": 0.25}``
(``legacy=False`` would swap the two weights). Tokens are the ``embed_dim`` codes of the grid
flattened row-major (``n = y * S/f + x``), as taming's ``min_encoding_indices``.

Param names follow the PyTorch ``state_dict`` (``encoder.down.1.attn.0.q.weight`` ->
``encoder/down_1_attn_0/q/kernel``, ``encoder.mid.block_1`` -> ``encoder/mid_block_1``; see
``titok_jax.convert.taming``). Feature maps are constrained at block boundaries to "batch split,
channels whole" (``nn.activation_sharding``), as in ``models.vqgan``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.grid_tokenizer import GridTokenizer
from titok_jax.nn import check_images, constrain
from titok_jax.nn.conv import (GROUPS, CompVisResnet, check_channels, group_norm, torch_conv,
                               upsample_nearest)
from titok_jax.quantizers import QuantizerOutput, build_quantizer, freeze_spec
from titok_jax.quantizers.factory import input_dim

Dtype = Any
# The official legacy VectorQuantizer2 (beta 0.25 on the codebook term), 1024 codes (f16_1024).
DEFAULT_QUANTIZER = {"name": "vq", "codebook_size": 1024, "commitment_weight": 1.0,
                     "codebook_weight": 0.25}
FMAP = ("batch", None, None, "act_embed")   # a feature map at a block boundary (models.vqgan's)


def TamingResnetBlock(out_channels: int, **kwargs: Any) -> nn.Module:
    """taming's ResnetBlock (no time embedding) ``[B, H, W, C_in] -> [B, H, W, out_channels]``
    (``nn.conv.CompVisResnet``, its shortcut ``nin_shortcut``, feature maps constrained)."""
    return CompVisResnet(out_channels, shortcut_name="nin_shortcut", fmap=FMAP, **kwargs)


class TamingAttnBlock(nn.Module):
    """taming's AttnBlock: single-head self-attention over the H*W positions, with a residual;
    ``q``, ``k``, ``v``, ``proj_out`` are 1x1 convs; logits and softmax in float32."""

    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = group_norm("norm", **kw)(x)
        q, k, v = (torch_conv(c, 1, n, **kw)(t).reshape(b, h * w, c) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
        y = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, -1).astype(v.dtype), v)
        y = torch_conv(c, 1, "proj_out", **kw)(y.reshape(b, h, w, c))
        return constrain(x + y, FMAP)


def _mid(x: jax.Array, c: int, kw: dict) -> jax.Array:
    x = TamingResnetBlock(c, name="mid_block_1", **kw)(x)
    x = TamingAttnBlock(name="mid_attn_1", **kw)(x)
    return TamingResnetBlock(c, name="mid_block_2", **kw)(x)


class TamingEncoder(nn.Module):
    """``x [B, S, S, 3]`` in [-1, 1] -> ``z [B, S/f, S/f, z_channels]`` (module docstring)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    z_channels: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.ch_mult)
        res = x.shape[1]
        x = torch_conv(self.ch, 3, "conv_in", **kw)(constrain(x.astype(self.dtype or x.dtype), FMAP))
        for i, m in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                x = TamingResnetBlock(self.ch * int(m), name=f"down_{i}_block_{j}", **kw)(x)
                if res in self.attn_resolutions:
                    x = TamingAttnBlock(name=f"down_{i}_attn_{j}", **kw)(x)
            if i != levels - 1:   # taming's Downsample: no asymmetric padding in torch conv
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = torch_conv(x.shape[-1], 3, f"down_{i}_downsample", stride=2, padding="VALID",
                               **kw)(x)
                res //= 2
        x = _mid(x, x.shape[-1], kw)
        x = nn.silu(group_norm("norm_out", **kw)(x))
        return torch_conv(self.z_channels, 3, "conv_out", **kw)(x)


class TamingDecoder(nn.Module):
    """``z [B, h, w, z_channels]`` -> ``y [B, h f, w f, 3]`` (in ~[-1, 1], float32)."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, image_size: int) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.ch_mult)
        res = image_size // 2 ** (levels - 1)
        x = torch_conv(self.ch * int(self.ch_mult[-1]), 3, "conv_in", **kw)(
            constrain(z.astype(self.dtype or z.dtype), FMAP))
        x = _mid(x, x.shape[-1], kw)
        for i in reversed(range(levels)):
            for j in range(self.num_res_blocks + 1):
                x = TamingResnetBlock(self.ch * int(self.ch_mult[i]), name=f"up_{i}_block_{j}",
                                      **kw)(x)
                if res in self.attn_resolutions:
                    x = TamingAttnBlock(name=f"up_{i}_attn_{j}", **kw)(x)
            if i != 0:
                x = torch_conv(x.shape[-1], 3, f"up_{i}_upsample", **kw)(upsample_nearest(x))
                res *= 2
        x = nn.silu(group_norm("norm_out", **kw)(x))
        return torch_conv(3, 3, "conv_out", **kw)(x).astype(jnp.float32)


class TamingVQGAN(GridTokenizer):
    """taming VQGAN tokenizer with the tokenizer interface (``models.grid_tokenizer``).

    ``encode(images, train)`` -> ``(codes [B, N, embed_dim] f32, QuantizerOutput)``, ``N =
    (S/f)**2`` row-major, ``out.indices`` int32 ``[B, N]``; ``decode(codes)`` and
    ``decode_tokens(indices [B, N] | [B, h, w])`` -> pixels ``[B, S, S, 3]`` f32 in ~[0, 1]
    (unclamped); ``__call__(images, train)`` -> ``(reconstruction, QuantizerOutput)``.
    ``pre_quant(images)`` -> ``quant_conv(encoder(2 images - 1))`` ``[B, S/f, S/f, .]`` (what
    taming quantizes).

    Attributes (defaults = the ImageNet f16 release, ``configs/imagenet_vqgan.yaml``):
      image_size: square input side S (a multiple of f); ``attn_resolutions`` are resolutions of
        this grid (16 = the 16x16 level of a 256-pixel model).
      ch, ch_mult, num_res_blocks, attn_resolutions, z_channels: taming's ``ddconfig``.
      embed_dim: the code dim (``quant_conv`` output, ``post_quant_conv`` input).
      quantizer: the bottleneck's sub-config (default: the legacy ``VectorQuantizer2``, 1024
        codes; ``{"name": "vae", ...}`` makes ``quant_conv`` emit ``2 embed_dim`` channels).
      dtype: compute dtype of the CNNs (the quantizer stays float32); param_dtype: float32.
    """

    image_size: int = 256
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    NAME = "taming VQGAN"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_size(self) -> int:
        return self.embed_dim

    def setup(self) -> None:
        check_channels(self.ch, self.ch_mult, self.NAME)
        if self.ch % GROUPS:
            raise ValueError(f"{self.NAME}: ch {self.ch} is not a multiple of {GROUPS} "
                             f"(GroupNorm({GROUPS}) of the first block)")
        if self.num_res_blocks < 1 or self.z_channels < 1 or self.embed_dim < 1:
            raise ValueError(f"{self.NAME}: num_res_blocks, z_channels and embed_dim must be >= 1")
        self.check_grid()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        trunk = dict(ch=self.ch, ch_mult=tuple(int(m) for m in self.ch_mult),
                     num_res_blocks=self.num_res_blocks,
                     attn_resolutions=tuple(int(r) for r in self.attn_resolutions), **kw)
        self.encoder = TamingEncoder(z_channels=self.z_channels, **trunk)
        self.quant_conv = torch_conv(input_dim(self.quantizer, self.embed_dim), 1, None, **kw)
        self.quantize = build_quantizer(self.quantizer, self.embed_dim, dtype=jnp.float32,
                                        param_dtype=self.param_dtype)
        self.post_quant_conv = torch_conv(self.z_channels, 1, None, **kw)
        self.decoder = TamingDecoder(**trunk)

    def pre_quant(self, images: jax.Array) -> jax.Array:
        """``images`` in [0, 1] -> ``quant_conv(encoder(2 images - 1))`` float32 (a grid)."""
        check_images(images, self.image_size, self.NAME)
        x = 2.0 * images.astype(jnp.float32) - 1.0
        return constrain(self.quant_conv(self.encoder(x)).astype(jnp.float32), FMAP)

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``images [B, S, S, 3]`` in [0, 1] -> ``(codes [B, N, embed_dim] f32, QuantizerOutput)``."""
        h = self.pre_quant(images)
        b, gh, gw, c = h.shape
        return self.quantize(h.reshape(b, gh * gw, c), train=train)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes ``[B, N, embed_dim]`` (``N`` a square, row-major) -> pixels ``[B, S, S, 3]`` f32."""
        if codes.ndim != 3 or codes.shape[-1] != self.embed_dim:
            raise ValueError(f"decode expects codes [B, N, {self.embed_dim}], got {codes.shape}")
        g = math.isqrt(codes.shape[1])
        if g * g != codes.shape[1]:
            raise ValueError(f"decode expects a square number of tokens, got {codes.shape[1]}")
        quant = codes.reshape(codes.shape[0], g, g, self.embed_dim)
        y = self.decoder(self.post_quant_conv(quant.astype(self.dtype or quant.dtype)),
                         g * self.downsample_factor)
        return (y + 1.0) / 2.0


# The published ImageNet f16 model (configs/imagenet_vqgan.yaml; the "f16, 1024" release).
TAMING_F16_1024: dict[str, Any] = dict(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4),
                                       num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
                                       embed_dim=256, quantizer=dict(DEFAULT_QUANTIZER))
