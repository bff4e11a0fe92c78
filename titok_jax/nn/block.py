"""Pre-LN transformer block, optionally adaLN-zero conditioned.

Plain (TiTok / open_clip ``ResidualAttentionBlock``: LayerNorm eps 1e-5, exact-GELU MLP ratio 4,
attention with biases)::

    x = x + attn(ln_1(x))
    x = x + mlp(ln_2(x))

adaLN-zero (DiT; FlexTok decoder; pass ``norm_affine=False`` and usually ``norm_eps=1e-6``), with
``(s1, c1, g1, s2, c2, g2) = AdaLNModulation(6)(cond)``::

    x = x + g1 * attn(modulate(ln_1(x), s1, c1))
    x = x + g2 * mlp(modulate(ln_2(x), s2, c2))

``cond`` is ``[B, Dc]`` (broadcast over tokens) or ``[B, T, Dc]`` (per token). The modulation is
zero at init, so the block is then the identity.

The residual stream is constrained to ``("batch", "tokens", "act_embed")`` (``activation_sharding``)
on entry, after the attention branch and on exit: under the trainer's rules the batch stays split
over ``data`` x ``fsdp`` and the features whole, so XLA keeps the FSDP pattern at any batch per
device. Outside a mesh and rules context that is the identity.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn.activation_sharding import BTD, constrain
from titok_jax.nn.adaln import AdaLNModulation, gate, modulate
from titok_jax.nn.attention import QUERY_CHUNK_SIZE, MultiHeadAttention
from titok_jax.nn.dropout import Dropout
from titok_jax.nn.initializers import Initializer, default_kernel_init
from titok_jax.nn.mlp import MLP
from titok_jax.nn.norm import make_norm


class TransformerBlock(nn.Module):
    """One pre-norm transformer block ``[B, T, D] -> [B, T, D]`` (see the module docstring).

    Attributes (beyond those forwarded to ``MultiHeadAttention`` / ``MLP``):
      mlp_dim: MLP hidden width (default ``mlp_ratio * D``).
      norm_type / norm_eps / norm_affine: the two pre-norms (``"layernorm"`` or ``"rmsnorm"``).
      adaln: condition on ``cond`` through adaLN-zero.
      dropout_rate: dropout on each branch output before the residual add.
      attention_implementation / attention_chunk_size: ``MultiHeadAttention``'s
        ``implementation`` (None: chunked query blocks for long sequences) and
        ``query_chunk_size``.
    """

    num_heads: int
    head_dim: int | None = None
    mlp_dim: int | None = None
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    norm_affine: bool = True
    fused_qkv: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    qk_norm: str | None = None
    qk_norm_eps: float = 1e-6
    attn_scale: float | None = None
    use_rope: bool = False
    rope_axes_dims: Sequence[int] | None = None
    rope_theta: float = 10000.0
    rope_interleaved: bool = True
    adaln: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    kernel_init: Initializer = default_kernel_init
    qkv_kernel_init: Initializer | None = None
    attention_implementation: str | None = None
    attention_chunk_size: int = QUERY_CHUNK_SIZE
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None = None, *,
                 mask: jax.Array | None = None, positions: jax.Array | None = None,
                 deterministic: bool = True, bias: jax.Array | None = None) -> jax.Array:
        features = x.shape[-1]
        norm = dict(epsilon=self.norm_eps, use_scale=self.norm_affine, use_bias=self.norm_affine,
                    dtype=self.dtype, param_dtype=self.param_dtype)
        attn = MultiHeadAttention(
            num_heads=self.num_heads, head_dim=self.head_dim, fused_qkv=self.fused_qkv,
            qkv_bias=self.qkv_bias, out_bias=self.out_bias, qk_norm=self.qk_norm,
            qk_norm_eps=self.qk_norm_eps, scale=self.attn_scale, use_rope=self.use_rope,
            rope_axes_dims=self.rope_axes_dims, rope_theta=self.rope_theta,
            rope_interleaved=self.rope_interleaved, dropout_rate=self.attention_dropout_rate,
            kernel_init=self.kernel_init, qkv_kernel_init=self.qkv_kernel_init,
            implementation=self.attention_implementation,
            query_chunk_size=self.attention_chunk_size, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, name="attn")
        mlp = MLP(hidden_dim=self.mlp_dim or int(self.mlp_ratio * features),
                  activation=self.activation, use_bias=self.mlp_bias,
                  kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                  precision=self.precision, name="mlp")
        drop = Dropout(self.dropout_rate)

        if self.adaln:
            if cond is None:
                raise ValueError("adaln=True needs `cond`")
            s1, c1, g1, s2, c2, g2 = AdaLNModulation(
                6, features, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, name="adaln")(cond)
        elif cond is not None:
            raise ValueError("`cond` given but adaln=False")

        x = constrain(x, BTD)
        h = make_norm(self.norm_type, name="ln_1", **norm)(x)
        if self.adaln:
            h = modulate(h, s1, c1)
        h = attn(h, mask=mask, positions=positions, deterministic=deterministic, bias=bias)
        h = drop(h, deterministic=deterministic)
        x = constrain(x + (gate(h, g1) if self.adaln else h), BTD)

        h = make_norm(self.norm_type, name="ln_2", **norm)(x)
        if self.adaln:
            h = modulate(h, s2, c2)
        h = mlp(h, deterministic=deterministic)
        h = drop(h, deterministic=deterministic)
        return constrain(x + (gate(h, g2) if self.adaln else h), BTD)
