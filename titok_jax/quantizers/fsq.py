"""Finite scalar quantization (FSQ, arXiv 2309.15505), with the corrected bound and a symmetric option.

Per dimension i with L = levels[i] (all maths in float32 whatever the input dtype):

Standard (``symmetric=False``, L >= 3)::

    half   = (L - 1)(1 + eps) / 2          offset = 0.5 if L is even else 0
    shift  = atanh(offset / half)          f(z)   = tanh(z + shift) * half - offset
    r      = round(f(z))                   (straight-through: forward exactly r, gradient 1)
    code   = r / floor(L/2)  in [-1, 1]    level  k = r + floor(L/2)  in {0 .. L-1}

  Odd L gives the symmetric grid {-1, .., 0, .., 1}; even L the asymmetric one
  {-1, .., 1 - 1/floor(L/2)} (L = 4: {-1, -.5, 0, .5}). The paper's notebook uses ``tan`` and
  ``(1 - eps)``; ``atanh`` and ``(1 + eps)`` are the corrections (``(1 - eps)`` gives NaN at L = 2,
  and L = 2 is rejected here: its shift atanh(1/(1+eps)) ~ 3.8 makes one code nearly unreachable).
  dcode/dz = tanh'(z + shift) * half / floor(L/2) (only the rounding is straight-through).

Symmetric (``symmetric=True``, L >= 2; arXiv 2411.19842 sec. 3.2)::

    k    = floor((L - 1)(tanh z + 1)/2 + 1/2)  in {0 .. L-1}   (straight-through)
    code = 2k/(L - 1) - 1                       (symmetric on [-1, 1]);  dcode/dz = tanh'(z)

Index: mixed radix with dimension 0 least significant, ``index = sum_i k_i * prod_{j<i} L_j``,
computed from the integer levels (never from float codes: bf16/f32 cannot hold large indices).
FSQ has no loss terms. The implicit codebook (prod L rows) is only built by ``implicit_codebook()``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.quantizers.base import QuantizerOutput, quantizer_metrics, straight_through

# Paper Table 1 and App. A.4.1: target codebook size -> recommended levels.
RECOMMENDED_LEVELS: dict[int, tuple[int, ...]] = {
    2 ** 4: (5, 3),
    2 ** 6: (8, 8),
    2 ** 8: (8, 6, 5),
    2 ** 9: (8, 8, 8),
    2 ** 10: (8, 5, 5, 5),
    2 ** 11: (8, 8, 6, 5),
    2 ** 12: (7, 5, 5, 5, 5),
    2 ** 14: (8, 8, 8, 6, 5),
    2 ** 16: (8, 8, 8, 5, 5, 5),
}


def fsq_levels(codebook_size: int) -> tuple[int, ...]:
    """Recommended FSQ levels for a target codebook size (FSQ paper, Table 1 / App. A.4.1).

    The real codebook size is ``prod(levels)`` (e.g. 2^10 -> (8, 5, 5, 5), 1000 codes)."""
    if codebook_size not in RECOMMENDED_LEVELS:
        known = ", ".join(f"2^{int(math.log2(n))}={n}" for n in sorted(RECOMMENDED_LEVELS))
        raise ValueError(f"no recommended FSQ levels for codebook size {codebook_size!r}; "
                         f"known sizes: {known} (or pass levels explicitly)")
    return RECOMMENDED_LEVELS[codebook_size]


class FSQ(nn.Module):
    """Finite scalar quantizer (see the module docstring for the maths).

    Attributes:
      levels: number of levels per dimension; the input's last dimension must be ``len(levels)``.
      symmetric: use the symmetric variant (allows L = 2).
      eps: the ``(1 + eps)`` margin of the bound.
      saturation_weight: weight of ``mean(relu(|u| - 2)^2)`` over the tanh's arguments ``u``
        (loss ``saturation``; 0 = off). Past |u| = 2 tanh' < 0.07: a value pushed there early in
        training keeps its extreme level and its gradient is lost (a dead dimension). The penalty
        pulls such values back where the reconstruction's gradient reaches them again. The metric
        ``saturated`` (the fraction of |u| > 2) is logged either way.
      track_usage: keep cumulative code counts in ``quantizer_stats`` (``cumulative_usage`` metric).
      axis_name: mesh axis to sum statistics over when run inside ``shard_map``.
    """

    levels: Sequence[int]
    symmetric: bool = False
    eps: float = 1e-3
    saturation_weight: float = 0.0
    track_usage: bool = True
    axis_name: Any = None

    def __post_init__(self) -> None:
        levels = tuple(self.levels) if not isinstance(self.levels, (int, str)) else None
        if not levels or not all(isinstance(l, (int, np.integer)) and not isinstance(l, bool)
                                 for l in levels):
            raise ValueError(f"FSQ levels must be a non-empty sequence of ints, got {self.levels!r}")
        lowest = 2 if self.symmetric else 3
        if min(levels) < lowest:
            hint = ("" if self.symmetric else
                    " (L = 2 needs symmetric=True; for binary codes LFQ is the better choice)")
            raise ValueError(f"FSQ levels must all be >= {lowest}, got {levels}{hint}")
        if math.prod(levels) >= 2 ** 31:
            raise ValueError(f"FSQ codebook size prod{levels} = {math.prod(levels)} does not fit int32")
        if not 0.0 <= float(self.eps) < 1.0:
            raise ValueError(f"FSQ eps must be in [0, 1), got {self.eps}")
        if not (math.isfinite(float(self.saturation_weight)) and float(self.saturation_weight) >= 0):
            raise ValueError(f"FSQ saturation_weight must be finite and >= 0, got "
                             f"{self.saturation_weight}")
        super().__post_init__()

    @classmethod
    def from_codebook_size(cls, codebook_size: int, **kwargs: Any) -> "FSQ":
        """FSQ with the paper's recommended levels for ``codebook_size`` (see ``fsq_levels``)."""
        return cls(levels=fsq_levels(codebook_size), **kwargs)

    # ---- static facts -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(int(l) for l in self.levels)

    def _levels(self) -> np.ndarray:
        return np.asarray([int(l) for l in self.levels], np.int64)

    def _basis(self) -> np.ndarray:
        """Mixed-radix place values ``[1, L0, L0*L1, ...]`` (int32)."""
        return np.cumprod(np.concatenate([[1], self._levels()[:-1]])).astype(np.int32)

    # ---- the quantizer ------------------------------------------------------------------------
    def _tanh_argument(self, z: jax.Array) -> jax.Array:
        """``u``, the argument of the bound's tanh: ``z`` (symmetric) or ``z + shift``."""
        if self.symmetric:
            return z
        levels = self._levels()
        half = (levels - 1) * (1.0 + float(self.eps)) / 2.0
        return z + jnp.asarray(np.arctanh(np.where(levels % 2 == 0, 0.5, 0.0) / half), jnp.float32)

    def _quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """float32 ``z`` -> (float32 codes with straight-through gradient, int32 levels k)."""
        levels = self._levels()
        if self.symmetric:
            lm1 = jnp.asarray(levels - 1, jnp.float32)
            y = lm1 * (jnp.tanh(z) + 1.0) / 2.0 + 0.5
            k = straight_through(y, jnp.floor(y))           # forward: integer-valued floats
            # (2k - (L-1)) / (L-1): one exact-integer numerator, one division (as in indices_to_codes)
            codes = (2.0 * k - lm1) / lm1
            k_int = jnp.floor(y).astype(jnp.int32)
        else:
            half = jnp.asarray((levels - 1) * (1.0 + float(self.eps)) / 2.0, jnp.float32)
            offset = jnp.asarray(np.where(levels % 2 == 0, 0.5, 0.0), jnp.float32)
            width = jnp.asarray(levels // 2, jnp.float32)
            bounded = jnp.tanh(self._tanh_argument(z)) * half - offset
            r = straight_through(bounded, jnp.round(bounded))
            codes = r / width
            k_int = jnp.round(bounded).astype(jnp.int32) + (levels // 2).astype(np.int32)
        k_int = jnp.clip(k_int, 0, jnp.asarray(levels - 1, jnp.int32))  # guard; no-op on the grid
        return codes, k_int

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        if z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with levels {tuple(self.levels)} expects inputs [..., {self.dim}], "
                             f"got shape {z.shape} (project to {self.dim} dims before quantizing)")
        dtype, z = z.dtype, z.astype(jnp.float32)
        codes, k = self._quantize(z)
        indices = self.levels_to_indices(k)
        metrics = quantizer_metrics(self, indices, self.codebook_size, train,
                                    axis_name=self.axis_name, track_usage=self.track_usage)
        excess = jnp.abs(self._tanh_argument(z)) - 2.0
        saturated = jnp.mean((excess > 0).astype(jnp.float32))
        metrics["saturated"] = (saturated if self.axis_name is None
                                else jax.lax.pmean(saturated, self.axis_name))
        losses = {}
        if self.saturation_weight > 0:
            losses["saturation"] = self.saturation_weight * jnp.mean(jnp.square(jax.nn.relu(excess)))
        return codes.astype(dtype), QuantizerOutput(indices=indices, losses=losses, metrics=metrics)

    # ---- index <-> code maps (pure; callable through ``apply(..., method=...)`` or unbound) -----
    def levels_to_indices(self, k: jax.Array) -> jax.Array:
        """Integer levels ``[..., d]`` -> int32 indices ``[...]`` (dimension 0 least significant)."""
        return jnp.sum(jnp.asarray(k, jnp.int32) * jnp.asarray(self._basis()), axis=-1,
                       dtype=jnp.int32)

    def indices_to_levels(self, indices: jax.Array) -> jax.Array:
        """int indices ``[...]`` -> int32 levels ``[..., d]``: ``k_i = (index // b_i) mod L_i``."""
        idx = jnp.asarray(indices, jnp.int32)[..., None]
        return (idx // jnp.asarray(self._basis())) % jnp.asarray(self._levels(), jnp.int32)

    def levels_to_codes(self, k: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        levels = self._levels()
        kf = jnp.asarray(k).astype(jnp.float32)
        if self.symmetric:
            lm1 = jnp.asarray(levels - 1, jnp.float32)
            codes = (2.0 * kf - lm1) / lm1
        else:
            width = jnp.asarray(levels // 2, jnp.float32)
            codes = (kf - width) / width
        return codes.astype(dtype)

    def codes_to_levels(self, codes: jax.Array) -> jax.Array:
        levels = self._levels()
        c = jnp.asarray(codes, jnp.float32)
        if self.symmetric:
            k = jnp.round((c + 1.0) * jnp.asarray((levels - 1) / 2.0, jnp.float32))
        else:
            width = jnp.asarray(levels // 2, jnp.float32)
            k = jnp.round(c * width) + width
        return k.astype(jnp.int32)

    def indices_to_codes(self, indices: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """int indices ``[...]`` -> codes ``[..., d]``; equals the forward ``z_q`` exactly (in
        ``dtype``, which should be the input dtype of the forward)."""
        return self.levels_to_codes(self.indices_to_levels(indices), dtype)

    def codes_to_indices(self, codes: jax.Array) -> jax.Array:
        """Codes on the grid ``[..., d]`` -> int32 indices ``[...]``."""
        return self.levels_to_indices(self.codes_to_levels(codes))

    def implicit_codebook(self, dtype: Any = jnp.float32) -> jax.Array:
        """All ``prod(levels)`` codes ``[K, d]`` in index order (built on demand only)."""
        return self.indices_to_codes(jnp.arange(self.codebook_size, dtype=jnp.int32), dtype)
