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
              decoder REPA (``decoder_repa_layer >= 0``): the P grid slots after that block ->
              decoder_repa_projector -> [B, P, repa_dim]

``decoder_head="flow"``: the rectified-flow decoder (FlexTok's idea on TiTok's decoder; t = 1 is
noise, ``titok_jax.flow``), in the data space ``x = 2 img - 1``::

    x_t = (1 - t) x + t eps                               eps ~ N(0, I) [B, H, W, 3], t [B]
    grid slot i = noised_embed(patch_i of x_t) + temb(t)  (visible patches: visible_embed of the
              clean image, as above); class slot cls + temb(t); temb = TimestepEmbedder(t)
    v   = conv_out(unpatchify(ffn(adaLN_temb(ln_post(grid slots)))))      the velocity eps - x
          (``flow_prediction="x"``: that output is x_hat and v = (x_t - x_hat) / max(t, 0.05))
    decode: Euler from eps (``noise_shape``) over a uniform grid of ``steps`` (default 25) with
            CFG weight w (default 1 = none) against the null condition "no tokens" (every slot
            the ``dropped_code``, as nested dropout at k = 0), img = (x_0 + 1) / 2; with visible
            patches those pixels are pasted over the sample (the network never reads x_t there).

Inference: ``decode_tokens(ids [B, k])`` (the flow head: ``key=`` / ``noise=``, ``steps=``,
``guidance_scale=``) for any prefix ``1 <= k <= N`` (slots past ``k`` hold the
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

from titok_jax.flow import GuidanceConfig, match_batch, sample, start_noise, time_grid, with_scale
from titok_jax.models.extractor_masking import pixel_weights
from titok_jax.models.flextok_blocks import RepaProjector
from titok_jax.models.titok import setup_titok_parts
from titok_jax.nn import boxed, check_images
from titok_jax.quantizers import QuantizedModel, QuantizerOutput, freeze_spec
from titok_jax.quantizers.factory import split_token_ids, token_ids_shape

Dtype = Any
DEFAULT_QUANTIZER = {"name": "fsq", "levels": [8, 8, 8, 5, 5, 5]}
DECODER_HEADS = ("pixel", "flow")   # TiTok's deterministic pixel decoder, or a rectified flow
# what the flow head's network outputs: the velocity itself, or the clean image x (JiT-style,
# v = (x_t - x_hat) / max(t, FLOW_T_MIN): the noise reaches v through x_t, not through the network)
FLOW_PREDICTIONS = ("velocity", "x")
FLOW_T_MIN = 0.05


class Extractor(QuantizedModel, nn.Module):
    """The extractor (module docstring): ``Extractor(**EXTRACTOR_VARIANTS[name])``.

    ``__call__(images, train)`` -> ``(reconstruction [B,H,W,3] f32, QuantizerOutput)`` with no
    masking (builds every param; the flow head: its one-step estimate from ``x_1 = 0``);
    ``forward(images, keep=, keep_k=, visible=, x_t=, t=, train=)`` the training forward;
    ``encode`` / ``latents`` / ``decode`` / ``decode_tokens`` for inference.

    Attributes (TiTok's, see ``models.titok.TiTok``): image_size, patch_size, encoder_* /
    decoder_* (width, depth, heads), num_latent_tokens (N), token_size (C), quantizer (a
    sub-config, default FSQ [8,8,8,5,5,5]), remat / remat_policy / scan_layers, init_scheme,
    token_prior, dtype / param_dtype. And:
      repa_layer: encoder block whose patch tokens REPA aligns (-1: none);
      repa_dim: the teacher's feature width (0: no projector); repa_hidden_dim: projector width.
      decoder_head: ``"pixel"`` (TiTok's decoder) or ``"flow"`` (the rectified-flow decoder of
        the module docstring; params ``decoder/{noised_embed,time_embed,head_adaln}`` instead of
        ``decoder/mask_token``).
      flow_prediction: the flow head's network output, ``"velocity"`` (v itself) or ``"x"`` (the
        clean image ``x_hat``, turned into ``v = (x_t - x_hat) / max(t, 0.05)``: a network whose
        width is below the patch's ``p * p * 3`` values cannot carry the noise of ``x_t`` through
        to ``v``; this way it need not). Either way the module returns the velocity.
      decoder_repa_layer: decoder block whose grid slots REPA aligns (-1: none; needs repa_dim),
        through its own ``decoder_repa_projector``.
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
    decoder_head: str = "pixel"
    flow_prediction: str = "velocity"
    decoder_repa_layer: int = -1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    variable_length = True   # any prefix of the tokens decodes
    default_steps = 25       # the flow head's Euler steps (uniform grid)
    default_guidance = 1.0   # the flow head's CFG weight (1 = none)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def repa(self) -> bool:
        return self.repa_dim > 0 and self.repa_layer >= 0

    @property
    def decoder_repa(self) -> bool:
        return self.repa_dim > 0 and self.decoder_repa_layer >= 0

    @property
    def flow(self) -> bool:
        return self.decoder_head == "flow"

    def setup(self) -> None:
        if self.decoder_head not in DECODER_HEADS:
            raise ValueError(f"decoder_head must be one of {', '.join(DECODER_HEADS)}, "
                             f"got {self.decoder_head!r}")
        if self.flow_prediction not in FLOW_PREDICTIONS:
            raise ValueError(f"flow_prediction must be one of {', '.join(FLOW_PREDICTIONS)}, "
                             f"got {self.flow_prediction!r}")
        if self.repa_layer >= self.encoder_depth or (
                self.repa_dim > 0 and self.repa_layer < 0 and self.decoder_repa_layer < 0):
            raise ValueError(f"repa_layer {self.repa_layer} is not a block of the "
                             f"{self.encoder_depth}-block encoder (repa_dim > 0 needs one, or a "
                             f"decoder_repa_layer)")
        if self.decoder_repa_layer >= 0 and not (self.decoder_repa_layer < self.decoder_depth
                                                 and self.repa_dim > 0):
            raise ValueError(f"decoder_repa_layer {self.decoder_repa_layer} needs a block of the "
                             f"{self.decoder_depth}-block decoder and repa_dim > 0 (the teacher's "
                             f"width), got repa_dim {self.repa_dim}")
        setup_titok_parts(self, feature_layer=self.repa_layer if self.repa else -1,
                          decoder_kwargs=dict(
                              head="flow" if self.flow else "pixels",
                              feature_layer=self.decoder_repa_layer if self.decoder_repa else -1))
        # what the decoder reads in a token slot dropped by nested dropout (or past a prefix)
        self.dropped_code = self.param("dropped_code", boxed(nn.initializers.zeros_init(), (None,)),
                                       (self.token_size,), self.param_dtype)
        projector = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.repa:
            self.repa_projector = RepaProjector(self.repa_hidden_dim, self.repa_dim, **projector)
        if self.decoder_repa:
            self.decoder_repa_projector = RepaProjector(self.repa_hidden_dim, self.repa_dim,
                                                        **projector)

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

    def _decoder(self, codes: jax.Array, visible: jax.Array | None, visible_mask: jax.Array | None,
                 x_t: jax.Array | None = None, t: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """Padded codes ``[B, N, C]`` -> ``(pixels or velocity, decoder REPA slots or None)``."""
        if (visible is None) != (visible_mask is None):
            raise ValueError("decode needs both `visible` (images) and `visible_mask`, or neither")
        if visible is not None:
            check_images(visible, self.image_size, "Extractor.decode (visible)")
        if self.flow and (x_t is None or t is None):
            raise ValueError("the flow decoder head decodes with x_t and t (or decode_tokens samples)")
        if not self.flow and (x_t is not None or t is not None):
            raise ValueError("x_t and t apply to decoder_head='flow' only")
        out, feats = (self.decoder(codes, visible, visible_mask, x_t, t) if self.decoder_repa else
                      (self.decoder(codes, visible, visible_mask, x_t, t), None))
        if self.flow and self.flow_prediction == "x":   # out is x_hat: v = (x_t - x_hat) / t
            tb = jnp.maximum(jnp.asarray(t, jnp.float32), FLOW_T_MIN)[:, None, None, None]
            out = (x_t.astype(jnp.float32) - out) / tb
        return out, feats

    def decode(self, codes: jax.Array, visible: jax.Array | None = None,
               visible_mask: jax.Array | None = None, keep_k: jax.Array | None = None,
               x_t: jax.Array | None = None, t: jax.Array | None = None) -> jax.Array:
        """Codes ``[B, k, C]`` (a prefix, ``1 <= k <= N``) -> pixels ``[B, H, W, 3]`` f32
        (unclamped). ``visible`` (images ``[B, H, W, 3]``) with ``visible_mask`` (bool ``[B, P]``):
        those patches are given to the decoder (completion); otherwise every slot is masked. The
        flow head: the velocity ``v(x_t, t | codes)`` at ``x_t [B, H, W, 3]`` (data space
        ``2 img - 1``), ``t [B]``."""
        return self._decoder(self.pad_codes(codes, keep_k), visible, visible_mask, x_t, t)[0]

    def decode_tokens(self, tokens: jax.Array, visible: jax.Array | None = None,
                      visible_mask: jax.Array | None = None, *, key: jax.Array | None = None,
                      noise: jax.Array | None = None, steps: int | None = None,
                      guidance_scale: Any = None) -> jax.Array:
        """Ids ``[B, k]`` (any prefix ``1 <= k <= N``; a VAE: codes ``[B, k, C]``) -> pixels; the
        flow head samples (:meth:`sample_codes`: ``key`` / ``noise``, ``steps``, ``guidance_scale``)."""
        if not self.continuous:
            m = self.num_codebooks
            if split_token_ids(tokens, m) != 2:
                raise ValueError(f"decode_tokens expects ids {token_ids_shape(m, 'B, k')}, got "
                                 f"shape {tokens.shape}")
            tokens = self.quantize.indices_to_codes(tokens.astype(jnp.int32), dtype=jnp.float32)
        if self.flow:
            return self.sample_codes(tokens, visible, visible_mask, key=key, noise=noise,
                                     steps=self.default_steps if steps is None else steps,
                                     guidance_scale=(self.default_guidance if guidance_scale is None
                                                     else guidance_scale))
        if noise is not None or steps is not None or guidance_scale is not None:
            raise ValueError("noise/steps/guidance apply to decoder_head='flow' only")
        return self.decode(tokens, visible, visible_mask)

    # ---- the flow head ----------------------------------------------------------------------------
    @staticmethod
    def flow_data(images: jax.Array) -> jax.Array:
        """Images in [0, 1] -> the flow's data space ``x = 2 img - 1`` (float32)."""
        return 2.0 * images.astype(jnp.float32) - 1.0

    def noise_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The flow sampler's initial noise: pixels ``(B, S, S, 3)`` (t = 1 is noise)."""
        return (int(batch), self.image_size, self.image_size, 3)

    def sample_codes(self, codes: jax.Array, visible: jax.Array | None = None,
                     visible_mask: jax.Array | None = None, *, key: jax.Array | None = None,
                     noise: jax.Array | None = None, steps: int = 25,
                     guidance_scale: Any = 1.0) -> jax.Array:
        """The flow head's decode: codes ``[B, k, C]`` -> pixels ``[B, S, S, 3]`` f32 (~[0, 1],
        unclipped): Euler from ``noise`` (``noise_shape(B)``; default ``N(0, I)`` from ``key``)
        over ``steps`` uniform steps, CFG ``guidance_scale`` against the all-dropped null condition
        (1: none), visible patches pasted over the sample."""
        if not self.flow:
            raise ValueError("sample_codes is the decode of decoder_head='flow'")
        b = codes.shape[0]
        cond_codes = self.pad_codes(codes)
        null_codes = self.pad_codes(codes, jnp.zeros((b,), jnp.int32))   # every slot dropped
        if (visible is None) != (visible_mask is None):
            raise ValueError("decode needs both `visible` (images) and `visible_mask`, or neither")
        noise = start_noise(self.noise_shape(b), key, noise, "pixels in [-1, 1] space")

        def velocity(x, t, cond):
            n = x.shape[0]
            z = jnp.where(cond[:, None, None], match_batch(cond_codes, n), match_batch(null_codes, n))
            seen = None if visible is None else match_batch(visible.astype(jnp.float32), n)
            mask = None if visible_mask is None else match_batch(visible_mask, n)
            return self._decoder(z, seen, mask, x, t)[0]

        grid = time_grid(int(steps))
        run = lambda g: sample(velocity, noise, grid, "euler", g)   # noqa: E731
        if not isinstance(guidance_scale, jax.core.Tracer):
            x0 = run(None if float(guidance_scale) == 1.0 else
                     with_scale(GuidanceConfig(kind="cfg"), guidance_scale))
        else:   # a jit argument (Tokenizer.decode): the null pass only where w != 1
            x0 = jax.lax.cond(guidance_scale == 1.0, lambda: run(None),
                              lambda: run(with_scale(GuidanceConfig(kind="cfg"), guidance_scale)))
        images = (x0 + 1.0) / 2.0
        if visible is not None:
            w = pixel_weights(visible_mask, self.patch_size, self.image_size) > 0
            images = jnp.where(w, visible.astype(jnp.float32), images)
        return images

    # ---- training -------------------------------------------------------------------------------
    def forward(self, images: jax.Array, *, keep: jax.Array | None = None,
                keep_k: jax.Array | None = None, visible: jax.Array | None = None,
                x_t: jax.Array | None = None, t: jax.Array | None = None,
                train: bool = False) -> tuple[jax.Array, QuantizerOutput, Any, Any]:
        """The training forward with explicit masks (drawn by the task, ``models.extractor_masking``):
        ``keep [B, n]`` the patches the encoder sees (None: all), ``keep_k [B]`` nested-dropout
        lengths (None: all tokens; 0: the null condition), ``visible [B, P]`` the patches the
        decoder sees (None: none); the flow head also takes ``x_t [B, H, W, 3]`` / ``t [B]``.
        Returns ``(reconstruction f32 (the flow head: the velocity), QuantizerOutput, projected
        encoder REPA features [B, n, repa_dim] or None, projected decoder REPA features
        [B, P, repa_dim] or None)``."""
        z, feats = self._encoder(images, keep)
        codes, qout = self.quantize(z, train=train)
        out, dec_feats = self._decoder(self.pad_codes(codes, keep_k),
                                       None if visible is None else images, visible, x_t, t)
        proj = self.repa_projector(feats) if self.repa else None
        dec_proj = self.decoder_repa_projector(dec_feats) if self.decoder_repa else None
        return out, qout, proj, dec_proj

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """No masking: ``(reconstruction [B,H,W,3] f32, QuantizerOutput)``; at init it also builds
        the decoder's ``visible_embed`` (an all-False mask: the same output). The flow head: the
        one-step estimate ``(x_t - t v + 1) / 2`` from ``x_1 = 0`` at ``t = 1`` (cheap; not a
        sample: ``decode_tokens`` samples)."""
        b = images.shape[0]
        visible = jnp.zeros((b, self.num_patches), bool) if self.is_initializing() else None
        flow = dict(x_t=jnp.zeros(images.shape, jnp.float32), t=jnp.ones((b,), jnp.float32)) \
            if self.flow else {}
        out, qout, _, _ = self.forward(images, visible=visible, train=train, **flow)
        return ((1.0 - out) / 2.0 if self.flow else out), qout


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
