"""Factorized quantization (FQGAN, arXiv 2411.16681).

k sub-quantizers, each behind its own projection: factor i sees ``P_i z`` (a Dense to the factor's
dim, or z itself when ``project_in`` is off, or its own slice ``z[..., o_i : o_i + d_i]`` with
``split_input``: official FQGAN, whose factors come from separate encoder branches), returns codes
c_i and one index per token; the output is ``W_out [c_1; ...; c_k]`` (or the plain concatenation
when ``project_out`` is off). Indices are
stacked on a trailing factor axis ``[..., k]``; the effective vocabulary is prod_i K_i.

Extra terms (both optional, already weighted in ``out.losses``):
- ``disentanglement``: lambda * mean over tokens of the mean over factor pairs (i < j) of
  (c_i_hat . c_j_hat)^2 with l2-normalised codes (paper eq. 7; 0 for orthogonal codes, lambda for
  parallel ones);
- ``representation``: the hook for semantic heads. ``representation_heads[i]`` (any Linen module,
  or None) maps factor i's codes to a feature; when the caller passes
  ``representation_targets[i]`` (e.g. frozen CLIP / DINOv2 features, ``[B, F]``) the loss is
  ``representation_weight * InfoNCE(head(c_i), target)`` over the batch, averaged over the heads
  used. The heads' outputs are also returned in ``out.aux`` (``representation_i``) with each factor's
  codes (``codes_i``).

Multi-device: as the sub-quantizers (global statistics under ``jax.jit`` with a sharded batch, on
Auto and Explicit meshes); the InfoNCE logits keep the batch sharding of their rows.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from titok_jax.quantizers.base import QuantizerOutput, explicit_spec, l2_normalize


def disentanglement_loss(codes: Sequence[jax.Array]) -> jax.Array:
    """Mean over tokens and over factor pairs of the squared cosine between factor codes."""
    if len(codes) < 2:
        raise ValueError("disentanglement_loss needs at least two factors")
    normed = [l2_normalize(c.astype(jnp.float32)) for c in codes]
    terms = [jnp.mean(jnp.square(jnp.sum(normed[i] * normed[j], axis=-1)))
             for i in range(len(normed)) for j in range(i + 1, len(normed))]
    return jnp.mean(jnp.stack(terms))


def info_nce(pred: jax.Array, target: jax.Array, temperature: float = 1.0) -> jax.Array:
    """InfoNCE over a batch: ``-mean_i log softmax_j(p_i . t_j / T)[i]`` with l2-normalised ``pred``
    ``[B, F]`` and ``target`` ``[B, F]`` (the i-th prediction should match the i-th target)."""
    p = l2_normalize(pred.astype(jnp.float32).reshape(pred.shape[0], -1))
    t = l2_normalize(target.astype(jnp.float32).reshape(target.shape[0], -1))
    if p.shape != t.shape:
        raise ValueError(f"info_nce: prediction {p.shape} and target {t.shape} differ")
    sp, st = explicit_spec(p), explicit_spec(t)
    if sp is None and st is None:
        logits = p @ t.T / temperature
        return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))
    # Explicit mesh (batch sharded in the types): the logits rows keep the batch sharding of the
    # predictions, the matmul gathers the targets; the diagonal is read with a mask, not a gather.
    mesh = jax.typeof(p if sp is not None else t).sharding.mesh
    out = NamedSharding(mesh, PartitionSpec(sp[0] if sp is not None else None, None))
    logits = jnp.matmul(p, t.T, out_sharding=out) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    eye = jnp.arange(p.shape[0])[:, None] == jnp.arange(p.shape[0])[None, :]
    return -jnp.mean(jnp.sum(jnp.where(eye, logp, 0.0), axis=-1))


class FactorizedQuantizer(nn.Module):
    """FQGAN factorized quantizer.

    Attributes:
      quantizers: one (unbound) sub-quantizer per factor (e.g. l2-normalised VQ with 16384 x 8 codes).
      factor_dims: input dim of each sub-quantizer (the output dim of its in-projection).
      dim: the input (and, with ``project_out``, the output) feature dim.
      project_in / project_out: Dense projections around each factor / after the concatenation.
      split_input: factor i reads its own channel slice of z (sum(factor_dims) == dim; no in-proj).
      disentanglement_weight: lambda_1 (FQGAN uses 0.1); 0 disables the term.
      representation_heads: optional per-factor modules for the representation loss (None entries skip).
      representation_weight, representation_temperature: lambda_2 (FQGAN 0.5) and the InfoNCE T (1.0).
    """

    quantizers: Sequence[nn.Module]
    factor_dims: Sequence[int]
    dim: int
    project_in: bool = True
    project_out: bool = True
    split_input: bool = False
    disentanglement_weight: float = 0.0
    representation_heads: Sequence[nn.Module | None] | None = None
    representation_weight: float = 0.0
    representation_temperature: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def num_factors(self) -> int:
        return len(self.quantizers)

    @property
    def codebook_size(self) -> tuple[int, ...]:
        """Codebook size of each factor (one index per factor)."""
        return tuple(int(q.codebook_size) for q in self.quantizers)

    def _check(self, z: jax.Array | None = None) -> None:
        k = self.num_factors
        if k < 1 or len(self.factor_dims) != k:
            raise ValueError(f"FactorizedQuantizer: {k} quantizers but {len(self.factor_dims)} factor_dims")
        if self.representation_heads is not None and len(self.representation_heads) != k:
            raise ValueError("FactorizedQuantizer: representation_heads needs one entry (or None) per factor")
        if self.split_input and sum(self.factor_dims) != self.dim:
            raise ValueError(f"FactorizedQuantizer: split_input needs sum(factor_dims) = "
                             f"{sum(self.factor_dims)} == dim {self.dim}")
        if not self.split_input and not self.project_in and any(d != self.dim for d in self.factor_dims):
            raise ValueError("FactorizedQuantizer: without project_in every factor_dim must equal dim")
        if z is not None and z.shape[-1] != self.dim:
            raise ValueError(f"FactorizedQuantizer expects inputs with last dim {self.dim}, got {z.shape}")

    def _dense(self, features: int) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))

    def setup(self) -> None:
        self._check()
        self.in_proj = ([self._dense(d) for d in self.factor_dims]
                        if self.project_in and not self.split_input else None)
        self.out_proj = self._dense(self.dim) if self.project_out else None

    def __call__(self, z: jax.Array, train: bool = False,
                 representation_targets: Sequence[jax.Array | None] | None = None
                 ) -> tuple[jax.Array, QuantizerOutput]:
        self._check(z)
        codes, indices, losses, metrics, aux = [], [], {}, {}, {}
        offsets = [sum(self.factor_dims[:i]) for i in range(self.num_factors)]
        for i, quantizer in enumerate(self.quantizers):
            if self.split_input:
                x = z[..., offsets[i]:offsets[i] + self.factor_dims[i]]
            else:
                x = self.in_proj[i](z) if self.project_in else z
            c, out = quantizer(x, train=train)
            codes.append(c)
            indices.append(out.indices)
            aux[f"codes_{i}"] = c
            for k, v in out.losses.items():
                losses[k] = losses.get(k, 0.0) + v
            for k, v in out.metrics.items():
                metrics[f"factor{i}/{k}"] = v
        for key in ("perplexity", "usage"):
            vals = [metrics[f"factor{i}/{key}"] for i in range(self.num_factors) if f"factor{i}/{key}" in metrics]
            if vals:
                metrics[key] = jnp.mean(jnp.stack(vals))
        if self.disentanglement_weight and self.num_factors > 1:
            losses["disentanglement"] = self.disentanglement_weight * disentanglement_loss(codes)
        rep_terms = []
        for i, head in enumerate(self.representation_heads or ()):
            if head is None:
                continue
            feature = head(codes[i])
            aux[f"representation_{i}"] = feature
            target = None if representation_targets is None else representation_targets[i]
            if target is not None:
                rep_terms.append(info_nce(feature, target, self.representation_temperature))
        if rep_terms and self.representation_weight:
            losses["representation"] = self.representation_weight * jnp.mean(jnp.stack(rep_terms))
        z_q = self._combine(codes)
        out = QuantizerOutput(indices=jnp.stack(indices, axis=-1), losses=losses, metrics=metrics, aux=aux)
        return z_q, out

    def _combine(self, codes: Sequence[jax.Array]) -> jax.Array:
        joined = jnp.concatenate(codes, axis=-1)
        return self.out_proj(joined) if self.project_out else joined

    def indices_to_codes(self, indices: jax.Array, dtype: Any = None) -> jax.Array:
        """Codes for ``indices[..., num_factors]``: the factors' codes (each sub-quantizer's
        ``indices_to_codes``, in ``dtype`` when given) concatenated (and projected)."""
        if indices.ndim < 1 or indices.shape[-1] != self.num_factors:
            raise ValueError(f"expected a trailing axis of {self.num_factors} factors, got shape {indices.shape}")
        kw = {} if dtype is None else {"dtype": dtype}
        codes = [q.indices_to_codes(indices[..., i], **kw) for i, q in enumerate(self.quantizers)]
        return self._combine(codes)
