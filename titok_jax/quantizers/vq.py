"""Vector quantiser (VQ-VAE): nearest code by squared L2, or by cosine with l2-normalised codes.

Maths (``z`` the tokens after the optional in-projection and l2-normalisation, ``E`` the codebook,
``sg`` stop-gradient, means over every token *and* every lookup dimension of the global batch):

- ``k*_n = argmin_k ||z_n - e_k||^2`` (cosine: ``argmax_k z_n . e_k``), float32 at HIGHEST
  precision, chunked so the ``N x K`` matrix never exists whole (``vq_lookup.nearest_code``);
- ``q_n = E[k*_n]`` (``base.take_rows``, i.e. ``jnp.take``); output
  ``z_q = project_out(sg(q) + (z - sg(z)))``, whose forward value is exactly ``project_out(q)`` (with
  ``rotation_trick`` the ``z - sg(z)`` term becomes the rotated ``z``, same forward value,
  rotation-trick gradient);
- losses: ``commitment = beta * mean ||sg(q) - z||^2``, ``codebook = w * mean ||q - sg(z)||^2``
  (gradient-learned codebook only), ``entropy = w_H * (mean_n H(p_n) - H(mean_n p_n))`` with
  ``p_n = softmax(-||z_n - e||^2 / T)``. E.g. ``E = [[0], [10]]``, ``z = [1, 2, 9]``: indices
  ``[0, 0, 1]``, ``commitment = 0.25 * (1 + 4 + 1) / 3 = 0.5``;
- EMA codebook (``use_ema``; state in ``quantizer_stats``, no gradient), with ``n_k``, ``s_k`` the
  global count and sum of the tokens assigned to code ``k``: ``N <- g N + (1-g) n``,
  ``m <- g m + (1-g) s``, ``N~ = (N + eps) / (sum N + K eps) * sum N``, ``e = m / N~`` (re-normalised
  when cosine). The returned codes come from the state read at input. Then codes with
  ``N < dead_code_threshold`` are replaced by random tokens ``x`` of the batch (``quantizer`` rng),
  with ``N <- threshold``, ``m <- threshold * x``;
- ``kmeans_init`` (EMA only): the first training call runs ``vq_kmeans.kmeans`` on the batch and sets
  ``E = means``, ``N = bins``, ``m = means * bins`` *before* the lookup of that call.

Multi-device: under ``jax.jit`` with the batch sharded over a mesh, with ``AxisType.Auto`` axes or
``AxisType.Explicit`` ones (the default of ``jax.make_mesh`` in jax 0.10), every statistic is global;
on Explicit meshes the gathers, scatter-adds and chunk reshapes over the token-sharded axis name
their output sharding (``base.take_rows``, ``base.scatter_add_replicated``, ``vq_lookup``'s per-block
chunking) and the codes and indices stay sharded like the batch. Inside ``shard_map`` set
``axis_name`` and the statistics are ``psum``-ed (``init`` may run outside ``shard_map``: it skips
the collectives).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from titok_jax.quantizers.base import (
    RNG, STATS, QuantizerOutput, global_mean, quantizer_metrics, straight_through, take_rows,
)
from titok_jax.quantizers.vq_kmeans import KMEANS_METHODS, cluster_stats, kmeans, sample_rows
from titok_jax.quantizers.vq_lookup import (
    DEFAULT_MAX_ELEMENTS, entropy_terms, nearest_code, normalize_if, rotate_to,
)

Dtype = Any
Initializer = Callable[..., jax.Array]


def default_codebook_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """``variance_scaling(1, fan_in, uniform)`` on ``(K, d)``: ``U(-sqrt(3/K), sqrt(3/K))`` (maskgit)."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "uniform")(key, shape, dtype)


def uniform_codebook_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32
                          ) -> jax.Array:
    """TiTok's codebook init ``U(-1/K, 1/K)`` for a ``[K, d]`` table."""
    bound = 1.0 / shape[0]
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def ema_update(counts: jax.Array, sums: jax.Array, batch_counts: jax.Array, batch_sums: jax.Array,
               decay: float, eps: float, cosine: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One EMA step -> ``(N', m', E')``: ``N' = g N + (1-g) n``, ``m' = g m + (1-g) s``,
    ``E' = m' / N~'`` with the Laplace-smoothed ``N~ = (N + eps) / (sum N + K eps) * sum N``
    (l2-normalised rows when ``cosine``)."""
    counts = decay * counts + (1.0 - decay) * batch_counts
    sums = decay * sums + (1.0 - decay) * batch_sums
    total = jnp.sum(counts)
    smoothed = (counts + eps) / (total + counts.shape[0] * eps) * total
    return counts, sums, normalize_if(sums / smoothed[:, None], cosine)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser; see the module docstring for the maths.

    Attributes:
      codebook_size: number of codes K.
      dim: feature dim of the input ``z [..., dim]`` (and of ``z_q``).
      codebook_dim: lookup dim; if set and ``!= dim``, Dense ``dim -> codebook_dim`` before the
        lookup and Dense ``codebook_dim -> dim`` after it (losses live in the lookup space).
      l2_normalize: cosine lookup; inputs and codes are l2-normalised and the codes returned are the
        normalised ones (TiTok: K=4096, codebook_dim=12, beta=0.25).
      commitment_weight: beta of the commitment loss.
      codebook_weight: weight of the codebook loss (gradient-learned codebook only).
      use_ema: EMA codebook in ``quantizer_stats`` instead of a param.
      ema_decay, ema_eps: EMA decay g and Laplace smoothing eps.
      dead_code_threshold: EMA count below which a code is replaced by a batch vector (0 = off;
        needs ``use_ema``; in units of tokens per step, so scale it with the batch).
      kmeans_init, kmeans_iters, kmeans_method: k-means initialisation of an EMA codebook on the
        first training call (``vq_kmeans.kmeans``; ``"kmeans++"`` or ``"random"`` seeding).
      rotation_trick: rotation-trick gradient (arXiv 2410.06424) instead of straight-through.
      entropy_weight, entropy_temperature: weight and temperature T of the entropy loss (0 = off).
      max_distance_elements: at most this many token-code distances exist at a time.
      axis_name: mesh axis (or axes) the batch is split over inside ``shard_map``; None under jit.
      track_usage: keep cumulative code counts (``quantizer_stats/usage/code_counts``).
      dtype: compute dtype of the projections (None: from the input); lookups are always float32.
      param_dtype: dtype of params and state.
      codebook_init: initialiser of the ``(K, codebook_dim)`` codebook (default U(+-sqrt(3/K))).
    """

    codebook_size: int
    dim: int
    codebook_dim: int | None = None
    l2_normalize: bool = False
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dead_code_threshold: float = 0.0
    kmeans_init: bool = False
    kmeans_iters: int = 10
    kmeans_method: str = "kmeans++"
    rotation_trick: bool = False
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    max_distance_elements: int = DEFAULT_MAX_ELEMENTS
    axis_name: Any = None
    track_usage: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    codebook_init: Initializer = default_codebook_init

    @property
    def lookup_dim(self) -> int:
        return self.codebook_dim or self.dim

    @property
    def projects(self) -> bool:
        return self.lookup_dim != self.dim

    def _check_config(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"VectorQuantizer: {msg}")
        if self.codebook_size < 1 or self.dim < 1 or self.lookup_dim < 1:
            bad(f"codebook_size, dim and codebook_dim must be >= 1, got {self.codebook_size}, "
                f"{self.dim}, {self.codebook_dim}")
        if not 0.0 <= self.ema_decay < 1.0:
            bad(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_eps < 0 or self.dead_code_threshold < 0 or self.entropy_weight < 0:
            bad("ema_eps, dead_code_threshold and entropy_weight must be >= 0")
        if self.entropy_temperature <= 0:
            bad(f"entropy_temperature must be > 0, got {self.entropy_temperature}")
        if self.max_distance_elements < 1 or self.kmeans_iters < 0:
            bad("max_distance_elements must be >= 1 and kmeans_iters >= 0")
        if self.kmeans_method not in KMEANS_METHODS:
            bad(f"kmeans_method must be one of {KMEANS_METHODS}, got {self.kmeans_method!r}")
        if self.dead_code_threshold > 0 and not self.use_ema:
            bad("dead_code_threshold > 0 needs use_ema=True: dead codes are revived through the EMA "
                "statistics, which a gradient-learned codebook does not have")
        if self.kmeans_init and not self.use_ema:
            bad("kmeans_init=True needs use_ema=True; to initialise a gradient-learned codebook, run "
                "titok_jax.quantizers.vq_kmeans.kmeans(key, features, codebook_size) in the trainer "
                "and write its means into params['codebook']")

    def setup(self) -> None:
        self._check_config()
        k, d = self.codebook_size, self.lookup_dim
        init = nn.with_logical_partitioning(self.codebook_init, ("codebook", None))
        if self.use_ema:
            self.codebook = self.variable(
                STATS, "codebook", lambda: init(self.make_rng("params"), (k, d), self.param_dtype))
            self.ema_counts = self.variable(
                STATS, "ema_counts", nn.with_logical_partitioning(jnp.ones, ("codebook",)), (k,),
                self.param_dtype)
            # m = E * N with N = 1 at init, so that m / N = E.
            self.ema_sums = self.variable(STATS, "ema_sums", nn.with_logical_partitioning(
                lambda: self.codebook.value, ("codebook", None)))
            if self.kmeans_init:
                self.kmeans_done = self.variable(STATS, "kmeans_done", jnp.zeros, (), jnp.bool_)
        else:
            self.codebook = self.param("codebook", init, (k, d), self.param_dtype)
        if self.projects:
            dense = lambda f, names: nn.Dense(
                f, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))
            self.project_in = dense(d, ("embed", None))
            self.project_out = dense(self.dim, (None, "embed"))

    def _codes_table(self, codebook: jax.Array) -> jax.Array:
        """The float32 table the lookup uses (l2-normalised when cosine)."""
        return normalize_if(jnp.asarray(codebook, jnp.float32), self.l2_normalize)

    def _read_codebook(self) -> jax.Array:
        return self.codebook.value if self.use_ema else self.codebook

    def _to_output(self, q: jax.Array, out_dtype: Dtype) -> jax.Array:
        """Lookup space -> output space (project_out) in ``out_dtype``."""
        if self.projects:
            q = self.project_out(q)
        return q.astype(out_dtype)

    def indices_to_codes(self, indices: jax.Array, dtype: Dtype | None = None) -> jax.Array:
        """``[...]`` int indices -> ``[..., dim]`` codes (gather, normalise if cosine, project out),
        equal to ``z_q`` of an eval call on inputs of dtype ``dtype`` (default ``self.dtype`` or
        float32). Out-of-range indices raise when concrete."""
        if not jnp.issubdtype(jnp.asarray(indices).dtype, jnp.integer):
            raise ValueError(f"indices must be integers, got {jnp.asarray(indices).dtype}")
        if not isinstance(indices, jax.core.Tracer):
            lo, hi = int(jnp.min(indices, initial=0)), int(jnp.max(indices, initial=0))
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"code index out of range [0, {self.codebook_size}): "
                                 f"min {lo}, max {hi}")
        codes = take_rows(self._codes_table(self._read_codebook()), indices)
        return self._to_output(codes, dtype or self.dtype or jnp.float32)

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``z [..., dim]`` -> ``(z_q [..., dim] in z.dtype, QuantizerOutput)``; state changes only
        with ``train=True`` outside ``init``."""
        if z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer expects inputs [..., {self.dim}], got shape {z.shape}")
        batch_shape = z.shape[:-1]
        h = self.project_in(z) if self.projects else z
        x = normalize_if(h.astype(jnp.float32).reshape(-1, self.lookup_dim), self.l2_normalize)
        update = train and self.use_ema and not self.is_initializing()
        # init may run outside shard_map (no bound axis); its outputs are never statistics.
        axis = None if self.is_initializing() else self.axis_name
        if update:
            codebook, counts, sums = self.codebook.value, self.ema_counts.value, self.ema_sums.value
            if self.kmeans_init:
                codebook, counts, sums = self._maybe_kmeans(x, codebook, counts, sums)
        else:
            codebook = self._read_codebook()
        table = self._codes_table(codebook)
        if self.use_ema:
            table = lax.stop_gradient(table)

        indices = nearest_code(x, table, cosine=self.l2_normalize,
                               max_elements=self.max_distance_elements)
        q = take_rows(table, indices)
        losses = {"commitment": self.commitment_weight * global_mean(
            jnp.square(lax.stop_gradient(q) - x), axis=None, axis_name=axis)}
        if not self.use_ema:
            losses["codebook"] = self.codebook_weight * global_mean(
                jnp.square(q - lax.stop_gradient(x)), axis=None, axis_name=axis)
        if self.entropy_weight > 0:
            sample_h, batch_h = entropy_terms(x, table, self.entropy_temperature,
                                              max_elements=self.max_distance_elements,
                                              axis_name=axis)
            losses["entropy"] = self.entropy_weight * (sample_h - batch_h)

        # Exact forward value q; gradient to x is the identity (or the rotation-trick Jacobian).
        if self.rotation_trick:
            rot = rotate_to(x, lax.stop_gradient(q))
            q_st = lax.stop_gradient(q) + (rot - lax.stop_gradient(rot))
        else:
            q_st = straight_through(x, lax.stop_gradient(q))
        z_q = self._to_output(q_st.reshape(batch_shape + (self.lookup_dim,)), z.dtype)

        if update:
            self._ema_step(x, indices, counts, sums)
        indices = indices.reshape(batch_shape)
        metrics = quantizer_metrics(self, indices, self.codebook_size, train, axis,
                                    self.track_usage)
        return z_q, QuantizerOutput(indices=indices, losses=losses, metrics=metrics)

    def _maybe_kmeans(self, x, codebook, counts, sums):
        """On the first training call: codebook, counts, sums from k-means of the batch."""
        key = self.make_rng(RNG)

        def run(_):
            means, bins = kmeans(key, x, self.codebook_size, self.kmeans_iters,
                                 cosine=self.l2_normalize, method=self.kmeans_method,
                                 axis_name=self.axis_name, max_elements=self.max_distance_elements)
            dt = codebook.dtype
            return means.astype(dt), bins.astype(dt), (means * bins[:, None]).astype(dt)

        out = lax.cond(self.kmeans_done.value, lambda _: (codebook, counts, sums), run, None)
        self.kmeans_done.value = jnp.ones((), jnp.bool_)
        return out

    def _ema_step(self, x, indices, counts, sums) -> None:
        """EMA update from this batch's global assignments, then dead-code replacement."""
        x = lax.stop_gradient(x)
        batch_counts, batch_sums = cluster_stats(x, indices, self.codebook_size, self.axis_name)
        counts, sums, codebook = ema_update(counts.astype(jnp.float32), sums.astype(jnp.float32),
                                            batch_counts, batch_sums, self.ema_decay,
                                            self.ema_eps, self.l2_normalize)
        if self.dead_code_threshold > 0:
            thr = jnp.float32(self.dead_code_threshold)
            cand = sample_rows(self.make_rng(RNG), x, self.codebook_size, self.axis_name)
            dead = counts < thr
            codebook = jnp.where(dead[:, None], cand, codebook)   # x is already normalised if cosine
            sums = jnp.where(dead[:, None], thr * cand, sums)
            counts = jnp.where(dead, thr, counts)
        dt = self.param_dtype
        self.codebook.value = codebook.astype(dt)
        self.ema_counts.value = counts.astype(dt)
        self.ema_sums.value = sums.astype(dt)
