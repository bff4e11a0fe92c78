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

Meshes with ``AxisType.Explicit`` axes (the default of ``jax.make_mesh`` in jax 0.10, "sharding in
types") need an output sharding on every gather, scatter and contraction over the sharded token axis.
The helpers below (``explicit_spec``, ``take_rows``, ``scatter_add_replicated``, ``replicate``) add
it only there: on Auto meshes, on one device and inside ``shard_map`` they are the plain ``jnp`` ops.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

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


# ---- explicit-sharding helpers ------------------------------------------------------------------
def _explicit_mesh(x: Any) -> Any:
    """The (abstract) mesh of ``x``'s type when it has ``AxisType.Explicit`` axes, else None."""
    try:
        sharding = getattr(jax.typeof(x), "sharding", None)
    except TypeError:   # not an array-like (python scalar, None, ...)
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return mesh


def explicit_spec(x: Any) -> tuple[Any, ...] | None:
    """The PartitionSpec of ``x``'s type, one entry per dimension, when ``x`` lives on a mesh with
    Explicit axes ("sharding in types", ``jax.make_mesh``'s default); None otherwise (Auto meshes,
    a single device, inside ``shard_map``), i.e. whenever plain ``jnp`` ops need no annotation."""
    mesh = _explicit_mesh(x)
    if mesh is None:
        return None
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (jnp.ndim(x) - len(spec))


def replicated_if_explicit(x: Any) -> NamedSharding | None:
    """A replicated ``NamedSharding`` on ``x``'s mesh when it has Explicit axes, else None: the
    ``out_sharding`` of a contraction / scatter over ``x``'s sharded axis (None is jax's default)."""
    mesh = _explicit_mesh(x)
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def shard_count(x: Any, axis: int = 0) -> int:
    """Number of shards of ``x``'s dimension ``axis`` on an Explicit mesh (1 when not sharded, on an
    Auto mesh, on one device or inside ``shard_map``)."""
    spec = explicit_spec(x)
    entry = None if spec is None else spec[axis]
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    mesh = _explicit_mesh(x)
    n = 1
    for name in names:
        n *= mesh.shape[name]
    return n


def replicate(x: jax.Array) -> jax.Array:
    """``x`` resharded to replicated when it is sharded on an Explicit mesh (an all-gather), else
    ``x`` itself. For ops that need a whole axis on every device (e.g. ``sort``)."""
    spec = explicit_spec(x)
    if spec is None or all(e is None for e in spec):
        return x
    return jax.sharding.reshard(x, replicated_if_explicit(x))


def take_rows(table: jax.Array, indices: jax.Array) -> jax.Array:
    """``jnp.take(table, indices, axis=0)``: rows ``[*indices.shape, *table.shape[1:]]``.

    On an Explicit mesh the gather names its output sharding: ``indices``' spec (e.g. the sharded
    token axis) followed by ``table``'s spec of the remaining axes (None where an axis name is
    already used by ``indices``), so a token-sharded lookup stays sharded and rows drawn from a
    token-sharded table with replicated indices come back replicated."""
    spec_t, spec_i = explicit_spec(table), explicit_spec(indices)
    if spec_t is None and spec_i is None:
        return jnp.take(table, indices, axis=0)
    mesh = _explicit_mesh(indices) if spec_i is not None else _explicit_mesh(table)
    spec_i = spec_i or (None,) * jnp.ndim(indices)
    rest = (spec_t or (None,) * table.ndim)[1:]

    def names(e):
        return set() if e is None else {e} if isinstance(e, str) else set(e)

    used = set().union(*map(names, spec_i))
    rest = tuple(None if names(e) & used else e for e in rest)
    out = NamedSharding(mesh, PartitionSpec(*spec_i, *rest))
    return table.at[indices].get(mode="fill", out_sharding=out)


def scatter_add_replicated(shape: tuple[int, ...], indices: jax.Array, updates: Any) -> jax.Array:
    """float32 ``zeros(shape).at[indices].add(updates)``: per-code sums over every (possibly
    token-sharded) index, replicated on an Explicit mesh (the scatter names ``out_sharding=P()``)."""
    out = jnp.zeros(shape, jnp.float32)
    rep = replicated_if_explicit(indices)
    if rep is None:
        return out.at[indices].add(updates)
    return out.at[indices].add(updates, out_sharding=rep)


def code_histogram(indices: jax.Array, codebook_size: int,
                   axis_name: str | Sequence[str] | None = None) -> jax.Array:
    """float32 counts ``[codebook_size]`` of each code over all of ``indices`` (global batch).
    Negative indices (dropped levels) are not counted."""
    flat = indices.reshape(-1).astype(jnp.int32)
    valid = flat >= 0
    counts = scatter_add_replicated((codebook_size,), jnp.where(valid, flat, 0),
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
        flat = jnp.sort(replicate(indices.reshape(-1)))   # sort needs the whole axis per device
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
