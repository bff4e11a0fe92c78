"""A learnable spatial prior between TiTok's 1D latent tokens and the patch grid (``token_prior``).

Trained from scratch, a TiTok first finds the symmetric solution: every latent token reads the same
blurred average of the patches and every decoded patch reads the same average of the tokens, so the
tokens carry one global descriptor and the reconstruction is a flat colour. Breaking that symmetry
takes the official recipe hundreds of thousands of steps (or proxy codes); on a CPU budget it never
happens. The prior gives each latent token a *home* on the image and adds, in every attention layer
of encoder and decoder, a per-head bias between a latent token ``i`` and a patch ``j``::

    logits[h, i, j] += -s_h * |home_i - centre_j|^2        (and the same for patch -> token)

in units of the patch spacing (``s_h`` learnable, one per head and layer, initialised to
``token_prior``). At initialisation each token gathers its own region and each patch reads its
nearest tokens, so the code starts as a learned thumbnail and improves from there; the model may
learn any ``s_h`` (``0`` is the plain TiTok attention). Token-token, patch-patch and class-token
entries get no bias. Homes: the ``N`` tokens on an ``r x (N / r)`` grid of cell centres (``r`` the
largest divisor of ``N`` at most ``sqrt(N)``), token ``i`` in row-major order.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.nn import boxed


def token_homes(num_tokens: int) -> np.ndarray:
    """``[N, 2]`` (row, col) homes in [0, 1] of the image: cell centres of an ``r x N/r`` grid."""
    r = max(d for d in range(1, int(math.isqrt(num_tokens)) + 1) if num_tokens % d == 0)
    c = num_tokens // r
    i = np.arange(num_tokens)
    return np.stack([(i // c + 0.5) / r, (i % c + 0.5) / c], axis=1)


def prior_distances(num_tokens: int, grid: int, num_prefix: int = 1) -> np.ndarray:
    """``[T, T]`` float32 for the sequence ``[prefix (num_prefix), patches (grid^2, row-major),
    tokens (num_tokens)]``: squared token-patch distances in patch units in the token-patch and
    patch-token blocks, 0 elsewhere."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    centres = np.stack([rows.ravel() + 0.5, cols.ravel() + 0.5], axis=1)     # patch units
    homes = token_homes(num_tokens) * grid
    d2 = ((homes[:, None, :] - centres[None, :, :]) ** 2).sum(-1)           # [N, P]
    p, t = grid * grid, num_prefix + grid * grid + num_tokens
    out = np.zeros((t, t), np.float32)
    out[num_prefix + p:, num_prefix:num_prefix + p] = d2
    out[num_prefix:num_prefix + p, num_prefix + p:] = d2.T
    return out


def kept_distances(distances: np.ndarray, keep: jax.Array, num_tokens: int,
                   num_prefix: int = 1) -> jax.Array:
    """``prior_distances`` of the sequence ``[prefix, patches keep[b], tokens]`` (MAE input
    masking: only the patches ``keep [B, n]`` are in it): ``[B, T', T']``, ``T' = prefix + n +
    num_tokens``, each row and column that of its patch or token in the full table."""
    d = jnp.asarray(distances)
    p = d.shape[0] - num_prefix - num_tokens
    b = keep.shape[0]
    idx = jnp.concatenate([jnp.broadcast_to(jnp.arange(num_prefix), (b, num_prefix)),
                           num_prefix + keep.astype(jnp.int32),
                           jnp.broadcast_to(num_prefix + p + jnp.arange(num_tokens), (b, num_tokens))], 1)
    return jax.vmap(lambda i: d[i][:, i])(idx)


class TokenPriorBias(nn.Module):
    """``[1, H, T, T]`` additive attention logits ``-s_h * distances`` (``s`` param ``[H]``);
    ``[B, H, T, T]`` for per-example ``distances [B, T, T]`` (``kept_distances``)."""

    num_heads: int
    init_scale: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, distances: np.ndarray) -> jax.Array:
        s = self.param("scale", boxed(nn.initializers.constant(self.init_scale), ("heads",)),
                       (self.num_heads,), self.param_dtype)
        d = jnp.asarray(distances)
        d = d[None, None] if d.ndim == 2 else d[:, None]
        return -s.astype(jnp.float32)[None, :, None, None] * d
