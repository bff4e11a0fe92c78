"""MaskGIT parallel decoding as a pure function (TiTok ``ImageBert.generate``), jit-able, one
``lax.scan`` over the steps.

Start from ``N`` mask ids. At step ``s = 0..S-1`` with ``r = (s+1)/S`` and ``T = tau * (1 - r)``
(``tau`` = ``randomize_temperature``)::

    l      = logits_fn(ids)                           guided: [cond; uncond] in ONE batched call,
                                                      combined by ``guidance.apply_guidance``
    l      = l / (0.5 + 0.8 (1 - r))                  only with softmax_temperature_annealing
    x      = argmax_k(l + T * G1)                     Gumbel-max: a sample of softmax(l / T)
    c      = l[x] + T * G2                            confidence (G1, G2 i.i.d. Gumbel)
    x, c   = where(masked, x, ids), where(masked, c, +inf)     fixed tokens never change
    ids    = x with the m_s lowest-confidence positions set back to the mask id

``m_s`` is the official count ``max(1, min(#masked - 1, floor(N * gamma(r))))`` with ``gamma`` the
(arccos) mask schedule, and ``m_{S-1} = 0``: the last step fixes everything. The counts do not
depend on the samples, so they are computed up front in float64 (``mask_counts``).

Two documented departures from the PyTorch loop, both without effect for continuous noise: the
``m_s`` positions are picked by exact ranking (the official ``confidence <= cutoff`` can re-mask more
on ties), and ``#masked`` is tracked per sample (the official takes sample 0's, all equal).
``confidence="log_probs"`` uses ``log_softmax(l)[x]`` instead of the raw logit (the original MaskGIT
sampler); the default ``"logits"`` is TiTok's.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.generators.guidance import (apply_guidance, check_guidance_schedule,
                                           guidance_weight, needs_uncond)
from titok_jax.generators.masking import mask_ratio_np

# logits_fn(tokens int32 [B', N], uncond bool [B']) -> logits [B', N, K] over the image codes.
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
CONFIDENCES = ("logits", "log_probs")


def mask_counts(num_tokens: int, steps: int, schedule: str = "arccos") -> np.ndarray:
    """``[steps]`` int: how many tokens stay masked after each step (see the module docstring)."""
    if steps < 1 or num_tokens < 1:
        raise ValueError(f"steps and num_tokens must be >= 1, got {steps}, {num_tokens}")
    counts, masked = [], num_tokens
    for s in range(steps):
        if s == steps - 1:
            m = 0
        else:
            target = int(np.floor(num_tokens * mask_ratio_np((s + 1) / steps, schedule)))
            m = max(1, min(masked - 1, target))
        counts.append(m)
        masked = m
    return np.asarray(counts, np.int32)


def _lowest_k(confidence: jax.Array, k: jax.Array) -> jax.Array:
    """Bool ``[B, N]``: True at the ``k`` (per-row ``[B]`` or scalar) lowest entries of each row."""
    ranks = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)
    return ranks < jnp.reshape(k, (-1, 1))


def maskgit_sample(
    logits_fn: LogitsFn,
    key: jax.Array,
    batch: int,
    num_tokens: int,
    mask_id: int,
    *,
    steps: int = 8,
    guidance_scale: float | jax.Array = 0.0,
    guidance_schedule: str = "constant",
    guidance_power: float = 3.0,
    randomize_temperature: float | jax.Array = 1.0,
    softmax_temperature_annealing: bool = False,
    mask_schedule: str = "arccos",
    confidence: str = "logits",
    init_tokens: jax.Array | None = None,
    num_fixed: int = 0,
    return_trace: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Sample ``[batch, num_tokens]`` int32 code ids by parallel decoding (module docstring).

    Args:
      logits_fn: ``(tokens [B', N], uncond [B']) -> [B', N, K]``. Unguided calls have
        ``B' = batch`` and ``uncond`` all False; guided calls stack ``[ids; ids]`` (``B' = 2
        batch``) with ``uncond = [False]*batch + [True]*batch`` (row ``i`` and ``i + batch`` are the
        same sample).
      key: PRNG key; step ``s`` uses ``fold_in(key, s)``.
      mask_id: the input id of a masked position; must lie outside ``[0, K)``.
      steps: number of decoding steps ``S`` (8 for TiTok-L-32/B-64, 64 for S-128).
      guidance_scale / guidance_schedule / guidance_power: classifier-free guidance
        (``guidance.py``; ``guidance_power`` is the official ``guidance_scale_pow``). A Python
        ``0`` with ``constant``/``linear`` skips the unconditional pass.
      randomize_temperature: ``tau``; the sampling and confidence temperature anneals to 0.
      softmax_temperature_annealing: divide the logits by ``0.5 + 0.8 (1 - r)``.
      init_tokens: the start ``[batch, num_tokens]`` (default all ``mask_id``); entries that are
        not ``mask_id`` are kept as fixed tokens. Pass it to give the state a sharding (e.g. the
        batch over a mesh).
      num_fixed: how many entries of ``init_tokens`` (per row) are given (e.g. a video's first
        latent frame): the per-step counts are those of ``num_tokens - num_fixed`` tokens, so the
        schedule spreads the free ones over the ``steps`` (0: the official counts over all ``N``).
      return_trace: also return ``{"tokens": [S, B, N], "num_masked": [S, B],
        "guidance": [S]}``, the state after each step.
    """
    check_guidance_schedule(guidance_schedule)
    if confidence not in CONFIDENCES:
        raise ValueError(f"unknown confidence {confidence!r}; expected one of {CONFIDENCES}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 <= num_fixed < num_tokens:
        raise ValueError(f"num_fixed must be in [0, {num_tokens}), got {num_fixed}")
    counts = jnp.asarray(mask_counts(num_tokens - num_fixed, steps, mask_schedule))
    guided = needs_uncond(guidance_schedule, guidance_scale)
    uncond_flags = jnp.concatenate([jnp.zeros((batch,), bool), jnp.ones((batch,), bool)])

    def logits_at(ids: jax.Array, weight: jax.Array) -> jax.Array:
        if not guided:
            out = logits_fn(ids, jnp.zeros((batch,), bool))
            return _check_logits(out, batch, num_tokens, mask_id).astype(jnp.float32)
        both = logits_fn(jnp.concatenate([ids, ids], axis=0), uncond_flags)
        both = _check_logits(both, 2 * batch, num_tokens, mask_id).astype(jnp.float32)
        return apply_guidance(both[:batch], both[batch:], weight, guidance_schedule)

    def step_fn(ids: jax.Array, s: jax.Array):
        ratio = (s + 1).astype(jnp.float32) / steps
        temp = jnp.asarray(randomize_temperature, jnp.float32) * (1.0 - ratio)
        weight = guidance_weight(guidance_schedule, guidance_scale, s, steps, guidance_power)
        is_mask = ids == mask_id
        logits = logits_at(ids, weight)
        if softmax_temperature_annealing:
            logits = logits / (0.5 + 0.8 * (1.0 - ratio))
        k_sample, k_conf = jax.random.split(jax.random.fold_in(key, s))
        sampled = jnp.argmax(logits + temp * jax.random.gumbel(k_sample, logits.shape), axis=-1)
        scores = jax.nn.log_softmax(logits, axis=-1) if confidence == "log_probs" else logits
        score = jnp.take_along_axis(scores, sampled[..., None], axis=-1)[..., 0]
        sampled = jnp.where(is_mask, sampled.astype(jnp.int32), ids)
        score = jnp.where(is_mask, score, jnp.inf)
        conf = score + temp * jax.random.gumbel(k_conf, score.shape)
        # counts[s], re-clamped per sample to [1, #masked - 1] (a no-op guard); 0 at the end
        m = jnp.maximum(1, jnp.minimum(counts[s], jnp.sum(is_mask, axis=-1) - 1))
        m = jnp.where(counts[s] == 0, 0, m)
        new_ids = jnp.where(_lowest_k(conf, m), mask_id, sampled).astype(jnp.int32)
        trace = {"tokens": new_ids, "num_masked": jnp.sum(new_ids == mask_id, axis=-1),
                 "guidance": weight if guided else jnp.zeros((), jnp.float32)}
        return new_ids, trace

    if init_tokens is None:
        ids0 = jnp.full((batch, num_tokens), mask_id, jnp.int32)
    elif init_tokens.shape != (batch, num_tokens):
        raise ValueError(f"init_tokens must be [{batch}, {num_tokens}], got {init_tokens.shape}")
    else:
        ids0 = init_tokens.astype(jnp.int32)
    ids, trace = jax.lax.scan(step_fn, ids0, jnp.arange(steps))
    return (ids, trace) if return_trace else ids


def _check_logits(logits: jax.Array, rows: int, num_tokens: int, mask_id: int) -> jax.Array:
    """Shape checks at trace time (one-line ValueErrors)."""
    if logits.ndim != 3 or logits.shape[:2] != (rows, num_tokens):
        raise ValueError(f"logits_fn must return [{rows}, {num_tokens}, K], got {logits.shape}")
    if 0 <= mask_id < logits.shape[-1]:
        raise ValueError(f"mask_id {mask_id} is a valid code of the {logits.shape[-1]}-way logits; "
                         f"it must lie outside [0, K)")
    return logits
