"""The extractor's masks, as pure functions of a key (the task draws them; the model only reads them).

With ``P = (S / p)^2`` patches of an image (row-major) and ``N`` latent tokens:

- **Encoder input masking (MAE)**: a ratio ``r`` from a set (probabilities ``pi``) removes
  ``round(r P)`` patches before the encoder; the rest, ``n = P - round(r P)`` (:func:`keep_counts`),
  are gathered out with their position embeddings. ``n`` is a static shape, so ONE ratio is drawn
  per step (:func:`choose_bucket`, ``i ~ Categorical(pi)``) and the step runs the branch of bucket
  ``i`` (``lax.switch`` over one branch per ratio, each with its own static ``n``): the encoder's
  cost falls with ``r``. Which patches stay is per example: ``keep[b]`` = the ``n`` smallest of
  ``P`` uniform draws, sorted (:func:`random_keep_indices`).
- **Nested dropout** on the latent tokens: FlexTok's ``keep_lengths`` (``uniform`` | ``pow2`` |
  ``uniform_pow2`` | ``none``; ``models.flextok_blocks``) per example; slots ``>= k`` are replaced
  by the model's learned ``dropped_code`` before the decoder, as a prefix decode pads them.
- **Decoder masking (MaskGIT-style)**: per example a ratio ``m`` from a set (probabilities
  ``rho``); ``v = P - round(m P)`` patches are visible (their patch embedding sits in the
  decoder's grid slot), the other ``round(m P)`` hold the mask token (:func:`decoder_visible`).
  ``m = 1`` is TiTok's decoder. :func:`pixel_weights` turns the masked patches into a per-pixel
  weight for a loss over masked positions only.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_ratios(ratios: Sequence[float], probs: Sequence[float] | None, what: str
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(ratios, probabilities)`` as tuples of floats: ratios in [0, 1], probabilities >= 0 of the
    same length summing to 1 (None: uniform). One-line ``ValueError`` otherwise."""
    ratios = tuple(float(r) for r in ratios)
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"{what} ratios must be a non-empty list of values in [0, 1], got {list(ratios)}")
    probs = tuple(1.0 / len(ratios) for _ in ratios) if probs is None or len(probs) == 0 else \
        tuple(float(p) for p in probs)
    if len(probs) != len(ratios) or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{what} probabilities {list(probs)} must be {len(ratios)} non-negative "
                         f"numbers summing to 1 (one per ratio {list(ratios)})")
    return ratios, probs


def masked_count(ratio: float, num_patches: int) -> int:
    """Patches a ratio masks: ``round(ratio * P)`` (a Python int: a static shape)."""
    return int(round(float(ratio) * num_patches))


def keep_counts(ratios: Sequence[float], num_patches: int) -> tuple[int, ...]:
    """The static encoder sequence length of each ratio bucket: ``P - round(r P)`` kept patches."""
    return tuple(num_patches - masked_count(r, num_patches) for r in ratios)


def choose_bucket(key: jax.Array, probs: Sequence[float]) -> jax.Array:
    """One bucket index int32 ``[]`` drawn from ``Categorical(probs)`` (the same on every device:
    the step's key is replicated)."""
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    return jax.random.categorical(key, logits).astype(jnp.int32)


def random_keep_indices(key: jax.Array, batch: int, num_patches: int, num_keep: int) -> jax.Array:
    """int32 ``[batch, num_keep]``: per example, ``num_keep`` distinct patch indices in ascending
    order, uniformly among the subsets of that size."""
    u = jax.random.uniform(key, (batch, num_patches))
    return jnp.sort(jnp.argsort(u, axis=1)[:, :num_keep], axis=1).astype(jnp.int32)


def decoder_visible(key: jax.Array, batch: int, num_patches: int, ratios: Sequence[float],
                    probs: Sequence[float]) -> tuple[jax.Array, jax.Array]:
    """``(visible bool [batch, P], ratio float32 [batch])``: per example a masking ratio ``m`` drawn
    from ``ratios`` with ``probs``, then exactly ``P - round(m P)`` patches visible, uniformly
    among the subsets of that size."""
    k_ratio, k_perm = jax.random.split(key)
    choice = jax.random.categorical(k_ratio, jnp.log(jnp.asarray(probs, jnp.float32)), shape=(batch,))
    counts = jnp.asarray([num_patches - masked_count(r, num_patches) for r in ratios], jnp.int32)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k_perm, (batch, num_patches)), axis=1), axis=1)
    visible = ranks < counts[choice][:, None]
    return visible, jnp.asarray(ratios, jnp.float32)[choice]


def pixel_weights(masked: jax.Array, patch_size: int, image_size: int) -> jax.Array:
    """Per-patch weights ``[B, P]`` (row-major) -> per-pixel ``[B, S, S, 1]`` float32."""
    b = masked.shape[0]
    g = image_size // patch_size
    w = masked.astype(jnp.float32).reshape(b, g, 1, g, 1)
    w = jnp.broadcast_to(w, (b, g, patch_size, g, patch_size))
    return w.reshape(b, image_size, image_size, 1)


def visible_mask_array(mask: np.ndarray | jax.Array, batch: int, grid: int) -> jax.Array:
    """A user's visible-patch mask as bool ``[B, grid^2]``: accepts ``[B, grid, grid]`` or
    ``[B, grid^2]`` (row-major). One-line ``ValueError`` for another shape."""
    m = jnp.asarray(mask)
    if m.shape == (batch, grid, grid):
        m = m.reshape(batch, grid * grid)
    if m.shape != (batch, grid * grid):
        raise ValueError(f"visible_mask must be bool [B, {grid}, {grid}] or [B, {grid * grid}] "
                         f"(one entry per patch), got {tuple(m.shape)}")
    return m.astype(bool)
