"""FlexTok building blocks: the transformer block (optionally adaLN-zero per sub-sequence), the
attention masks, nested-dropout keep lengths, REPA's projector (``RepaProjector``, shared with the
extractor); the REPA teacher (DINOv2) is ``nets.dinov2.ViTFeatures``.

Block (FlexTok ``FlexBlock``): pre-norm LayerNorm **without** scale/bias (eps 1e-5), separate
bias-free q/k/v/out projections, per-head LayerNorm qk-norm (no affine), the muP attention scale
``8 / head_dim``, a bias-free SwiGLU MLP of hidden width ``int(2/3 * 4 * D)``::

    x = x + attn(ln(x));  x = x + mlp(ln(x))                                   (encoder)

adaLN-zero per sub-sequence (FlexTok ``FlexBlockAdaLN`` with ``adaLN_expansion = S``): one
condition ``c [B, D]`` (the time embedding) gives ``Dense(SiLU(c)) -> [B, S, 6, D]``; token ``i``
of sub-sequence ``s`` (``S = 2``: noised patches, then registers) uses chunk group ``s``, in
FlexTok's order ``(gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp)``::

    x = x + g1 * attn(ln(x) (1 + a1) + b1);  x = x + g2 * mlp(ln(x) (1 + a2) + b2)

The residual stream is constrained to ``("batch", "tokens", "act_embed")`` on entry, after the
attention branch and on exit (``nn.activation_sharding``, as ``nn.TransformerBlock`` does), the
condition and its adaLN chunks to ``("batch", "act_embed")``.

The modulation is zero at init, so each block starts as the identity. Params per block:
``4 D^2 + 3 D h`` (= ``12 D^2`` with ``h = 8D/3``), plus ``6 S (D^2 + D)`` with adaLN
(= ``24 D^2 + 12 D`` total for ``S = 2``): the reference's d12 / d18 / d28 arithmetic.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.nn import (AdaLNModulation, LayerContext, MLP, MultiHeadAttention, PatchEmbed,
                          boxed, constrain, make_norm, prefix_causal_mask, sincos_2d)
from titok_jax.nn.activation_sharding import BTD

Dtype = Any
BD = ("batch", "act_embed")   # one vector per example [B, D] (a condition, an adaLN chunk)
NESTED_MODES = ("uniform", "pow2", "uniform_pow2", "none")
ADALN_ORDER = ("gate_msa", "gate_mlp", "shift_msa", "scale_msa", "shift_mlp", "scale_mlp")


def swiglu_hidden(dim: int) -> int:
    """FlexTok's gated-MLP hidden width ``int(2/3 * 4 * dim)``."""
    return int(2 / 3 * 4 * dim)


# ----------------------------------------------------------------------------- masks
def encoder_mask(num_patches: int, num_registers: int) -> jax.Array:
    """``[1, 1, P+R, P+R]`` (True = may attend) for ``[patches || registers]``: patches see every
    patch and no register; register ``i`` sees every patch and registers ``0..i`` (FlexTok's
    ``causal_last``)."""
    return prefix_causal_mask(num_patches, num_registers)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def keep_lengths(key: jax.Array, batch: int, n: int, mode: str) -> jax.Array:
    """Nested-dropout keep lengths ``k`` int32 ``[batch]`` in ``1..n``:

    - ``uniform``: ``k ~ U{1, .., n}``;
    - ``pow2``: ``k`` uniform over ``{1, 2, 4, .., n}`` (``n`` a power of two);
    - ``uniform_pow2``: ``u ~ U{1, .., n}`` rounded **up** to the next power of two;
    - ``none``: ``k = n`` (no dropout).
    """
    if mode not in NESTED_MODES:
        raise ValueError(f"unknown nested dropout mode {mode!r}; known: {', '.join(NESTED_MODES)}")
    if mode in ("pow2", "uniform_pow2") and not is_power_of_two(n):
        raise ValueError(f"nested dropout {mode!r} needs a power-of-two register count, got {n}")
    if mode == "none":
        return jnp.full((batch,), n, jnp.int32)
    if mode == "pow2":
        powers = jnp.asarray(2 ** np.arange(int(np.log2(n)) + 1), jnp.int32)
        return powers[jax.random.randint(key, (batch,), 0, powers.shape[0])]
    u = jax.random.randint(key, (batch,), 1, n + 1).astype(jnp.int32)
    if mode == "uniform":
        return u
    p = jnp.ones_like(u)            # smallest power of two >= u, by doubling (exact integers)
    for _ in range(int(np.log2(n))):
        p = jnp.where(p < u, 2 * p, p)
    return p


def keep_mask(keep_k: jax.Array, n: int) -> jax.Array:
    """bool ``[B, n]``: slot ``j`` of row ``b`` is kept iff ``j < keep_k[b]``."""
    return jnp.arange(n)[None, :] < jnp.asarray(keep_k)[:, None]


# ----------------------------------------------------------------------------- block
class FlexBlock(nn.Module):
    """One FlexTok transformer block (module docstring). ``__call__(x [B,T,D], cond=None,
    split=None, mask=None)``: with ``num_subseqs > 0`` the block is adaLN-zero conditioned on
    ``cond [B, D]``, tokens ``[:split]`` using chunk group 0 and ``[split:]`` group 1."""

    num_heads: int
    head_dim: int = 64
    num_subseqs: int = 0
    norm_eps: float = 1e-5
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None = None, split: int | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: make_norm("layernorm", epsilon=self.norm_eps, use_scale=False,  # noqa: E731
                                      use_bias=False, name=name, **kw)
        attn = MultiHeadAttention(num_heads=self.num_heads, head_dim=self.head_dim, fused_qkv=False,
                                  qkv_bias=False, out_bias=False, qk_norm="layernorm",
                                  qk_norm_eps=self.norm_eps, qk_norm_affine=False,
                                  scale=8.0 / self.head_dim, name="attn", **kw)
        mlp = MLP(hidden_dim=swiglu_hidden(d), activation="swiglu", use_bias=False, name="mlp", **kw)
        x = constrain(x, BTD)
        if not self.num_subseqs:
            x = constrain(x + attn(norm("norm1")(x), mask=mask), BTD)
            return constrain(x + mlp(norm("norm2")(x)), BTD)
        if cond is None or split is None:
            raise ValueError("an adaLN FlexBlock needs `cond` [B, D] and `split`")
        chunks = [constrain(c, BD) for c in AdaLNModulation(6 * self.num_subseqs, d, name="adaln",
                                                             **kw)(constrain(cond, BD))]   # [B, D] each
        t = x.shape[1]
        sizes = (split, t - split) if self.num_subseqs == 2 else (t,)

        def per_token(k: int) -> jax.Array:   # chunk k of every group, spread over its tokens
            parts = [jnp.broadcast_to(chunks[6 * s + k][:, None, :], (x.shape[0], n, d))
                     for s, n in enumerate(sizes)]
            return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

        g1, g2, b1, a1, b2, a2 = (per_token(k) for k in range(6))
        x = constrain(x + g1 * attn(norm("norm1")(x) * (1 + a1) + b1, mask=mask), BTD)
        return constrain(x + g2 * mlp(norm("norm2")(x) * (1 + a2) + b2), BTD)


def encoder_layer(ctx: LayerContext, x: jax.Array, mask: jax.Array, *, num_heads: int,
                  head_dim: int, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """One encoder ``FlexBlock`` named ``block`` (``titok_jax.nn.scan`` layer contract)."""
    return ctx.module(FlexBlock)(num_heads=num_heads, head_dim=head_dim, dtype=dtype,
                                 param_dtype=param_dtype, name=ctx.name("block"))(x, mask=mask)


def decoder_layer(ctx: LayerContext, carry: tuple, temb: jax.Array, mask: jax.Array | None, *,
                  num_heads: int, head_dim: int, split: int, repa_layer: int, dtype: Dtype,
                  param_dtype: Dtype) -> tuple:
    """One adaLN decoder ``FlexBlock`` named ``block`` on ``carry = (x, feats)``: ``feats`` becomes
    the patch tokens ``x[:, :split]`` after block ``repa_layer`` (-1: stays as it is)."""
    x, feats = carry
    # split (a Python int: static shapes) stays static under remat: argument 3 counting self
    x = ctx.module(FlexBlock, static_argnums=(3,))(
        num_heads=num_heads, head_dim=head_dim, num_subseqs=2, dtype=dtype, param_dtype=param_dtype,
        name=ctx.name("block"))(x, temb, split, mask=mask)
    if repa_layer >= 0:
        feats = ctx.keep_at(repa_layer, x[:, :split], feats)
    return x, feats


def patch_embed_with_posemb(latents: jax.Array, patch_size: int, width: int, name: str,
                            dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """``[B, h, w, C]`` -> ``Dense(patchify_p) + sincos_2d`` ``[B, (h/p)(w/p), width]`` (call from a
    compact method; the 2D sin-cos table is fixed). The table is the official FlexTok one: row half
    first (``sincos_2d(row_first=True)``; apple/ml-flextok ``build_2d_sincos_posemb``)."""
    x = PatchEmbed(patch_size, width, channel_order="hwc", dtype=dtype, param_dtype=param_dtype,
                   name=name)(latents.astype(dtype or latents.dtype))
    gh, gw = latents.shape[1] // patch_size, latents.shape[2] // patch_size
    return constrain(x + sincos_2d(gh, gw, width, row_first=True).astype(x.dtype)[None], BTD)


# ----------------------------------------------------------------------------- REPA
class RepaProjector(nn.Module):
    """REPA's projector ``Dense(H) -> SiLU -> Dense(H) -> SiLU -> Dense(out)`` per token."""

    hidden_dim: int
    out_dim: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=boxed(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                  bias_init=boxed(nn.initializers.zeros_init(), ("mlp",)))
        x = nn.silu(nn.Dense(self.hidden_dim, name="fc_0", **kw)(x))
        x = nn.silu(nn.Dense(self.hidden_dim, name="fc_1", **kw)(x))
        return constrain(nn.Dense(self.out_dim, name="fc_2", **kw)(x).astype(jnp.float32), BTD)


# ----------------------------------------------------------------------------- REPA teacher
# The REPA teacher is DINOv2's frozen feature network (``nets/dinov2.py``; LayerScale, registers
# and the official position-embedding interpolation there); re-exported here for FlexTok.
from titok_jax.nets.dinov2 import IMAGENET_MEAN, IMAGENET_STD, ViTFeatures  # noqa: E402,F401
