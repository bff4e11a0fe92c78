"""GPT-style autoregressive generator on 1D tokens, class-conditional, with a KV cache.

Sequence layout (``K = codebook_size``, ``C = num_classes``, ``N = num_tokens``): the class embedding
is the first input, so position ``p`` reads ``t_{p-1}`` and predicts ``t_p``::

    inputs   = [E_cls[label], E_tok[t_0], ..., E_tok[t_{n-2}]]          [B, n, D], n <= N
    x        = dropout_tok(inputs (+ P[0..n-1] when position_embedding="learned"))
    block:     x = x + drop(attn(norm_1(x)))                  causal; RoPE on q, k at positions 0..n-1
               x = x + drop(mlp(norm_2(x)))                   SwiGLU by default
    logits   = head(norm(x))                                  [B, n, K] float32; logits[:, p] ~ t_p

``label == C`` is the null class (classifier-free guidance); the class table has ``C + 1`` rows.
The defaults follow LlamaGen's ``gpt.py`` (which the unofficial FlexTok AR re-implementation
adapts): RMSNorm eps 1e-5, SwiGLU with hidden ``find_multiple(int(8 D / 3), 256)``, no biases, 1D
RoPE (theta 1e4, adjacent channel pairs; here the class sits at position 0 and ``t_{p-1}`` at ``p``),
N(0, 0.02) init and a zero-initialised head, dropout 0.1 on the embeddings, the attention output and
the MLP output. Not weight-compatible with LlamaGen (no checkpoint of a FlexTok AR is released).

KV cache (``decode``): per layer ``{"k", "v"}`` of shape ``[B, L, H, d]`` (``L`` >= the positions
to run), preallocated by ``init_cache`` and written with ``lax.dynamic_update_slice`` at the
running position; queries at positions ``index .. index + T - 1`` attend to cache slots ``j <=``
their own position, so a cached pass over positions in any chunking gives the logits of the full
causal forward.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.generators.ar_sampling import ar_sample
from titok_jax.nn import (MLP, Dropout, HeadsDense, HeadsOutDense, apply_rope, boxed,
                          dot_product_attention, make_norm, rope_angles)
from titok_jax.nn.activation_sharding import BTD, constrain, gathered
from titok_jax.nn.attention import module_path, split_heads

Dtype = Any
Cache = tuple  # tuple over layers of {"k": [B, L, H, d], "v": [B, L, H, d]}
POSITION_EMBEDDINGS = ("rope", "learned")
init_normal = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros_init()


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width: ``int(2 * 4 * width / 3)`` rounded up to a multiple of
    ``multiple_of``."""
    h = int(2 * 4 * width / 3)
    return multiple_of * -(-h // multiple_of)


class CausalSelfAttention(nn.Module):
    """Fused-qkv causal self-attention with an optional KV cache (module docstring).

    ``x [B, T, D]``, ``positions [T]`` int (absolute positions of the T queries) ->
    ``([B, T, D], new layer cache or None)``.
    """

    num_heads: int
    use_rope: bool = True
    rope_theta: float = 10000.0
    qk_norm: str | None = None
    use_bias: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
                 index: jax.Array | int = 0, deterministic: bool = True
                 ) -> tuple[jax.Array, dict | None]:
        width = x.shape[-1]
        head_dim = split_heads(width, self.num_heads, module_path(self))
        qkv = HeadsDense(self.num_heads, head_dim, lead=(3,), use_bias=self.use_bias,
                         kernel_init=init_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="qkv")(x)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        if self.qk_norm is not None:
            norm = dict(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)
            q = make_norm(self.qk_norm, name="q_norm", **norm)(q)
            k = make_norm(self.qk_norm, name="k_norm", **norm)(k)
        if self.use_rope:
            angles = rope_angles(positions[None], (head_dim,), self.rope_theta)
            q, k = apply_rope(q, angles), apply_rope(k, angles)  # adjacent pairs, as LlamaGen
        if cache is None:
            key_pos, new_cache = positions, None
        else:
            start = (0, jnp.asarray(index, jnp.int32), 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            key_pos, new_cache = jnp.arange(k.shape[1]), {"k": k, "v": v}
        mask = (key_pos[None, :] <= positions[:, None])[None, None]
        rng = self.make_rng("dropout") if self.dropout_rate > 0 and not deterministic else None
        y = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                  dropout_rate=self.dropout_rate, dropout_rng=rng)
        out = HeadsOutDense(width, use_bias=self.use_bias, kernel_init=init_normal,
                            dtype=self.dtype, param_dtype=self.param_dtype, name="out")(y)
        return out, new_cache


class ARBlock(nn.Module):
    """Pre-norm block ``x + attn(norm_1 x)``, ``x + mlp(norm_2 x)`` with residual dropout;
    returns ``(x, new layer cache or None)``. Positional arguments so ``nn.remat`` can mark
    ``deterministic`` static."""

    num_heads: int
    mlp_dim: int
    activation: str = "swiglu"
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-5
    use_bias: bool = False
    use_rope: bool = True
    rope_theta: float = 10000.0
    qk_norm: str | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
                 index: jax.Array | int = 0, deterministic: bool = True
                 ) -> tuple[jax.Array, dict | None]:
        norm = dict(epsilon=self.norm_eps, use_bias=self.use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype)
        drop = Dropout(self.dropout)
        x = constrain(x, BTD)   # batch-sharded activations: FSDP gathers weights, not activations
        h, new_cache = CausalSelfAttention(
            self.num_heads, self.use_rope, self.rope_theta, self.qk_norm, self.use_bias,
            self.attention_dropout, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
            make_norm(self.norm_type, name="norm_1", **norm)(x), positions, cache, index,
            deterministic)
        x = constrain(x + drop(h, deterministic=deterministic), BTD)
        h = MLP(self.mlp_dim, activation=self.activation, use_bias=self.use_bias,
                kernel_init=init_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                name="mlp")(make_norm(self.norm_type, name="norm_2", **norm)(x))
        return constrain(x + drop(h, deterministic=deterministic), BTD), new_cache


class ARTransformer(nn.Module):
    """``(tokens [B, n], labels [B]) -> logits [B, n, K]`` (teacher forcing; module docstring).

    ``decode`` runs the same network over positions ``index .. index + T - 1`` with a KV cache.
    """

    codebook_size: int
    num_tokens: int
    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None
    mlp_multiple_of: int = 256
    activation: str = "swiglu"
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-5
    use_bias: bool = False
    position_embedding: str = "rope"
    rope_theta: float = 10000.0
    qk_norm: str | None = None
    token_dropout: float = 0.1
    dropout: float = 0.1
    attention_dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def head_dim(self) -> int:
        return split_heads(self.width, self.num_heads, module_path(self))

    def setup(self) -> None:
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"unknown position_embedding {self.position_embedding!r}; expected "
                             f"one of {POSITION_EMBEDDINGS}")
        split_heads(self.width, self.num_heads, module_path(self))
        w = self.width
        self.class_embedding = self.param("class_embedding", boxed(init_normal, (None, "embed")),
                                          (self.num_classes + 1, w), self.param_dtype)
        self.token_embedding = self.param("token_embedding", boxed(init_normal, ("vocab", "embed")),
                                          (self.codebook_size, w), self.param_dtype)
        if self.position_embedding == "learned":
            self.position_table = self.param("position_embedding",
                                             boxed(init_normal, ("tokens", "embed")),
                                             (self.num_tokens, w), self.param_dtype)
        block = nn.remat(ARBlock, static_argnums=(5,)) if self.remat else ARBlock
        self.blocks = [block(
            self.num_heads, self.mlp_dim or swiglu_hidden(w, self.mlp_multiple_of),
            self.activation, self.norm_type, self.norm_eps, self.use_bias,
            self.position_embedding == "rope", self.rope_theta, self.qk_norm, self.dropout,
            self.attention_dropout, dtype=self.dtype, param_dtype=self.param_dtype,
            name=f"block_{i}") for i in range(self.depth)]
        self.token_drop = Dropout(self.token_dropout)
        self.norm = make_norm(self.norm_type, epsilon=self.norm_eps, use_bias=self.use_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype)
        self.head = nn.Dense(self.codebook_size, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             kernel_init=boxed(zeros, ("embed", "vocab")))

    # ------------------------------------------------------------------ helpers
    def _check(self, tokens: jax.Array, labels: jax.Array, max_len: int) -> None:
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= max_len:
            raise ValueError(f"tokens must be [B, n] with 1 <= n <= {max_len}, got shape "
                             f"{tokens.shape}")
        if labels.shape != tokens.shape[:1]:
            raise ValueError(f"labels must be [B] = [{tokens.shape[0]}], got shape {labels.shape}")
        for name, a in (("tokens", tokens), ("labels", labels)):
            if not jnp.issubdtype(a.dtype, jnp.integer):
                raise ValueError(f"{name} must be integer ids, got dtype {a.dtype}")

    def _run(self, x: jax.Array, positions: jax.Array, cache: Cache | None, index: Any,
             train: bool) -> tuple[jax.Array, Cache | None]:
        if self.position_embedding == "learned":
            table = jax.lax.dynamic_slice_in_dim(self.position_table, positions[0],
                                                 positions.shape[0])
            x = x + table.astype(self.dtype)
        x = self.token_drop(x, deterministic=not train)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions, None if cache is None else cache[i], index, not train)
            new_cache.append(c)
        logits = constrain(self.head(self.norm(x)).astype(jnp.float32), ("batch", "tokens", None))
        return logits, (None if cache is None else tuple(new_cache))

    def _embed(self, token_ids: jax.Array, labels: jax.Array, is_class: jax.Array) -> jax.Array:
        """``E_cls[labels]`` where ``is_class [T]`` else ``E_tok[token_ids]`` -> ``[B, T, D]``."""
        cls = jnp.take(gathered(self.class_embedding), labels.astype(jnp.int32), axis=0)[:, None]
        tok = jnp.take(gathered(self.token_embedding), jnp.clip(token_ids.astype(jnp.int32), 0,
                                                      self.codebook_size - 1), axis=0)
        return constrain(jnp.where(is_class[None, :, None], cls, tok).astype(self.dtype), BTD)

    # ------------------------------------------------------------------ entry points
    def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False
                 ) -> jax.Array:
        tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
        self._check(tokens, labels, self.num_tokens)
        n = tokens.shape[1]
        prev = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
        positions = jnp.arange(n)
        x = self._embed(prev, labels, positions == 0)
        return self._run(x, positions, None, 0, train)[0]

    def decode(self, prev_tokens: jax.Array, labels: jax.Array, index: jax.Array | int,
               cache: Cache) -> tuple[jax.Array, Cache]:
        """Cached forward at positions ``index .. index + T - 1`` (eval mode).

        ``prev_tokens [B, T]``: the token *before* each position (``t_{p-1}``; ignored at
        ``p = 0``, which reads the class). Returns ``(logits [B, T, K], new cache)``; the cache
        length ``L`` must cover ``index + T`` (not checked when ``index`` is traced).
        """
        prev_tokens, labels = jnp.asarray(prev_tokens), jnp.asarray(labels)
        self._check(prev_tokens, labels, self.num_tokens)
        if len(cache) != self.depth:
            raise ValueError(f"cache has {len(cache)} layers, the model {self.depth}")
        positions = jnp.asarray(index, jnp.int32) + jnp.arange(prev_tokens.shape[1])
        x = self._embed(prev_tokens, labels, positions == 0)
        return self._run(x, positions, cache, index, False)

    def init_cache(self, batch: int, length: int | None = None, dtype: Dtype | None = None
                   ) -> Cache:
        """Zeros ``{"k", "v"}: [batch, length, heads, head_dim]`` per layer (``length`` default
        ``num_tokens``; ``dtype`` default the compute dtype). Needs no params."""
        length = self.num_tokens if length is None else int(length)
        shape = (batch, length, self.num_heads, self.head_dim)
        z = jnp.zeros(shape, dtype or self.dtype)
        return tuple({"k": z, "v": z} for _ in range(self.depth))


# --------------------------------------------------------------------------- sampling glue


def class_step_fn(model: ARTransformer, variables: Any, labels: jax.Array
                  ) -> Callable[[jax.Array, jax.Array, jax.Array, Cache], tuple[jax.Array, Cache]]:
    """The sampler's ``step_fn(prev [B'], uncond [B'], index, cache) -> (logits [B', K], cache)``:
    rows of a stacked batch (``B' = k B``) take ``labels[i mod B]``, or the null class where
    ``uncond``."""
    labels = jnp.asarray(labels, jnp.int32)

    def step_fn(prev: jax.Array, uncond: jax.Array, index: jax.Array, cache: Cache):
        rows = jnp.tile(labels, prev.shape[0] // labels.shape[0])
        rows = jnp.where(uncond, model.null_label, rows)
        logits, cache = model.apply(variables, prev[:, None], rows, index, cache, method="decode")
        return logits[:, 0], cache

    return step_fn


@functools.partial(jax.jit, static_argnames=("model", "max_len", "top_k", "guidance_scale",
                                             "return_logits"))
def generate_tokens(model: ARTransformer, variables: Any, labels: jax.Array, key: jax.Array, *,
                    max_len: int | None = None, temperature: float | jax.Array = 1.0,
                    top_k: int = 0, top_p: float | jax.Array = 1.0, guidance_scale: float = 1.0,
                    return_logits: bool = False) -> Any:
    """Jitted class-conditional sampling: ``labels [B]`` -> code ids ``[B, max_len]`` int32
    (``max_len`` default ``num_tokens``; later positions are never computed). See
    ``ar_sampling.ar_sample`` for the settings."""
    length = model.num_tokens if not max_len else int(max_len)
    if not 1 <= length <= model.num_tokens:
        raise ValueError(f"max_len must be in [1, {model.num_tokens}], got {max_len}")
    labels = jnp.asarray(labels, jnp.int32)
    return ar_sample(class_step_fn(model, variables, labels),
                     lambda rows: model.init_cache(rows, length), key, labels.shape[0], length,
                     temperature=temperature, top_k=top_k, top_p=top_p,
                     guidance_scale=guidance_scale, return_logits=return_logits)


# --------------------------------------------------------------------------- variants

# FlexTok's class-conditional AR family (w = 64 d, heads = d; LlamaGen-style; names and sizes from
# the unofficial re-implementation deboradum/ml-flextok-ar-generation, whose largest, 1.33B, is the
# "custom AR 1.33B" third-party tables list for FlexTok): d10 "AR_49M" ... d30 "AR_1330M". Token
# vocabulary: FlexTok's 64,000 FSQ codes, 256 tokens. Counts by jax.eval_shape (tests), in total
# and without the embedding tables and the head: flextok_d10 133,364,480 / 50,803,840,
# flextok_d30 1,574,903,040 / 1,327,221,120.
_FLEXTOK = dict(codebook_size=64_000, num_tokens=256, num_classes=1000, token_dropout=0.1,
                dropout=0.1, attention_dropout=0.0)
AR_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(codebook_size=64, num_tokens=32, num_classes=10, width=64, depth=2, num_heads=4,
                 token_dropout=0.0, dropout=0.0, attention_dropout=0.0),
    "flextok_d10": dict(_FLEXTOK, width=640, depth=10, num_heads=10),
    "flextok_d30": dict(_FLEXTOK, width=1920, depth=30, num_heads=30),
}


def ar_variant(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of ``AR_VARIANTS[name]`` updated with ``overrides``."""
    if name not in AR_VARIANTS:
        raise ValueError(f"unknown AR variant {name!r}; known: {sorted(AR_VARIANTS)}")
    unknown = set(overrides) - set(ARTransformer.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown ARTransformer fields {sorted(unknown)}")
    return {**AR_VARIANTS[name], **overrides}
