"""Position and timestep embeddings: learned tables, sin-cos (1D/2D), RoPE (1D and multi-axis),
and the DiT timestep embedder.

Conventions (all tables are float32; cast at the use site):
- ``sincos_1d``  (MAE): ``omega_i = max_period**(-i/(D/2))``, ``i = 0..D/2-1``;
  ``emb[p] = [sin(p*omega), cos(p*omega)]`` -- **sin first**.
- ``sincos_2d`` (MAE/DiT ``get_2d_sincos_pos_embed``): tokens row-major (token ``r*W + c``);
  the **first half** of the channels is ``sincos_1d`` of the **column (w)** index, the **second
  half** of the **row (h)** index (MAE builds ``meshgrid(w, h)`` and calls the first grid "h").
  ``row_first=True`` swaps the halves: ``[sin r, cos r, sin c, cos c]``, the table of the official
  FlexTok (apple/ml-flextok ``model/utils/posembs.py`` ``build_2d_sincos_posemb`` on its square
  grids; vectors in ``tests/data/flextok/posemb_vectors.npz``). Same frequencies either way.
- ``timestep_embedding`` (DiT/Flux): ``freqs_i = exp(-log(max_period) * i / (D/2))``,
  ``emb = [cos(s*t*freqs), sin(s*t*freqs)]`` -- **cos first**; ``s = time_scale`` (FlowMo feeds
  ``1000*t`` for ``t`` in [0, 1]); a zero column is appended when ``D`` is odd.
- RoPE: per axis ``a`` with ``d_a`` rotated channels, ``theta_{a,j} = p_a * base**(-2j/d_a)``,
  ``j = 0..d_a/2-1``; the per-axis angle lists are concatenated (axis 0 first), as in Flux's
  ``EmbedND`` (FlowMo: axes (t, h, w), dims ``[8, 28, 28] * width/4``). Channel pairs are adjacent
  ``(x[2i], x[2i+1])`` when ``interleaved`` (Flux / GPT-J) or ``(x[i], x[i + R])`` otherwise
  (rotate-half, GPT-NeoX / HF Llama); ``R = sum(d_a)/2``. A pair rotates by ``+theta``:
  ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)``, so ``<rope(q, m), rope(k, n)>`` depends only
  on ``m - n``. Channels beyond ``2R`` pass through unrotated.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.nn.activation_sharding import constrain
from titok_jax.nn.initializers import Initializer, boxed, width_scaled_normal

# --------------------------------------------------------------------------- learned


class LearnedPositionEmbedding(nn.Module):
    """A learned absolute table ``embedding [num_tokens, features]`` added to ``x [..., T, D]``.

    ``x + embedding[:T]`` (T <= num_tokens; TiTok's decoder reads
    ``latent_token_positional_embedding[:N]``).
    The default init is TiTok's ``features**-0.5 * N(0, 1)``; the param shape equals the official
    checkpoints' ``positional_embedding [g*g+1, W]`` / ``latent_token_positional_embedding [N, W]``.
    """

    num_tokens: int
    features: int
    embedding_init: Initializer | None = None
    param_dtype: Any = jnp.float32
    dtype: Any = None

    def setup(self) -> None:
        init = self.embedding_init or width_scaled_normal(self.features)
        self.embedding = self.param("embedding", boxed(init, ("tokens", "embed")),
                                    (self.num_tokens, self.features), self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.shape[-2]
        if t > self.num_tokens:
            raise ValueError(f"sequence of {t} tokens but only {self.num_tokens} positions")
        dtype = self.dtype or x.dtype
        return x.astype(dtype) + jnp.asarray(self.embedding[:t], dtype)


# --------------------------------------------------------------------------- sin-cos


def sincos_1d(positions: int | jax.Array | np.ndarray, dim: int,
              max_period: float = 10000.0) -> jax.Array:
    """MAE 1D sin-cos table ``[..., dim]`` = ``[sin(p*omega), cos(p*omega)]`` (sin first).

    ``positions`` is an int ``T`` (meaning ``arange(T)``) or an array of (float) positions.
    """
    if dim % 2:
        raise ValueError(f"sincos_1d needs an even dim, got {dim}")
    pos = jnp.arange(positions) if isinstance(positions, int) else jnp.asarray(positions)
    pos = pos.astype(jnp.float32)
    omega = 1.0 / max_period ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
    out = pos[..., None] * omega
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)


def sincos_2d(grid_h: int, grid_w: int, dim: int, max_period: float = 10000.0, *,
              row_first: bool = False) -> jax.Array:
    """2D sin-cos table ``[grid_h*grid_w, dim]``, tokens row-major.

    ``row_first=False`` (MAE/DiT):
    ``emb[r*grid_w + c] = [sincos_1d(c, dim/2), sincos_1d(r, dim/2)]``, column (w) half first.
    ``row_first=True`` (official FlexTok): ``[sincos_1d(r, dim/2), sincos_1d(c, dim/2)]``, row (h)
    half first.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
    emb_w = sincos_1d(cols.reshape(-1), dim // 2, max_period)
    emb_h = sincos_1d(rows.reshape(-1), dim // 2, max_period)
    halves = [emb_h, emb_w] if row_first else [emb_w, emb_h]
    return jnp.concatenate(halves, axis=-1)


# --------------------------------------------------------------------------- RoPE


def rope_angles(positions: jax.Array, axes_dims: Sequence[int],
                theta: float = 10000.0) -> jax.Array:
    """Rotation angles ``[..., T, sum(axes_dims)/2]`` (float32).

    ``positions``: ``[..., T]`` when ``len(axes_dims) == 1``, else ``[..., T, len(axes_dims)]``
    (e.g. FlowMo's ids (t, row, col)). Axis ``a`` contributes ``p_a * theta**(-2j/d_a)``.
    """
    axes_dims = tuple(int(d) for d in axes_dims)
    if any(d % 2 for d in axes_dims):
        raise ValueError(f"every RoPE axis dim must be even, got {axes_dims}")
    pos = jnp.asarray(positions, jnp.float32)
    if len(axes_dims) == 1:
        pos = pos[..., None]
    if pos.shape[-1] != len(axes_dims):
        raise ValueError(f"positions' last axis {pos.shape[-1]} != number of axes {len(axes_dims)}")
    parts = []
    for a, d in enumerate(axes_dims):
        omega = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
        parts.append(pos[..., a, None] * omega)
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array, interleaved: bool = True) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by ``angles [B or 1, T, R]`` (or ``[T, R]``), ``2R <= D``.

    The maths is done in float32 and the result cast back to ``x.dtype``.
    """
    r = angles.shape[-1]
    d = x.shape[-1]
    if 2 * r > d:
        raise ValueError(f"RoPE rotates {2 * r} channels but heads have only {d}")
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[..., None, :]   # [B, T, 1, R], broadcast over heads
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :2 * r], xf[..., 2 * r:]
    if interleaved:
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
    else:
        x0, x1 = rot[..., :r], rot[..., r:]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    if interleaved:
        y = jnp.stack([y0, y1], axis=-1).reshape(rot.shape)
    else:
        y = jnp.concatenate([y0, y1], axis=-1)
    return jnp.concatenate([y, rest], axis=-1).astype(x.dtype)


def grid_positions(grid_h: int, grid_w: int, t: float = 0.0) -> jax.Array:
    """3-axis ids ``[grid_h*grid_w, 3]`` = ``(t, row, col)`` row-major (FlowMo's image-token ids).

    FlowMo gives latent token ``i`` the ids ``(i, i, i)``:
    ``jnp.repeat(jnp.arange(n)[:, None], 3, 1)``.
    """
    rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
    tt = jnp.full((grid_h * grid_w,), t, jnp.float32)
    return jnp.stack([tt, rows.reshape(-1).astype(jnp.float32),
                      cols.reshape(-1).astype(jnp.float32)], axis=-1)


# --------------------------------------------------------------------------- timesteps


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       time_scale: float = 1.0) -> jax.Array:
    """DiT sinusoidal embedding ``[..., dim]`` of float ``t``: ``[cos(a), sin(a)]`` (cos first),
    ``a_i = time_scale * t * exp(-log(max_period) * i / half)``, ``half = dim // 2``."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = time_scale * jnp.asarray(t, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """DiT ``TimestepEmbedder``: ``Dense(features) . SiLU . Dense(features) . timestep_embedding``.

    ``t [B]`` (float) -> ``[B, features]``. Kernels are ``N(0, 0.02)`` as in DiT, biases zero.
    """

    features: int
    frequency_dim: int = 256
    max_period: float = 10000.0
    time_scale: float = 1.0
    kernel_init: Initializer = nn.initializers.normal(stddev=0.02)
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        emb = timestep_embedding(t, self.frequency_dim, self.max_period, self.time_scale)
        zeros = nn.initializers.zeros_init()
        h = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=boxed(self.kernel_init, (None, "mlp")),
                     bias_init=boxed(zeros, ("mlp",)), name="fc_in")(emb)
        h = constrain(nn.silu(h), ("batch", "act_mlp"))  # features whole (no all-to-all)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=boxed(self.kernel_init, ("mlp", "embed")),
                        bias_init=boxed(zeros, ("embed",)), name="fc_out")(h)
