"""FlexTok (arXiv 2502.13967): ordered 1D tokens of an image, decodable from any prefix.

Shapes for a ``S x S`` image, a VAE of factor ``f = 8`` and ``C`` latent channels, patch ``p = 2``,
``g = S / (f p)`` (16 at 256 px), ``P = g^2`` patches, ``R`` registers (256), FSQ levels
``L = [8, 8, 8, 5, 5, 5]`` (64 000 codes, ``d = 6``)::

    z      = s_vae * VAE.mean(img)               [B, S/f, S/f, C]   frozen KL-VAE, no gradient
    Encoder:  [Dense(patchify_p z) + sincos_2d || registers R x We]  -> FlexBlocks with the mask
              (patches <-> patches; register i -> all patches + registers <= i)
              -> registers -> LayerNorm -> Dense(We -> d) -> FSQ     codes [B, R, d], ids [B, R]
    Decoder (rectified flow, t = 1 noise):
      x_t = (1 - t) z + t eps                                         (titok_jax.flow)
      seq = [Dense(patchify_p x_t) + sincos_2d  ||  r]                [B, P + R, Wd]
      r   = Dense(codes) + register posemb ; then slots j >= k replaced by the bare mask_token
            (nested dropout, k per sample; no posemb on dropped slots, as in the official code)
            ; whole r replaced by the null condition for unconditional rows (CFG: ``null_cond``
            learned / zeros / a single learned token)
      FlexBlocks with adaLN-zero per sub-sequence (patches / registers) on temb(t), full attention
      v   = unpatchify(Dense_0(LN(h_P) (1 + a) + b))                   [B, S/f, S/f, C]
            (adaLN on the head when ``head_adaln``; temb(t) from t * 1000 / ``max_timestep``)
      REPA: h_P after block ``repa_layer`` -> projector MLP -> aligned to a frozen teacher's features

``sincos_2d`` above is the official FlexTok table (row half first: ``[sin r, cos r, sin c, cos c]``,
``sincos_2d(..., row_first=True)``; apple/ml-flextok ``build_2d_sincos_posemb``).

Training (``flow_loss``): ``mean (v(x_t, t) - (eps - z))^2`` with ``t ~ logit-normal(0, 1)``; the keep
length ``k`` from ``nested_dropout`` (``uniform`` / ``pow2`` / ``uniform_pow2``); each sample's
registers nulled with probability ``cfg_dropout``. Decoding (``decode_tokens``): any prefix
``[B, k]`` (``1 <= k <= R``) is padded with the mask token, Euler from ``eps ~ N(0, I)`` (seeded by
``key``) over a uniform grid with APG (``titok_jax.flow`` preset ``"flextok"``: w = 7.5,
momentum -0.5, norm threshold 2.5, eta 0), then the VAE decoder to pixels in ~[0, 1]. Decode cost
does not depend on ``k`` (always ``R`` register slots), as in the reference.

Activations are constrained to "batch split, features whole" (``nn.activation_sharding``) in
every ``FlexBlock`` and at the stacks' boundaries (embeddings, the patch/register concatenation,
the final norms and heads, the VAE latents), so XLA keeps the FSDP pattern at one image per device.

Param tree: ``vae/...`` (frozen; loaded by the task), ``encoder/...``, ``decoder/...``,
``repa_projector/...`` (training only). Published sizes: ``FLEXTOK_VARIANTS`` (configs/flextok.py).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.flow import GuidanceConfig, guidance_preset, match_batch, rectified_flow_loss, sample
from titok_jax.flow import start_noise, time_grid, with_scale
from titok_jax.models.flextok_blocks import (BD, NESTED_MODES, RepaProjector, decoder_layer,
                                             encoder_layer, encoder_mask, is_power_of_two,
                                             keep_lengths, keep_mask, patch_embed_with_posemb)
from titok_jax.models.kl_vae import KLVAE
from titok_jax.nn import (AdaLNModulation, TimestepEmbedder, boxed, constrain, layer_stack,
                          make_norm, resolve_remat, unpatchify)
from titok_jax.nn.activation_sharding import BTD
from titok_jax.nn.attention import heads_of, module_path
from titok_jax.quantizers import FSQ, QuantizerOutput

Dtype = Any
token_init = nn.initializers.truncated_normal(0.02)
NULL_CONDS = ("learned", "zeros", "single_token")
BHWC = ("batch", None, None, None)   # a latent grid [B, h, w, C]: the batch split, the rest free


def flextok_guidance(scale: Any) -> GuidanceConfig:
    """FlexTok's APG preset with ``scale`` (a Python number, or a traced scalar: ``flow.with_scale``)."""
    return with_scale(guidance_preset("flextok"), scale)


def _ln(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Module:
    return make_norm("layernorm", epsilon=1e-5, use_scale=False, use_bias=False, dtype=dtype,
                     param_dtype=param_dtype, name=name)


class FlexTokEncoder(nn.Module):
    """Scaled VAE latents ``[B, h, w, C]`` -> pre-quantisation register values ``[B, R, d]`` f32."""

    width: int
    depth: int
    head_dim: int
    num_registers: int
    patch_size: int
    token_dim: int
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = patch_embed_with_posemb(latents, self.patch_size, self.width, "patch_embed", **kw)
        b, p, w = x.shape
        regs = self.param("registers", boxed(token_init, ("tokens", "embed")),
                          (self.num_registers, w), self.param_dtype)
        x = constrain(jnp.concatenate(
            [x, jnp.broadcast_to(regs.astype(x.dtype)[None], (b,) + regs.shape)], 1), BTD)
        mask = encoder_mask(p, self.num_registers)
        layer = functools.partial(encoder_layer, num_heads=heads_of(w, self.head_dim, module_path(self)),
                                  head_dim=self.head_dim, **kw)
        x = layer_stack(layer, x, mask, depth=self.depth, scan=self.scan_layers,
                        remat_policy=resolve_remat(self.remat, self.remat_policy))
        r = constrain(_ln("norm_out", **kw)(x[:, p:]), BTD)
        r = nn.Dense(self.token_dim, kernel_init=boxed(nn.initializers.xavier_uniform(), ("embed", None)),
                     bias_init=boxed(nn.initializers.zeros_init(), (None,)), name="to_codes", **kw)(r)
        return constrain(r.astype(jnp.float32), BTD)


class FlexTokDecoder(nn.Module):
    """Velocity ``v(x_t, t | registers)``: ``(x_t [B,h,w,C], t [B], codes [B,R,d], keep bool [B,R],
    cond bool [B])`` -> ``(v [B,h,w,C] f32, patch features after block repa_layer [B,P,W] or None)``."""

    width: int
    depth: int
    head_dim: int
    num_registers: int
    patch_size: int
    latent_channels: int
    repa_layer: int = -1
    null_cond: str = "learned"
    max_timestep: float = 1.0
    head_adaln: bool = True
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array, codes: jax.Array, keep: jax.Array,
                 cond: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w_lat, c = x_t.shape
        d, p = self.width, self.patch_size
        x = patch_embed_with_posemb(constrain(x_t, BHWC), p, d, "patch_embed", **kw)
        num_patches = x.shape[1]
        r = nn.Dense(d, kernel_init=boxed(nn.initializers.xavier_uniform(), (None, "embed")),
                     bias_init=boxed(nn.initializers.zeros_init(), ("embed",)), name="from_codes",
                     **kw)(constrain(codes.astype(self.dtype or jnp.float32), BTD))
        mask_token = self.param("mask_token", boxed(token_init, ("embed",)), (d,), self.param_dtype)
        pos = self.param("register_posemb", boxed(token_init, ("tokens", "embed")),
                         (self.num_registers, d), self.param_dtype)
        # official order (apple/ml-flextok decoder config; MaskedNestedDropout runs after the
        # register posemb is summed): posemb first, then dropped slots become the bare mask token
        r = r + pos.astype(r.dtype)[None]
        r = jnp.where(keep[..., None], r, mask_token.astype(r.dtype))
        # the null condition (CFG): every register slot (dropped ones included) becomes zeros or
        # the learned null vector; "single_token": the register sequence is ONE learned token,
        # realised as slot 0 with slots 1.. hidden from every query (same maths, static shapes)
        if self.null_cond == "zeros":
            null = jnp.zeros((d,), r.dtype)
        else:
            null = self.param("null_token", boxed(token_init, ("embed",)), (d,), self.param_dtype)
        r = constrain(jnp.where(cond[:, None, None], r, null.astype(r.dtype)), BTD)
        mask = None
        if self.null_cond == "single_token":
            visible = jnp.concatenate([jnp.ones((b, num_patches + 1), bool),
                                       jnp.broadcast_to(cond[:, None], (b, self.num_registers - 1))], 1)
            mask = visible[:, None, None, :]
        # time embedding: t in [0, 1] at frequencies scaled by 1000 / max_timestep (official)
        temb = TimestepEmbedder(d, frequency_dim=256, max_period=256.0,
                                time_scale=1000.0 / float(self.max_timestep), name="time_embed",
                                **kw)(t)
        temb = constrain(temb, BD)
        x = constrain(jnp.concatenate([x.astype(r.dtype), r], axis=1), BTD)
        layer = functools.partial(decoder_layer, num_heads=heads_of(d, self.head_dim, module_path(self)),
                                  head_dim=self.head_dim, split=num_patches,
                                  repa_layer=self.repa_layer, **kw)
        # scanned: the REPA features are carried through the scan (zeros until block repa_layer)
        feats = (constrain(jnp.zeros_like(x[:, :num_patches]), BTD)
                 if self.scan_layers and self.repa_layer >= 0 else None)
        x, feats = layer_stack(layer, (x, feats), temb, mask, depth=self.depth, scan=self.scan_layers,
                               remat_policy=resolve_remat(self.remat, self.remat_policy))
        y = constrain(_ln("norm_out", **kw)(x[:, :num_patches]), BTD)
        if self.head_adaln:
            shift, scale = (constrain(m, BD) for m in AdaLNModulation(2, d, name="head_adaln", **kw)(temb))
            y = constrain(y * (1 + scale[:, None]) + shift[:, None], BTD)
        y = nn.Dense(p * p * c, kernel_init=boxed(nn.initializers.zeros_init(), ("embed", None)),
                     bias_init=boxed(nn.initializers.zeros_init(), (None,)), name="head", **kw)(y)
        v = unpatchify(constrain(y, BTD), p, h, w_lat, c, channel_order="hwc")
        if feats is not None:
            feats = constrain(feats, BTD)
        return constrain(v.astype(jnp.float32), BHWC), feats


class FlexTok(nn.Module):
    """FlexTok (module docstring). A flow-decoder tokenizer for ``titok_jax.api``.

    ``encode(images)`` -> ``(codes [B,R,6], QuantizerOutput)`` (ids ``out.indices [B, R]``);
    ``decode_tokens(ids [B, k], key=, steps=, guidance_scale=)`` -> pixels; ``flow_loss(images,
    key)`` -> ``(loss, aux)`` for training; ``__call__(images)`` -> ``(one-step reconstruction,
    out)``: one Euler step from ``x_1 = 0`` (cheap; builds every param, used by ``init``).

    Attributes:
      image_size: square input side (a multiple of ``8 * patch_size``).
      vae_latent_channels / vae_base_channels / vae_channel_mult / vae_num_res_blocks: the KL-VAE.
      vae_scaling_factor: latent scale; vae_sample_posterior: sample the posterior in training.
      patch_size: patch side on the latent grid (2).
      encoder_width / encoder_depth / decoder_width / decoder_depth / head_dim: the transformers.
      num_registers: R, the maximum number of tokens; fsq_levels: the FSQ levels.
      nested_dropout: ``uniform`` | ``pow2`` | ``uniform_pow2`` | ``none``.
      cfg_dropout: probability of nulling a sample's registers in training.
      null_cond: the CFG null condition (``NULL_CONDS``): ``learned`` (every register slot becomes
        one learned vector), ``zeros`` (all slots zero) or ``single_token`` (the register sequence
        becomes one learned token) - the released config's ``LearnedNullCond`` / ``ZeroNullCond`` /
        ``replace_with_single_token``.
      max_timestep: the time embedding reads ``t`` in [0, 1] at frequencies scaled by
        ``1000 / max_timestep`` (the official ``TimestepEmbedder``; 1.0 -> x1000, 1000.0 -> x1).
      head_adaln: whether the decoder's patch head is adaLN-modulated by the time embedding.
      repa_layer: decoder block whose patch features REPA aligns; repa_dim: teacher feature width
        (0 = no REPA projector); repa_hidden_dim: projector width.
      remat: rematerialise each block; remat_policy: what the backward keeps (none | full | dots |
        dots_saveable; "" = full when ``remat``; ``titok_jax.nn.scan``).
      scan_layers: each transformer as one ``nn.scan`` over its blocks (params
        ``{encoder,decoder}/layers/block/... [depth, ...]`` instead of ``block_{i}``).
      dtype / param_dtype: compute / parameter dtype.
    """

    image_size: int = 256
    vae_latent_channels: int = 16
    vae_base_channels: int = 128
    vae_channel_mult: Sequence[int] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    vae_scaling_factor: float = 1.0
    vae_sample_posterior: bool = False
    patch_size: int = 2
    encoder_width: int = 768
    encoder_depth: int = 12
    decoder_width: int = 768
    decoder_depth: int = 12
    head_dim: int = 64
    num_registers: int = 256
    fsq_levels: Sequence[int] = (8, 8, 8, 5, 5, 5)
    nested_dropout: str = "uniform"
    cfg_dropout: float = 0.1
    null_cond: str = "learned"
    max_timestep: float = 1.0
    head_adaln: bool = True
    repa_layer: int = 1
    repa_dim: int = 1024
    repa_hidden_dim: int = 2048
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    flow_decoder = True
    variable_length = True
    quantizer_name = "fsq"
    default_steps = 25          # the pipeline's default (the README decodes with 20)
    default_guidance = 7.5      # README, with APG

    # ---- static facts ---------------------------------------------------------------------------
    @property
    def num_latent_tokens(self) -> int:
        return self.num_registers

    @property
    def codebook_size(self) -> int:
        return math.prod(int(v) for v in self.fsq_levels)

    @property
    def token_size(self) -> int:
        return len(self.fsq_levels)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channel_mult) - 1)

    def setup(self) -> None:
        f = 2 ** (len(self.vae_channel_mult) - 1)
        if self.image_size % (f * self.patch_size):
            raise ValueError(f"FlexTok: image_size {self.image_size} is not a multiple of VAE factor "
                             f"{f} x patch_size {self.patch_size}")
        for name in ("encoder_width", "decoder_width"):
            if getattr(self, name) % self.head_dim:
                raise ValueError(f"FlexTok: {name} {getattr(self, name)} is not a multiple of "
                                 f"head_dim {self.head_dim}")
        if self.nested_dropout not in NESTED_MODES:
            raise ValueError(f"FlexTok: unknown nested_dropout {self.nested_dropout!r}; known: "
                             f"{', '.join(NESTED_MODES)}")
        if self.nested_dropout in ("pow2", "uniform_pow2") and not is_power_of_two(self.num_registers):
            raise ValueError(f"FlexTok: nested_dropout {self.nested_dropout!r} needs a power-of-two "
                             f"num_registers, got {self.num_registers}")
        if self.null_cond not in NULL_CONDS:
            raise ValueError(f"FlexTok: unknown null_cond {self.null_cond!r}; known: "
                             f"{', '.join(NULL_CONDS)}")
        if not float(self.max_timestep) > 0:
            raise ValueError(f"FlexTok: max_timestep must be > 0, got {self.max_timestep}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"FlexTok: cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.repa_dim and not 0 <= self.repa_layer < self.decoder_depth:
            raise ValueError(f"FlexTok: repa_layer {self.repa_layer} is not a decoder block index "
                             f"(decoder_depth {self.decoder_depth})")
        common = dict(head_dim=self.head_dim, num_registers=self.num_registers,
                      patch_size=self.patch_size, remat=self.remat, remat_policy=self.remat_policy,
                      scan_layers=self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype)
        self.vae = KLVAE(image_size=self.image_size, latent_channels=self.vae_latent_channels,
                         base_channels=self.vae_base_channels,
                         channel_mult=tuple(self.vae_channel_mult),
                         num_res_blocks=self.vae_num_res_blocks,
                         scaling_factor=self.vae_scaling_factor, dtype=self.dtype,
                         param_dtype=self.param_dtype)
        self.encoder = FlexTokEncoder(width=self.encoder_width, depth=self.encoder_depth,
                                      token_dim=len(self.fsq_levels), **common)
        self.quantize = FSQ(tuple(int(v) for v in self.fsq_levels))
        self.decoder = FlexTokDecoder(width=self.decoder_width, depth=self.decoder_depth,
                                      latent_channels=self.vae_latent_channels,
                                      repa_layer=self.repa_layer if self.repa_dim else -1,
                                      null_cond=self.null_cond,
                                      max_timestep=float(self.max_timestep),
                                      head_adaln=bool(self.head_adaln), **common)
        if self.repa_dim:
            self.repa_projector = RepaProjector(self.repa_hidden_dim, self.repa_dim,
                                                dtype=self.dtype, param_dtype=self.param_dtype)

    # ---- encoding -------------------------------------------------------------------------------
    def vae_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Frozen VAE: images in [0, 1] -> scaled latents ``[B, h, w, C]`` (the posterior mean, or a
        sample when ``key`` is given and ``vae_sample_posterior``), gradient stopped."""
        key = key if self.vae_sample_posterior else None
        return constrain(jax.lax.stop_gradient(self.vae.encode_latents(images, key)), BHWC)

    def encode_latents(self, latents: jax.Array, train: bool = False
                       ) -> tuple[jax.Array, QuantizerOutput]:
        return self.quantize(self.encoder(latents), train=train)

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``images [B,S,S,3]`` in [0,1] -> ``(codes [B,R,6] f32, out)``; ``out.indices`` int32
        ``[B, R]``, ordered coarse to fine."""
        return self.encode_latents(self.vae_latents(images), train=train)

    # ---- decoding -------------------------------------------------------------------------------
    def prefix_codes(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids ``[B, k]`` -> ``(codes [B, R, 6] with zeros past k, keep [B, R] = slot < k)``."""
        r = self.num_registers
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= r:
            raise ValueError(f"FlexTok decodes token ids [B, k] with 1 <= k <= {r}, got shape "
                             f"{tokens.shape}")
        b, k = tokens.shape
        ids = jnp.concatenate([tokens.astype(jnp.int32), jnp.zeros((b, r - k), jnp.int32)], 1)
        codes = self.quantize.indices_to_codes(ids, dtype=jnp.float32)
        return codes, keep_mask(jnp.full((b,), k, jnp.int32), r)

    def noise_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The sampler's initial noise: the VAE-latent grid ``(B, h, w, C)`` (t = 1 is noise)."""
        return (int(batch), self.latent_size, self.latent_size, self.vae_latent_channels)

    def decode_latents(self, tokens: jax.Array, *, key: jax.Array | None = None,
                       noise: jax.Array | None = None, steps: int = 25,
                       guidance_scale: Any = 7.5) -> jax.Array:
        """Prefix ids ``[B, k]`` -> sampled scaled VAE latents ``[B, h, w, C]`` (Euler, APG) from
        ``noise`` (``noise_shape(B)``; default ``N(0, I)`` drawn from ``key``)."""
        codes, keep = self.prefix_codes(tokens)
        noise = start_noise(self.noise_shape(tokens.shape[0]), key, noise, "the VAE-latent grid")

        def velocity(x, t, cond):
            n = x.shape[0]
            return self.decoder(x, t, match_batch(codes, n), match_batch(keep, n), cond)[0]

        return sample(velocity, noise, time_grid(int(steps)), "euler", flextok_guidance(guidance_scale))

    def decode_tokens(self, tokens: jax.Array, *, key: jax.Array | None = None,
                      noise: jax.Array | None = None, steps: int = 25,
                      guidance_scale: Any = 7.5) -> jax.Array:
        """Prefix ids ``[B, k]`` (any ``1 <= k <= R``) -> pixels ``[B, S, S, 3]`` f32 in ~[0, 1]."""
        return self.vae.decode_latents(self.decode_latents(tokens, key=key, noise=noise, steps=steps,
                                                           guidance_scale=guidance_scale))

    # ---- training -------------------------------------------------------------------------------
    def flow_loss(self, images: jax.Array, key: jax.Array, *, time_sampler: str = "logit_normal",
                  time_params: dict | None = None) -> tuple[jax.Array, dict]:
        """The rectified-flow loss of one batch (train mode; apply with ``mutable=
        ["quantizer_stats"]``). Returns ``(loss, aux)`` with ``aux``: ``quantizer``
        (QuantizerOutput), ``keep_k [B]``, ``cond [B]`` (False = registers nulled), ``t [B]`` and
        ``repa`` (projected patch features ``[B, P, repa_dim]``, or None)."""
        b, r = images.shape[0], self.num_registers
        k_vae, k_flow, k_nest, k_cfg = jax.random.split(key, 4)
        latents = self.vae_latents(images, k_vae)
        codes, qout = self.encode_latents(latents, train=True)
        keep_k = keep_lengths(k_nest, b, r, self.nested_dropout)
        keep = keep_mask(keep_k, r)
        cond = jax.random.uniform(k_cfg, (b,)) >= self.cfg_dropout
        feats = {}

        def velocity(x_t, t):
            v, feats["repa"] = self.decoder(x_t, t, codes, keep, cond)
            return v

        loss, faux = rectified_flow_loss(velocity, latents, k_flow, time_sampler=time_sampler,
                                         time_params=time_params)
        repa = self.repa_projector(feats["repa"]) if self.repa_dim else None
        return loss, {"quantizer": qout, "keep_k": keep_k, "cond": cond, "t": faux.t, "repa": repa}

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        latents = self.vae_latents(images)
        codes, qout = self.encode_latents(latents, train=train)
        b, r = images.shape[0], self.num_registers
        x1 = jnp.zeros_like(latents)
        v, feats = self.decoder(x1, jnp.ones((b,), jnp.float32), codes,
                                jnp.ones((b, r), bool), jnp.ones((b,), bool))
        if self.repa_dim:
            self.repa_projector(feats)
        return self.vae.decode_latents(x1 - v), qout


# name -> FlexTok kwargs: the released tokenizers (HF EPFL-VILAB/flextok_*; widths 64 * depth,
# head dim 64, 16-channel VAE) and a CPU-sized model. Reference sizes (flextok_flowmo.md A2):
# encoder ~85M / 287M, decoder ~170M / 573M / 2.16B, VAE ~84M.
FLEXTOK_VARIANTS: dict[str, dict[str, Any]] = {
    "d12_d12": dict(encoder_width=768, encoder_depth=12, decoder_width=768, decoder_depth=12),
    "d18_d18": dict(encoder_width=1152, encoder_depth=18, decoder_width=1152, decoder_depth=18),
    "d18_d28": dict(encoder_width=1152, encoder_depth=18, decoder_width=1792, decoder_depth=28),
    # 64 px, a 4-channel f8 VAE of width 32, 4x4 patches of the 8x8 latent, 16 registers.
    "tiny": dict(image_size=64, vae_latent_channels=4, vae_base_channels=32,
                 vae_channel_mult=(1, 1, 2, 2), vae_num_res_blocks=1, encoder_width=64,
                 encoder_depth=2, decoder_width=64, decoder_depth=2, head_dim=32, num_registers=16,
                 repa_layer=0, repa_dim=64, repa_hidden_dim=128),
}
