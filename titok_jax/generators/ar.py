"""GPT-style autoregressive generator on 1D tokens, class-conditional, with a KV cache.

Sequence layout (``K = codebook_size``, ``C = num_classes``, ``N = num_tokens``): the class embedding
is the first input, so position ``p`` reads ``t_{p-1}`` and predicts ``t_p``::

    inputs   = [E_cls[label], E_tok[t_0], ..., E_tok[t_{n-2}]]          [B, n, D], n <= N
    x        = dropout_tok(inputs (+ P[0..n-1] when position_embedding="learned"))
    block:     x = x + drop(attn(norm_1(x)))                  causal; RoPE on q, k at positions 0..n-1
               x = x + drop(mlp(norm_2(x)))                   SwiGLU by default
    logits   = head(norm(x))                                  [B, n, K] float32; logits[:, p] ~ t_p

``label == C`` is the null class (classifier-free guidance); the class table has ``C + 1`` rows.
Tokens of several ids (fq / rq factors ``[B, n, k]``, or an LFQ index split into bit groups) are
predicted sub-token after sub-token by a small per-position head (``ar_subtokens.py``; FQGAN's FAR,
Open-MAGVIT2's AR); ``position_embedding="rope_2d"`` rotates by grid cells instead of positions.
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
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.generators.ar_blocks import ARBlock, CausalSelfAttention, swiglu_hidden
from titok_jax.generators.ar_sampling import ar_sample, ar_sample_subtokens
from titok_jax.generators.ar_subtokens import (FACTOR_EMBEDDINGS, from_subtokens, split_bit_widths,
                                               sub_vocab_sizes, subtoken_fns, to_subtokens)
from titok_jax.nn import Dropout, boxed, make_norm
from titok_jax.nn.activation_sharding import BTD, constrain, gathered
from titok_jax.nn.attention import module_path, split_heads

Dtype = Any
Cache = tuple  # tuple over layers of {"k": [B, L, H, d], "v": [B, L, H, d]}
POSITION_EMBEDDINGS = ("rope", "rope_2d", "learned")
init_normal = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros_init()
__all__ = ["ARBlock", "ARTransformer", "CausalSelfAttention", "ar_variant", "class_step_fn",
           "generate_tokens", "swiglu_hidden"]


class ARTransformer(nn.Module):
    """``(tokens [B, n], labels [B]) -> logits [B, n, K]`` (teacher forcing; module docstring).

    ``decode`` runs the same network over positions ``index .. index + T - 1`` with a KV cache.

    Several sub-tokens per position (``generators/ar_subtokens.py``): ``num_codebooks = k > 1``
    takes factorized ids ``tokens [B, n, k]`` (fq / rq), ``split_bits`` one LFQ index split into
    bit groups; ``__call__`` then returns a tuple of ``G`` logits ``[B, n, V_i]`` (sub-token ``i``
    given ``s_<i``: teacher forcing), the input embedding combines per-sub-token tables
    (``factor_embedding``) and ``head_depth`` causal blocks predict the sub-tokens one after the
    other. ``position_embedding="rope_2d"``: RoPE over the ``sqrt(N) x sqrt(N)`` grid of the
    token each position predicts (rows on the first half of a head's rotated pairs, columns on the
    second; LlamaGen gives the class a zero row instead).
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
    num_codebooks: int = 1        # k ids per token (fq / rq): tokens [B, n, k]
    split_bits: Any = None        # Open-MAGVIT2: bit widths (LSB first) or a group count
    factor_embedding: str = "sum"  # "sum" (Open-MAGVIT2) or "concat" + Linear (FAR)
    head_depth: int = 1           # blocks of the per-position sub-token head (FAR 3, OM2 2)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def head_dim(self) -> int:
        return split_heads(self.width, self.num_heads, module_path(self))

    @property
    def sub_vocab(self) -> tuple[int, ...]:
        """The vocabularies ``(V_0, ..., V_{G-1})`` of a position's sub-tokens (``(K,)``: one)."""
        return sub_vocab_sizes(self.codebook_size, self.num_codebooks, self.split_bits)

    @property
    def multi(self) -> bool:
        return len(self.sub_vocab) > 1

    @property
    def token_shape(self) -> tuple[int, ...]:
        """One example's ids: ``(N,)`` or ``(N, k)`` (factorized)."""
        k = int(self.num_codebooks)
        return (self.num_tokens,) if k == 1 else (self.num_tokens, k)

    def subtoken_ids(self, tokens: jax.Array) -> jax.Array:
        """The model's ids ``[B, n(, k)]`` -> sub-token ids ``[B, n, G]``."""
        return to_subtokens(tokens, self.num_codebooks, split_bit_widths(self.codebook_size,
                                                                          self.split_bits))

    def merge_subtokens(self, subs: jax.Array) -> jax.Array:
        """Sub-token ids ``[B, n, G]`` -> the model's ids."""
        return from_subtokens(subs, self.num_codebooks, split_bit_widths(self.codebook_size,
                                                                          self.split_bits))

    def _rope_grid(self) -> int:
        if self.position_embedding != "rope_2d":
            return 0
        side = math.isqrt(self.num_tokens)
        if side * side != self.num_tokens or self.head_dim % 4:
            raise ValueError(f"position_embedding='rope_2d' needs a square number of tokens and a "
                             f"head dim divisible by 4, got {self.num_tokens} tokens, head dim "
                             f"{self.head_dim}")
        return side

    def setup(self) -> None:
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"unknown position_embedding {self.position_embedding!r}; expected "
                             f"one of {POSITION_EMBEDDINGS}")
        if self.factor_embedding not in FACTOR_EMBEDDINGS:
            raise ValueError(f"unknown factor_embedding {self.factor_embedding!r}; expected one of "
                             f"{FACTOR_EMBEDDINGS}")
        split_heads(self.width, self.num_heads, module_path(self))
        w, vocab = self.width, self.sub_vocab
        if len(vocab) > 1 and self.head_depth < 1:
            raise ValueError(f"a sub-token head needs head_depth >= 1, got {self.head_depth}")
        self.class_embedding = self.param("class_embedding", boxed(init_normal, (None, "embed")),
                                          (self.num_classes + 1, w), self.param_dtype)
        if len(vocab) == 1:
            self.token_embedding = self.param("token_embedding", boxed(init_normal, ("vocab", "embed")),
                                              (self.codebook_size, w), self.param_dtype)
        else:
            self.token_embeddings = [
                self.param(f"token_embedding_{i}", boxed(init_normal, ("vocab", "embed")), (v, w),
                           self.param_dtype) for i, v in enumerate(vocab)]
            if self.factor_embedding == "concat":
                self.aggregate = nn.Dense(w, dtype=self.dtype, param_dtype=self.param_dtype,
                                          kernel_init=boxed(init_normal, (None, "embed")),
                                          bias_init=boxed(zeros, ("embed",)))
        if self.position_embedding == "learned":
            self.position_table = self.param("position_embedding",
                                             boxed(init_normal, ("tokens", "embed")),
                                             (self.num_tokens, w), self.param_dtype)
        block = nn.remat(ARBlock, static_argnums=(5,)) if self.remat else ARBlock
        args = (self.num_heads, self.mlp_dim or swiglu_hidden(w, self.mlp_multiple_of),
                self.activation, self.norm_type, self.norm_eps, self.use_bias,
                self.position_embedding != "learned", self.rope_theta, self.qk_norm, self.dropout,
                self.attention_dropout)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.blocks = [block(*args, **kw, rope_grid=self._rope_grid(), name=f"block_{i}")
                       for i in range(self.depth)]
        self.token_drop = Dropout(self.token_dropout)
        self.norm = make_norm(self.norm_type, epsilon=self.norm_eps, use_bias=self.use_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype)
        head = dict(use_bias=False, kernel_init=boxed(zeros, ("embed", "vocab")), **kw)
        if len(vocab) == 1:
            self.head = nn.Dense(self.codebook_size, **head)
        else:   # the sub-token head: 1D RoPE over sub-positions 0 .. G-1
            args = args[:6] + (True,) + args[7:]
            self.head_blocks = [block(*args, **kw, name=f"head_block_{i}")
                                for i in range(self.head_depth)]
            self.heads = [nn.Dense(v, name=f"head_{i}", **head) for i, v in enumerate(vocab)]

    # ------------------------------------------------------------------ helpers
    def _check(self, tokens: jax.Array, labels: jax.Array, max_len: int, sub: bool = False) -> None:
        k = len(self.sub_vocab) if sub else int(self.num_codebooks)
        want = "[B, n]" if k == 1 and not sub else f"[B, n, {k}]"
        ndim = 2 if want == "[B, n]" else 3
        if (tokens.ndim != ndim or not 1 <= tokens.shape[1] <= max_len
                or (ndim == 3 and tokens.shape[2] != k)):
            raise ValueError(f"tokens must be {want} with 1 <= n <= {max_len}, got shape "
                             f"{tokens.shape}")
        if labels.shape != tokens.shape[:1]:
            raise ValueError(f"labels must be [B] = [{tokens.shape[0]}], got shape {labels.shape}")
        for name, a in (("tokens", tokens), ("labels", labels)):
            if not jnp.issubdtype(a.dtype, jnp.integer):
                raise ValueError(f"{name} must be integer ids, got dtype {a.dtype}")

    def _trunk(self, x: jax.Array, positions: jax.Array, cache: Cache | None, index: Any,
               train: bool) -> tuple[jax.Array, Cache | None]:
        """The blocks' output ``h [B, T, D]`` (before the final norm) and the new cache."""
        if self.position_embedding == "learned":
            table = jax.lax.dynamic_slice_in_dim(self.position_table, positions[0],
                                                 positions.shape[0])
            x = x + table.astype(self.dtype)
        x = self.token_drop(x, deterministic=not train)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions, None if cache is None else cache[i], index, not train)
            new_cache.append(c)
        return x, (None if cache is None else tuple(new_cache))

    def _logits(self, h: jax.Array) -> jax.Array:
        return constrain(self.head(self.norm(h)).astype(jnp.float32), ("batch", "tokens", None))

    def _lookup(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        return jnp.take(gathered(table), jnp.clip(ids.astype(jnp.int32), 0, table.shape[0] - 1),
                        axis=0)

    def _embed(self, token_ids: jax.Array, labels: jax.Array, is_class: jax.Array) -> jax.Array:
        """``E_cls[labels]`` where ``is_class [T]`` else the token embedding -> ``[B, T, D]``
        (``token_ids [B, T]``, or sub-token ids ``[B, T, G]`` combined by ``factor_embedding``)."""
        cls = jnp.take(gathered(self.class_embedding), labels.astype(jnp.int32), axis=0)[:, None]
        if not self.multi:
            tok = self._lookup(self.token_embedding, token_ids)
        else:
            parts = [self._lookup(t, token_ids[..., i]) for i, t in enumerate(self.token_embeddings)]
            tok = (sum(parts) if self.factor_embedding == "sum" else
                   self.aggregate(jnp.concatenate(parts, axis=-1).astype(self.dtype)))
        return constrain(jnp.where(is_class[None, :, None], cls, tok).astype(self.dtype), BTD)

    # ------------------------------------------------------------------ entry points
    def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False) -> Any:
        tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
        self._check(tokens, labels, self.num_tokens)
        n = tokens.shape[1]
        ids = self.subtoken_ids(tokens) if self.multi else tokens
        prev = jnp.concatenate([jnp.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
        positions = jnp.arange(n)
        h, _ = self._trunk(self._embed(prev, labels, positions == 0), positions, None, 0, train)
        return self.sub_logits(h, ids, train=train) if self.multi else self._logits(h)

    def sub_logits(self, h: jax.Array, subs: jax.Array, *, train: bool = False
                   ) -> tuple[jax.Array, ...]:
        """The sub-token head: trunk outputs ``h [B, T, D]`` and sub-ids ``subs [B, T, G]`` ->
        ``G`` logits ``[B, T, V_i]`` (float32), ``i`` read from ``[h, E_0[s_0], .., E_{i-1}[s_{i-1}]]``
        (causal: ``subs[..., i:]`` do not affect logits ``i``)."""
        b, t, d = h.shape
        g = len(self.sub_vocab)
        seq = [h.astype(self.dtype)] + [self._lookup(self.token_embeddings[i], subs[..., i]
                                                     ).astype(self.dtype) for i in range(g - 1)]
        x = jnp.stack(seq, axis=2).reshape(b * t, g, d)
        positions = jnp.arange(g)
        for block in self.head_blocks:
            x, _ = block(x, positions, None, 0, not train)
        x = self.norm(x).reshape(b, t, g, d)
        return tuple(constrain(head(x[:, :, i]).astype(jnp.float32), ("batch", "tokens", None))
                     for i, head in enumerate(self.heads))

    def decode_hidden(self, prev_tokens: jax.Array, labels: jax.Array, index: jax.Array | int,
                      cache: Cache) -> tuple[jax.Array, Cache]:
        """Cached trunk at positions ``index .. index + T - 1`` (eval mode): ``(h [B, T, D], new
        cache)``. ``prev_tokens``: the token *before* each position, ``[B, T]`` or sub-token ids
        ``[B, T, G]`` (ignored at ``p = 0``, which reads the class); the cache length must cover
        ``index + T`` (not checked when ``index`` is traced)."""
        prev_tokens, labels = jnp.asarray(prev_tokens), jnp.asarray(labels)
        self._check(prev_tokens, labels, self.num_tokens, sub=self.multi)
        if len(cache) != self.depth:
            raise ValueError(f"cache has {len(cache)} layers, the model {self.depth}")
        positions = jnp.asarray(index, jnp.int32) + jnp.arange(prev_tokens.shape[1])
        x = self._embed(prev_tokens, labels, positions == 0)
        return self._trunk(x, positions, cache, index, False)

    def decode(self, prev_tokens: jax.Array, labels: jax.Array, index: jax.Array | int,
               cache: Cache) -> tuple[jax.Array, Cache]:
        """Cached forward at positions ``index .. index + T - 1`` (eval mode).

        ``prev_tokens [B, T]``: the token *before* each position (``t_{p-1}``; ignored at
        ``p = 0``, which reads the class). Returns ``(logits [B, T, K], new cache)``; the cache
        length ``L`` must cover ``index + T`` (not checked when ``index`` is traced). A model with
        sub-tokens runs ``decode_hidden`` and ``sub_logits`` instead.
        """
        if self.multi:
            raise ValueError("a model with sub-tokens decodes with decode_hidden + sub_logits")
        h, cache = self.decode_hidden(prev_tokens, labels, index, cache)
        return self._logits(h), cache

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
    """Jitted class-conditional sampling: ``labels [B]`` -> code ids ``[B, max_len]`` int32,
    ``[B, max_len, k]`` for factorized ids (a split-bit index comes back whole; ``max_len``
    default ``num_tokens``; later positions are never computed). See ``ar_sampling.ar_sample`` /
    ``ar_sample_subtokens`` for the settings; ``return_logits`` gives a tuple of per-sub-token
    logits for a model with sub-tokens."""
    length = model.num_tokens if not max_len else int(max_len)
    if not 1 <= length <= model.num_tokens:
        raise ValueError(f"max_len must be in [1, {model.num_tokens}], got {max_len}")
    labels = jnp.asarray(labels, jnp.int32)
    if model.multi:   # G sub-tokens per position; ids merged back to the model's layout
        step_fn, sub_fn = subtoken_fns(model, variables, labels)
        out = ar_sample_subtokens(step_fn, sub_fn, lambda rows: model.init_cache(rows, length), key,
                                  labels.shape[0], length, len(model.sub_vocab),
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  guidance_scale=guidance_scale, return_logits=return_logits)
        if return_logits:
            return model.merge_subtokens(out[0]), out[1]
        return model.merge_subtokens(out)
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
# FQGAN's FAR (reference lineage_2d.md §2; showlab/FQGAN far_dual.py / far_triple.py): FQGAN-Dual
# (Triple) ids, 2 (3) factors of 16384 codes on the 16 x 16 grid, per-factor tables concatenated
# and mapped back to the width by a Linear with bias, a factor head of 3 (B) / 4 (L) blocks, 2D RoPE.
# Open-MAGVIT2's AR (reference magvit.md §6): one 18-bit LFQ index per cell predicted as
# (pre = low 6 bits, post = high 12 bits), the two tables summed at the input, 2 / 3 / 4 intra
# blocks. Counts against the published ones: configs/ar.py and tests/test_ar_published_variants.py.
_GRID = dict(num_tokens=256, num_classes=1000, position_embedding="rope_2d", token_dropout=0.1,
             dropout=0.1, attention_dropout=0.0)
_FAR = dict(_GRID, codebook_size=16384, num_codebooks=2, factor_embedding="concat")
_OM2 = dict(_GRID, codebook_size=2 ** 18, split_bits=(6, 12), factor_embedding="sum")
AR_VARIANTS.update({
    "far_b_dual": dict(_FAR, width=1024, depth=24, num_heads=16, head_depth=3),
    "far_l_dual": dict(_FAR, width=1280, depth=36, num_heads=20, head_depth=4),
    "far_b_triple": dict(_FAR, num_codebooks=3, width=1024, depth=24, num_heads=16, head_depth=3),
    "om2_ar_b": dict(_OM2, width=1024, depth=24, num_heads=16, head_depth=2),
    "om2_ar_l": dict(_OM2, width=1280, depth=36, num_heads=20, head_depth=3),
    "om2_ar_xl": dict(_OM2, width=1536, depth=48, num_heads=24, head_depth=4),
})


def ar_variant(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of ``AR_VARIANTS[name]`` updated with ``overrides``."""
    if name not in AR_VARIANTS:
        raise ValueError(f"unknown AR variant {name!r}; known: {sorted(AR_VARIANTS)}")
    unknown = set(overrides) - set(ARTransformer.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown ARTransformer fields {sorted(unknown)}")
    return {**AR_VARIANTS[name], **overrides}
