"""Residual quantization (SoundStream Alg. 1) over any quantizer of this package.

With residual r_0 = z, level l quantizes r_l (optionally rescaled: ``s_l * Q_l(r_l / s_l)``, as
residual FSQ/LFQ do with s_l = L^-l), and passes on r_{l+1} = r_l - sg(q_l). The output is
``z_q = sum_l q_l`` and the indices are stacked on a trailing level axis ``[..., num_levels]``.

Gradient: every level keeps its own straight-through path to its residual, and every residual has an
identity Jacobian w.r.t. z (the subtracted codes are stop-gradiented), so dz_q/dz is the sum of the
levels' Jacobians (num_levels * I for straight-through VQ/LFQ levels), as in the reference
implementations.

Quantize-dropout (optional, training only): a cutoff c is drawn uniformly from
[quantize_dropout_min_levels, num_levels - 1] once per call from the ``quantizer`` rng (so it is the
same on every device); levels after c contribute zero codes and index -1, and ``indices_to_codes``
maps -1 to a zero code.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from titok_jax.quantizers.base import RNG, QuantizerOutput


class ResidualQuantizer(nn.Module):
    """Stack of quantizers applied to successive residuals.

    Attributes:
      quantizers: one (unbound) quantizer module per level, e.g.
        ``tuple(VectorQuantizer(1024, 64) for _ in range(4))``; use ``ResidualQuantizer.repeat``.
      scales: optional per-level scale s_l (level l sees r_l / s_l and returns s_l * codes).
      quantize_dropout_min_levels: None disables quantize-dropout; otherwise the minimum number of
        levels kept in training (>= 1).
    """

    quantizers: Sequence[nn.Module]
    scales: Sequence[float] | None = None
    quantize_dropout_min_levels: int | None = None

    @staticmethod
    def repeat(quantizer: nn.Module, num_levels: int, scales: Sequence[float] | None = None,
               **kwargs: Any) -> "ResidualQuantizer":
        """``num_levels`` independent copies of ``quantizer`` (each with its own codebook)."""
        if num_levels < 1:
            raise ValueError(f"ResidualQuantizer needs num_levels >= 1, got {num_levels}")
        return ResidualQuantizer(tuple(quantizer.clone() for _ in range(num_levels)), scales, **kwargs)

    def _check(self) -> None:
        n = len(self.quantizers)
        if n < 1:
            raise ValueError("ResidualQuantizer needs at least one level")
        if self.scales is not None and len(self.scales) != n:
            raise ValueError(f"ResidualQuantizer: {len(self.scales)} scales for {n} levels")
        m = self.quantize_dropout_min_levels
        if m is not None and not 1 <= m <= n:
            raise ValueError(f"quantize_dropout_min_levels must be in [1, {n}], got {m}")

    @property
    def num_levels(self) -> int:
        return len(self.quantizers)

    @property
    def codebook_size(self) -> tuple[int, ...]:
        """Codebook size of each level."""
        return tuple(int(q.codebook_size) for q in self.quantizers)

    def _scale(self, level: int) -> float:
        return 1.0 if self.scales is None else float(self.scales[level])

    def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        self._check()
        n = self.num_levels
        keep = None  # number of levels kept (traced), only with quantize-dropout in training
        if train and self.quantize_dropout_min_levels is not None and not self.is_initializing():
            keep = jax.random.randint(self.make_rng(RNG), (), self.quantize_dropout_min_levels, n + 1)
        residual = z
        z_q = jnp.zeros_like(z)
        indices, losses, metrics = [], {}, {}
        for level, quantizer in enumerate(self.quantizers):
            s = self._scale(level)
            q_l, out = quantizer(residual / s if s != 1.0 else residual, train=train)
            if s != 1.0:
                q_l = q_l * jnp.asarray(s, q_l.dtype)
            idx = out.indices
            level_losses = out.losses
            if keep is not None:
                active = level < keep
                q_l = jnp.where(active, q_l, jnp.zeros_like(q_l))
                idx = jnp.where(active, idx, -1)
                level_losses = {k: jnp.where(active, v, 0.0) for k, v in level_losses.items()}
            residual = residual - lax.stop_gradient(q_l)
            z_q = z_q + q_l
            indices.append(idx)
            for k, v in level_losses.items():
                losses[k] = losses.get(k, 0.0) + v
            for k, v in out.metrics.items():
                metrics[f"level{level}/{k}"] = v
        for key in ("perplexity", "usage"):
            per_level = [metrics[f"level{l}/{key}"] for l in range(n) if f"level{l}/{key}" in metrics]
            if per_level:
                metrics[key] = jnp.mean(jnp.stack(per_level))
        if keep is not None:
            metrics["kept_levels"] = keep.astype(jnp.float32)
        return z_q, QuantizerOutput(indices=jnp.stack(indices, axis=-1), losses=losses, metrics=metrics)

    def indices_to_codes(self, indices: jax.Array, dtype: Any = None) -> jax.Array:
        """Sum of the levels' codes for ``indices[..., num_levels]`` (each level's
        ``indices_to_codes``, in ``dtype`` when given); index -1 is a zero code."""
        self._check()
        if indices.ndim < 1 or indices.shape[-1] != self.num_levels:
            raise ValueError(f"expected a trailing axis of {self.num_levels} levels, got shape {indices.shape}")
        kw = {} if dtype is None else {"dtype": dtype}
        total = None
        for level, quantizer in enumerate(self.quantizers):
            idx = indices[..., level]
            codes = quantizer.indices_to_codes(jnp.maximum(idx, 0), **kw)
            s = self._scale(level)
            if s != 1.0:
                codes = codes * jnp.asarray(s, codes.dtype)
            codes = jnp.where((idx >= 0)[..., None], codes, jnp.zeros_like(codes))
            total = codes if total is None else total + codes
        return total
