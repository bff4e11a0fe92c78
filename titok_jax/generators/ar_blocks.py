"""The AR generator's blocks (``generators/ar.py``): LlamaGen-style fused-qkv causal attention
with an optional KV cache and 1D / 2D RoPE, and the pre-norm block around it.

KV cache: per layer ``{"k", "v"}`` of shape ``[B, L, H, d]``, written with
``lax.dynamic_update_slice`` at the running position; queries at positions ``index .. index + T - 1``
attend to cache slots ``j <=`` their own position. 2D RoPE (``rope_grid = w > 0``): position ``p``
rotates by the grid cell ``(p // w, p mod w)``, rows on the first half of a head's rotated pairs and
columns on the second (LlamaGen's split), adjacent pairs, base ``rope_theta``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn import (MLP, Dropout, HeadsDense, HeadsOutDense, apply_rope, dot_product_attention,
                          make_norm, rope_angles)
from titok_jax.nn.activation_sharding import BTD, constrain
from titok_jax.nn.attention import module_path, split_heads

Dtype = Any
init_normal = nn.initializers.normal(stddev=0.02)


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width: ``int(2 * 4 * width / 3)`` rounded up to a multiple of
    ``multiple_of``."""
    h = int(2 * 4 * width / 3)
    return multiple_of * -(-h // multiple_of)


class CausalSelfAttention(nn.Module):
    """Fused-qkv causal self-attention with an optional KV cache (module docstring).

    ``x [B, T, D]``, ``positions [T]`` int (absolute positions of the T queries) ->
    ``([B, T, D], new layer cache or None)``.
    """

    num_heads: int
    use_rope: bool = True
    rope_theta: float = 10000.0
    qk_norm: str | None = None
    use_bias: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    rope_grid: int = 0   # > 0: 2D RoPE, position p at cell (p // rope_grid, p mod rope_grid)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
                 index: jax.Array | int = 0, deterministic: bool = True
                 ) -> tuple[jax.Array, dict | None]:
        width = x.shape[-1]
        head_dim = split_heads(width, self.num_heads, module_path(self))
        qkv = HeadsDense(self.num_heads, head_dim, lead=(3,), use_bias=self.use_bias,
                         kernel_init=init_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="qkv")(x)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if self.qk_norm is not None:
            norm = dict(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)
            q = make_norm(self.qk_norm, name="q_norm", **norm)(q)
            k = make_norm(self.qk_norm, name="k_norm", **norm)(k)
        if self.use_rope and self.rope_grid > 0:   # half the pairs rows, half columns (LlamaGen)
            cells = jnp.stack([positions // self.rope_grid, positions % self.rope_grid], axis=-1)
            angles = rope_angles(cells[None], (head_dim // 2, head_dim // 2), self.rope_theta)
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        elif self.use_rope:
            angles = rope_angles(positions[None], (head_dim,), self.rope_theta)
            q, k = apply_rope(q, angles), apply_rope(k, angles)  # adjacent pairs, as LlamaGen
        if cache is None:
            key_pos, new_cache = positions, None
        else:
            start = (0, jnp.asarray(index, jnp.int32), 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            key_pos, new_cache = jnp.arange(k.shape[1]), {"k": k, "v": v}
        mask = (key_pos[None, :] <= positions[:, None])[None, None]
        rng = self.make_rng("dropout") if self.dropout_rate > 0 and not deterministic else None
        y = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                  dropout_rate=self.dropout_rate, dropout_rng=rng)
        out = HeadsOutDense(width, use_bias=self.use_bias, kernel_init=init_normal,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="out")(y)
        return out, new_cache


class ARBlock(nn.Module):
    """Pre-norm block ``x + attn(norm_1 x)``, ``x + mlp(norm_2 x)`` with residual dropout;
    returns ``(x, new layer cache or None)``. Positional arguments so ``nn.remat`` can mark
    ``deterministic`` static."""

    num_heads: int
    mlp_dim: int
    activation: str = "swiglu"
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-5
    use_bias: bool = False
    use_rope: bool = True
    rope_theta: float = 10000.0
    qk_norm: str | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    rope_grid: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
                 index: jax.Array | int = 0, deterministic: bool = True
                 ) -> tuple[jax.Array, dict | None]:
        norm = dict(epsilon=self.norm_eps, use_bias=self.use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype)
        drop = Dropout(self.dropout)
        x = constrain(x, BTD)   # batch-sharded activations: FSDP gathers weights, not activations
        h, new_cache = CausalSelfAttention(
            self.num_heads, self.use_rope, self.rope_theta, self.qk_norm, self.use_bias,
            self.attention_dropout, dtype=self.dtype, param_dtype=self.param_dtype,
            rope_grid=self.rope_grid, name="attn")(
            make_norm(self.norm_type, name="norm_1", **norm)(x), positions, cache, index,
            deterministic)
        x = constrain(x + drop(h, deterministic=deterministic), BTD)
        h = MLP(self.mlp_dim, activation=self.activation, use_bias=self.use_bias,
                kernel_init=init_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                name="mlp")(make_norm(self.norm_type, name="norm_2", **norm)(x))
        return constrain(x + drop(h, deterministic=deterministic), BTD), new_cache
