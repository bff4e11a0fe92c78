"""What every quantizer shares: the output record, the exact straight-through estimator, f32 maths
helpers, collective-aware reductions and the codebook-usage statistics.

Conventions (see ``shared/API.md``):
- a quantizer is a ``flax.linen.Module`` called as ``q(z, train=...)`` and returning
  ``(z_q, QuantizerOutput)``; ``q.indices_to_codes(indices)`` inverts the lookup exactly in eval;
- mutable state (EMA statistics, usage counters, init flags) lives in the ``quantizer_stats``
  collection and changes only with ``train=True`` (and never during ``init``);
- randomness (dead-code candidates, dropout of levels) comes from the ``quantizer`` rng stream;
- distances, entropies and indices are computed in float32 at ``Precision.HIGHEST`` whatever the
  input dtype.

Under ``jax.jit`` with a batch sharded over devices every reduction here is already global. For code
that runs a quantizer inside ``shard_map`` (per-device views), pass ``axis_name`` so the same
reductions are summed over that mesh axis.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

STATS = "quantizer_stats"   # the variable collection holding quantizer state
RNG = "quantizer"           # the rng stream quantizers draw from in training
HIGHEST = lax.Precision.HIGHEST
# Histograms over more codes than this are not kept (an implicit 2^b LFQ codebook can be huge).
MAX_HISTOGRAM_CODES = 1 << 20


@flax.struct.dataclass
class QuantizerOutput:
    """What a quantizer returns beside ``z_q``.

    indices: int32, ``z.shape[:-1]`` (+ a trailing axis for factorized / residual quantizers).
    losses:  name -> scalar, already weighted; the caller sums them.
    metrics: name -> scalar, for logging (``perplexity`` and ``usage`` for every quantizer).
    aux:     name -> array, optional extra outputs for the caller (e.g. the per-factor codes of a
             factorized quantizer, for representation heads); empty for plain quantizers.
    """

    indices: jax.Array
    losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]
    aux: dict[str, jax.Array] = flax.struct.field(default_factory=dict)

    def total_loss(self) -> jax.Array:
        """Sum of the (already weighted) loss terms; 0.0 when there are none."""
        return sum(self.losses.values(), jnp.zeros((), jnp.float32))


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """``z_q + (z - sg(z))``: forward value is exactly ``z_q`` (``z - z == 0`` in IEEE arithmetic),
    gradient w.r.t. ``z`` is the identity. The common form ``z + sg(z_q - z)`` is off by rounding."""
    return z_q + (z - lax.stop_gradient(z))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """``x / max(||x||, eps)`` along ``axis``; zero vectors stay zero instead of becoming NaN."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(sq, eps * eps))


def matmul_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in float32 at HIGHEST precision (no TF32 / bf16 passes on GPU and TPU)."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=HIGHEST,
                      preferred_element_type=jnp.float32)


def global_sum(x: jax.Array, axis_name: str | Sequence[str] | None = None) -> jax.Array:
    """Sum over the mesh axis ``axis_name`` inside ``shard_map``; identity under plain ``jit``
    (where arrays are global and reductions already cover every device)."""
    return x if axis_name is None else lax.psum(x, axis_name)


def global_mean(x: jax.Array, axis: int | tuple[int, ...] | None = 0,
                axis_name: str | Sequence[str] | None = None) -> jax.Array:
    """Mean over ``axis`` of the global batch: local sums and counts are summed across devices."""
    total = global_sum(jnp.sum(x, axis=axis), axis_name)
    count = x.size if axis is None else _count(x.shape, axis)
    count = global_sum(jnp.asarray(count, jnp.float32), axis_name)
    return total / count


def _count(shape: tuple[int, ...], axis: int | tuple[int, ...]) -> int:
    axes = (axis,) if isinstance(axis, int) else axis
    n = 1
    for a in axes:
        n *= shape[a]
    return n


def entropy(probs: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy ``-sum p log p`` (nats) along ``axis``, with ``0 log 0 = 0``; float32."""
    p = probs.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def entropy_from_logits(logits: jax.Array, axis: int = -1) -> jax.Array:
    """Entropy of ``softmax(logits)`` computed from ``log_softmax`` (no eps, no NaN at p = 0)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=axis)
    return -jnp.sum(jnp.exp(logp) * logp, axis=axis)


def binary_entropy(p: jax.Array) -> jax.Array:
    """``H(p) = -p log p - (1-p) log(1-p)`` elementwise, float32, finite at 0 and 1."""
    p = p.astype(jnp.float32)
    return entropy(jnp.stack([p, 1.0 - p], axis=-1))


def binary_entropy_from_logits(x: jax.Array) -> jax.Array:
    """``H(sigmoid(x))`` computed stably from the logit: ``softplus(x) - x * sigmoid(x)``."""
    x = x.astype(jnp.float32)
    return jax.nn.softplus(x) - x * jax.nn.sigmoid(x)


def code_histogram(indices: jax.Array, codebook_size: int,
                   axis_name: str | Sequence[str] | None = None) -> jax.Array:
    """float32 counts ``[codebook_size]`` of each code over all of ``indices`` (global batch).
    Negative indices (dropped levels) are not counted."""
    flat = indices.reshape(-1).astype(jnp.int32)
    valid = flat >= 0
    counts = jnp.zeros((codebook_size,), jnp.float32).at[jnp.where(valid, flat, 0)].add(
        valid.astype(jnp.float32))
    return global_sum(counts, axis_name)


def usage_metrics(counts: jax.Array) -> dict[str, jax.Array]:
    """From code counts: ``perplexity = exp(H(counts / sum))`` (1 = one code, K = uniform) and
    ``usage`` = fraction of codes used at least once."""
    total = jnp.maximum(jnp.sum(counts), 1.0)
    return {
        "perplexity": jnp.exp(entropy(counts / total)),
        "usage": jnp.mean((counts > 0).astype(jnp.float32)),
    }


def batch_usage_metrics(indices: jax.Array, codebook_size: int,
                        axis_name: str | Sequence[str] | None = None) -> dict[str, jax.Array]:
    """``usage_metrics`` of the codes in ``indices`` (the current global batch)."""
    if codebook_size > MAX_HISTOGRAM_CODES:
        # Too many codes to histogram: report the number of distinct codes in the batch instead of
        # a fraction of the codebook. Sorting is global under jit.
        flat = jnp.sort(indices.reshape(-1))
        distinct = 1 + jnp.sum(flat[1:] != flat[:-1])
        return {"perplexity": jnp.float32(jnp.nan), "usage": distinct.astype(jnp.float32) / codebook_size}
    return usage_metrics(code_histogram(indices, codebook_size, axis_name))


class UsageTracker(nn.Module):
    """Cumulative code counts in ``quantizer_stats/code_counts`` (float32 ``[K]``), added to only
    with ``train=True``; returns ``cumulative_usage`` (fraction of codes ever selected since init).

    Used as a submodule by every quantizer whose codebook size allows a histogram."""

    codebook_size: int
    axis_name: Any = None

    @nn.compact
    def __call__(self, counts: jax.Array, train: bool) -> dict[str, jax.Array]:
        if not train and not self.is_initializing() and not self.has_variable(STATS, "code_counts"):
            return {}  # applied in eval with params only: nothing to report, nothing to update
        total = self.variable(STATS, "code_counts",
                              nn.with_logical_partitioning(jnp.zeros, ("codebook",)),
                              (self.codebook_size,), jnp.float32)
        if train and not self.is_initializing():
            total.value = total.value + counts
        return {"cumulative_usage": jnp.mean((total.value > 0).astype(jnp.float32))}


def quantizer_metrics(module: nn.Module, indices: jax.Array, codebook_size: int, train: bool,
                      axis_name: Any = None, track_usage: bool = True) -> dict[str, jax.Array]:
    """Perplexity and usage of this batch; with ``track_usage`` also the cumulative usage kept in
    ``quantizer_stats`` (call from inside a compact ``__call__``; creates a ``usage`` submodule)."""
    if codebook_size > MAX_HISTOGRAM_CODES:
        return batch_usage_metrics(indices, codebook_size, axis_name)
    counts = code_histogram(indices, codebook_size, axis_name)
    metrics = usage_metrics(counts)
    if track_usage:
        metrics.update(UsageTracker(codebook_size, axis_name, name="usage")(counts, train))
    return metrics
