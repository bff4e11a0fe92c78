"""The tokenizer interface of the 2D CNN tokenizers (MaskGIT-VQGAN, VQ-VAE): one base module.

A subclass is a Linen module with the fields ``image_size`` (square side ``S``), ``z_channels``
(the code dim) and ``quantizer`` (the bottleneck's sub-config, ``quantizers.factory``), a
``downsample_factor`` property ``f`` and, in ``setup``, three submodules::

    encoder:   images [B, S, S, 3] in [0, 1] -> [B, S/f, S/f, input_dim(quantizer, z)]
    quantize:  build_quantizer(quantizer, z)   (tokens [B, N, .] -> (codes [B, N, z], QuantizerOutput))
    decoder:   codes [B, S/f, S/f, z] -> pixels [B, S, S, 3] (float32, unclamped)

The base gives it what the ``tokenizer`` task, the trainer and ``api.load_tokenizer`` read:
``grid_size = S / f``, ``num_latent_tokens = (S / f)**2`` (the grid flattened row-major, token
``n = y * (S/f) + x``), ``token_size = z``, ``quantizer_name`` / ``codebook_size`` / ``continuous``
(``QuantizedModel``) and the methods ``encode``, ``decode``, ``decode_tokens`` and ``__call__``.
``NAME`` names the model in its errors.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn import check_images
from titok_jax.quantizers import QuantizedModel, QuantizerOutput
from titok_jax.quantizers.factory import split_token_ids, token_ids_shape


class GridTokenizer(QuantizedModel, nn.Module):
    """Base of the CNN tokenizers with a square grid of tokens (module docstring). Subclasses
    declare the fields; this class declares none (it is never built on its own)."""

    NAME = "CNN tokenizer"   # a class attribute, not a field

    @property
    def downsample_factor(self) -> int:
        raise NotImplementedError

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def num_latent_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def token_size(self) -> int:
        return self.z_channels

    def check_grid(self) -> None:
        """``image_size`` must be a multiple of the downsampling factor (call from ``setup``)."""
        if self.image_size % self.downsample_factor:
            raise ValueError(f"{self.NAME}: image_size {self.image_size} is not a multiple of the "
                             f"downsampling factor {self.downsample_factor}")

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``images [B, S, S, 3]`` in [0, 1] -> ``(codes [B, N, z] f32, QuantizerOutput)`` with
        ``out.indices`` int32 ``[B, N]`` (``[B, N, k]`` for a multi-index quantizer; None for
        continuous tokens)."""
        check_images(images, self.image_size, self.NAME)
        z = self.encoder(images)
        b, h, w, c = z.shape
        return self.quantize(z.reshape(b, h * w, c), train=train)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes ``[B, N, z]`` (``N`` a square, row-major) -> pixels ``[B, S, S, 3]`` f32."""
        if codes.ndim != 3 or codes.shape[-1] != self.z_channels:
            raise ValueError(f"decode expects codes [B, N, {self.z_channels}], got {codes.shape}")
        g = math.isqrt(codes.shape[1])
        if g * g != codes.shape[1]:
            raise ValueError(f"decode expects a square number of tokens, got {codes.shape[1]}")
        return self.decoder(codes.reshape(codes.shape[0], g, g, self.z_channels))

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        """Int indices ``[B, N]`` (or ``[B, 1, N]`` / ``[B, h, w]``; with a trailing axis of ``k``
        ids per token for a multi-index quantizer, ``fq`` / ``rq``: ``[B, N, k]`` / ``[B, h, w,
        k]``) -> codebook -> ``decode``; continuous codes ``[B, N, z]`` (a VAE bottleneck) ->
        ``decode``."""
        if self.continuous:
            return self.decode(tokens)
        k = self.num_codebooks
        lead = split_token_ids(tokens, k)
        if lead == 3:
            tokens = tokens.reshape(tokens.shape[0], -1, *tokens.shape[3:])
        elif lead != 2:
            raise ValueError(f"decode_tokens expects indices {token_ids_shape(k)}, got shape "
                             f"{tokens.shape}")
        return self.decode(self.quantize.indices_to_codes(tokens, dtype=jnp.float32))

    def __call__(self, images: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, QuantizerOutput]:
        """``images`` -> ``(reconstruction [B, S, S, 3] f32, QuantizerOutput)``."""
        codes, out = self.encode(images, train=train)
        return self.decode(codes), out
