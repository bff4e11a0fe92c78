"""Memory-bounded nearest-code search, the VQ entropy loss and the rotation trick (pure functions).

Everything here works on flat float32 arrays: tokens ``x [N, d]`` and a codebook ``E [K, d]``. The
``N x K`` distance matrix is never built whole: tokens are processed in chunks (``lax.map``) and, when
the codebook alone is larger than the budget, codes too (``lax.scan`` with a running min / argmin), so
at most ``max_elements`` distances exist at a time.

Token chunks are *strided*: chunk ``j`` holds tokens ``j, j + C, j + 2C, ...`` (``C`` chunks). A batch
sharded over devices along the token axis therefore stays sharded inside every chunk, and every chunk
runs on all devices at once instead of being gathered to one. On a mesh with Explicit axes, where the
token axis is split into ``S`` equal blocks in the array's type, the striding (and the padding to a
whole number of chunks) is done inside each block: chunk ``j`` holds local tokens ``j, j + C, ...`` of
every block, i.e. it is ``[S * rows_per_block]`` sharded the same way, with no data movement.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from titok_jax.quantizers.base import (
    HIGHEST, entropy, entropy_from_logits, global_sum, l2_normalize, shard_count,
)

DEFAULT_MAX_ELEMENTS = 1 << 24   # 64 MiB of float32 distances per chunk


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` in float32 at HIGHEST precision."""
    return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32),
                           (((1,), (1,)), ((), ())), precision=HIGHEST,
                           preferred_element_type=jnp.float32)


def _token_chunks(n: int, per_chunk: int, shards: int = 1) -> tuple[int, int]:
    """(rows per chunk, number of chunks) for ``n`` tokens and at most ``per_chunk`` rows a chunk.

    With ``shards > 1`` (token axis split into that many equal blocks on an Explicit mesh) every
    block contributes the same number of rows to each chunk, so rows is a multiple of ``shards``."""
    if shards > 1:
        local = max(1, min(n // shards, per_chunk // shards))
        return shards * local, max(1, math.ceil(n // shards / local))
    rows = max(1, min(n, per_chunk))
    return rows, max(1, math.ceil(n / rows))


def _map_token_chunks(fn: Callable[..., Any], xs: tuple[jax.Array, ...], rows: int,
                      chunks: int, remat: bool = False, shards: int = 1) -> Any:
    """Apply ``fn(*chunk)`` to strided token chunks of the arrays ``xs`` (all ``[N, ...]``).

    Returns ``fn``'s outputs stacked over chunks (leading axis ``chunks``, then ``rows``); padded
    rows are the caller's to drop (see ``_unchunk``). ``shards``: the number of equal blocks the
    token axis is split into on an Explicit mesh (1 otherwise); the striding and padding then happen
    inside each block (``[S, N/S] -> [C, S * rows/S]``) so that the chunks keep the blocks' sharding."""
    if chunks == 1:
        return jax.tree.map(lambda y: y[None], fn(*xs))
    n = xs[0].shape[0]
    local = rows // shards
    pad = local * chunks - n // shards

    def split(a):
        tail = a.shape[1:]
        a = a.reshape((shards, n // shards) + tail)
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * len(tail))
        a = jnp.moveaxis(a.reshape((shards, local, chunks) + tail), 2, 0)
        return a.reshape((chunks, rows) + tail)

    body = jax.checkpoint(lambda c: fn(*c)) if remat else (lambda c: fn(*c))
    return lax.map(body, tuple(split(a) for a in xs))


def _unchunk(y: jax.Array, n: int, shards: int = 1) -> jax.Array:
    """Inverse of the strided split for a per-row output ``[chunks, rows, ...]`` -> ``[n, ...]``."""
    chunks, rows = y.shape[:2]
    if chunks == 1:
        return y[0]
    tail = y.shape[2:]
    local = rows // shards
    y = jnp.moveaxis(y.reshape((chunks, shards, local) + tail), 0, 2)
    y = y.reshape((shards, local * chunks) + tail)[:, :n // shards]
    return y.reshape((n,) + tail)


def _chunk_shards(x: jax.Array) -> int:
    """Blocks of the token axis of ``x [N, ...]`` to chunk within (> 1 only on an Explicit mesh)."""
    s = shard_count(x, 0)
    return s if s > 1 and x.shape[0] % s == 0 else 1


def _full_rows(like: jax.Array, value: Any, dtype: Any) -> jax.Array:
    """``full((like.shape[0],), value)`` with ``like``'s sharding of its first axis."""
    if shard_count(like, 0) == 1:
        return jnp.full((like.shape[0],), value, dtype)
    return jnp.full_like(like[:, 0] if like.ndim > 1 else like, value, dtype)


def nearest_code(x: jax.Array, codebook: jax.Array, *, cosine: bool = False,
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> jax.Array:
    """int32 ``[N]``: ``argmin_k ||x_n - e_k||^2`` (``||x||^2`` dropped: ``||e_k||^2 - 2 x.e_k``), or
    ``argmax_k x_n . e_k`` when ``cosine`` (inputs assumed l2-normalised by the caller).

    float32 at HIGHEST precision whatever the input dtype; ties go to the lowest index; no gradient.
    At most ``max_elements`` scores are held at a time."""
    x = lax.stop_gradient(x).astype(jnp.float32)
    e = lax.stop_gradient(codebook).astype(jnp.float32)
    n, k = x.shape[0], e.shape[0]
    bias = jnp.zeros((k,), jnp.float32) if cosine else jnp.sum(e * e, axis=-1)
    scale = 1.0 if cosine else 2.0
    code_rows = max(1, min(k, max_elements))
    code_chunks = math.ceil(k / code_rows)
    if code_chunks > 1:   # pad codes with +inf cost so they never win
        kpad = code_rows * code_chunks - k
        e = jnp.pad(e, ((0, kpad), (0, 0))).reshape(code_chunks, code_rows, -1)
        bias = jnp.pad(bias, (0, kpad), constant_values=jnp.inf).reshape(code_chunks, code_rows)

    def search(xc):
        if code_chunks == 1:
            return jnp.argmin(bias - scale * _dot_t(xc, e), axis=-1).astype(jnp.int32)

        def step(carry, blk):
            best, arg = carry
            ec, bc, off = blk
            cost = bc - scale * _dot_t(xc, ec)
            cmin, carg = jnp.min(cost, axis=-1), jnp.argmin(cost, axis=-1).astype(jnp.int32)
            better = cmin < best   # strict: earlier chunks win ties
            return (jnp.where(better, cmin, best), jnp.where(better, carg + off, arg)), None

        init = (_full_rows(xc, jnp.inf, jnp.float32), _full_rows(xc, 0, jnp.int32))
        offsets = jnp.arange(code_chunks, dtype=jnp.int32) * code_rows
        return lax.scan(step, init, (e, bias, offsets))[0][1]

    shards = _chunk_shards(x)
    rows, chunks = _token_chunks(n, max_elements // code_rows, shards)
    return _unchunk(_map_token_chunks(search, (x,), rows, chunks, shards=shards), n, shards)


def entropy_terms(x: jax.Array, codebook: jax.Array, temperature: float, *,
                  max_elements: int = DEFAULT_MAX_ELEMENTS,
                  axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
    """``(mean_n H(p_n), H(mean_n p_n))`` with ``p_n = softmax(-||x_n - e||^2 / T)`` over the global
    batch (natural log). Differentiable w.r.t. ``x`` and ``codebook``; chunked over tokens with
    rematerialisation so neither pass keeps the ``N x K`` logits. The VQ entropy loss is the first
    minus the second (maskgit / magvit ``entropy_loss``)."""
    x = x.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    n, k = x.shape[0], e.shape[0]
    e2 = jnp.sum(e * e, axis=-1)

    def fn(xc, valid):
        # -||x - e||^2 / T up to a per-row constant (softmax is shift invariant).
        logits = (2.0 * _dot_t(xc, e) - e2) / temperature
        h = entropy_from_logits(logits) * valid
        p = jax.nn.softmax(logits, axis=-1) * valid[:, None]
        return jnp.sum(h), jnp.sum(p, axis=0)

    shards = _chunk_shards(x)
    rows, chunks = _token_chunks(n, max(1, max_elements // k), shards)
    valid = _full_rows(x, 1.0, jnp.float32)
    h_sum, p_sum = _map_token_chunks(fn, (x, valid), rows, chunks, remat=chunks > 1, shards=shards)
    count = global_sum(jnp.asarray(n, jnp.float32), axis_name)
    mean_h = global_sum(jnp.sum(h_sum), axis_name) / count
    p_mean = global_sum(jnp.sum(p_sum, axis=0), axis_name) / count
    return mean_h, entropy(p_mean)


def rotate_to(e: jax.Array, q: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Rotation trick (arXiv 2410.06424): ``sg(||q||/||e||) * sg(R) e`` with ``R`` the rotation taking
    ``e^`` to ``q^``: ``R = I - 2 r r^T + 2 q^ e^T``, ``r = (e^ + q^)/||e^ + q^||``, applied as
    ``R e = e - 2 (e.r) r + 2 (e.e^) q^`` (no ``d x d`` matrix).

    Forward value ``~= q`` (to rounding); gradient w.r.t. ``e`` is ``(||q||/||e||) R^T g``. The
    antipodal case ``e^ = -q^`` gives ``r = 0`` (so ``R = I + 2 q^ e^T``, still ``R e^ = q^``). Rows
    where ``||e||`` or ``||q||`` is below ``eps`` fall back to the identity (plain straight-through).
    ``e, q``: ``[..., d]`` float32."""
    sg = lax.stop_gradient
    e_norm = jnp.linalg.norm(sg(e), axis=-1, keepdims=True)
    q_norm = jnp.linalg.norm(sg(q), axis=-1, keepdims=True)
    degenerate = (e_norm < eps) | (q_norm < eps)
    e_hat = sg(e) / jnp.maximum(e_norm, eps)
    q_hat = sg(q) / jnp.maximum(q_norm, eps)
    s = e_hat + q_hat
    s_norm = jnp.linalg.norm(s, axis=-1, keepdims=True)
    r = jnp.where(s_norm > eps, s / jnp.maximum(s_norm, eps), 0.0)
    dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
    rotated = e - 2.0 * dot(e, r) * r + 2.0 * dot(e, e_hat) * q_hat
    scaled = sg(q_norm / jnp.maximum(e_norm, eps)) * rotated
    return jnp.where(degenerate, e, scaled)


def normalize_if(x: jax.Array, cosine: bool) -> jax.Array:
    """``l2_normalize(x)`` when ``cosine``, else ``x``."""
    return l2_normalize(x) if cosine else x
