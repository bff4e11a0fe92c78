"""MaskGIT training: mask-ratio schedules, the random training mask, class dropout and the loss.

Schedules map ``t`` in [0, 1] to the fraction of masked tokens ``gamma(t)`` (1 at ``t = 0``, 0 at
``t = 1``)::

    arccos:  gamma(t) = arccos(t) / (pi/2)      (TiTok, MUSE; the official default)
    cosine:  gamma(t) = cos(pi/2 * t)           (MaskGIT)
    linear:  gamma(t) = 1 - t

Training mask (TiTok ``ImageBert.masking_input_tokens``), per sample ``b`` of ``N`` tokens::

    t_b ~ U[0, 1),   n_b = max(1, round(N * clip(gamma(t_b), 1e-6, 1)))      (round half to even)
    mask_b = n_b positions drawn uniformly without replacement (True = masked)

Loss (TiTok ``MLMLoss``): label-smoothed cross-entropy on **every** position, weighted 1 where the
input was masked and ``unmasked_weight`` (0.1 official) elsewhere::

    l_{b,n} = (1 - eps) * (-log p(y_{b,n})) + eps * mean_k(-log p(k))     (PyTorch label smoothing)
    w_{b,n} = mask_{b,n} + unmasked_weight * (1 - mask_{b,n})
    loss    = sum(w * l) / (sum(w) + 1e-8)

Class dropout: each label is replaced by the null class (label ``num_classes``) with probability ``p``
(0.1 official); the model maps label ``c`` to vocabulary id ``codebook_size + 1 + c``.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.Array | np.ndarray | float

SCHEDULES = ("arccos", "cosine", "linear")


def _arccos(t, xp):
    return xp.arccos(t) / (math.pi / 2)


def _cosine(t, xp):
    return xp.cos(math.pi / 2 * t)


def _linear(t, xp):
    return 1.0 - t


_SCHEDULE_FNS: dict[str, Callable] = {"arccos": _arccos, "cosine": _cosine, "linear": _linear}


def _check_schedule(schedule: str) -> Callable:
    if schedule not in _SCHEDULE_FNS:
        raise ValueError(f"unknown mask schedule {schedule!r}; expected one of {SCHEDULES}")
    return _SCHEDULE_FNS[schedule]


def mask_ratio(t: ArrayLike, schedule: str = "arccos") -> jax.Array:
    """``gamma(t)``: the fraction of masked tokens at ``t`` in [0, 1] (float32, jnp)."""
    fn = _check_schedule(schedule)
    return fn(jnp.asarray(t, jnp.float32), jnp)


def mask_ratio_np(t: ArrayLike, schedule: str = "arccos") -> np.ndarray:
    """``gamma(t)`` in float64 numpy (the sampler's static per-step counts use this, like the
    official ``np.arccos``)."""
    fn = _check_schedule(schedule)
    return fn(np.asarray(t, np.float64), np)


def num_masked(t: jax.Array, num_tokens: int | jax.Array, schedule: str = "arccos") -> jax.Array:
    """Training count ``max(1, round(N * clip(gamma(t), 1e-6, 1)))`` per entry of ``t`` (int32)."""
    ratio = jnp.clip(mask_ratio(t, schedule), 1e-6, 1.0)
    return jnp.maximum(1, jnp.round(num_tokens * ratio)).astype(jnp.int32)


def random_mask(key: jax.Array, counts: jax.Array, num_tokens: int) -> jax.Array:
    """Boolean ``[B, N]`` with exactly ``counts[b]`` True entries per row at uniformly random
    positions: rank the positions by i.i.d. uniforms and mask the ``counts[b]`` lowest ranks."""
    counts = jnp.asarray(counts, jnp.int32)
    u = jax.random.uniform(key, (counts.shape[0], num_tokens))
    ranks = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    return ranks < counts[:, None]


def training_mask(key: jax.Array, batch: int, num_tokens: int, schedule: str = "arccos",
                  keep: jax.Array | None = None) -> jax.Array:
    """The official training mask ``[batch, N]`` (True = masked; see the module docstring).

    ``t_key, perm_key = jax.random.split(key)``; ``t = uniform(t_key, (batch,))``; the counts are
    ``num_masked(t, N, schedule)`` and the positions come from ``random_mask(perm_key, ...)``.

    ``keep`` (bool ``[batch, N]``, True = given: a video's first latent frame as the condition)
    draws each row's mask over its other ``N_b = N - sum(keep_b)`` positions only: count
    ``num_masked(t_b, N_b)`` (at most ``N_b``), positions uniform among them. ``keep=None`` is the
    official mask, bit for bit.
    """
    _check_schedule(schedule)
    if batch < 1 or num_tokens < 1:
        raise ValueError(f"training_mask needs batch >= 1 and num_tokens >= 1, got {batch}, "
                         f"{num_tokens}")
    t_key, perm_key = jax.random.split(key)
    t = jax.random.uniform(t_key, (batch,))
    if keep is None:
        return random_mask(perm_key, num_masked(t, num_tokens, schedule), num_tokens)
    keep = jnp.asarray(keep, bool)
    free = num_tokens - jnp.sum(keep, axis=-1).astype(jnp.int32)
    counts = jnp.minimum(num_masked(t, free, schedule), free)   # num_masked takes [B] counts too
    u = jnp.where(keep, 2.0, jax.random.uniform(perm_key, (batch, num_tokens)))  # kept rank last
    ranks = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    return ranks < counts[:, None]


def apply_mask(tokens: jax.Array, mask: jax.Array, mask_id: int) -> jax.Array:
    """``where(mask, mask_id, tokens)``: the model input for a training mask."""
    return jnp.where(mask, jnp.asarray(mask_id, tokens.dtype), tokens)


def drop_classes(key: jax.Array, labels: jax.Array, p: float, num_classes: int) -> jax.Array:
    """Replace each label by the null class ``num_classes`` with probability ``p``.

    Labels that are negative (unknown, e.g. a folder without class sub-folders) also become the
    null class, so the model is then trained unconditionally on them.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"class dropout probability must be in [0, 1], got {p}")
    labels = jnp.asarray(labels, jnp.int32)
    drop = jax.random.bernoulli(key, p, labels.shape) | (labels < 0)
    return jnp.where(drop, num_classes, labels)


def maskgit_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                 label_smoothing: float = 0.1, unmasked_weight: float = 0.1
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted, label-smoothed cross-entropy of the module docstring.

    Args:
      logits: ``[B, N, K]`` over the image codes (any float dtype; computed in float32).
      targets: int ``[B, N]`` in ``[0, K)``: the unmasked token ids.
      mask: bool ``[B, N]``, True where the input was masked.
    Returns:
      ``(loss, metrics)``; ``metrics["masked_accuracy"]`` is the batch mean of each sample's
      argmax accuracy on its masked positions (the official ``correct_tokens``).
    """
    if logits.ndim != 3 or logits.shape[:2] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"maskgit_loss needs logits [B, N, K], targets and mask [B, N]; got "
                         f"{logits.shape}, {targets.shape}, {mask.shape}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    smooth = -jnp.mean(logp, axis=-1)
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    m = mask.astype(jnp.float32)
    w = m + unmasked_weight * (1.0 - m)
    loss = jnp.sum(w * per_token) / (jnp.sum(w) + 1e-8)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * m
    accuracy = jnp.mean(jnp.sum(correct, -1) / (jnp.sum(m, -1) + 1e-8))
    return loss, {"loss": loss, "masked_accuracy": accuracy}
