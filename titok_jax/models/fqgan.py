"""FQGAN (showlab/FQGAN, "Factorized Visual Tokenization and Generation", arXiv 2411.16681): the
LlamaGen VQGAN CNN with k factor branches, one l2-normalised codebook per factor, NHWC.

Images ``[B, S, S, 3]`` in **[0, 1]** are mapped to ``x = 2 img - 1`` (FQGAN's data are in
[-1, 1]); reconstructions are ``(y + 1) / 2`` (unclamped float32). With ``c_i = ch * ch_mult[i]``,
``L`` levels (f = 2**(L-1): 16 for VQ-16, 8 for VQ-8), ``n = num_res_blocks``, ``C = c_{L-1}``::

    Encoder:  conv_in 3x3: 3 -> ch
              conv_blocks_i (i = 0..L-1): res_j = ResnetBlock(-> c_i), j < n, each followed by
                          attn_j = AttnBlock at the last level only; then (i < L-1) downsample =
                          pad right/bottom by 1, conv 3x3 stride 2
              mid_0 ResnetBlock, mid_1 AttnBlock, mid_2 ResnetBlock (C)
              per factor f: adapter_f (below) -> norm_out_f -> swish -> conv_out_f 3x3 -> z_channels
    quant_conv_f 1x1: z_channels -> embed_dim;  quantize: ``fq`` with ``split_input`` (factor f
              quantizes its own embed_dim channels with an l2-normalised VQ; the codes are the
              normalised codebook rows), codes concatenated in factor order
    Decoder:  post_quant_conv 1x1: k embed_dim -> z_channels; conv_in 3x3 -> C; mid as above;
              conv_blocks_l for l = 0..L-1 = levels L-1..0 (conv_blocks_0 the LOWEST resolution):
              res_j (n + 1 of them, -> c_{L-1-l}), attn_j at l = 0 only; upsample (nearest x2 +
              conv 3x3) unless l = L-1;  norm_out -> swish -> conv_out 3x3 -> 3
    Adapter:  tokens [B, h w, C] + positional_embedding [h w, C] -> ln_pre -> adapter_layers
              pre-LN blocks (adapter_heads heads, MLP 4C, exact GELU) -> ln_post -> grid
    Head (FeatPredHead, factors with head width W > 0): codes [B, h w, e] -> upscale_0 (Linear e
              -> W), ReLU, upscale_2 (Linear W -> W); [class_embedding; tokens] + positional
              [1 + h w, W] -> ln_pre -> head_layers blocks (head_heads heads, MLP 4W) -> ln_post;
              the prediction is position 0 ``[B, W]``
    Block:    x = x + out_proj(MHA(in_proj(ln_1(x))));  x = x + c_proj(gelu(c_fc(ln_2(x))))

GroupNorm ``norm_groups`` (32 in the releases) with eps 1e-6; LayerNorm eps 1e-5 (torch default).
Factor names (and the concatenation order): Dual ``("vis", "sem")``, Triple ``("vis", "sem_mid",
"sem_high")``. Losses (already weighted, ``out.losses``): the quantizer's (codebook 1.0,
commitment 0.25, entropy 0.03 in the releases), ``disentanglement`` = lambda * mean over factor
pairs of mean_tokens (c_i^ . c_j^)^2 (0.1), and, when ``representation_targets`` (per factor, a
teacher's CLS feature ``[B, W]`` or None) are given, ``representation`` = w * sum over heads of
InfoNCE(pred, target) (temperature 1, the batch as negatives; FQGAN's 0.5 per head, summed).

Param names follow the PyTorch ``state_dict`` (``encoder.conv_blocks.1.res.0.conv1.weight`` ->
``encoder/conv_blocks_1_res_0/conv1/kernel``, ``encoder.visual_head.0.transformer.2.attn.
in_proj_weight`` -> ``encoder/visual_head/transformer_2/in_proj/kernel``, ``quantize_vis.
embedding.weight`` -> ``quantize/quantizers_0/codebook``, ``quant_conv_vis`` -> ``quant_convs_0``,
``feat_pred_head`` -> ``heads_1``;
``convert.fqgan``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.grid_tokenizer import GridTokenizer
from titok_jax.nn import boxed, check_images, constrain
from titok_jax.nn.conv import CompVisResnet, group_norm, ones, torch_conv, upsample_nearest, zeros
from titok_jax.quantizers import QuantizerOutput, build_quantizer, freeze_spec
from titok_jax.quantizers.factorized import info_nce

Dtype = Any
FMAP = ("batch", None, None, "act_embed")
TOKENS = ("batch", "tokens", "act_embed")
DUAL = ("vis", "sem")
TRIPLE = ("vis", "sem_mid", "sem_high")
# the official module names of each factor's encoder branch and representation head
ADAPTER_NAMES = {"vis": "visual_head", "sem": "semantic_head", "sem_mid": "semantic_head_mid",
                 "sem_high": "semantic_head_high"}
HEAD_NAMES = {"sem": "feat_pred_head", "sem_mid": "mid_sem_feat_pred",
              "sem_high": "high_sem_feat_pred"}


def fqgan_quantizer(factors: int, codebook_size: int = 16384, entropy_weight: float = 0.0,
                    disentanglement_weight: float = 0.1) -> dict:
    """FQGAN's factorized quantizer sub-config: ``factors`` l2-normalised VQs (codebook 1.0,
    commitment 0.25, entropy on ``-d / 0.01``), each on its own channel slice."""
    vq = {"name": "vq", "l2_normalize": True, "commitment_weight": 0.25, "codebook_weight": 1.0,
          "entropy_weight": float(entropy_weight), "entropy_temperature": 0.01}
    return {"name": "fq", "factors": int(factors), "codebook_size": int(codebook_size),
            "quantizer": vq, "split_input": True,
            "disentanglement_weight": float(disentanglement_weight)}


def _layer_norm(name: str, kw: dict) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, scale_init=boxed(ones, ("norm",)),
                        bias_init=boxed(zeros, ("norm",)), name=name, **kw)


def _linear(features: int, name: str, axes: tuple, kw: dict) -> nn.Dense:
    return nn.Dense(features, kernel_init=boxed(nn.initializers.lecun_normal(), axes),
                    bias_init=boxed(zeros, (axes[1],)), name=name, **kw)


class ResidualAttentionBlock(nn.Module):
    """The official pre-LN block (torch ``nn.MultiheadAttention`` with packed ``in_proj``)."""

    heads: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, w = x.shape
        d = w // self.heads
        qkv = _linear(3 * w, "in_proj", ("embed", "mlp"), kw)(_layer_norm("ln_1", kw)(x))
        q, k, v = (t.reshape(b, n, self.heads, d) for t in jnp.split(qkv, 3, axis=-1))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * d ** -0.5
        y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1).astype(v.dtype), v)
        x = x + _linear(w, "out_proj", ("mlp", "embed"), kw)(y.reshape(b, n, w))
        h = _linear(4 * w, "mlp_c_fc", ("embed", "mlp"), kw)(_layer_norm("ln_2", kw)(x))
        h = _linear(w, "mlp_c_proj", ("mlp", "embed"), kw)(nn.gelu(h, approximate=False))
        return constrain(x + h, TOKENS)


def _pos_init(width: int):
    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return width ** -0.5 * jax.random.normal(key, shape, dtype)
    return init


class FactorizedAdapter(nn.Module):
    """``[B, h, w, C]`` -> the same shape (module docstring, "Adapter")."""

    layers: int
    heads: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        pos = self.param("positional_embedding", boxed(_pos_init(c), ("tokens", "embed")),
                         (h * w, c), self.param_dtype)
        t = x.reshape(b, h * w, c) + pos.astype(x.dtype)
        t = _layer_norm("ln_pre", kw)(t)
        for i in range(self.layers):
            t = ResidualAttentionBlock(self.heads, name=f"transformer_{i}", **kw)(t)
        return _layer_norm("ln_post", kw)(t).reshape(b, h, w, c)


class FeatPredHead(nn.Module):
    """Codes ``[B, N, e]`` -> the predicted teacher feature ``[B, width]`` (module docstring)."""

    width: int
    layers: int = 3
    heads: int = 8
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, _ = codes.shape
        w = self.width
        t = _linear(w, "upscale_0", ("embed", "mlp"), kw)(codes.astype(self.dtype or codes.dtype))
        t = _linear(w, "upscale_2", ("mlp", "embed"), kw)(nn.relu(t))
        cls = self.param("class_embedding", boxed(_pos_init(w), (None, "embed")), (1, w),
                         self.param_dtype)
        pos = self.param("positional_embedding", boxed(_pos_init(w), ("tokens", "embed")),
                         (n + 1, w), self.param_dtype)
        t = jnp.concatenate([jnp.broadcast_to(cls.astype(t.dtype)[None], (b, 1, w)), t], axis=1)
        t = _layer_norm("ln_pre", kw)(t + pos.astype(t.dtype))
        for i in range(self.layers):
            t = ResidualAttentionBlock(self.heads, name=f"transformer_{i}", **kw)(t)
        return _layer_norm("ln_post", kw)(t)[:, 0].astype(jnp.float32)


class AttnBlock(nn.Module):
    """LlamaGen/taming AttnBlock: single head over the H*W positions, 1x1-conv q, k, v, proj_out."""

    groups: int = 32
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = group_norm("norm", groups=self.groups, **kw)(x)
        q, k, v = (torch_conv(c, 1, n, **kw)(t).reshape(b, h * w, c) for n in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
        y = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, -1).astype(v.dtype), v)
        return constrain(x + torch_conv(c, 1, "proj_out", **kw)(y.reshape(b, h, w, c)), FMAP)


class _Trunk(nn.Module):
    """Shared fields of the encoder and decoder."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    groups: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    def res(self, c: int, name: str) -> nn.Module:
        return CompVisResnet(c, shortcut_name="nin_shortcut", fmap=FMAP, groups=self.groups,
                             name=name, dtype=self.dtype, param_dtype=self.param_dtype)

    def attn(self, name: str) -> nn.Module:
        return AttnBlock(self.groups, name=name, dtype=self.dtype, param_dtype=self.param_dtype)

    def mid(self, x: jax.Array) -> jax.Array:
        x = self.res(x.shape[-1], "mid_0")(x)
        return self.res(x.shape[-1], "mid_2")(self.attn("mid_1")(x))


class FQGANEncoder(_Trunk):
    """``x [B, S, S, 3]`` in [-1, 1] -> one ``[B, S/f, S/f, z_channels]`` map per factor."""

    factors: Sequence[str] = DUAL
    z_channels: int = 256
    adapter_layers: int = 6
    adapter_heads: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.ch_mult)
        x = torch_conv(self.ch, 3, "conv_in", **kw)(constrain(x.astype(self.dtype or x.dtype), FMAP))
        for i, m in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                x = self.res(self.ch * int(m), f"conv_blocks_{i}_res_{j}")(x)
                if i == levels - 1:
                    x = self.attn(f"conv_blocks_{i}_attn_{j}")(x)
            if i != levels - 1:
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = torch_conv(x.shape[-1], 3, f"conv_blocks_{i}_downsample", stride=2,
                               padding="VALID", **kw)(x)
        x = self.mid(x)
        outs = []
        for f in self.factors:
            h = FactorizedAdapter(self.adapter_layers, self.adapter_heads, name=ADAPTER_NAMES[f],
                                  **kw)(x)
            h = nn.silu(group_norm(f"norm_out_{f}", groups=self.groups, **kw)(h))
            outs.append(torch_conv(self.z_channels, 3, f"conv_out_{f}", **kw)(h))
        return outs


class FQGANDecoder(_Trunk):
    """``z [B, h, w, z_channels]`` -> ``y [B, h f, w f, 3]`` in ~[-1, 1], float32."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.ch_mult)
        x = torch_conv(self.ch * int(self.ch_mult[-1]), 3, "conv_in", **kw)(
            constrain(z.astype(self.dtype or z.dtype), FMAP))
        x = self.mid(x)
        for l, i in enumerate(reversed(range(levels))):
            for j in range(self.num_res_blocks + 1):
                x = self.res(self.ch * int(self.ch_mult[i]), f"conv_blocks_{l}_res_{j}")(x)
                if l == 0:
                    x = self.attn(f"conv_blocks_{l}_attn_{j}")(x)
            if l != levels - 1:
                x = torch_conv(x.shape[-1], 3, f"conv_blocks_{l}_upsample", **kw)(
                    upsample_nearest(x))
        x = nn.silu(group_norm("norm_out", groups=self.groups, **kw)(x))
        return torch_conv(3, 3, "conv_out", **kw)(x).astype(jnp.float32)


class FQGAN(GridTokenizer):
    """FQGAN tokenizer with the tokenizer interface (``models.grid_tokenizer``): ``k = len(factors)``
    ids per token, ``out.indices`` int32 ``[B, N, k]`` (factor order), codes ``[B, N, k
    embed_dim]`` (the concatenated normalised code rows).

    ``__call__(images, train, representation_targets=None)`` -> ``(reconstruction, out)``; the
    heads' predictions are ``out.aux["representation_i"]`` (factor i) and, with targets, the
    weighted InfoNCE sum is ``out.losses["representation"]``.

    Attributes (defaults = FQGAN-Dual VQ-16, ``tokenizer/vq_model_dual.py``):
      image_size: S; the adapters' and heads' position tables are ``(S/f)**2`` long.
      ch, ch_mult, num_res_blocks, z_channels, embed_dim: the LlamaGen trunk; the code dim per factor.
      norm_groups: GroupNorm groups (32; tiny test models use fewer).
      factors: factor names (``DUAL`` / ``TRIPLE``), the concatenation order.
      adapter_layers, adapter_heads: each branch's transformer (width ``ch * ch_mult[-1]``).
      head_widths: per factor, the representation head's width (its teacher's feature dim), 0 = none.
      head_layers, head_heads, representation_weight: the FeatPredHeads and the InfoNCE weight.
      quantizer: ``fqgan_quantizer(k)`` (``fq``, ``split_input``); dtype / param_dtype.
    """

    image_size: int = 256
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    embed_dim: int = 8
    norm_groups: int = 32
    factors: Sequence[str] = DUAL
    adapter_layers: int = 6
    adapter_heads: int = 8
    head_widths: Sequence[int] = (0, 1024)
    head_layers: int = 3
    head_heads: int = 8
    representation_weight: float = 0.5
    quantizer: Any = freeze_spec(fqgan_quantizer(2))
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    NAME = "FQGAN"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_size(self) -> int:
        return len(self.factors) * self.embed_dim

    def setup(self) -> None:
        k = len(self.factors)
        if any(f not in ADAPTER_NAMES for f in self.factors) or len(set(self.factors)) != k:
            raise ValueError(f"{self.NAME}: factors must be distinct names of "
                             f"{sorted(ADAPTER_NAMES)}, got {list(self.factors)}")
        if len(self.head_widths) != k:
            raise ValueError(f"{self.NAME}: head_widths needs one width (0 = none) per factor")
        if self.num_codebooks != k:
            raise ValueError(f"{self.NAME}: the quantizer emits {self.num_codebooks} ids per token "
                             f"but there are {k} factors (use fqgan_quantizer({k}))")
        for c in [self.ch] + [self.ch * int(m) for m in self.ch_mult]:
            if c % self.norm_groups:
                raise ValueError(f"{self.NAME}: width {c} is not a multiple of norm_groups "
                                 f"{self.norm_groups}")
        if (self.ch * int(self.ch_mult[-1])) % self.adapter_heads:
            raise ValueError(f"{self.NAME}: adapter width {self.ch * int(self.ch_mult[-1])} is "
                             f"not a multiple of adapter_heads {self.adapter_heads}")
        self.check_grid()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        trunk = dict(ch=self.ch, ch_mult=tuple(int(m) for m in self.ch_mult),
                     num_res_blocks=self.num_res_blocks, groups=self.norm_groups, **kw)
        self.encoder = FQGANEncoder(factors=tuple(self.factors), z_channels=self.z_channels,
                                    adapter_layers=self.adapter_layers,
                                    adapter_heads=self.adapter_heads, **trunk)
        self.quant_convs = [torch_conv(self.embed_dim, 1, None, **kw) for _ in self.factors]
        self.quantize = build_quantizer(self.quantizer, self.token_size, dtype=jnp.float32,
                                        param_dtype=self.param_dtype)
        self.post_quant_conv = torch_conv(self.z_channels, 1, None, **kw)
        self.decoder = FQGANDecoder(**trunk)
        self.heads = [FeatPredHead(int(w), self.head_layers, self.head_heads, **kw) if w else None
                      for w in self.head_widths]

    def pre_quant(self, images: jax.Array) -> jax.Array:
        """``images`` in [0, 1] -> the factors' ``quant_conv`` outputs concatenated, float32
        ``[B, S/f, S/f, k embed_dim]`` (what the factor codebooks quantize, unnormalised)."""
        check_images(images, self.image_size, self.NAME)
        x = 2.0 * images.astype(jnp.float32) - 1.0
        hs = [conv(h) for conv, h in zip(self.quant_convs, self.encoder(x))]
        return constrain(jnp.concatenate(hs, axis=-1).astype(jnp.float32), FMAP)

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``images`` -> ``(codes [B, N, k embed_dim] f32, QuantizerOutput)``, indices ``[B, N, k]``."""
        h = self.pre_quant(images)
        b, gh, gw, c = h.shape
        return self.quantize(h.reshape(b, gh * gw, c), train=train)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes ``[B, N, k embed_dim]`` -> pixels ``[B, S, S, 3]`` f32 in ~[0, 1]."""
        c = self.token_size
        if codes.ndim != 3 or codes.shape[-1] != c:
            raise ValueError(f"decode expects codes [B, N, {c}], got {codes.shape}")
        g = math.isqrt(codes.shape[1])
        if g * g != codes.shape[1]:
            raise ValueError(f"decode expects a square number of tokens, got {codes.shape[1]}")
        quant = codes.reshape(codes.shape[0], g, g, c)
        y = self.decoder(self.post_quant_conv(quant.astype(self.dtype or quant.dtype)))
        return (y + 1.0) / 2.0

    def representations(self, out: QuantizerOutput) -> dict[int, jax.Array]:
        """The heads' predictions ``{factor i: [B, W_i]}`` from ``out.aux["codes_i"]``."""
        return {i: head(out.aux[f"codes_{i}"]) for i, head in enumerate(self.heads)
                if head is not None}

    def __call__(self, images: jax.Array, train: bool = False,
                 representation_targets: Sequence[jax.Array | None] | None = None
                 ) -> tuple[jax.Array, QuantizerOutput]:
        codes, out = self.encode(images, train=train)
        preds = self.representations(out)
        aux = {**out.aux, **{f"representation_{i}": p for i, p in preds.items()}}
        losses = dict(out.losses)
        if representation_targets is not None and self.representation_weight:
            terms = [info_nce(p, representation_targets[i]) for i, p in preds.items()
                     if representation_targets[i] is not None]
            if terms:
                losses["representation"] = self.representation_weight * sum(terms)
        out = out.replace(losses=losses, aux=aux)
        return self.decode(codes), out


def _published(ch_mult: Sequence[int], factors: Sequence[str], heads: Sequence[int]
               ) -> dict[str, Any]:
    return dict(image_size=256, ch=128, ch_mult=tuple(ch_mult), num_res_blocks=2, z_channels=256,
                embed_dim=8, norm_groups=32, factors=tuple(factors), adapter_layers=6,
                adapter_heads=8, head_widths=tuple(heads), head_layers=3, head_heads=8,
                representation_weight=0.5,
                quantizer=fqgan_quantizer(len(factors), 16384, entropy_weight=0.03))


# The released models (README.md:43-46): Dual / Triple at 16x (VQ-16) and 8x (VQ-8), 256 px.
# Dual's semantic head predicts CLIP ViT-L/14 (1024); Triple's DINOv2-S (384) and CLIP ViT-B/16 (768).
FQGAN_DUAL_DS16 = _published((1, 1, 2, 2, 4), DUAL, (0, 1024))
FQGAN_DUAL_DS8 = _published((1, 2, 2, 4), DUAL, (0, 1024))
FQGAN_TRIPLE_DS16 = _published((1, 1, 2, 2, 4), TRIPLE, (0, 384, 768))
FQGAN_TRIPLE_DS8 = _published((1, 2, 2, 4), TRIPLE, (0, 384, 768))
