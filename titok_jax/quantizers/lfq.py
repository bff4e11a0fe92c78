"""Lookup-free quantization (LFQ, MAGVIT-v2 arXiv 2310.05737) and its spherical form (BSQ, arXiv 2406.07548).

Codes. Each of the ``bits`` dimensions is quantized to ``{-s, +s}``: ``q_i = +s if x_i > 0 else -s``
(so x_i == 0 maps to -s). ``x = z`` and ``s = codebook_scale`` for LFQ; for BSQ (``spherical=True``)
``x = u = z / ||z||`` and ``s = codebook_scale / sqrt(bits)``, so the codes lie on the sphere of radius
``codebook_scale`` and ``||u - q||^2 = 2 - 2 sum_i |u_i| / sqrt(bits)`` is in ``[0, 2 - 2/sqrt(bits)]``
(scale 1). The output is ``q + (x - sg(x))``: forward exactly ``q``, gradient the identity w.r.t. x.
Index: ``sum_i 2**i [x_i > 0]`` (dimension 0 is the least significant bit), int32.

Entropy. With the soft assignment ``p(c|x) = softmax_c(2 x.c / T)`` over all codes ``c in {-s, +s}^b``
(equal to ``softmax(-||x - c||^2 / T)`` because every code has the same norm), the logit is a sum of
per-bit terms ``(2/T) x_i c_i``, so p factorises into independent bits with

    P(c_i = +s | x) = exp(2 s x_i/T) / (exp(2 s x_i/T) + exp(-2 s x_i/T)) = sigmoid(4 s x_i / T).

This holds for both cases: BSQ just has x = u and s = 1/sqrt(b) (BSQ's ``sigmoid(4 tau u_i / sqrt(b))``
with tau = 1/T). Hence the per-sample entropy is ``H(p(.|x)) = sum_i H_bin(sigmoid(4 s x_i / T))``,
O(N b) with no 2^b tensor. The batch ("codebook") entropy is that of the mixture
``P(c) = mean_n prod_i p_ni(c_i)`` over the global batch, which does not factorise. It is computed
exactly, without an [N, 2^b] tensor, by splitting the bits of a group into a low and a high half:
``P(c_lo + 2^m c_hi) = (1/N) sum_n lo_n(c_lo) hi_n(c_hi)``, one float32 matmul ``hi^T lo`` with
[N, 2^(b/2)] operands (the contraction over the sharded batch axis is an all-reduce under jit, a
``psum`` over ``axis_name`` under shard_map).

Batch-entropy grouping (``batch_entropy_group_size`` g and ``entropy_grouping``):
- ``None``: exact over all bits when bits <= 16, otherwise ceil(bits/16) contiguous groups of nearly
  equal size, as in "separate";
- ``"separate"`` (BSQ): contiguous groups of g bits (the last one smaller if g does not divide bits);
  each group's 2^g mixture is averaged over the global batch and the group entropies are summed (an
  upper bound of the exact entropy; equal to it for g = bits);
- ``"subtokens"`` (FlowMo): every token's bits are cut into G = bits/g sub-tokens of g bits, sub-token
  h holding bits ``h, h + G, h + 2G, ...`` (FlowMo's ``b t (fg fh) -> b fg (t fh)`` with fg = g); all
  sub-tokens share one 2^g mixture and both entropy terms are per sub-token (the per-sample term is the
  token entropy / G). FlowMo-Lo: ``LFQ.flowmo(18, 9)``.

Losses (weighted scalars, float32):
    entropy    = entropy_weight * (mean_n H_sample - diversity_gamma * H_batch)   (negative by design)
    commitment = commitment_weight * mean (x - sg(q))^2

Open-MAGVIT2 (TencentARC/SEED-Voken ``lookup_free_quantize.py`` + ``vqperceptual.py``) in these
terms: ``{"name": "lfq", "bits": 18, "entropy_weight": 0.1, "commitment_weight": 0.25,
"temperature": 0.01, "batch_entropy_group_size": 18, "batch_entropy_eps": 1e-5}``. Its dense
``softmax(2 z.c / T)`` over all 2^18 codes is the factorised form above (its per-sample
``log_softmax(logits / T + 1e-5)`` shifts every logit alike, so it is the exact entropy); its
codebook entropy ``-sum P log(P + 1e-5)`` over the exact 2^18 mixture is ``batch_entropy_eps =
1e-5`` with one group of 18 bits (the default grouping would split it in two 9-bit halves).
Differences: OM2 averages P over the tokens of its own device (no all-reduce), this over the
global batch; OM2 computes both losses in training only. Its optional annealing (``codebook_enlarge
_ratio`` r over ``codebook_enlarge_steps`` n: the entropy term times ``1 + r max(0, 1 - step / n)``)
needs the step, which a quantizer does not see: the tokenizer task applies
:func:`entropy_anneal_factor` (``config.losses.entropy_anneal_ratio`` / ``entropy_anneal_steps``).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from titok_jax.quantizers.base import (HIGHEST, QuantizerOutput, binary_entropy_from_logits,
                                       entropy, global_mean, global_sum, l2_normalize,
                                       quantizer_metrics, replicated_if_explicit, straight_through)

EXACT_BATCH_ENTROPY_MAX_BITS = 16   # above this, the default batch entropy is grouped
MAX_GROUP_BITS = 24                 # a group's mixture has 2^g entries
_GROUPINGS = ("separate", "subtokens")


# ---- pure entropy helpers (float32) -----------------------------------------------------------
def bit_logits(x: jax.Array, scale: float, temperature: float) -> jax.Array:
    """Logits of ``P(c_i = +s | x) = sigmoid(4 s x_i / T)`` (float32)."""
    return x.astype(jnp.float32) * jnp.float32(4.0 * scale / temperature)


def per_sample_entropy(logits: jax.Array) -> jax.Array:
    """``H(p(.|x)) = sum_i H_bin(sigmoid(logit_i))`` over the last axis (nats), float32."""
    return jnp.sum(binary_entropy_from_logits(logits), axis=-1)


def code_probs(logits: jax.Array) -> jax.Array:
    """``[N, k]`` bit logits -> ``[N, 2^k]`` probabilities ``prod_i p_i(c_i)``, column
    ``sum_i 2^i c_i`` (LSB first). Built as a running Kronecker product (k = 0 gives ones)."""
    p1 = jax.nn.sigmoid(logits)
    p0 = jax.nn.sigmoid(-logits)
    out = jnp.ones(logits.shape[:-1] + (1,), jnp.float32)
    for i in range(logits.shape[-1]):
        out = jnp.concatenate([out * p0[..., i:i + 1], out * p1[..., i:i + 1]], axis=-1)
    return out


def mixture_sum(logits: jax.Array) -> jax.Array:
    """``[N, g]`` bit logits -> ``[2^g]``: ``sum_n prod_i p_ni(c_i)`` (LSB-first code order), via
    ``hi^T lo`` over the low ceil(g/2) and high floor(g/2) bits: no [N, 2^g] tensor."""
    g = logits.shape[-1]
    m = (g + 1) // 2
    lo = code_probs(logits[:, :m])        # [N, 2^m]
    hi = code_probs(logits[:, m:])        # [N, 2^(g-m)]
    # row c_hi, column c_lo -> index c_lo + 2^m c_hi; the contraction is over the (sharded) batch
    joint = jnp.matmul(hi.T, lo, precision=HIGHEST, preferred_element_type=jnp.float32,
                       out_sharding=replicated_if_explicit(logits))
    return joint.reshape(-1)


def mixture_entropy(logits: jax.Array, axis_name: Any = None, eps: float = 0.0) -> jax.Array:
    """Entropy of the global-batch mixture ``P = mean_n prod_i p_ni(c_i)`` for ``[N, g]`` bit
    logits; ``eps > 0``: ``-sum P log(P + eps)`` (Open-MAGVIT2's 1e-5) instead of the exact one."""
    total = global_sum(mixture_sum(logits.astype(jnp.float32)), axis_name)
    count = global_sum(jnp.asarray(logits.shape[0], jnp.float32), axis_name)
    p = total / count
    if eps > 0:
        return -jnp.sum(p * jnp.log(p + jnp.float32(eps)))
    return entropy(p)


def entropy_anneal_factor(step: Any, ratio: float, steps: int) -> jax.Array:
    """Open-MAGVIT2's entropy-loss annealing (``codebook_enlarge_ratio`` / ``_steps``): the factor
    ``1 + ratio * max(0, 1 - step / steps)`` on the entropy term, ``1 + ratio`` at step 0 falling
    linearly to 1 at ``steps`` (float32; ``step`` may be traced; ``ratio = 0``: always 1)."""
    if steps <= 0:
        raise ValueError(f"entropy annealing needs steps > 0, got {steps}")
    frac = jnp.maximum(0.0, 1.0 - jnp.asarray(step, jnp.float32) / jnp.float32(steps))
    return 1.0 + jnp.float32(ratio) * frac


def contiguous_groups(bits: int, group_size: int | None) -> tuple[int, ...]:
    """Group sizes of the "separate" batch entropy (see the module docstring)."""
    if group_size is None:
        n = -(-bits // EXACT_BATCH_ENTROPY_MAX_BITS)
        return tuple(bits // n + (1 if j < bits % n else 0) for j in range(n))
    return (group_size,) * (bits // group_size) + ((bits % group_size,) if bits % group_size else ())


class LFQ(nn.Module):
    """Lookup-free quantizer with the entropy loss; ``spherical=True`` gives BSQ.

    Attributes:
      bits: code dimension b (the input's last dimension); codebook size 2^b, b <= 31.
      entropy_weight: weight of ``mean H_sample - diversity_gamma * H_batch``.
      commitment_weight: weight of ``mean (x - sg(q))^2``.
      temperature: T of ``softmax(2 x.c / T)``.
      diversity_gamma: weight of the batch entropy inside the entropy term.
      batch_entropy_eps: 0 (the exact batch entropy) or eps in ``-sum P log(P + eps)``
        (Open-MAGVIT2: 1e-5; module docstring).
      spherical: BSQ: l2-normalise the input, codes ``sign * codebook_scale / sqrt(bits)``.
      codebook_scale: s (the code magnitude, or the code norm when spherical).
      batch_entropy_group_size: None (exact up to 16 bits, else grouped) or g (see module docstring).
      entropy_grouping: "separate" (BSQ, contiguous groups, entropies summed) or "subtokens" (FlowMo).
      track_usage: keep cumulative code counts in ``quantizer_stats`` (only for b <= 20).
      axis_name: mesh axis to reduce over when run inside ``shard_map``.
    """

    bits: int
    entropy_weight: float = 0.1
    commitment_weight: float = 0.25
    temperature: float = 0.01
    diversity_gamma: float = 1.0
    batch_entropy_eps: float = 0.0
    spherical: bool = False
    codebook_scale: float = 1.0
    batch_entropy_group_size: int | None = None
    entropy_grouping: str = "separate"
    track_usage: bool = True
    axis_name: Any = None

    def __post_init__(self) -> None:
        b = self.bits
        if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or not 1 <= b <= 31:
            raise ValueError(f"LFQ bits must be an int in [1, 31] (int32 indices), got {b!r}")
        for name in ("entropy_weight", "commitment_weight", "diversity_gamma", "batch_entropy_eps"):
            v = getattr(self, name)
            if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
                raise ValueError(f"LFQ {name} must be a finite number >= 0, got {v!r}")
        for name in ("temperature", "codebook_scale"):
            v = getattr(self, name)
            if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
                raise ValueError(f"LFQ {name} must be a finite number > 0, got {v!r}")
        if self.entropy_grouping not in _GROUPINGS:
            raise ValueError(f"LFQ entropy_grouping must be one of {_GROUPINGS}, "
                             f"got {self.entropy_grouping!r}")
        g = self.batch_entropy_group_size
        if g is not None:
            if not isinstance(g, (int, np.integer)) or isinstance(g, bool) or not 1 <= g <= b:
                raise ValueError(f"LFQ batch_entropy_group_size must be None or an int in [1, bits={b}], "
                                 f"got {g!r}")
            if g > MAX_GROUP_BITS:
                raise ValueError(f"LFQ batch_entropy_group_size {g} > {MAX_GROUP_BITS}: the 2^{g} mixture "
                                 "is too large; use smaller groups")
        if self.entropy_grouping == "subtokens" and (g is None or b % g):
            raise ValueError(f"LFQ entropy_grouping='subtokens' needs a batch_entropy_group_size that "
                             f"divides bits={b}, got {g!r}")
        super().__post_init__()

    @classmethod
    def flowmo(cls, bits: int = 18, group_size: int = 9, **kwargs: Any) -> "LFQ":
        """FlowMo's quantizer: T = 0.1, entropy 0.0025, commitment 0.000625, ``group_size``-bit
        sub-tokens for the entropy (FlowMo-Lo: 18 bits, 9-bit sub-tokens). FlowMo adds 1e-5 inside
        its logs; this does not."""
        defaults = dict(entropy_weight=0.0025, commitment_weight=0.000625, temperature=0.1,
                        batch_entropy_group_size=group_size, entropy_grouping="subtokens")
        defaults.update(kwargs)
        return cls(bits=bits, **defaults)

    # ---- static facts -------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return 2 ** int(self.bits)

    @property
    def code_value(self) -> float:
        """s: the magnitude of every code coordinate."""
        s = float(self.codebook_scale)
        return s / math.sqrt(self.bits) if self.spherical else s

    def _powers(self) -> jax.Array:
        return jnp.asarray(np.left_shift(1, np.arange(self.bits)).astype(np.int32))

    # ---- entropy terms ------------------------------------------------------------------------
    def entropy_terms(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(per-sample term, batch term) of the entropy loss for float32 ``x`` ``[..., bits]``
        (already normalised when spherical); both means over the global batch."""
        logits = bit_logits(x.reshape(-1, self.bits), self.code_value, self.temperature)
        h_sample = global_mean(per_sample_entropy(logits), axis=0, axis_name=self.axis_name)
        g = self.batch_entropy_group_size
        if self.entropy_grouping == "subtokens":
            n_sub = self.bits // g
            # bit i = k * n_sub + h belongs to sub-token h as its k-th bit
            sub = logits.reshape(-1, g, n_sub).transpose(0, 2, 1).reshape(-1, g)
            return h_sample / n_sub, mixture_entropy(sub, self.axis_name, self.batch_entropy_eps)
        h_batch = jnp.zeros((), jnp.float32)
        start = 0
        for size in contiguous_groups(self.bits, g):
            h_batch = h_batch + mixture_entropy(logits[:, start:start + size], self.axis_name,
                                                self.batch_entropy_eps)
            start += size
        return h_sample, h_batch

    # ---- the quantizer ------------------------------------------------------------------------
    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        if z.ndim < 1 or z.shape[-1] != self.bits:
            raise ValueError(f"LFQ with bits={self.bits} expects inputs [..., {self.bits}], got shape "
                             f"{z.shape}")
        x = z.astype(jnp.float32)
        if self.spherical:
            x = l2_normalize(x, axis=-1)
        positive = x > 0
        s = jnp.float32(self.code_value)
        q = jnp.where(positive, s, -s)
        z_q = straight_through(x, q)
        indices = jnp.sum(positive.astype(jnp.int32) * self._powers(), axis=-1, dtype=jnp.int32)

        h_sample, h_batch = self.entropy_terms(x)
        commit = global_mean(jnp.square(x - lax.stop_gradient(q)), axis=None,
                             axis_name=self.axis_name)
        losses = {
            "entropy": jnp.float32(self.entropy_weight)
                       * (h_sample - jnp.float32(self.diversity_gamma) * h_batch),
            "commitment": jnp.float32(self.commitment_weight) * commit,
        }
        metrics = quantizer_metrics(self, indices, self.codebook_size, train,
                                    axis_name=self.axis_name, track_usage=self.track_usage)
        metrics.update(per_sample_entropy=h_sample, batch_entropy=h_batch)
        return z_q.astype(z.dtype), QuantizerOutput(indices=indices, losses=losses, metrics=metrics)

    # ---- index <-> code maps ------------------------------------------------------------------
    def indices_to_bits(self, indices: jax.Array) -> jax.Array:
        """int indices ``[...]`` -> bool bits ``[..., bits]`` (LSB first)."""
        return (jnp.asarray(indices, jnp.int32)[..., None] & self._powers()) != 0

    def indices_to_codes(self, indices: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """int indices ``[...]`` -> codes ``[..., bits]`` in ``{-s, +s}``; equals the forward z_q."""
        s = jnp.float32(self.code_value)
        return jnp.where(self.indices_to_bits(indices), s, -s).astype(dtype)

    def codes_to_indices(self, codes: jax.Array) -> jax.Array:
        """Codes (or any input) ``[..., bits]`` -> int32 indices of their signs."""
        return jnp.sum((jnp.asarray(codes) > 0).astype(jnp.int32) * self._powers(), axis=-1,
                       dtype=jnp.int32)
