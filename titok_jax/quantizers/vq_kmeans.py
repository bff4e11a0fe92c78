"""k-means for codebook initialisation and random sampling of batch vectors, over the global batch.

Pure, ``jax.jit``-able functions. Under ``jax.jit`` with a sharded batch every reduction is already
global; inside ``shard_map`` pass ``axis_name`` (the mesh axis, or axes, the batch is split over) and
the statistics are ``psum``-ed and the samples drawn from the union of the per-device batches, the
same on every device (the ``key`` must be the same on every device).

A trainer with a gradient-learned codebook can initialise it from data with::

    means, bins = kmeans(key, features.reshape(-1, d), codebook_size)
    params["quantizer"]["codebook"] = means
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from titok_jax.quantizers.base import explicit_spec, global_sum, scatter_add_replicated, take_rows
from titok_jax.quantizers.vq_lookup import DEFAULT_MAX_ELEMENTS, nearest_code, normalize_if

KMEANS_METHODS = ("kmeans++", "random")


def _axis_index_and_size(axis_name: Any) -> tuple[jax.Array, jax.Array]:
    return lax.axis_index(axis_name), lax.psum(1, axis_name)


def sample_rows(key: jax.Array, x: jax.Array, num: int, axis_name: Any = None) -> jax.Array:
    """``num`` rows of ``x [N, d]`` drawn uniformly with replacement from the global batch."""
    if axis_name is None:
        return take_rows(x, jax.random.randint(key, (num,), 0, x.shape[0]))
    k_dev, k_row = jax.random.split(key)
    me, n_dev = _axis_index_and_size(axis_name)
    dev = jax.random.randint(k_dev, (num,), 0, n_dev)   # equal local batches: uniform device
    local = jnp.take(x, jax.random.randint(k_row, (num,), 0, x.shape[0]), axis=0)
    return lax.psum(jnp.where((dev == me)[:, None], local, jnp.zeros_like(local)), axis_name)


def _sample_distinct_rows(key: jax.Array, x: jax.Array, num: int, axis_name: Any) -> jax.Array:
    """Uniform rows, without replacement when the (local, unsharded) batch allows it."""
    if axis_name is None and x.shape[0] >= num:
        return take_rows(x, jax.random.choice(key, x.shape[0], (num,), replace=False))
    return sample_rows(key, x, num, axis_name)


def _weighted_row(key: jax.Array, x: jax.Array, weights: jax.Array, axis_name: Any) -> jax.Array:
    """One row of the global batch drawn with probability proportional to ``weights`` (Gumbel-max;
    the noise differs per device, the winner is the same everywhere)."""
    if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
    logw = jnp.where(weights > 0, jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
    score = logw + jax.random.gumbel(key, weights.shape, jnp.float32)
    i = jnp.argmax(score)
    row = x[i] if explicit_spec(x) is None else take_rows(x, i[None])[0]
    if axis_name is None:
        return row
    me = lax.axis_index(axis_name)
    best = lax.pmax(score[i], axis_name)
    winner = lax.pmin(jnp.where(score[i] == best, me, jnp.iinfo(jnp.int32).max), axis_name)
    return lax.psum(jnp.where(me == winner, row, jnp.zeros_like(row)), axis_name)


def _kmeans_plus_plus(key: jax.Array, x: jax.Array, k: int, axis_name: Any) -> jax.Array:
    """k-means++ seeding (D^2 sampling): ``[k, d]`` rows of the global batch."""
    keys = jax.random.split(key, k)
    first = sample_rows(keys[0], x, 1, axis_name)[0]
    means = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
    d2 = jnp.sum(jnp.square(x - first), axis=-1)

    def body(i, carry):
        means, d2 = carry
        c = _weighted_row(keys[i], x, d2, axis_name)
        return means.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=-1))

    return lax.fori_loop(1, k, body, (means, d2))[0]


def cluster_stats(x: jax.Array, indices: jax.Array, k: int,
                  axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
    """Global ``(counts [k], sums [k, d])`` of the rows of ``x`` assigned to each code."""
    counts = scatter_add_replicated((k,), indices, 1.0)
    sums = scatter_add_replicated((k, x.shape[1]), indices, x.astype(jnp.float32))
    return global_sum(counts, axis_name), global_sum(sums, axis_name)


@partial(jax.jit, static_argnames=("num_clusters", "iters", "cosine", "method", "axis_name",
                                   "max_elements"))
def kmeans(key: jax.Array, x: jax.Array, num_clusters: int, iters: int = 10, *,
           cosine: bool = False, method: str = "kmeans++", axis_name: Any = None,
           max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means of the rows of ``x [N, d]`` (the global batch) -> ``(means [K, d], bins [K])``.

    Initial means are batch rows drawn with ``key``: ``method="kmeans++"`` (D^2 sampling, robust) or
    ``"random"`` (uniform, without replacement when possible; what vector-quantize-pytorch does).
    Each of ``iters`` steps assigns rows to the nearest mean (squared L2, or cosine with
    l2-normalised rows and means) and moves each mean to its cluster's average; a cluster left
    empty keeps its old mean. ``bins`` counts the rows nearest each returned mean (sums to ``N``).
    float32 throughout; no gradient."""
    if method not in KMEANS_METHODS:
        raise ValueError(f"kmeans method must be one of {KMEANS_METHODS}, got {method!r}")
    if num_clusters < 1 or iters < 0:
        raise ValueError(f"kmeans needs num_clusters >= 1 and iters >= 0, got {num_clusters}, {iters}")
    x = normalize_if(lax.stop_gradient(x).astype(jnp.float32), cosine)
    if method == "kmeans++":
        means = _kmeans_plus_plus(key, x, num_clusters, axis_name)
    else:
        means = _sample_distinct_rows(key, x, num_clusters, axis_name)
    means = normalize_if(means, cosine)

    def assign(means):
        idx = nearest_code(x, means, cosine=cosine, max_elements=max_elements)
        return cluster_stats(x, idx, num_clusters, axis_name)

    def step(_, means):
        bins, sums = assign(means)
        new = normalize_if(sums / jnp.maximum(bins, 1.0)[:, None], cosine)
        return jnp.where((bins > 0)[:, None], new, means)

    means = lax.fori_loop(0, iters, step, means)
    return means, assign(means)[0]
