"""TiTok: a ViT encoder reads an image into ``N`` 1D latent tokens, a VQ (or a diagonal Gaussian)
bottleneck, and a ViT decoder paints the image back from mask tokens (arXiv 2406.07550).

This is the single-stage (pixel-head) model of the 10/2024 TiTok-BL/SL/LL weights; the decoder's
two-stage logits head (``head="legacy"``) is used by ``titok_jax.models.titok_two_stage``. With ``g = image_size / patch_size``,
``W`` a width and ``C = token_size``:

Encoder (width ``We``)::

    x   = [cls, PatchEmbed(images)] + pos[g*g+1]              patches row-major, conv p/p ("chw")
    l   = latent_tokens[N, We] + latent_pos[N]                (``latent_tokens``: a top-level param)
    h   = blocks(ln_pre([x, l]))[:, 1 + g*g:]                 read-out of the N latent slots only
    z   = conv_out(ln_post(h))                                per-token Linear We -> C (2C for VAE)
          legacy: conv_out(ln_post(h).reshape(B, We, N).swapaxes(1, 2))   (PyTorch reshape quirk)

Bottleneck (``quantizer``, a sub-config built by ``quantizers.build_quantizer``):
``VectorQuantizer`` (straight-through, ``commitment`` + ``codebook`` losses, optional
l2-normalised cosine lookup, codebook ``U(+-1/K)``) or a diagonal Gaussian: ``mean, logvar =
split(z)``, ``logvar`` clipped to ``[-30, 20]``, ``z = mean + exp(logvar/2) * eps`` (rng stream
``"sample"``) in training and ``z = mean`` in eval, ``kl = kl_weight * mean_b sum_{n,c} 0.5 (mean^2
+ var - 1 - logvar)``.

Decoder (width ``Wd``)::

    m   = [cls, mask_token * g*g] + pos[g*g+1]                one learned mask token, repeated
    t   = Linear_{C -> Wd}(z) + latent_pos[:N]
    h   = ln_post(blocks(ln_pre([m, t]))[:, 1:1 + g*g])       the mask-token slots
    img = conv3x3(unpatchify(Linear_{Wd -> p*p*3}(h), "hwc")) unbounded; the caller clamps to [0, 1]
    (options, off in the official models: ``head_channels`` c > 0 makes the per-patch linear
    Wd -> p*p*c and puts ``conv_mid`` (conv3x3 c -> c, exact GELU) before ``conv_out``;
    ``lowres_head`` k > 0 adds ``resize_bilinear(unpatchify(ffn_lowres_{Wd -> k*k*3}(h)))``,
    a (g k)^2 colour image brought to full size: smooth from the first step)
    legacy head: logits = ffn_2(tanh(ffn_0(h)))  [B, g, g, 1024]  (Wd -> 2Wd -> 1024 per cell)

Blocks are open_clip ``ResidualAttentionBlock``s (pre-LN, eps 1e-5, exact GELU, MLP 4x, biases).
Every boundary between the stages above (embeddings, concatenations, ``ln_pre`` / ``ln_post``, the
read-outs) is constrained to "batch split, features whole" (``nn.activation_sharding``; ``BTD`` for
``[B, T, D]``, ``BHWC`` for images), as the blocks are: without them XLA keeps these activations
feature-sharded at one image per device and moves them with all-to-alls.
Images are NHWC float in **[0, 1]**, fed as they are: the official single-stage models apply no
mean/std normalisation, so neither does this module. Reconstructions are returned as float32.

Parameter names follow the PyTorch ``state_dict`` (``latent_tokens``, ``encoder/patch_embed``,
``encoder/class_embedding``, ``encoder/positional_embedding``, ``encoder/transformer_{i}``,
``encoder/conv_out``, ``decoder/decoder_embed``, ``decoder/mask_token``, ``decoder/ffn``,
``decoder/conv_out``, ``quantize/codebook``), so weight import is a table. With ``scan_layers`` the
blocks of each ViT are one ``nn.scan`` instead: ``encoder/layers/transformer/...`` (and
``.../layers/token_prior/scale``) with a leading layer axis (``titok_jax.nn.scan``).

Optional inputs the extractor (``models.extractor``) uses, off by default (TiTok never sets them):
``TiTokEncoder(..., keep)`` runs on the kept patches only (MAE input masking) and with
``feature_layer`` also returns one block's patch tokens (REPA); ``TiTokDecoder(z, images,
visible)`` puts the visible patches' embeddings (``visible_embed``) in their grid slots instead of
the mask token (MaskGIT-style decoder masking); ``TiTokDecoder(feature_layer=i)`` also returns the
grid slots after block ``i`` (decoder REPA); ``TiTokDecoder(head="flow")(z, images, visible, x_t,
t)`` is a rectified-flow velocity head (the grid slots read the noised image instead of the mask
token, conditioned on the time ``t``; see ``TiTokDecoder``).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn import (AdaLNModulation, check_images, LearnedPositionEmbedding, LayerContext,
                          PatchEmbed, TimestepEmbedder, TransformerBlock, boxed, constrain,
                          layer_stack, make_norm, modulate, resolve_remat, unpatchify,
                          width_scaled_normal)
from titok_jax.nn.activation_sharding import BTD
from titok_jax.quantizers import QuantizedModel, QuantizerOutput, build_quantizer, freeze_spec
from titok_jax.quantizers.factory import input_dim, split_token_ids, token_ids_shape
from titok_jax.models.token_prior import TokenPriorBias, kept_distances, prior_distances

Dtype = Any
DEFAULT_QUANTIZER = {"name": "vq", "codebook_size": 8192}   # TiTok-BL-64-VQ's
# decoder heads: RGB patches, the two-stage proxy-code logits, or a rectified-flow velocity
HEADS = ("pixels", "legacy", "flow")
# An image-shaped activation [B, H, W, C]: the batch split as the residual stream's, the rest
# left to XLA (``nn.activation_sharding``).
BHWC = ("batch", None, None, None)

# TiTok initialisation: Linear/Conv weights N(0, 0.02) (PyTorch ``trunc_normal_(std=.02)`` cuts at
# +-2 absolute, i.e. 100 std: a plain normal), zero biases; LayerNorm 1/0; tokens and position
# tables ``width**-0.5 * N(0, 1)``.
kernel_init = nn.initializers.normal(stddev=0.02)
# ...except the packed q/k/v in-projection of open_clip's nn.MultiheadAttention, which is not an
# nn.Linear, so TiTok's re-initialisation skips it and it keeps PyTorch's xavier-uniform (fans of the
# whole [3W, W] matrix). With N(0, .02) there instead, attention starts uniform and a small model
# does not learn to route image content into the latent tokens for hundreds of steps.
qkv_kernel_init = nn.initializers.xavier_uniform()
# name -> (kernel init, q/k/v init). "titok" is the official scheme; "xavier" (xavier-uniform
# everywhere) lets image content reach the small decoder much sooner when training from scratch,
# which the CPU-sized `tiny` recipe needs.
INITS = {"titok": (kernel_init, qkv_kernel_init),
         "xavier": (nn.initializers.xavier_uniform(), nn.initializers.xavier_uniform())}


def _kernel_inits(init: str):
    if init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    return INITS[init]
zeros = nn.initializers.zeros_init()


def _layer(ctx: LayerContext, carry: Any, distances: Any, *, num_heads: int, dtype: Dtype,
           param_dtype: Dtype, init: str, prior: float, feature_layer: int = -1,
           feature_slice: tuple[int, int] = (0, 0)) -> Any:
    """One open_clip block ``transformer`` (with ``prior > 0``: after its token prior bias
    ``token_prior``); ``nn.scan`` layer contract (``titok_jax.nn.scan``). The carry is ``x``, or
    ``(x, feats)`` with ``feature_layer >= 0``: ``feats`` becomes ``x[:, lo:hi]`` (``feature_slice``)
    after block ``feature_layer``."""
    x, feats = carry if feature_layer >= 0 else (carry, None)
    k_init, qkv_init = _kernel_inits(init)
    bias = (TokenPriorBias(num_heads, prior, param_dtype=param_dtype,
                           name=ctx.name("token_prior"))(distances) if prior > 0 else None)
    x = ctx.module(TransformerBlock)(
        num_heads=num_heads, mlp_ratio=4.0, activation="gelu", norm_eps=1e-5, kernel_init=k_init,
        qkv_kernel_init=qkv_init, dtype=dtype, param_dtype=param_dtype,
        name=ctx.name("transformer"))(x, bias=bias)
    if feature_layer < 0:
        return x
    lo, hi = feature_slice
    return x, ctx.keep_at(feature_layer, x[:, lo:hi], feats)


def _blocks(x: jax.Array, depth: int, num_heads: int, remat_policy: str, dtype: Dtype,
            param_dtype: Dtype, init: str = "titok", prior: float = 0.0,
            distances: Any = None, scan: bool = False, feature_layer: int = -1,
            feature_slice: tuple[int, int] = (0, 0)) -> Any:
    """``depth`` open_clip blocks named ``transformer_{i}`` (call from a compact method); with
    ``prior > 0`` each block's attention adds the learnable token-patch bias ``token_prior_{i}``
    (``models.token_prior``) over ``distances`` ``[T, T]`` or per example ``[B, T, T]``
    (``prior_distances``). ``scan``: one ``nn.scan`` over the layers instead, params
    ``layers/{transformer,token_prior}/... [depth, ...]``. With ``feature_layer >= 0`` returns
    ``(x, x[:, lo:hi] after block feature_layer)`` (``feature_slice = (lo, hi)``), else ``x``."""
    if feature_layer >= depth:
        raise ValueError(f"feature layer {feature_layer} of a stack of {depth} blocks")
    layer = functools.partial(_layer, num_heads=num_heads, dtype=dtype, param_dtype=param_dtype,
                              init=init, prior=prior, feature_layer=feature_layer,
                              feature_slice=tuple(feature_slice))
    distances = None if prior <= 0 else (jnp.asarray(distances) if scan else distances)
    carry = x
    if feature_layer >= 0:   # scanned: carried as zeros until block feature_layer
        lo, hi = feature_slice
        carry = (x, constrain(jnp.zeros_like(x[:, lo:hi]), BTD) if scan else None)
    return layer_stack(layer, carry, distances, depth=depth, scan=scan, remat_policy=remat_policy)


def _dense(features: int, names: tuple[str | None, str | None], dtype: Dtype,
           param_dtype: Dtype, name: str, init: str = "titok") -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=boxed(_kernel_inits(init)[0], names),
                    bias_init=boxed(zeros, names[1:]), name=name)


class TiTokEncoder(nn.Module):
    """``images [B, H, W, 3]``, ``latent_tokens [N, W]`` -> ``[B, N, out_dim]`` float32.

    ``keep`` (int ``[B, n]``, optional): MAE input masking - only patches ``keep[b]`` (row-major
    indices, each with its own position embedding) enter the sequence ``[cls, kept, latents]``, so
    the cost falls with the number removed (``n = 0``: class and latent tokens only).
    ``feature_layer >= 0``: returns ``(z, feats)`` with ``feats [B, n, W]`` the patch tokens after
    that block (REPA's alignment input)."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    num_latent_tokens: int
    out_dim: int
    is_legacy: bool = False
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    init_scheme: str = "titok"
    token_prior: float = 0.0
    feature_layer: int = -1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, latent_tokens: jax.Array,
                 keep: jax.Array | None = None) -> Any:
        g = self.image_size // self.patch_size
        b, n, w = images.shape[0], self.num_latent_tokens, self.width
        x = PatchEmbed(self.patch_size, w, channel_order="chw",
                       kernel_init=_kernel_inits(self.init_scheme)[0],
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name="patch_embed")(images.astype(self.dtype))
        x = constrain(x, BTD)
        cls = self.param("class_embedding", boxed(width_scaled_normal(w), (None, "embed")),
                         (1, w), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype)[None], (b, 1, w)), x], 1)
        x = constrain(LearnedPositionEmbedding(g * g + 1, w, param_dtype=self.param_dtype,
                                               dtype=self.dtype, name="positional_embedding")(x), BTD)
        distances = prior_distances(n, g) if self.token_prior > 0 else None
        if keep is not None:   # MAE: the kept patches (with their positions) only
            x = constrain(jnp.concatenate(
                [x[:, :1], jnp.take_along_axis(x[:, 1:], keep[..., None].astype(jnp.int32), 1)], 1),
                BTD)
            if distances is not None:
                distances = kept_distances(distances, keep, n)
        p = x.shape[1] - 1   # patches in the sequence
        lat = jnp.broadcast_to(latent_tokens.astype(self.dtype)[None], (b, n, w))
        lat = constrain(LearnedPositionEmbedding(n, w, param_dtype=self.param_dtype, dtype=self.dtype,
                                                 name="latent_token_positional_embedding")(lat), BTD)
        x = constrain(jnp.concatenate([x, lat], axis=1), BTD)
        norm = dict(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(make_norm("layernorm", name="ln_pre", **norm)(x), BTD)
        x = _blocks(x, self.depth, self.num_heads, resolve_remat(self.remat, self.remat_policy),
                    self.dtype, self.param_dtype, self.init_scheme, self.token_prior,
                    distances, self.scan_layers, self.feature_layer, (1, 1 + p))
        x, feats = x if self.feature_layer >= 0 else (x, None)
        x = constrain(make_norm("layernorm", name="ln_post", **norm)(x[:, 1 + p:]), BTD)
        if self.is_legacy:
            # PyTorch ``latent.reshape(B, W, N, 1)`` of a [B, N, W] tensor: memory is reinterpreted,
            # not transposed; the 1x1 conv then mixes over the scrambled "W" axis.
            x = x.reshape(b, w, n).swapaxes(1, 2)
        x = _dense(self.out_dim, ("embed", None), self.dtype, self.param_dtype, "conv_out",
                   self.init_scheme)(x)
        x = constrain(x.astype(jnp.float32), BTD)
        return x if feats is None else (x, constrain(feats, BTD))


class TiTokDecoder(nn.Module):
    """Continuous codes ``[B, N, C]`` -> pixels ``[B, H, W, 3]`` float32 (unbounded).

    ``head="flow"`` (the extractor's rectified-flow decoder; t = 1 is noise): grid slot ``i`` reads
    ``noised_embed(patch_i of x_t) + temb(t)`` instead of the mask token (visible patches, when
    given, still read ``visible_embed`` of the clean image), the class slot ``cls + temb(t)``, with
    ``temb = time_embed(t)`` (``nn.TimestepEmbedder``, DiT's: ``t * 1000``, period 10^4); the
    tokens enter as in TiTok's decoder; after ``ln_post`` the grid is adaLN-modulated by ``temb``
    (``head_adaln``, zero at init) and the pixel head (``ffn``, unpatchify, ``conv_out``) gives
    the velocity ``v(x_t, t | z) [B, H, W, 3]``."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    num_latent_tokens: int
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    init_scheme: str = "titok"
    token_prior: float = 0.0
    head: str = "pixels"
    lowres_head: int = 0
    head_channels: int = 0
    proxy_codebook_size: int = 1024
    feature_layer: int = -1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, images: jax.Array | None = None,
                 visible: jax.Array | None = None, x_t: jax.Array | None = None,
                 t: jax.Array | None = None) -> Any:
        """``head="pixels"``: pixels ``[B, H, W, 3]``; ``head="legacy"``: proxy-code logits
        ``[B, g, g, proxy_codebook_size]``; ``head="flow"``: the velocity at ``(x_t [B, H, W, 3],
        t [B])`` (all float32). With ``visible`` (bool ``[B, g*g]``, MaskGIT-style decoder
        masking) the grid slots of the visible patches hold ``visible_embed(images)`` (a patch
        embedding, param ``visible_embed``) instead of the mask token (the noised patch); all
        False is the plain decoder. With ``feature_layer >= 0`` returns ``(output, grid slots
        after that block [B, g*g, W])``."""
        if self.head not in HEADS:
            raise ValueError(f"decoder head must be one of {HEADS}, got {self.head!r}")
        flow = self.head == "flow"
        if flow != (x_t is not None and t is not None):
            raise ValueError("the flow decoder head needs x_t and t (and only it takes them)")
        p, w = self.patch_size, self.width
        g = self.image_size // p
        b, n = z.shape[:2]
        if n > self.num_latent_tokens:
            raise ValueError(f"{n} tokens but the decoder has {self.num_latent_tokens} positions")
        tok = constrain(_dense(w, (None, "embed"), self.dtype, self.param_dtype, "decoder_embed",
                               self.init_scheme)(constrain(z.astype(self.dtype), BTD)), BTD)
        cls = self.param("class_embedding", boxed(width_scaled_normal(w), (None, "embed")),
                         (1, w), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype)[None], (b, 1, w))
        patch_embed = functools.partial(PatchEmbed, p, w, channel_order="chw",
                                        kernel_init=_kernel_inits(self.init_scheme)[0],
                                        dtype=self.dtype, param_dtype=self.param_dtype)
        temb = None
        if flow:
            temb = constrain(TimestepEmbedder(w, time_scale=1000.0, dtype=self.dtype,
                                              param_dtype=self.param_dtype, name="time_embed")(t),
                             ("batch", "act_embed"))
            grid = patch_embed(name="noised_embed")(x_t.astype(self.dtype)) + temb[:, None]
            cls = cls + temb[:, None]
        else:
            mask = self.param("mask_token", boxed(width_scaled_normal(w), (None, None, "embed")),
                              (1, 1, w), self.param_dtype)
            grid = jnp.broadcast_to(mask.astype(self.dtype), (b, g * g, w))
        grid = constrain(grid, BTD)
        if visible is not None:
            seen = patch_embed(name="visible_embed")(images.astype(self.dtype))
            grid = jnp.where(visible[..., None], constrain(seen, BTD), grid)
        m = jnp.concatenate([cls, grid], axis=1)
        m = constrain(LearnedPositionEmbedding(g * g + 1, w, param_dtype=self.param_dtype,
                                               dtype=self.dtype, name="positional_embedding")(m), BTD)
        tok = constrain(LearnedPositionEmbedding(
            self.num_latent_tokens, w, param_dtype=self.param_dtype, dtype=self.dtype,
            name="latent_token_positional_embedding")(tok), BTD)
        x = constrain(jnp.concatenate([m, tok], axis=1), BTD)
        norm = dict(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(make_norm("layernorm", name="ln_pre", **norm)(x), BTD)
        distances = prior_distances(self.num_latent_tokens, g)[:1 + g * g + n, :1 + g * g + n]
        x = _blocks(x, self.depth, self.num_heads, resolve_remat(self.remat, self.remat_policy),
                    self.dtype, self.param_dtype, self.init_scheme, self.token_prior, distances,
                    self.scan_layers, self.feature_layer, (1, 1 + g * g))
        x, feats = x if self.feature_layer >= 0 else (x, None)
        out = self._head(x, b, g, temb)
        return out if feats is None else (out, constrain(feats, BTD))

    def _head(self, x: jax.Array, b: int, g: int, temb: jax.Array | None) -> jax.Array:
        """``ln_post`` of the grid slots, then the head (``temb``: the flow head's adaLN)."""
        p, w = self.patch_size, self.width
        norm = dict(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(make_norm("layernorm", name="ln_post", **norm)(x[:, 1:1 + g * g]), BTD)
        if temb is not None:
            shift, scale = AdaLNModulation(2, w, dtype=self.dtype, param_dtype=self.param_dtype,
                                           name="head_adaln")(temb)
            x = constrain(modulate(x, shift, scale), BTD)
        if self.head == "legacy":
            # Two-stage head: Conv1x1(W -> 2W), tanh, Conv1x1(2W -> K) per grid cell (row-major).
            x = _dense(2 * w, ("embed", "mlp"), self.dtype, self.param_dtype, "ffn_0",
                       self.init_scheme)(x)
            x = constrain(x, ("batch", "tokens", "act_mlp"))
            x = _dense(self.proxy_codebook_size, ("mlp", None), self.dtype, self.param_dtype,
                       "ffn_2", self.init_scheme)(jnp.tanh(x))
            x = x.reshape(b, g, g, self.proxy_codebook_size).astype(jnp.float32)
            return constrain(x, BHWC)
        # Conv1x1(W -> p*p*3) then Rearrange('b (p1 p2 c) h w -> b c (h p1) (w p2)'): "hwc".
        h = x
        c = self.head_channels or 3
        x = _dense(p * p * c, ("embed", None), self.dtype, self.param_dtype, "ffn",
                   self.init_scheme)(x)
        x = constrain(x, BTD)
        x = constrain(unpatchify(x, p, self.image_size, self.image_size, c, channel_order="hwc"),
                      BHWC)
        if self.head_channels:
            x = nn.Conv(c, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=boxed(_kernel_inits(self.init_scheme)[0],
                                          (None, None, None, None)),
                        bias_init=boxed(zeros, (None,)), name="conv_mid")(x)
            x = nn.gelu(x, approximate=False)
        x = nn.Conv(3, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=boxed(_kernel_inits(self.init_scheme)[0],
                                      (None, None, None, None)),
                    bias_init=boxed(zeros, (None,)), name="conv_out")(x)
        if self.lowres_head and self.head == "pixels":
            x = x + self._lowres(h, b, g)
        return constrain(x.astype(jnp.float32), BHWC)

    def _lowres(self, h: jax.Array, b: int, g: int) -> jax.Array:
        """The low-resolution colour path (``lowres_head = k``): each grid slot gives a k x k
        patch of colours (``ffn_lowres``, W -> k*k*3), the ``(g k)^2`` image is resized
        bilinearly to full size (``jax.image.resize``: half-pixel centres, the edge rows
        repeated). A smooth image from the first steps, where the per-patch linear head starts
        as flat, blocky patches."""
        k = self.lowres_head
        y = _dense(k * k * 3, ("embed", None), self.dtype, self.param_dtype, "ffn_lowres",
                   self.init_scheme)(h)
        y = unpatchify(constrain(y, BTD), k, g * k, g * k, 3, channel_order="hwc")
        y = jax.image.resize(y.astype(jnp.float32), (b, self.image_size, self.image_size, 3),
                             "linear")
        return constrain(y.astype(self.dtype), BHWC)


def setup_titok_parts(m: nn.Module, decoder_kwargs: dict | None = None,
                      **encoder_kwargs: Any) -> None:
    """In ``m.setup()``: TiTok's parts on ``m`` (from the fields TiTok and the extractor share):
    ``latent_tokens`` ``[N, encoder_width]``, ``encoder`` (``TiTokEncoder``, plus
    ``encoder_kwargs``), ``quantize`` (float32, like the official quantizer) and ``decoder``
    (``TiTokDecoder``, plus ``decoder_kwargs``: ``head``, ``feature_layer``)."""
    if m.image_size % m.patch_size:
        raise ValueError(f"image_size {m.image_size} is not a multiple of patch_size "
                         f"{m.patch_size}")
    common = dict(image_size=m.image_size, patch_size=m.patch_size,
                  num_latent_tokens=m.num_latent_tokens, remat=m.remat,
                  remat_policy=m.remat_policy, scan_layers=m.scan_layers,
                  init_scheme=m.init_scheme, token_prior=float(m.token_prior),
                  dtype=m.dtype, param_dtype=m.param_dtype)
    m.latent_tokens = m.param(
        "latent_tokens", boxed(width_scaled_normal(m.encoder_width), ("tokens", "embed")),
        (m.num_latent_tokens, m.encoder_width), m.param_dtype)
    m.encoder = TiTokEncoder(width=m.encoder_width, depth=m.encoder_depth,
                             num_heads=m.encoder_heads, out_dim=input_dim(m.quantizer, m.token_size),
                             **encoder_kwargs, **common)
    m.quantize = build_quantizer(m.quantizer, m.token_size, dtype=jnp.float32,
                                 param_dtype=m.param_dtype)
    m.decoder = TiTokDecoder(width=m.decoder_width, depth=m.decoder_depth,
                             num_heads=m.decoder_heads, **(decoder_kwargs or {}), **common)


class TiTok(QuantizedModel, nn.Module):
    """Single-stage TiTok (see the module docstring): ``TiTok(**titok_variant(name))``.

    ``__call__(images, train)`` -> ``(reconstruction [B,H,W,3] f32, QuantizerOutput)``;
    ``encode`` -> ``(codes [B,N,C] f32, QuantizerOutput)``; ``decode(codes)``;
    ``decode_tokens(indices [B,N] or [B,1,N])`` (VQ; a VAE takes continuous codes).
    Training a VQ model: ``mutable=["quantizer_stats"]``; a VAE: ``rngs={"sample": key}``.

    Attributes (defaults = TiTok-BL-64-VQ):
      image_size, patch_size: square input side and patch side (the same for both ViTs).
      encoder_* / decoder_*: width, depth and heads of each ViT (MLP 4x width).
      num_latent_tokens: N; token_size: C (the VAE encoder emits 2C: mean then logvar).
      quantizer: the bottleneck's sub-config ``{"name": ..., **arguments}`` (a mapping; kept as a
        tuple of pairs), built by ``quantizers.build_quantizer``: ``"vq"`` (``VectorQuantizer``'s
        arguments: codebook_size, l2_normalize for the cosine lookup, commitment_weight = beta,
        use_ema, ...; codebook ``U(+-1/K)``) or ``"vae"`` (kl_weight). Read back through
        ``quantizer_name`` and ``codebook_size`` (None for the VAE).
      is_legacy: the two-stage checkpoints' encoder read-out reshape (see the module docstring).
      remat: rematerialise each transformer block in the backward pass; remat_policy: what the
        backward keeps (``titok_jax.nn.scan.REMAT_POLICIES``: none | full | dots | dots_saveable;
        "" = full when ``remat``).
      scan_layers: each ViT's blocks as one ``nn.scan`` (params ``{encoder,decoder}/layers/
        {transformer,token_prior}/... [depth, ...]``, compiled once whatever the depth) instead
        of ``transformer_{i}`` / ``token_prior_{i}``; ``nn.scan.match_layers`` converts.
      token_prior: initial strength of the learnable token-patch locality bias in every attention
        layer (``models.token_prior``; 0 = none, the official TiTok). Trained from scratch on a
        small budget it breaks the symmetric "every token reads the average" start.
      lowres_head, head_channels: the pixel head's options (module docstring; 0 = the official
        head). From scratch a per-patch linear head draws flat, blocky patches for a long time;
        the bilinear low-resolution path and a full-resolution conv layer give the small `tiny`
        model a smooth image early (held-out PSNR at 1500 steps 18.35 -> 18.93 dB).
      dtype: compute dtype (bf16 on accelerators); the quantizer / posterior stay float32.
      param_dtype: parameter dtype (float32).
    """

    image_size: int = 256
    patch_size: int = 16
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    num_latent_tokens: int = 64
    token_size: int = 64
    # The official TiTok learns its codebook by gradient (use_ema off); EMA updates with k-means
    # initialisation and dead-code replacement restart collapsed codebooks (quantizers.vq).
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    is_legacy: bool = False
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    init_scheme: str = "titok"
    token_prior: float = 0.0
    lowres_head: int = 0
    head_channels: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def setup(self) -> None:
        setup_titok_parts(self, {"lowres_head": self.lowres_head,
                                 "head_channels": self.head_channels}, is_legacy=self.is_legacy)

    def _check_images(self, images: jax.Array) -> None:
        check_images(images, self.image_size, "TiTok")

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``images [B,H,W,3]`` in [0,1] -> ``(codes [B,N,C] f32, QuantizerOutput)``.

        VQ: codes are ``z_q`` (straight-through; l2-normalised codes when ``l2_normalize``) and
        ``out.indices`` int32 ``[B, N]``. VAE: codes are the posterior sample (train) or mean
        (eval); ``out.indices`` is None and ``out.losses == {"kl": ...}``.
        """
        self._check_images(images)
        z = self.encoder(images, self.latent_tokens)
        return self.quantize(z, train=train)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Continuous codes ``[B, N, token_size]`` -> pixels ``[B, H, W, 3]`` f32 (unclamped)."""
        if codes.ndim != 3 or codes.shape[-1] != self.token_size:
            raise ValueError(f"decode expects codes [B, N, {self.token_size}], got {codes.shape}")
        return self.decoder(codes)

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        """VQ: int indices ``[B, N]`` (or ``[B, 1, N]``; ``[B, N, k]`` for the k ids per token of a
        multi-index quantizer, ``fq`` / ``rq``) -> codebook lookup -> ``decode``.
        VAE: continuous codes ``[B, N, C]`` -> ``decode``."""
        if self.continuous:
            return self.decode(tokens)
        k = self.num_codebooks
        lead = split_token_ids(tokens, k)
        if lead == 3 and tokens.shape[1] == 1:
            tokens, lead = tokens[:, 0], 2
        if lead != 2:
            raise ValueError(f"decode_tokens expects indices {token_ids_shape(k)}, got shape "
                             f"{tokens.shape}")
        codes = self.quantize.indices_to_codes(tokens, dtype=jnp.float32)
        return self.decode(codes)

    def __call__(self, images: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, QuantizerOutput]:
        """``images [B,H,W,3]`` in [0,1] -> ``(reconstruction [B,H,W,3] f32, QuantizerOutput)``."""
        codes, out = self.encode(images, train=train)
        return self.decode(codes), out
