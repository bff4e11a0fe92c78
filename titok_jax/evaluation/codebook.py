"""Codebook statistics over a held-out set: counts accumulated batch by batch, then usage, entropy
and perplexity. Pure ``jax.numpy`` functions on a counts array (jit-able), plus a small host-side
``CodebookCounter`` that wraps them.

Counts are int32 (exact up to 2**31 - 1 assignments per code; float32 would stop counting at
2**24). Two layouts:

- ``[K]``: one codebook; every entry of ``indices`` (any shape) is one assignment.
- ``[F, K]``: ``F`` codebooks (factorized / multi-level quantizers whose ``indices`` carry a
  trailing axis of ``F`` entries, one per sub-codebook); row ``f`` counts ``indices[..., f]``.
  Sub-codebooks of different sizes share ``K = max size``; pass their sizes to ``codebook_usage``.

Indices outside ``[0, K)`` (e.g. ``-1`` for a dropped level) are not counted.

Definitions (per codebook row, ``n_k`` = count of code ``k``, ``p_k = n_k / sum_j n_j``)::

    usage      = #{k : n_k > 0} / K                     fraction of codes used at least once
    entropy    = -sum_k p_k log_b p_k                    (0 log 0 = 0); b = 2 (bits) by default
    perplexity = b ** entropy = exp(entropy in nats)     1 = one code used, K = uniform use

These are the official TiTok evaluator's ``CodebookUsage`` (distinct codes seen over the whole
evaluation set / K) and ``CodebookEntropy`` (in **bits**, over the accumulated frequencies).
The official code evaluates ``-sum p log2(p + 1e-8)``; ``eps=1e-8`` reproduces that exactly, the
default ``eps=0`` is the exact entropy (they differ by at most ``used_codes * 1.5e-8`` bits).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["init_counts", "update_counts", "codebook_usage", "codebook_entropy",
           "codebook_perplexity", "codebook_metrics", "CodebookCounter"]


def init_counts(codebook_size: int | Sequence[int]) -> jax.Array:
    """Zero int32 counts: ``[K]`` for an int, ``[F, max(sizes)]`` for one size per codebook."""
    if isinstance(codebook_size, (int, np.integer)):
        return jnp.zeros((int(codebook_size),), jnp.int32)
    sizes = [int(k) for k in codebook_size]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"codebook sizes must be positive, got {codebook_size}")
    return jnp.zeros((len(sizes), max(sizes)), jnp.int32)


@jax.jit
def update_counts(counts: jax.Array, indices: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``counts`` plus the assignments in ``indices``.

    ``counts [K]``: all of ``indices`` is counted. ``counts [F, K]``: ``indices[..., F]``, row ``f``
    counts ``indices[..., f]``. ``mask`` (bool or 0/1, shape = a prefix of ``indices.shape``, e.g.
    ``[B]``) excludes padded examples. Out-of-range indices are ignored.
    """
    counts = jnp.asarray(counts)
    indices = jnp.asarray(indices).astype(jnp.int32)
    k = counts.shape[-1]
    if counts.ndim == 1:
        idx = indices
    elif counts.ndim == 2:
        f = counts.shape[0]
        if indices.ndim == 0 or indices.shape[-1] != f:
            raise ValueError(f"counts {counts.shape} need indices with a trailing axis of {f}, "
                             f"got {indices.shape}")
        idx = indices
    else:
        raise ValueError(f"counts must be [K] or [F, K], got {counts.shape}")

    valid = (idx >= 0) & (idx < k)
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
        if mask.shape != idx.shape[:mask.ndim]:
            raise ValueError(f"mask {mask.shape} must be a prefix of indices {idx.shape}")
        valid = valid & mask.reshape(mask.shape + (1,) * (idx.ndim - mask.ndim))
    ones = valid.astype(jnp.int32).reshape(-1)
    safe = jnp.where(valid, idx, 0)
    if counts.ndim == 1:
        return counts.at[safe.reshape(-1)].add(ones)
    rows = jnp.broadcast_to(jnp.arange(counts.shape[0], dtype=jnp.int32), idx.shape)
    return counts.at[rows.reshape(-1), safe.reshape(-1)].add(ones)


def _sizes(counts: jax.Array, codebook_size: int | Sequence[int] | None) -> jax.Array:
    if codebook_size is None:
        return jnp.float32(counts.shape[-1])
    sizes = jnp.asarray(codebook_size, jnp.float32)
    if sizes.ndim and sizes.shape != counts.shape[:-1]:
        raise ValueError(f"codebook_size {tuple(sizes.shape)} does not match counts {counts.shape}")
    return sizes


def codebook_usage(counts: jax.Array, codebook_size: int | Sequence[int] | None = None) -> jax.Array:
    """Fraction of codes used at least once, float32 of shape ``counts.shape[:-1]``.
    ``codebook_size`` (int or one per row) defaults to ``counts.shape[-1]``."""
    counts = jnp.asarray(counts)
    return _usage(counts, _sizes(counts, codebook_size))


@jax.jit
def _usage(counts: jax.Array, sizes: jax.Array) -> jax.Array:
    return jnp.sum(counts > 0, axis=-1).astype(jnp.float32) / sizes


def codebook_entropy(counts: jax.Array, base: float = 2.0, eps: float = 0.0) -> jax.Array:
    """Entropy of the empirical code distribution ``-sum p log_base(p + eps)``, float32 of shape
    ``counts.shape[:-1]``; bits by default (``base=math.e`` for nats). 0 when nothing was counted."""
    return _entropy_nats(jnp.asarray(counts), float(eps)) / np.float32(np.log(base))


@functools.partial(jax.jit, static_argnums=1)
def _entropy_nats(counts: jax.Array, eps: float) -> jax.Array:
    c = counts.astype(jnp.float32)
    total = jnp.sum(c, axis=-1, keepdims=True)
    p = c / jnp.maximum(total, 1.0)
    arg = jnp.where(p > 0, p + eps, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(arg), 0.0), axis=-1)


def codebook_perplexity(counts: jax.Array) -> jax.Array:
    """``exp(entropy in nats)``: the effective number of codes (1 to K)."""
    return jnp.exp(_entropy_nats(jnp.asarray(counts), 0.0))


def codebook_metrics(counts: jax.Array, codebook_size: int | Sequence[int] | None = None,
                     prefix: str = "codebook_") -> dict[str, float]:
    """Python floats for logging: ``{prefix}usage``, ``{prefix}entropy`` (bits),
    ``{prefix}perplexity``. With ``[F, K]`` counts the plain keys are the mean over the ``F``
    codebooks and ``{prefix}usage_{f}`` etc. are added for each codebook."""
    counts = jnp.asarray(counts)
    stats = {
        "usage": np.asarray(codebook_usage(counts, codebook_size)),
        "entropy": np.asarray(codebook_entropy(counts)),
        "perplexity": np.asarray(codebook_perplexity(counts)),
    }
    out: dict[str, float] = {}
    for name, value in stats.items():
        out[f"{prefix}{name}"] = float(np.mean(value))
        if value.ndim:
            for f, v in enumerate(value):
                out[f"{prefix}{name}_{f}"] = float(v)
    return out


class CodebookCounter:
    """Host-side accumulator: ``c = CodebookCounter(K); c.update(indices, mask); c.result()``.

    ``codebook_size`` is an int (counts ``[K]``) or one size per sub-codebook (counts ``[F, K]``).
    """

    def __init__(self, codebook_size: int | Sequence[int]):
        self.codebook_size = codebook_size
        self.reset()

    def reset(self) -> None:
        self.counts = init_counts(self.codebook_size)
        self.num_updates = 0

    def update(self, indices: jax.Array, mask: jax.Array | None = None) -> None:
        self.counts = update_counts(self.counts, indices, mask)
        self.num_updates += 1

    def result(self, prefix: str = "codebook_") -> dict[str, float]:
        return codebook_metrics(self.counts, self.codebook_size, prefix=prefix)
