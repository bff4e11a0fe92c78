"""KV-cached autoregressive sampling as a pure function: one ``lax.scan`` over the positions.

At position ``i = 0 .. L-1`` (``L`` = ``length``, any prefix length up to the model's ``N``; later
positions are never computed), with ``s`` the guidance scale, ``T`` the temperature::

    l       = step_fn(t_{i-1}, i, cache)            guided: rows [cond; uncond] in ONE batched call
    l       = u + s (c - u)                         (c, u = cond / uncond rows; LlamaGen's CFG:
                                                     s = 1 is the conditional model, s = 0 the
                                                     unconditional one; a Python s == 1 skips u)
    l       = keep_top_p(keep_top_k(l / T))        filtered entries -> -inf
    t_i     = argmax(l + G),  G ~ Gumbel(fold_in(key, i))      (a sample of softmax(l));
    t_i     = argmax(guided logits)                 when T == 0 (greedy)

Filters (both keep ties, so they do not depend on the order of equal logits):

- top-k (``k > 0``): keep ``l_j >= `` the k-th largest logit (ties at the boundary are all kept;
  ``k >= K`` or ``k <= 0`` keeps everything).
- top-p (nucleus, ``p < 1``): with ``P = softmax(l)``, keep ``j`` iff the mass of the strictly
  more probable entries, ``sum_{m: l_m > l_j} P_m``, is ``< p``: the smallest set of most probable
  entries whose mass reaches ``p``, plus anything tied with its last member. ``p <= 0`` keeps the
  argmax (and its ties), ``p >= 1`` everything. Applied after top-k, on the renormalised
  distribution (as the HF / LlamaGen filter). HF keeps one entry more when a prefix's mass equals
  ``p`` exactly; here that prefix is already the nucleus.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# step_fn(prev [B'], uncond [B'] bool, index, cache) -> (logits [B', K], cache)
StepFn = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
NEG_INF = -jnp.inf


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Bool ``[..., K]``: True where ``logits >=`` the k-th largest of its row (ties kept)."""
    num = logits.shape[-1]
    k = int(k)
    if k <= 0 or k >= num:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return logits >= kth


def top_p_mask(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Bool ``[..., K]``: the tie-inclusive nucleus of mass ``p`` (module docstring); ``p`` may be
    traced. Entries already at ``-inf`` are never kept."""
    logits = logits.astype(jnp.float32)
    p = jnp.asarray(p, jnp.float32)
    ordered = -jnp.sort(-logits, axis=-1)                      # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs           # exclusive cumulative mass
    count = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
    keep = logits >= threshold
    return jnp.where(p >= 1.0, logits > NEG_INF, keep)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float | jax.Array = 1.0
                  ) -> jax.Array:
    """``logits`` with the entries outside top-k, then outside the top-p nucleus, set to -inf."""
    logits = logits.astype(jnp.float32)
    if top_k and top_k > 0:
        logits = jnp.where(top_k_mask(logits, top_k), logits, NEG_INF)
    if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        logits = jnp.where(top_p_mask(logits, top_p), logits, NEG_INF)
    return logits


def sample_logits(key: jax.Array, logits: jax.Array, temperature: float | jax.Array = 1.0,
                  top_k: int = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
    """One id per row of ``logits [..., K]`` (int32): Gumbel-max on the filtered ``logits / T``;
    the argmax of ``logits`` when ``T == 0`` (``T`` may be traced)."""
    logits = logits.astype(jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)
    scaled = filter_logits(logits / jnp.maximum(t, 1e-6), top_k, top_p)
    sampled = jnp.argmax(scaled + jax.random.gumbel(key, logits.shape), axis=-1)
    return jnp.where(t > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _check_settings(top_k: int, batch: int, length: int) -> None:
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if batch < 1 or length < 1:
        raise ValueError(f"batch and length must be >= 1, got {batch}, {length}")


def ar_sample(
    step_fn: StepFn,
    cache_fn: Callable[[int], Any],
    key: jax.Array,
    batch: int,
    length: int,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    guidance_scale: float | jax.Array = 1.0,
    return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Sample ``[batch, length]`` int32 ids position by position (module docstring).

    Args:
      step_fn: ``(prev [B'], uncond [B'], index, cache) -> (logits [B', K], cache)`` for position
        ``index``; ``prev`` is the previous token (0 at ``index == 0``, where the model reads the
        class). Unguided: ``B' = batch``, ``uncond`` all False; guided: ``B' = 2 batch`` with rows
        ``i`` and ``i + batch`` the same sample, cond then uncond.
      cache_fn: ``rows -> cache`` of ``length`` slots (zeros) for ``B'`` rows.
      key: PRNG key; position ``i`` draws from ``fold_in(key, i)``.
      temperature / top_k / top_p / guidance_scale: as in the module docstring; ``top_k`` is
        static, the others may be traced (a Python ``guidance_scale == 1`` runs no uncond rows).
      return_logits: also return the guided, unfiltered logits ``[batch, length, K]`` (float32).
    """
    _check_settings(top_k, batch, length)
    guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1)
    rows = 2 * batch if guided else batch
    uncond = jnp.arange(rows) >= batch
    scale = jnp.asarray(guidance_scale, jnp.float32)

    def body(carry, i):
        prev, cache = carry
        inputs = jnp.concatenate([prev, prev]) if guided else prev
        logits, cache = step_fn(inputs, uncond, i, cache)
        if logits.shape[0] != rows or logits.ndim != 2:
            raise ValueError(f"step_fn must return logits [{rows}, K], got {logits.shape}")
        logits = logits.astype(jnp.float32)
        if guided:
            cond, unc = logits[:batch], logits[batch:]
            logits = unc + scale * (cond - unc)
        token = sample_logits(jax.random.fold_in(key, i), logits, temperature, top_k, top_p)
        return (token, cache), ((token, logits) if return_logits else token)

    init = (jnp.zeros((batch,), jnp.int32), cache_fn(rows))
    _, out = jax.lax.scan(body, init, jnp.arange(length))
    if return_logits:
        tokens, logits = out
        return tokens.T, jnp.swapaxes(logits, 0, 1)
    return out.T


# sub_fn(h [B', D], subs [B', G], i) -> logits [B', V_i]: sub-token i of the position whose trunk
# output is h, given subs[:, :i] (later entries are ignored: the head is causal).
SubFn = Callable[[jax.Array, jax.Array, int], jax.Array]


def ar_sample_subtokens(
    step_fn: Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]],
    sub_fn: SubFn,
    cache_fn: Callable[[int], Any],
    key: jax.Array,
    batch: int,
    length: int,
    num_sub: int,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    guidance_scale: float | jax.Array = 1.0,
    return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
    """``ar_sample`` for positions of ``num_sub = G`` sub-tokens (``ar_subtokens``): sub-ids
    ``[batch, length, G]`` int32.

    At position ``i``: ``h = step_fn(s_{i-1} [B', G], uncond, i, cache)`` (the trunk; zeros at
    ``i = 0``), then for ``g = 0 .. G-1``: ``l = sub_fn(h, s_i, g)``, guided per sub-token
    (``u + s (c - u)``, FAR / Open-MAGVIT2), filtered and sampled as in ``ar_sample`` with the key
    ``fold_in(fold_in(key, i), g)``; the drawn ``s_{i,g}`` goes to both halves of a guided batch
    before sub-token ``g + 1``. ``top_k`` applies to each sub-vocabulary. ``return_logits`` adds
    the guided logits, one ``[batch, length, V_g]`` per sub-token.
    """
    _check_settings(top_k, batch, length)
    guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1)
    rows = 2 * batch if guided else batch
    uncond = jnp.arange(rows) >= batch
    scale = jnp.asarray(guidance_scale, jnp.float32)

    def both(x):
        return jnp.concatenate([x, x]) if guided else x

    def body(carry, i):
        prev, cache = carry
        h, cache = step_fn(both(prev), uncond, i, cache)
        k_i = jax.random.fold_in(key, i)
        subs = jnp.zeros((batch, num_sub), jnp.int32)
        all_logits = []
        for g in range(num_sub):
            logits = sub_fn(h, both(subs), g).astype(jnp.float32)
            if logits.ndim != 2 or logits.shape[0] != rows:
                raise ValueError(f"sub_fn must return logits [{rows}, V], got {logits.shape}")
            if guided:
                logits = logits[batch:] + scale * (logits[:batch] - logits[batch:])
            token = sample_logits(jax.random.fold_in(k_i, g), logits, temperature, top_k, top_p)
            subs = subs.at[:, g].set(token)
            all_logits.append(logits)
        return (subs, cache), ((subs, tuple(all_logits)) if return_logits else subs)

    init = (jnp.zeros((batch, num_sub), jnp.int32), cache_fn(rows))
    _, out = jax.lax.scan(body, init, jnp.arange(length))
    if return_logits:
        subs, logits = out
        return jnp.swapaxes(subs, 0, 1), tuple(jnp.swapaxes(l, 0, 1) for l in logits)
    return jnp.swapaxes(out, 0, 1)
