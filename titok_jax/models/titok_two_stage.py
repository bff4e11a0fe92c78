"""Two-stage TiTok (the 06/2024 TiTok-L-32 / B-64 / S-128 weights; arXiv 2406.07550 section 3.3).

Stage 1 ("proxy codes"): the ViT decoder does not paint pixels; its legacy head predicts, for each
of the ``g x g`` cells, logits over the ``K = 1024`` codes of a frozen MaskGIT-VQGAN (the teacher's
own tokens of the image are the cross-entropy target). Stage 2 ("decoder fine-tuning") adds the
teacher's codebook and CNN decoder as ``pixel_quantize`` / ``pixel_decoder`` and trains them with
the ViT decoder on pixels, with the encoder, quantizer and latent tokens frozen.

With ``z [B, N, C]`` the (l2-normalised) TiTok codes and ``E_pix [K, Z]`` the pixel codebook::

    logits = TiTokDecoder(head="legacy")(z)                 [B, g, g, K]      (stage 1's output)
    soft   = softmax_K(logits) @ E_pix                      [B, g, g, Z]      a soft code mixture,
                                                                              not an argmax lookup
    pixels = MaskGITDecoder(soft)                           [B, g f, g f, 3]  unclamped, float32

(``f = 2 ** (len(pixel_channel_mult) - 1)``; ``g * f`` must equal ``image_size``.) The encoder uses
the legacy read-out reshape (``is_legacy=True``, see ``titok_jax.models.titok``). As in the
official ``finetune_decoder`` mode, ``encode`` of a stage-2 model is frozen: its codes are
``stop_gradient``-ed, the quantizer runs in eval mode and its losses are reported as zero.

Param tree (PyTorch ``state_dict`` names in brackets)::

    latent_tokens, encoder/..., quantize/codebook            as TiTok      [latent_tokens, encoder.*,
                                                                            quantize.embedding.weight]
    decoder/... + decoder/ffn_0, decoder/ffn_2               legacy head   [decoder.ffn.0 / .2]
    pixel_quantize/codebook [K, Z]                           stage 2 only  [pixel_quantize.embedding.weight]
    pixel_decoder/...       (MaskGITDecoder)                 stage 2 only  [pixel_decoder.*]
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.titok import BHWC, TiTokDecoder, TiTokEncoder
from titok_jax.models.vqgan import MaskGITDecoder
from titok_jax.nn import check_images, boxed, constrain, width_scaled_normal
from titok_jax.quantizers import QuantizedModel, QuantizerOutput, build_quantizer, freeze_spec
from titok_jax.quantizers.factory import split_token_ids, token_ids_shape
from titok_jax.quantizers.vq import uniform_codebook_init

Dtype = Any
DEFAULT_QUANTIZER = {"name": "vq", "codebook_size": 4096, "l2_normalize": True}   # TiTok-L-32's


class Codebook(nn.Module):
    """A bare ``[num_codes, dim]`` table (param ``codebook``, ``U(+-1/K)`` init)."""

    num_codes: int
    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("codebook", boxed(uniform_codebook_init, ("codebook", None)),
                          (self.num_codes, self.dim), self.param_dtype)


class TiTokTwoStage(QuantizedModel, nn.Module):
    """Legacy two-stage TiTok; see the module docstring. ``TiTokTwoStage(**titok_variant("l32"))``.

    ``__call__(images, train)`` -> ``(output, QuantizerOutput)``: pixels ``[B,H,W,3]`` when
    ``finetune_decoder`` (stage 2 / released weights), else the proxy-code logits ``[B,g,g,K]``
    (stage 1). ``encode`` -> ``(codes [B,N,C], out)`` with ``out.indices [B,N]``;
    ``decode_logits(codes)``; ``decode(codes)`` / ``decode_tokens(indices)`` -> pixels (stage 2).

    Attributes: those of ``TiTok`` (``remat``, ``remat_policy`` and ``scan_layers`` included; a
    discrete quantizer; defaults = TiTok-L-32: ``{"name": "vq", "codebook_size": 4096,
    "l2_normalize": True}``) plus
      proxy_codebook_size: K, the teacher's codebook size (1024 for MaskGIT-VQGAN).
      finetune_decoder: build ``pixel_quantize`` + ``pixel_decoder`` and freeze ``encode``.
      pixel_hidden_channels, pixel_channel_mult, pixel_num_res_blocks, pixel_z_channels: the
        MaskGIT-VQGAN decoder (defaults: the published f16 one, 30.74M params).
    """

    image_size: int = 256
    patch_size: int = 16
    encoder_width: int = 1024
    encoder_depth: int = 24
    encoder_heads: int = 16
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    num_latent_tokens: int = 32
    token_size: int = 12
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    is_legacy: bool = True
    proxy_codebook_size: int = 1024
    finetune_decoder: bool = True
    pixel_hidden_channels: int = 128
    pixel_channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
    pixel_num_res_blocks: int = 2
    pixel_z_channels: int = 256
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    init_scheme: str = "titok"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def setup(self) -> None:
        if self.continuous:
            raise ValueError(f"two-stage TiTok needs a discrete quantizer (its tokens are decoded "
                             f"through proxy codes), got {self.quantizer_name!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        f = 2 ** (len(self.pixel_channel_mult) - 1)
        if self.finetune_decoder and self.grid_size * f != self.image_size:
            raise ValueError(f"the pixel decoder upsamples the {self.grid_size}x{self.grid_size} "
                             f"grid by {f} to {self.grid_size * f}, not image_size "
                             f"{self.image_size}; adjust pixel_channel_mult or patch_size")
        common = dict(image_size=self.image_size, patch_size=self.patch_size,
                      num_latent_tokens=self.num_latent_tokens, remat=self.remat,
                      remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                      init_scheme=self.init_scheme, dtype=self.dtype,
                      param_dtype=self.param_dtype)
        self.latent_tokens = self.param(
            "latent_tokens", boxed(width_scaled_normal(self.encoder_width), ("tokens", "embed")),
            (self.num_latent_tokens, self.encoder_width), self.param_dtype)
        self.encoder = TiTokEncoder(width=self.encoder_width, depth=self.encoder_depth,
                                    num_heads=self.encoder_heads, out_dim=self.token_size,
                                    is_legacy=self.is_legacy, **common)
        self.quantize = build_quantizer(self.quantizer, self.token_size, dtype=jnp.float32,
                                        param_dtype=self.param_dtype)
        self.decoder = TiTokDecoder(width=self.decoder_width, depth=self.decoder_depth,
                                    num_heads=self.decoder_heads, head="legacy",
                                    proxy_codebook_size=self.proxy_codebook_size, **common)
        if self.finetune_decoder:
            self.pixel_quantize = Codebook(self.proxy_codebook_size, self.pixel_z_channels,
                                           param_dtype=self.param_dtype)
            self.pixel_decoder = MaskGITDecoder(
                hidden_channels=self.pixel_hidden_channels,
                channel_mult=tuple(int(m) for m in self.pixel_channel_mult),
                num_res_blocks=self.pixel_num_res_blocks, z_channels=self.pixel_z_channels,
                dtype=self.dtype, param_dtype=self.param_dtype)

    def _check_images(self, images: jax.Array) -> None:
        check_images(images, self.image_size, "TiTok")

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``images [B,H,W,3]`` in [0,1] -> ``(codes [B,N,C] f32, QuantizerOutput)``; frozen
        (stop-gradient codes, eval-mode quantizer, zero losses) when ``finetune_decoder``."""
        self._check_images(images)
        z = self.encoder(images, self.latent_tokens)
        if not self.finetune_decoder:
            return self.quantize(z, train=train)
        codes, out = self.quantize(z, train=False)
        out = out.replace(losses={k: jnp.zeros_like(v) for k, v in out.losses.items()})
        return jax.lax.stop_gradient(codes), out

    def decode_logits(self, codes: jax.Array) -> jax.Array:
        """Codes ``[B, N, C]`` -> proxy-code logits ``[B, g, g, K]`` float32."""
        if codes.ndim != 3 or codes.shape[-1] != self.token_size:
            raise ValueError(f"decode expects codes [B, N, {self.token_size}], got {codes.shape}")
        return self.decoder(codes)

    def logits_to_pixels(self, logits: jax.Array) -> jax.Array:
        """``softmax(logits) @ pixel codebook`` -> MaskGIT decoder -> pixels (stage 2 only)."""
        if not self.finetune_decoder:
            raise ValueError("this TiTok is a stage-1 model (finetune_decoder=False): it predicts "
                             "proxy-code logits; decode them with the teacher MaskGIT-VQGAN")
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        soft = jnp.einsum("bhwk,kd->bhwd", probs, self.pixel_quantize().astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
        # batch split, as the ViT's boundaries are (models.titok)
        return constrain(self.pixel_decoder(constrain(soft, BHWC)), BHWC)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes ``[B, N, C]`` -> pixels ``[B, H, W, 3]`` f32 (unclamped; stage 2 only)."""
        return self.logits_to_pixels(self.decode_logits(codes))

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        """Int indices ``[B, N]`` (or ``[B, 1, N]``; ``[B, N, k]`` for a multi-index quantizer)
        -> codebook lookup -> ``decode``."""
        k = self.num_codebooks
        lead = split_token_ids(tokens, k)
        if lead == 3 and tokens.shape[1] == 1:
            tokens, lead = tokens[:, 0], 2
        if lead != 2:
            raise ValueError(f"decode_tokens expects indices {token_ids_shape(k)}, got shape "
                             f"{tokens.shape}")
        return self.decode(self.quantize.indices_to_codes(tokens, dtype=jnp.float32))

    def __call__(self, images: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, QuantizerOutput]:
        """Stage 2: ``(pixels [B,H,W,3], out)``; stage 1: ``(logits [B,g,g,K], out)``."""
        codes, out = self.encode(images, train=train)
        logits = self.decode_logits(codes)
        if not self.finetune_decoder:
            return logits, out
        return self.logits_to_pixels(logits), out
