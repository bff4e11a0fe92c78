"""KL autoencoder with the Stable-Diffusion / FlexTok layout (diffusers ``AutoencoderKL``), NHWC.

Images ``[B, S, S, 3]`` in **[0, 1]** are mapped to ``x = 2 img - 1`` (the SD convention), encoded
to a diagonal Gaussian over latents ``[B, S/f, S/f, C]`` (``f = 2**(len(channel_mult) - 1)``, 8 for
the published ``(1, 2, 4, 4)``; ``C`` = ``latent_channels``, 4 / 8 / 16 in FlexTok's VAEs) and
decoded back; reconstructions are returned as ``(y + 1) / 2`` (unclamped float32). With
``c_i = base_channels * channel_mult[i]`` and ``L`` levels::

    Encoder:  conv_in 3x3: 3 -> c_0
              down_i (i = 0..L-1): resnets_j (j < num_res_blocks) -> c_i;
                                   then downsample (pad right/bottom by 1, conv 3x3 stride 2) unless i = L-1
              mid: resnet, attention, resnet (c_{L-1});  norm_out -> SiLU -> conv_out 3x3 -> 2C
              quant_conv 1x1: 2C -> 2C        = (mean, logvar), logvar clipped to [-30, 20]
    Decoder:  post_quant_conv 1x1: C -> C;  conv_in 3x3: C -> c_{L-1};  mid as above
              up_k (k = 0..L-1, level i = L-1-k): resnets_j (j <= num_res_blocks) -> c_i;
                                   then nearest x2 + conv 3x3 unless i = 0
              norm_out -> SiLU -> conv_out 3x3 -> 3
    Resnet(x -> c):  h = conv1(SiLU(norm1(x)));  h = conv2(SiLU(norm2(h)));  x' = shortcut(x) + h
                     (shortcut: 1x1 conv when the width changes, else identity)
    Attention:       single head over the H*W positions: x + proj(softmax(q k^T / sqrt(c)) v),
                     q, k, v = Dense(norm(x))

GroupNorms have 32 groups and eps 1e-6; every conv and dense has a bias. Tokens for the tokenizer
API are the latent grid flattened row-major: ``[B, (S/f)^2, C]`` (token ``r * S/f + c``).

Loss terms (``QuantizerOutput.losses``, as TiTok's VAE path): ``kl = kl_weight * mean_b sum_{h,w,c}
0.5 (mean^2 + var - 1 - logvar)``. FlexTok reads *scaled* latents ``scaling_factor * z`` (see
:meth:`KLVAE.encode_latents` / :meth:`KLVAE.decode_latents`).

Published size (c = 128, mult (1, 2, 4, 4), 2 resnets per level): 83.65M params at C = 4,
83.82M at C = 16 (the SD / SDXL VAE layout).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn import check_images, boxed
from titok_jax.nn.conv import (CompVisResnet, check_channels, group_norm, torch_conv_init,
                               upsample_nearest)
from titok_jax.nn.conv import torch_conv as conv
from titok_jax.quantizers import QuantizerOutput
from titok_jax.quantizers.gaussian import SAMPLE_RNG, gaussian_posterior

Dtype = Any
zeros = nn.initializers.zeros_init()


def VAEResnet(out_channels: int, **kwargs: Any) -> nn.Module:
    """SD ResnetBlock ``[B, H, W, C_in] -> [B, H, W, out_channels]`` (``nn.conv.CompVisResnet``)."""
    return CompVisResnet(out_channels, shortcut_name="conv_shortcut", **kwargs)


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with a residual (SD mid block)."""

    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda name: nn.Dense(c, kernel_init=boxed(torch_conv_init, ("embed", "mlp")),  # noqa: E731
                                      bias_init=boxed(zeros, ("mlp",)), name=name, **kw)
        t = group_norm("norm", **kw)(x).reshape(b, h * w, c)
        q, k, v = dense("query")(t), dense("key")(t), dense("value")(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
        y = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, -1).astype(v.dtype), v)
        y = nn.Dense(c, kernel_init=boxed(torch_conv_init, ("mlp", "embed")),
                     bias_init=boxed(zeros, ("embed",)), name="proj_out", **kw)(y)
        return x + y.reshape(b, h, w, c)


def _mid(x: jax.Array, c: int, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    x = VAEResnet(c, name="mid_resnet_0", **kw)(x)
    x = VAEAttention(name="mid_attention", **kw)(x)
    return VAEResnet(c, name="mid_resnet_1", **kw)(x)


class VAEEncoder(nn.Module):
    """``x [B, S, S, 3]`` in [-1, 1] -> moments ``[B, S/f, S/f, 2 C]`` (mean, logvar) float32."""

    base_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    latent_channels: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = [self.base_channels * int(m) for m in self.channel_mult]
        x = conv(chans[0], 3, "conv_in", **kw)(x)
        for i, c in enumerate(chans):
            for j in range(self.num_res_blocks):
                x = VAEResnet(c, name=f"down_{i}_resnet_{j}", **kw)(x)
            if i < len(chans) - 1:
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = conv(c, 3, f"down_{i}_downsample", stride=2, padding="VALID", **kw)(x)
        x = _mid(x, chans[-1], self.dtype, self.param_dtype)
        x = nn.silu(group_norm("norm_out", **kw)(x))
        x = conv(2 * self.latent_channels, 3, "conv_out", **kw)(x)
        x = conv(2 * self.latent_channels, 1, "quant_conv", **kw)(x)
        return x.astype(jnp.float32)


class VAEDecoder(nn.Module):
    """Latents ``[B, h, w, C]`` -> ``y [B, h f, w f, 3]`` (in ~[-1, 1]) float32."""

    base_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = [self.base_channels * int(m) for m in self.channel_mult]
        z = conv(z.shape[-1], 1, "post_quant_conv", **kw)(z.astype(self.dtype or z.dtype))
        x = conv(chans[-1], 3, "conv_in", **kw)(z)
        x = _mid(x, chans[-1], self.dtype, self.param_dtype)
        for k, i in enumerate(reversed(range(len(chans)))):
            for j in range(self.num_res_blocks + 1):
                x = VAEResnet(chans[i], name=f"up_{k}_resnet_{j}", **kw)(x)
            if i > 0:
                x = conv(chans[i], 3, f"up_{k}_upsample", **kw)(upsample_nearest(x))
        x = nn.silu(group_norm("norm_out", **kw)(x))
        return conv(3, 3, "conv_out", **kw)(x).astype(jnp.float32)


class KLVAE(nn.Module):
    """The SD-layout KL autoencoder (module docstring); also a continuous tokenizer
    (``quantizer_name = "vae"``) for the ``tokenizer`` task and ``load_tokenizer``.

    ``__call__(images, train)`` -> ``(reconstruction [B,S,S,3] f32, QuantizerOutput)`` (posterior
    sample in training: rng ``"sample"``; the mean in eval); ``encode`` -> ``(tokens [B, N, C],
    out)``; ``decode_tokens(tokens [B, N, C])`` -> pixels. FlexTok uses ``encode_latents`` /
    ``decode_latents`` on the ``[B, h, w, C]`` grid of scaled latents.

    Attributes:
      image_size: square input side; latent_channels: C (4 / 8 / 16).
      base_channels, channel_mult, num_res_blocks: the conv trunk (default: the SD VAE, f8).
      kl_weight: weight of the KL term in ``out.losses``.
      scaling_factor: FlexTok's latent scale (``z_flextok = scaling_factor * z``).
    """

    image_size: int = 256
    latent_channels: int = 16
    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    kl_weight: float = 1e-6
    scaling_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    quantizer_name = "vae"   # the tokenizer interface (the tasks read it)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def num_latent_tokens(self) -> int:
        return self.latent_size ** 2

    @property
    def token_size(self) -> int:
        return self.latent_channels

    @property
    def codebook_size(self) -> None:
        return None

    @property
    def num_codebooks(self) -> int:
        return 1   # the tokenizer interface (continuous tokens: no ids)

    def setup(self) -> None:
        check_channels(self.base_channels, self.channel_mult, "KL-VAE")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"KL-VAE: image_size {self.image_size} is not a multiple of the "
                             f"downsampling factor {self.downsample_factor}")
        if self.latent_channels < 1:
            raise ValueError(f"KL-VAE: latent_channels must be >= 1, got {self.latent_channels}")
        trunk = dict(base_channels=self.base_channels, channel_mult=tuple(self.channel_mult),
                     num_res_blocks=self.num_res_blocks, dtype=self.dtype,
                     param_dtype=self.param_dtype)
        self.encoder = VAEEncoder(latent_channels=self.latent_channels, **trunk)
        self.decoder = VAEDecoder(**trunk)

    def _check_images(self, images: jax.Array) -> None:
        check_images(images, self.image_size, "KL-VAE")

    def moments(self, images: jax.Array) -> jax.Array:
        """``images`` in [0, 1] -> ``[B, h, w, 2C]`` (mean, logvar), float32."""
        self._check_images(images)
        return self.encoder(2.0 * images.astype(jnp.float32) - 1.0)

    def encode_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Scaled latents ``scaling_factor * z`` ``[B, h, w, C]``: the posterior mean, or a sample
        ``mean + std * eps`` when ``key`` is given (FlexTok's ``sample_posterior``)."""
        m = self.moments(images)
        b, h, w, _ = m.shape
        z, _ = gaussian_posterior(m.reshape(b, h * w, -1), sample_key=key, kl_weight=0.0)
        return self.scaling_factor * z.reshape(b, h, w, self.latent_channels)

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        """Scaled latents ``[B, h, w, C]`` -> pixels ``[B, S, S, 3]`` in ~[0, 1] (unclamped)."""
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"KL-VAE decode expects latents [B, h, w, {self.latent_channels}], "
                             f"got {latents.shape}")
        y = self.decoder(latents.astype(jnp.float32) / self.scaling_factor)
        return (y + 1.0) / 2.0

    # ---- the continuous-tokenizer contract (tokenizer task, load_tokenizer) ----------------------
    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """-> ``(tokens [B, h*w, C] f32, QuantizerOutput(indices=None, losses={"kl"}))``: a posterior
        sample in training (rng ``"sample"``), the mean in eval. Tokens are *unscaled* latents."""
        m = self.moments(images)
        b, h, w, _ = m.shape
        key = self.make_rng(SAMPLE_RNG) if train else None
        return gaussian_posterior(m.reshape(b, h * w, -1), sample_key=key, kl_weight=self.kl_weight)

    def decode(self, tokens: jax.Array) -> jax.Array:
        """Unscaled latent tokens ``[B, h*w, C]`` -> pixels ``[B, S, S, 3]`` in ~[0, 1]."""
        n, c = self.num_latent_tokens, self.latent_channels
        if tokens.ndim != 3 or tokens.shape[1:] != (n, c):
            raise ValueError(f"KL-VAE decode expects tokens [B, {n}, {c}], got {tokens.shape}")
        g = self.latent_size
        y = self.decoder(tokens.reshape(tokens.shape[0], g, g, c))
        return (y + 1.0) / 2.0

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.decode(tokens)

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        tokens, out = self.encode(images, train=train)
        return self.decode(tokens), out
