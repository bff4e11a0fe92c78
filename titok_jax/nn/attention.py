"""Multi-head attention (fused or separate q/k/v, optional qk-norm and RoPE) and mask builders.

Attention, per head ``h`` (``d`` = head dim, ``s`` = ``scale``, default ``d**-0.5``; FlexTok/FlowMo
use the muP scale ``8/d``)::

    q, k, v = x Wq + bq, c Wk + bk, c Wv + bv          (c = inputs_kv, default x)
    q, k    = rope(norm(q)), rope(norm(k))              (each optional; norm over d, per head)
    A       = softmax_k(s * q k^T  masked to -inf where mask is False)      (float32)
    y       = concat_h(A v) Wo + bo

Masks are boolean ``[B or 1, H or 1, Q, K]`` with **True = may attend**. A query row whose keys are
all masked gets zero attention weights (its output is just the output bias), never NaN.

Long sequences: the float32 logits ``[B, H, Q, K]`` are 76 MB per head and example at FlowMo's
4,352 tokens. ``dot_product_attention`` then takes the ``"chunked"`` path (automatically when
``Q > query_chunk_size`` and ``Q * K >= CHUNKED_MIN_LOGITS``, or when asked): the queries are cut
into blocks of at most ``query_chunk_size`` rows, and one block at a time (``lax.map``) computes its
``[B, H, chunk, K]`` logits, softmax and output, rematerialised in the backward pass, so no more
than one block of logits is ever live. Each query row's softmax is over all its keys either way, so
the result is the plain one to float32 round-off, with masks, biases, scales and whatever was done
to q and k before (qk-norm, RoPE). ``jax.nn.dot_product_attention`` is not used: its XLA path
materialises the full logits too, and its fused kernels are GPU-only and take no float32 softmax
or fully-masked-row guarantee.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.errors import ConfigError
from titok_jax.nn.dropout import bernoulli_like
from titok_jax.nn.initializers import (Initializer, boxed, default_kernel_init, flat_kernel_init,
                                       zeros_init)
from titok_jax.nn.norm import make_norm
from titok_jax.nn.posemb import apply_rope, rope_angles

# --------------------------------------------------------------------------- masks


def causal_mask(n: int) -> jax.Array:
    """``[1, 1, n, n]``: query ``i`` sees keys ``j <= i``."""
    i = jnp.arange(n)
    return (i[None, :] <= i[:, None])[None, None]


def prefix_causal_mask(num_prefix: int, num_suffix: int, *,
                       prefix_sees_suffix: bool = False) -> jax.Array:
    """``[1, 1, T, T]`` for a sequence ``[prefix (num_prefix) || suffix (num_suffix)]``.

    FlexTok's encoder (``causal_last``) with prefix = image patches, suffix = registers:
    patches see all patches (bidirectional) and, by default, **no** registers; register ``i``
    sees every patch and registers ``0..i`` (causal among registers).
    ``prefix_sees_suffix=True`` also lets every patch see every register.
    """
    t = num_prefix + num_suffix
    i = jnp.arange(t)
    q, k = i[:, None], i[None, :]
    q_suffix, k_suffix = q >= num_prefix, k >= num_prefix
    allowed = jnp.where(q_suffix, (~k_suffix) | (k <= q),
                        (~k_suffix) | prefix_sees_suffix)
    return allowed[None, None]


def padding_mask(valid_q: jax.Array, valid_k: jax.Array | None = None) -> jax.Array:
    """``[B, 1, Q, K]`` = ``valid_q[b, q] & valid_k[b, k]`` from per-position validity ``[B, L]``.

    ``valid_k`` defaults to ``valid_q`` (self-attention). Invalid query rows are fully masked, so
    their outputs are zero-weighted (no NaN); drop them downstream.
    """
    valid_q = jnp.asarray(valid_q, bool)
    valid_k = valid_q if valid_k is None else jnp.asarray(valid_k, bool)
    return valid_q[:, None, :, None] & valid_k[:, None, None, :]


def segment_mask(segment_q: jax.Array, segment_k: jax.Array | None = None) -> jax.Array:
    """``[B, 1, Q, K]``: attend only within the same segment id (block-diagonal packing)."""
    segment_k = segment_q if segment_k is None else segment_k
    return segment_q[:, None, :, None] == segment_k[:, None, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks (broadcasting); ``None`` entries are skipped, all-None -> None."""
    present = [jnp.asarray(m, bool) for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out


# --------------------------------------------------------------------------- head counts


def module_path(module: nn.Module) -> str:
    """``encoder/block_0/attn``: where a bound module sits (its class name when unbound)."""
    scope = getattr(module, "scope", None)
    path = "/".join(str(p) for p in getattr(scope, "path", ()) or ())
    return path or type(module).__name__


def split_heads(width: int, num_heads: int, where: str) -> int:
    """The head dim ``width // num_heads``; a one-line ``ConfigError`` naming ``where`` when
    ``num_heads`` is not a positive divisor of ``width`` (never a silently smaller head dim)."""
    if not isinstance(num_heads, numbers.Integral) or num_heads < 1 or width % num_heads:
        raise ConfigError(f"attention {where}: width {width} is not divisible by num_heads "
                          f"{num_heads!r}; choose a head count that divides the width")
    return width // num_heads


def heads_of(width: int, head_dim: int, where: str) -> int:
    """The head count ``width // head_dim`` (models with a fixed head dim, as FlexTok); a one-line
    ``ConfigError`` naming ``where`` when ``head_dim`` does not divide ``width``."""
    if not isinstance(head_dim, numbers.Integral) or head_dim < 1 or width % head_dim:
        raise ConfigError(f"attention {where}: width {width} is not divisible by head_dim "
                          f"{head_dim!r}; choose a width that is a multiple of the head dim")
    return width // head_dim


# --------------------------------------------------------------------------- core


# "auto" (None) takes the chunked path when a query block is smaller than Q and the logits of one
# example and head reach this many (1024 x 1024: 4 MiB in float32).
CHUNKED_MIN_LOGITS = 2 ** 20
QUERY_CHUNK_SIZE = 512
IMPLEMENTATIONS = ("plain", "chunked")


def attention_implementation(num_queries: int, num_keys: int, implementation: str | None = None,
                             query_chunk_size: int = QUERY_CHUNK_SIZE) -> str:
    """The path ``dot_product_attention`` takes: ``implementation`` when given, else ``"chunked"``
    for ``Q > query_chunk_size`` and ``Q * K >= CHUNKED_MIN_LOGITS``, else ``"plain"``."""
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS} or None "
                             f"(automatic), got {implementation!r}")
        return implementation
    if num_queries > query_chunk_size and num_queries * num_keys >= CHUNKED_MIN_LOGITS:
        return "chunked"
    return "plain"


def _as_4d(a: jax.Array | None) -> jax.Array | None:
    """A ``[Q, K]`` (or lower-rank) mask or bias as ``[1, 1, Q, K]``."""
    return None if a is None else a.reshape((1,) * (4 - a.ndim) + a.shape)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
            bias: jax.Array | None, scale: float, dropout_rate: float,
            dropout_rng: jax.Array | None, precision: Any) -> jax.Array:
    """The plain path: full ``[B, H, Q, K]`` float32 logits (``mask``: bool
    ``[B|1, H|1, Q|1, K]``)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = bernoulli_like(dropout_rng, 1.0 - dropout_rate, weights)   # weights' sharding
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, precision=precision)


def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
             bias: jax.Array | None, scale: float, dropout_rate: float,
             dropout_rng: jax.Array | None, precision: Any, chunk: int) -> jax.Array:
    """``_attend`` over blocks of at most ``chunk`` queries, one block at a time, each block
    rematerialised in the backward pass. The blocks are evened out (``ceil(Q / n)`` rows for ``n``
    blocks, rounded up to a multiple of 8) and Q is padded to ``n`` of them with zero queries
    (finite rows, dropped from the output). Dropout draws block ``i``'s mask from
    ``fold_in(dropout_rng, i)``."""
    b, nq = q.shape[:2]
    even = -(-nq // -(-nq // chunk))
    chunk = min(chunk, -(-even // 8) * 8)
    n = -(-nq // chunk)
    pad = n * chunk - nq

    def blocks(a: jax.Array | None, axis: int, fill: Any) -> jax.Array | None:
        """``a``'s query axis cut into ``[n, ..., chunk, ...]`` (None when it broadcasts)."""
        if a is None or a.shape[axis] == 1:
            return None
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        a = jnp.pad(a, widths, constant_values=fill)
        return jnp.moveaxis(a.reshape(a.shape[:axis] + (n, chunk) + a.shape[axis + 1:]), axis, 0)

    xs = (blocks(q, 1, 0), blocks(mask, 2, False), blocks(bias, 2, 0), jnp.arange(n))
    whole_mask = mask if xs[1] is None else None
    whole_bias = bias if xs[2] is None else None

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(block):
        qb, mb, bb, i = block
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        return _attend(qb, k, v, whole_mask if mb is None else mb,
                       whole_bias if bb is None else bb, scale, dropout_rate, rng, precision)

    out = jax.lax.map(one, xs)                                    # [n, B, chunk, H, Dv]
    out = jnp.moveaxis(out, 0, 1).reshape((b, n * chunk) + out.shape[3:])
    return out[:, :nq] if pad else out


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
    scale: float | None = None, dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
    precision: Any = None, bias: jax.Array | None = None, implementation: str | None = None,
    query_chunk_size: int = QUERY_CHUNK_SIZE,
) -> jax.Array:
    """``softmax(scale * q k^T + bias) v``: q ``[B,Q,H,D]``, k ``[B,K,H,D]``, v ``[B,K,H,Dv]``
    -> ``[B,Q,H,Dv]``.

    Logits and softmax are float32; ``bias`` (``[B|1, H|1, Q|1, K]`` or ``[Q, K]``, float) is added
    to the scaled logits; ``mask`` (``[B|1, H|1, Q|1, K]`` or ``[Q, K]``, True = attend) sets
    blocked logits to the float32 minimum, and rows with no allowed key get zero weights.
    ``implementation``: ``"plain"`` (full logits), ``"chunked"`` (blocks of ``query_chunk_size``
    queries; see the module docstring) or None to choose by size (``attention_implementation``).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.ndim == 2:
            mask = mask[None, None]
        if mask.ndim != 4:
            raise ValueError(f"mask must be [B|1, H|1, Q, K], got shape {mask.shape}")
    if query_chunk_size < 1:
        raise ValueError(f"query_chunk_size must be positive, got {query_chunk_size}")
    path = attention_implementation(q.shape[1], k.shape[1], implementation, query_chunk_size)
    if path == "plain" or q.shape[1] <= query_chunk_size:
        return _attend(q, k, v, mask, bias, scale, dropout_rate, dropout_rng, precision)
    bias = None if bias is None else _as_4d(jnp.asarray(bias))
    return _chunked(q, k, v, mask, bias, scale, dropout_rate, dropout_rng, precision,
                    query_chunk_size)


class HeadsDense(nn.Module):
    """``[..., in] -> [..., *lead, heads, head_dim]``; kernel ``[in, *lead, heads, head_dim]``.

    Logical names: kernel ``("embed", None.., "heads", "kv")``, bias ``(None.., "heads", "kv")``.
    ``lead=(3,)`` is the fused q/k/v projection (q, k, v in that order, like PyTorch's
    ``in_proj_weight`` rows).
    """

    num_heads: int
    head_dim: int
    lead: tuple[int, ...] = ()
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_shape = (*self.lead, self.num_heads, self.head_dim)
        out_names = (*([None] * len(self.lead)), "heads", "kv")
        kernel = self.param("kernel", boxed(flat_kernel_init(self.kernel_init, 1),
                                            ("embed", *out_names)),
                            (x.shape[-1], *out_shape), self.param_dtype)
        bias = (self.param("bias", boxed(zeros_init, out_names), out_shape, self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.tensordot(x, kernel, axes=((x.ndim - 1,), (0,)), precision=self.precision)
        return y + bias if bias is not None else y


class HeadsOutDense(nn.Module):
    """``[..., heads, head_dim] -> [..., features]``; kernel ``[heads, head_dim, features]``
    named ``("heads", "kv", "embed")``, bias ``("embed",)``."""

    features: int
    use_bias: bool = True
    kernel_init: Initializer = default_kernel_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, d = x.shape[-2:]
        kernel = self.param("kernel", boxed(flat_kernel_init(self.kernel_init, 2),
                                            ("heads", "kv", "embed")),
                            (h, d, self.features), self.param_dtype)
        bias = (self.param("bias", boxed(zeros_init, ("embed",)), (self.features,),
                           self.param_dtype) if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.tensordot(x, kernel, axes=((x.ndim - 2, x.ndim - 1), (0, 1)),
                          precision=self.precision)
        return y + bias if bias is not None else y


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention; see the module docstring for the maths.

    Attributes:
      num_heads: number of heads.
      head_dim: per-head width (default ``features // num_heads``; heads that do not divide the
        width are a ``ConfigError``).
      out_features: output width (default: input width).
      fused_qkv: one ``qkv`` projection (``[D, 3, H, d]``) instead of ``query``/``key``/``value``;
        only for self-attention.
      qkv_bias / out_bias: biases of the input / output projections (TiTok: both; FlexTok: none).
      qk_norm: ``None``, ``"layernorm"`` or ``"rmsnorm"`` over each head's ``d`` channels.
      qk_norm_eps / qk_norm_affine: its epsilon and whether it has a learned scale (and LN bias).
      scale: logit scale, default ``head_dim**-0.5``.
      use_rope / rope_axes_dims / rope_theta / rope_interleaved: RoPE on q and k after the norm
        (``rope_axes_dims`` default ``(head_dim,)``; see ``posemb.rope_angles``).
      dropout_rate: dropout on the attention weights (needs the ``dropout`` rng when
        ``deterministic=False``).
      kernel_init / qkv_kernel_init: initialisers of the projections; ``qkv_kernel_init`` (default
        ``kernel_init``) for q, k, v only (PyTorch's ``nn.MultiheadAttention`` keeps xavier-uniform
        on its packed in-projection even when a model re-initialises its Linear layers).
      implementation / query_chunk_size: ``dot_product_attention``'s path (None: chunked query
        blocks for long sequences, plain otherwise) and its query block size.
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    fused_qkv: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    qk_norm: str | None = None
    qk_norm_eps: float = 1e-6
    qk_norm_affine: bool = True
    scale: float | None = None
    use_rope: bool = False
    rope_axes_dims: Sequence[int] | None = None
    rope_theta: float = 10000.0
    rope_interleaved: bool = True
    dropout_rate: float = 0.0
    kernel_init: Initializer = default_kernel_init
    qkv_kernel_init: Initializer | None = None
    implementation: str | None = None
    query_chunk_size: int = QUERY_CHUNK_SIZE
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, inputs_kv: jax.Array | None = None, *,
                 mask: jax.Array | None = None, positions: jax.Array | None = None,
                 kv_positions: jax.Array | None = None, deterministic: bool = True,
                 bias: jax.Array | None = None) -> jax.Array:
        """``x [B, Q, D]`` (and ``inputs_kv [B, K, Dk]``) -> ``[B, Q, out_features or D]``;
        ``bias``: additive float32 logits ``[B|1, H|1, Q, K]``.

        ``positions``: RoPE positions of the queries (``[B|1, Q]`` or ``[B|1, Q, n_axes]``);
        ``kv_positions`` those of the keys (default ``positions``).
        """
        features = x.shape[-1]
        head_dim = self.head_dim or split_heads(features, self.num_heads, module_path(self))
        dense = dict(num_heads=self.num_heads, head_dim=head_dim, use_bias=self.qkv_bias,
                     kernel_init=self.qkv_kernel_init or self.kernel_init, dtype=self.dtype,
                     param_dtype=self.param_dtype, precision=self.precision)
        if self.fused_qkv:
            if inputs_kv is not None:
                raise ValueError("fused_qkv=True is self-attention only; pass fused_qkv=False")
            qkv = HeadsDense(lead=(3,), name="qkv", **dense)(x)
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            kv_in = x if inputs_kv is None else inputs_kv
            q = HeadsDense(name="query", **dense)(x)
            k = HeadsDense(name="key", **dense)(kv_in)
            v = HeadsDense(name="value", **dense)(kv_in)

        if self.qk_norm is not None:
            norm = dict(epsilon=self.qk_norm_eps, use_scale=self.qk_norm_affine,
                        use_bias=self.qk_norm_affine, dtype=self.dtype,
                        param_dtype=self.param_dtype)
            q = make_norm(self.qk_norm, name="q_norm", **norm)(q)
            k = make_norm(self.qk_norm, name="k_norm", **norm)(k)

        if self.use_rope:
            if positions is None:
                raise ValueError("use_rope=True needs `positions`")
            axes = tuple(self.rope_axes_dims or (head_dim,))
            kv_pos = positions if kv_positions is None else kv_positions
            q = apply_rope(q, rope_angles(positions, axes, self.rope_theta), self.rope_interleaved)
            k = apply_rope(k, rope_angles(kv_pos, axes, self.rope_theta), self.rope_interleaved)
        elif positions is not None or kv_positions is not None:
            raise ValueError("`positions` given but use_rope=False")

        rng = None
        if self.dropout_rate > 0.0 and not deterministic:
            rng = self.make_rng("dropout")
        y = dot_product_attention(q, k, v, mask=mask, scale=self.scale,
                                  dropout_rate=self.dropout_rate, dropout_rng=rng,
                                  precision=self.precision, bias=bias,
                                  implementation=self.implementation,
                                  query_chunk_size=self.query_chunk_size)
        return HeadsOutDense(self.out_features or features, use_bias=self.out_bias,
                             kernel_init=self.kernel_init, dtype=self.dtype,
                             param_dtype=self.param_dtype, precision=self.precision,
                             name="out")(y)
