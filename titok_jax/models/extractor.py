"""The universal extractor: TiTok's 1D tokenizer trained with MAE input masking, nested dropout on
its latent tokens, MaskGIT-style decoder masking and REPA - one model for reconstruction, ordered
(any-prefix) tokens, completion from tokens, and features.

It is composed of TiTok's own modules (``models.titok``: ``TiTokEncoder`` / ``TiTokDecoder``, same
param names and inits, ``nn.scan`` / remat, the optional token prior), a quantizer of
``titok_jax.quantizers`` (default FSQ; ``vae`` for continuous tokens) and FlexTok's REPA projector
(``models.flextok_blocks.RepaProjector``). With ``g = S / p`` and ``P = g^2`` patches, ``N`` latent
tokens of ``C`` channels::

    Encoder:  [cls, (PatchEmbed(x) + pos)[keep]] || latents + latent_pos  -> ViT
              -> z = conv_out(ln_post(latent slots))       pre-quantisation tokens [B, N, C]
              (keep [B, n]: the patches left by MAE masking, n = P - round(r P); n = 0 leaves
              the class slot and the N latents only)
              REPA: h = patch slots after block ``repa_layer`` -> RepaProjector -> [B, n, repa_dim]
    Quantizer: z_q, ids = Q(z)
    Nested dropout: t_j = z_q,j for j < k, the learned ``dropped_code [C]`` for j >= k
    Decoder:  [cls, grid] || Linear(t) + latent_pos -> ViT -> pixels      (TiTok's pixel head)
              grid slot i = visible_embed(patch_i of x) where visible[b, i], else the mask token
              (decoder masking ratio m: round(m P) mask tokens; m = 1 is TiTok's decoder)

Inference: ``decode_tokens(ids [B, k])`` for any prefix ``1 <= k <= N`` (slots past ``k`` hold the
``dropped_code``, exactly as in training) with all patches masked, or with ``visible`` images and a
``visible_mask`` (completion / inpainting from tokens). ``latents(images)`` are the features
(pre-quantisation tokens; a VAE bottleneck's posterior mean).

Published-size variant ``bl128`` (256 px, patch 16, B-size encoder 768 x 12, L-size decoder
1024 x 24, 128 tokens of FSQ [8,8,8,5,5,5]): 398.21M parameters = the tokenizer's 390.34M
(encoder 85.95M, decoder 304.29M of which 0.79M ``visible_embed``, latent tokens 0.10M) + the
training-only REPA projector to DINOv2-L's 1024-d features, 7.87M (``repa_hidden_dim = 2048``).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.flextok_blocks import RepaProjector
from titok_jax.models.titok import setup_titok_parts
from titok_jax.nn import boxed, check_images
from titok_jax.quantizers import QuantizedModel, QuantizerOutput, freeze_spec

Dtype = Any
DEFAULT_QUANTIZER = {"name": "fsq", "levels": [8, 8, 8, 5, 5, 5]}


class Extractor(QuantizedModel, nn.Module):
    """The extractor (module docstring): ``Extractor(**EXTRACTOR_VARIANTS[name])``.

    ``__call__(images, train)`` -> ``(reconstruction [B,H,W,3] f32, QuantizerOutput)`` with no
    masking (builds every param); ``forward(images, keep=, keep_k=, visible=, train=)`` the
    training forward; ``encode`` / ``latents`` / ``decode`` / ``decode_tokens`` for inference.

    Attributes (TiTok's, see ``models.titok.TiTok``): image_size, patch_size, encoder_* /
    decoder_* (width, depth, heads), num_latent_tokens (N), token_size (C), quantizer (a
    sub-config, default FSQ [8,8,8,5,5,5]), remat / remat_policy / scan_layers, init_scheme,
    token_prior, dtype / param_dtype. And:
      repa_layer: encoder block whose patch tokens REPA aligns (-1: none);
      repa_dim: the teacher's feature width (0: no projector); repa_hidden_dim: projector width.
    """

    image_size: int = 256
    patch_size: int = 16
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    num_latent_tokens: int = 128
    token_size: int = 6
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    repa_layer: int = -1
    repa_dim: int = 0
    repa_hidden_dim: int = 256
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    init_scheme: str = "titok"
    token_prior: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    variable_length = True   # any prefix of the tokens decodes

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def repa(self) -> bool:
        return self.repa_dim > 0 and self.repa_layer >= 0

    def setup(self) -> None:
        if self.repa_dim > 0 and not 0 <= self.repa_layer < self.encoder_depth:
            raise ValueError(f"repa_layer {self.repa_layer} is not a block of the "
                             f"{self.encoder_depth}-block encoder (repa_dim > 0 needs one)")
        setup_titok_parts(self, feature_layer=self.repa_layer if self.repa else -1)
        # what the decoder reads in a token slot dropped by nested dropout (or past a prefix)
        self.dropped_code = self.param("dropped_code", boxed(nn.initializers.zeros_init(), (None,)),
                                       (self.token_size,), self.param_dtype)
        if self.repa:
            self.repa_projector = RepaProjector(self.repa_hidden_dim, self.repa_dim,
                                                dtype=self.dtype, param_dtype=self.param_dtype)

    # ---- encoding -------------------------------------------------------------------------------
    def _encoder(self, images: jax.Array, keep: jax.Array | None) -> tuple[jax.Array, Any]:
        check_images(images, self.image_size, "Extractor")
        out = self.encoder(images, self.latent_tokens, keep)
        return out if self.repa else (out, None)

    def latents(self, images: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        """Pre-quantisation tokens ``[B, N, C]`` f32 (a VAE bottleneck: the posterior mean), from
        the patches ``keep [B, n]`` only when given."""
        z = self._encoder(images, keep)[0]
        return z[..., :self.token_size] if self.continuous else z

    def encode(self, images: jax.Array, train: bool = False, keep: jax.Array | None = None
               ) -> tuple[jax.Array, QuantizerOutput]:
        """``images [B,H,W,3]`` in [0,1] -> ``(codes [B,N,C] f32, QuantizerOutput)`` (ids
        ``out.indices [B, N]`` for a discrete quantizer), ordered coarse to fine."""
        return self.quantize(self._encoder(images, keep)[0], train=train)

    # ---- decoding -------------------------------------------------------------------------------
    def pad_codes(self, codes: jax.Array, keep_k: jax.Array | None = None) -> jax.Array:
        """Codes ``[B, k, C]`` (``k <= N``) -> ``[B, N, C]``: slots ``j >= k`` (and ``j >=
        keep_k[b]``, nested dropout) hold ``dropped_code``."""
        b, k, c = codes.shape
        n = self.num_latent_tokens
        if not 1 <= k <= n or c != self.token_size:
            raise ValueError(f"the extractor decodes codes [B, k, {self.token_size}] with "
                             f"1 <= k <= {n}, got {codes.shape}")
        dropped = jnp.broadcast_to(self.dropped_code.astype(jnp.float32), (b, n - k, c))
        codes = jnp.concatenate([codes.astype(jnp.float32), dropped], axis=1)
        if keep_k is not None:
            kept = jnp.arange(n)[None, :] < jnp.asarray(keep_k)[:, None]
            codes = jnp.where(kept[..., None], codes, self.dropped_code.astype(jnp.float32))
        return codes

    def decode(self, codes: jax.Array, visible: jax.Array | None = None,
               visible_mask: jax.Array | None = None, keep_k: jax.Array | None = None) -> jax.Array:
        """Codes ``[B, k, C]`` (a prefix, ``1 <= k <= N``) -> pixels ``[B, H, W, 3]`` f32
        (unclamped). ``visible`` (images ``[B, H, W, 3]``) with ``visible_mask`` (bool ``[B, P]``):
        those patches are given to the decoder (completion); otherwise every slot is masked."""
        if (visible is None) != (visible_mask is None):
            raise ValueError("decode needs both `visible` (images) and `visible_mask`, or neither")
        if visible is not None:
            check_images(visible, self.image_size, "Extractor.decode (visible)")
        return self.decoder(self.pad_codes(codes, keep_k), visible, visible_mask)

    def decode_tokens(self, tokens: jax.Array, visible: jax.Array | None = None,
                      visible_mask: jax.Array | None = None) -> jax.Array:
        """Ids ``[B, k]`` (any prefix ``1 <= k <= N``; a VAE: codes ``[B, k, C]``) -> pixels."""
        if not self.continuous:
            if tokens.ndim != 2:
                raise ValueError(f"decode_tokens expects ids [B, k], got shape {tokens.shape}")
            tokens = self.quantize.indices_to_codes(tokens.astype(jnp.int32), dtype=jnp.float32)
        return self.decode(tokens, visible, visible_mask)

    # ---- training -------------------------------------------------------------------------------
    def forward(self, images: jax.Array, *, keep: jax.Array | None = None,
                keep_k: jax.Array | None = None, visible: jax.Array | None = None,
                train: bool = False) -> tuple[jax.Array, QuantizerOutput, jax.Array | None]:
        """The training forward with explicit masks (drawn by the task, ``models.extractor_masking``):
        ``keep [B, n]`` the patches the encoder sees (None: all), ``keep_k [B]`` nested-dropout
        lengths (None: all tokens), ``visible [B, P]`` the patches the decoder sees (None: none).
        Returns ``(reconstruction f32, QuantizerOutput, projected REPA features [B, n, repa_dim]
        or None)``."""
        z, feats = self._encoder(images, keep)
        codes, qout = self.quantize(z, train=train)
        rec = self.decode(codes, None if visible is None else images, visible, keep_k)
        proj = self.repa_projector(feats) if self.repa else None
        return rec, qout, proj

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """No masking: ``(reconstruction [B,H,W,3] f32, QuantizerOutput)``; at init it also builds
        the decoder's ``visible_embed`` (an all-False mask: the same output)."""
        visible = (jnp.zeros((images.shape[0], self.num_patches), bool)
                   if self.is_initializing() else None)
        rec, qout, _ = self.forward(images, visible=visible, train=train)
        return rec, qout


# name -> Extractor kwargs. ``bl128``: the published size (TiTok-B encoder, TiTok-L decoder, 256 px,
# patch 16) with 128 FSQ tokens and REPA on encoder block 6 against DINOv2-L/14 (1024-d).
# ``tiny``: 64 px for a CPU (the REPA teacher of configs/extractor.py:tiny is 64-d).
EXTRACTOR_VARIANTS: dict[str, dict[str, Any]] = {
    "bl128": dict(image_size=256, patch_size=16, encoder_width=768, encoder_depth=12,
                  encoder_heads=12, decoder_width=1024, decoder_depth=24, decoder_heads=16,
                  num_latent_tokens=128, token_size=6, quantizer=dict(DEFAULT_QUANTIZER),
                  repa_layer=5, repa_dim=1024, repa_hidden_dim=2048),
    "tiny": dict(image_size=64, patch_size=8, encoder_width=128, encoder_depth=2, encoder_heads=4,
                 decoder_width=128, decoder_depth=2, decoder_heads=4, num_latent_tokens=16,
                 token_size=6, quantizer=dict(DEFAULT_QUANTIZER), repa_layer=0, repa_dim=64,
                 repa_hidden_dim=128, token_prior=1.0, init_scheme="xavier"),
}
