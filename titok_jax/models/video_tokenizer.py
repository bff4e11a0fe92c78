"""The tokenizer interface of the video CNN tokenizers (MAGVIT v1's 3D-VQ, MAGVIT-v2's causal
tokenizer): one base module, the video counterpart of ``models.grid_tokenizer``.

A subclass is a Linen module with the fields ``num_frames`` (nominal ``T``), ``image_size``
(nominal square side ``S``), ``z_channels`` (the code dim) and ``quantizer`` (the bottleneck's
sub-config, ``quantizers.factory``), the properties ``spatial_factor`` ``f`` and
``temporal_factor`` ``ft``, the methods ``latent_frames(T)`` / ``check_frames(T)`` and, in
``setup``, three submodules::

    encoder:   clips [B, T, H, W, 3] in [0, 1] -> [B, T', H/f, W/f, input_dim(quantizer, z)]
    quantize:  build_quantizer(quantizer, z)   ([B, N, .] -> (codes [B, N, z], QuantizerOutput))
    decoder:   codes [B, T', h, w, z] -> pixels [B, T, h f, w f, 3] (float32, unclamped)

The model is fully convolutional: any ``T`` that ``check_frames`` accepts and any ``H, W`` that
are multiples of ``f`` work; the nominal ``(num_frames, image_size)`` only define
``latent_shape = (T', S/f, S/f)`` and ``num_latent_tokens = T' (S/f)**2`` (the latent grid
flattened ``(t, y, x)``-major, token ``n = (t h + y) w + x``) for the task and the API. Codes are
returned as a grid ``[B, T', h, w, z]`` and indices as int32 ``[B, T', h, w]`` (a trailing axis of
``k`` ids for a multi-index quantizer; None for continuous tokens).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn.conv3d import reshape_batch_major
from titok_jax.quantizers import QuantizedModel, QuantizerOutput


class VideoTokenizer(QuantizedModel, nn.Module):
    """Base of the video CNN tokenizers (module docstring). Subclasses declare the fields; this
    class declares none (it is never built on its own)."""

    NAME = "video tokenizer"   # a class attribute, not a field

    @property
    def spatial_factor(self) -> int:
        raise NotImplementedError

    @property
    def temporal_factor(self) -> int:
        raise NotImplementedError

    def latent_frames(self, frames: int) -> int:
        """``T -> T'``, the number of latent frames of a ``T``-frame clip."""
        raise NotImplementedError

    def check_frames(self, frames: int) -> None:
        """ValueError unless ``T`` frames decode back to ``T`` frames."""
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(T', h, w)`` of the nominal clip ``[num_frames, image_size, image_size]``."""
        g = self.image_size // self.spatial_factor
        return self.latent_frames(self.num_frames), g, g

    @property
    def num_latent_tokens(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def token_size(self) -> int:
        return self.z_channels

    def inflate_image_params(self, params_2d: Any, params_3d: Any) -> Any:
        """The params of this family's image model (``params_2d``, host arrays) -> params with the
        structure of ``params_3d`` (this model's params or their shapes): the 2-D -> 3-D inflation
        the MAGVIT papers start video training from (``config.init_from``, ``tasks.video_init``).
        A family without one raises NotImplementedError; a tree that does not map, ValueError."""
        raise NotImplementedError(f"{self.NAME} has no inflation from an image model")

    def check_nominal(self) -> None:
        """The nominal clip must be valid (call from ``setup``)."""
        if self.image_size % self.spatial_factor:
            raise ValueError(f"{self.NAME}: image_size {self.image_size} is not a multiple of the "
                             f"spatial downsampling factor {self.spatial_factor}")
        self.check_frames(self.num_frames)

    def check_clips(self, clips: jax.Array) -> None:
        """One-line ValueError unless ``clips`` is a float batch ``[B, T, H, W, 3]`` with valid
        ``T`` and ``H, W`` multiples of ``f``."""
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"{self.NAME} expects clips [B, T, H, W, 3] in [0, 1], got "
                             f"{clips.shape}")
        if not jnp.issubdtype(clips.dtype, jnp.floating):
            raise ValueError(f"{self.NAME} expects float clips in [0, 1], got {clips.dtype}")
        f = self.spatial_factor
        if clips.shape[2] % f or clips.shape[3] % f:
            raise ValueError(f"{self.NAME}: frame size {clips.shape[2]}x{clips.shape[3]} is not a "
                             f"multiple of the spatial downsampling factor {f}")
        self.check_frames(clips.shape[1])

    def pre_quant(self, clips: jax.Array) -> jax.Array:
        """``clips [B, T, H, W, 3]`` in [0, 1] -> the encoder's output ``[B, T', h, w, .]`` f32."""
        self.check_clips(clips)
        return self.encoder(clips)

    def encode(self, clips: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``clips [B, T, H, W, 3]`` in [0, 1] -> ``(codes [B, T', h, w, z] f32, QuantizerOutput)``
        with ``out.indices`` int32 ``[B, T', h, w]`` (``[..., k]`` multi-index, None continuous)."""
        z = self.pre_quant(clips)
        grid = z.shape[:4]
        codes, out = self.quantize(reshape_batch_major(z, (grid[0], -1, z.shape[-1])),
                                   train=train)
        if out.indices is not None:
            out = out.replace(indices=reshape_batch_major(
                out.indices, (*grid, *out.indices.shape[2:])))
        return reshape_batch_major(codes, (*grid, codes.shape[-1])), out

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes ``[B, T', h, w, z]`` (or ``[B, N, z]`` with ``N = num_latent_tokens``, the nominal
        grid) -> pixels ``[B, T, h f, w f, 3]`` f32 (unclamped)."""
        if codes.ndim == 3 and codes.shape[1:] == (self.num_latent_tokens, self.z_channels):
            codes = reshape_batch_major(codes, (codes.shape[0], *self.latent_shape,
                                                self.z_channels))
        if codes.ndim != 5 or codes.shape[-1] != self.z_channels:
            raise ValueError(f"{self.NAME}: decode expects codes [B, T', h, w, {self.z_channels}] "
                             f"or [B, {self.num_latent_tokens}, {self.z_channels}], got "
                             f"{codes.shape}")
        return self.decoder(codes)

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        """Int indices ``[B, T', h, w]`` (or ``[B, N]``, the nominal grid flattened; a trailing
        axis of ``k`` ids for a multi-index quantizer) -> codebook -> ``decode``; continuous codes
        (a VAE bottleneck) -> ``decode``."""
        if self.continuous:
            return self.decode(tokens)
        lead = tokens.ndim - (self.num_codebooks > 1)
        if lead == 2:
            if tokens.shape[1] != self.num_latent_tokens:
                raise ValueError(f"{self.NAME}: decode_tokens expects [B, T', h, w] indices or "
                                 f"[B, {self.num_latent_tokens}], got {tokens.shape}")
            tokens = reshape_batch_major(tokens, (tokens.shape[0], *self.latent_shape,
                                                  *tokens.shape[2:]))
        elif lead != 4:
            raise ValueError(f"{self.NAME}: decode_tokens expects [B, T', h, w] indices, got "
                             f"{tokens.shape}")
        return self.decode(self.quantize.indices_to_codes(tokens, dtype=jnp.float32))

    def __call__(self, clips: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, QuantizerOutput]:
        """``clips`` -> ``(reconstruction [B, T, H, W, 3] f32, QuantizerOutput)``."""
        codes, out = self.encode(clips, train=train)
        return self.decode(codes), out
