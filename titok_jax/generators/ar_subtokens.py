"""Several sub-tokens per AR position: FQGAN's factorized head and Open-MAGVIT2's split-bit head.

A position's token is ``G`` sub-tokens ``s_0 .. s_{G-1}`` with vocabularies ``V_0 .. V_{G-1}``:

- **factorized** (``num_codebooks = k > 1``; ``fq`` / ``rq`` tokenizers, ids ``[B, N, k]``):
  ``s_i`` = factor / level ``i``, ``V_i = codebook_size`` (FQGAN's FAR, reference lineage_2d §2).
- **split bits** (``split_bits``; one LFQ index of ``b = log2(codebook_size)`` bits, ids ``[B, N]``):
  the index split into groups of ``b_0, ..., b_{G-1}`` bits, least significant first (LFQ's channel
  0 is the LSB), ``s_g = (t >> o_g) mod 2^{b_g}`` with ``o_g = b_0 + ... + b_{g-1}``, ``V_g = 2^{b_g}``
  and ``t = sum_g s_g 2^{o_g}`` (Open-MAGVIT2's AR: ``[6, 12]`` of 18 bits, pre = low bits; an int
  ``G`` = ``G`` equal groups).

Both share the model's layout (``generators/ar.py``): the input embedding of a position is the
sum of per-sub-token tables ``E_i[s_i]`` (``factor_embedding="sum"``, Open-MAGVIT2) or their
concatenation mapped back to the width by one Linear with bias (``"concat"``, FAR); the per-position
head runs ``head_depth`` causal blocks over ``[h_p, E_0[s_0], ..., E_{G-2}[s_{G-2}]]`` (``h_p`` the
trunk output before the final norm; sub-positions ``0 .. G-1`` with 1D RoPE), then the shared final
norm, and reads ``s_i`` from sub-position ``i`` with its own zero-initialised, bias-free Linear.
So ``p(t_p | .) = prod_i p(s_i | h_p, s_<i)``: the loss is ``sum_i CE(s_i)`` (teacher forcing),
which for split bits is the CE of the whole index under that factorised distribution, and sampling
draws ``s_0``, then ``s_1`` given it, ... at every position (``ar_sampling.ar_sample_subtokens``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

FACTOR_EMBEDDINGS = ("sum", "concat")


def split_bit_widths(codebook_size: int, split_bits: Any) -> tuple[int, ...]:
    """The bit widths of the groups (LSB first): ``split_bits`` as a sequence of widths summing
    to ``log2(codebook_size)``, or an int ``G`` (equal groups); ``()`` when off (None / 0)."""
    if split_bits is None or (isinstance(split_bits, (int, float)) and int(split_bits) == 0):
        return ()
    bits = math.log2(codebook_size) if codebook_size > 0 else -1
    if bits != int(bits) or bits < 1:
        raise ValueError(f"split_bits needs a codebook_size that is a power of two (an LFQ index), "
                         f"got {codebook_size}")
    bits = int(bits)
    if isinstance(split_bits, (int, float)):
        groups = int(split_bits)
        if groups < 1 or bits % groups:
            raise ValueError(f"split_bits={groups} groups must divide the {bits} bits of the index")
        return (bits // groups,) * groups
    widths = tuple(int(b) for b in split_bits)
    if any(b < 1 for b in widths) or sum(widths) != bits:
        raise ValueError(f"split_bits {list(widths)} must be widths >= 1 summing to the {bits} bits "
                         f"of codebook_size {codebook_size}")
    return widths


def sub_vocab_sizes(codebook_size: int, num_codebooks: int = 1, split_bits: Any = None
                    ) -> tuple[int, ...]:
    """``(V_0, ..., V_{G-1})`` (module docstring); ``(codebook_size,)`` for one id per token."""
    k = int(num_codebooks)
    widths = split_bit_widths(codebook_size, split_bits)
    if k < 1:
        raise ValueError(f"num_codebooks must be >= 1, got {k}")
    if k > 1 and widths:
        raise ValueError("num_codebooks > 1 (factorized ids) and split_bits (one LFQ index) exclude "
                         "each other")
    if widths:
        return tuple(2 ** b for b in widths)
    return (int(codebook_size),) * k


def to_subtokens(tokens: jax.Array, num_codebooks: int, widths: Sequence[int]) -> jax.Array:
    """Model ids -> sub-token ids ``[B, n, G]``: factorized ids pass through; an index is split
    into its bit groups (LSB first)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if not widths:
        return tokens if num_codebooks > 1 else tokens[..., None]
    parts, offset = [], 0
    for b in widths:
        parts.append((tokens >> offset) & ((1 << b) - 1))
        offset += b
    return jnp.stack(parts, axis=-1)


def from_subtokens(subs: jax.Array, num_codebooks: int, widths: Sequence[int]) -> jax.Array:
    """The inverse of ``to_subtokens``: ``[B, n, G]`` -> the model's ids."""
    subs = jnp.asarray(subs, jnp.int32)
    if not widths:
        return subs if num_codebooks > 1 else subs[..., 0]
    out, offset = jnp.zeros(subs.shape[:-1], jnp.int32), 0
    for g, b in enumerate(widths):
        out = out + (subs[..., g] << offset)
        offset += b
    return out


def subtoken_fns(model: Any, variables: Any, labels: jax.Array) -> tuple[Any, Any]:
    """The sub-token sampler's callbacks (``ar_sampling.ar_sample_subtokens``):
    ``step_fn(prev [B', G], uncond [B'], index, cache) -> (h [B', D], cache)`` (rows of a stacked
    batch take ``labels[i mod B]``, the null class where ``uncond``) and
    ``sub_fn(h [B', D], subs [B', G], i) -> logits [B', V_i]`` (float32)."""
    labels = jnp.asarray(labels, jnp.int32)

    def step_fn(prev: jax.Array, uncond: jax.Array, index: jax.Array, cache: Any):
        rows = jnp.tile(labels, prev.shape[0] // labels.shape[0])
        rows = jnp.where(uncond, model.null_label, rows)
        h, cache = model.apply(variables, prev[:, None], rows, index, cache, method="decode_hidden")
        return h[:, 0], cache

    def sub_fn(h: jax.Array, subs: jax.Array, i: int) -> jax.Array:
        logits = model.apply(variables, h[:, None], subs[:, None], method="sub_logits")
        return logits[i][:, 0]

    return step_fn, sub_fn
