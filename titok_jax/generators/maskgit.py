"""MaskGIT generator on 1D tokens: a bidirectional transformer over ``[class | image tokens]``
(TiTok ``modeling/maskgit.py``: ``ImageBert`` for L-32 / B-64, ``UViTBert`` for S-128).

Vocabulary (``K = codebook_size``, ``C = num_classes``): ids ``0..K-1`` are image codes, ``K`` is
``[MASK]``, ``K + 1 + c`` is class ``c`` and ``K + 1 + C`` the null class (label ``c = C``); the
embedding table has ``K + C + 2`` rows. The class token is **prepended**, positions ``0..N``::

    x      = E[concat(K + 1 + label, tokens)]  + P[0..N]          [B, N+1, D]
    vit:   x = LN_1e-12(x + type_emb[0]); dropout; ``depth`` post-LN BERT layers:
               x = LN(x + drop(attn(x)));  x = LN(x + drop(mlp(x)))
    uvit:  ``depth//2`` pre-LN in-blocks (pushing skips), a mid block, ``depth//2`` out-blocks
           with ``x = skip_linear(concat(x, skips.pop()))`` before each; final LN (eps 1e-5)
    logits = lm_head(x[:, 1:])                                      [B, N, K]  (float32)

``vit`` is HF ``BertModel`` (post-LN, eps 1e-12, exact GELU, separate q/k/v with biases, a token-type
embedding whose row 0 is added, dropout on the embeddings, attention weights and both branches).
``grid_shape`` (a video tokenizer's latent grid ``(T', h, w)``, ``N = T' h w`` tokens in row-major
order, time first) swaps the learned ``[N+1, D]`` position table for a factorised 3D one
(:class:`GridPositionEmbedding`): ``P[0] = p_cls`` and ``P[1 + (t, i, j)] = P_t[t] + P_h[i] + P_w[j]``;
the rest of the model is unchanged (MAGVIT's masked video transformer over its 3D tokens).

``uvit`` blocks are U-ViT's (pre-LN eps 1e-5, fused q/k/v without bias, GELU MLP); the official
``UViTBert`` builds them without dropout. Init: N(0, 0.02) kernels, embeddings and position table,
zero biases (HF ``initializer_range`` / U-ViT ``trunc_normal_(std=.02)``).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.generators.maskgit_sampling import maskgit_sample
from titok_jax.nn import (MLP, Dropout, LearnedPositionEmbedding, MultiHeadAttention,
                          TransformerBlock, boxed, make_norm)
from titok_jax.nn.activation_sharding import BTD, constrain, gathered
from titok_jax.quantizers.base import take_rows   # jnp.take that names its sharding (Explicit meshes)

Dtype = Any
ARCHS = ("vit", "uvit")
init_normal = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros_init()


class BertLayer(nn.Module):
    """One post-LN HF ``BertLayer`` ``[B, T, D] -> [B, T, D]`` (module docstring)."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        norm = dict(epsilon=1e-12, dtype=self.dtype, param_dtype=self.param_dtype)
        drop = Dropout(self.dropout)
        x = constrain(x, BTD)   # batch-sharded activations: FSDP gathers weights, not activations
        h = MultiHeadAttention(num_heads=self.num_heads, fused_qkv=False,
                               dropout_rate=self.attention_dropout, kernel_init=init_normal,
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               name="attn")(x, deterministic=deterministic)
        x = constrain(make_norm("layernorm", name="attn_ln", **norm)(x + drop(h, deterministic)), BTD)
        h = MLP(self.mlp_dim, activation="gelu", kernel_init=init_normal, dtype=self.dtype,
                param_dtype=self.param_dtype, name="mlp")(x)
        return constrain(make_norm("layernorm", name="mlp_ln", **norm)(x + drop(h, deterministic)),
                         BTD)


class _UViTBlock(TransformerBlock):
    """``TransformerBlock`` taking ``deterministic`` positionally (so ``nn.remat`` can mark it
    static)."""

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:  # type: ignore[override]
        return super().__call__(x, deterministic=deterministic)


class GridPositionEmbedding(nn.Module):
    """Factorised position embedding of ``[class | grid tokens]``: ``x [B, 1 + prod(grid), D]``
    plus ``concat(p_cls, sum_a P_a[index_a])`` with one learned ``[grid[a], D]`` table per grid axis
    (``axis_0`` = time for a video grid ``(T', h, w)``) and one row for the class token; all
    N(0, 0.02). Token ``1 + n`` sits at the row-major grid index of ``n``."""

    grid_shape: tuple[int, ...]
    features: int
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        d = self.features
        self.axes = [self.param(f"axis_{a}", boxed(init_normal, (None, "embed")), (size, d),
                                self.param_dtype) for a, size in enumerate(self.grid_shape)]
        self.class_position = self.param("class_position", boxed(init_normal, (None, "embed")),
                                         (1, d), self.param_dtype)

    def table(self) -> jax.Array:
        """The ``[1 + prod(grid), D]`` table (the class row first)."""
        d = self.features
        total = jnp.zeros((*self.grid_shape, d), self.param_dtype)
        for a, p in enumerate(self.axes):
            shape = [1] * len(self.grid_shape) + [d]
            shape[a] = self.grid_shape[a]
            total = total + p.reshape(shape)
        return jnp.concatenate([self.class_position, total.reshape(-1, d)], axis=0)

    def __call__(self, x: jax.Array) -> jax.Array:
        table = self.table()
        if x.shape[-2] != table.shape[0]:
            raise ValueError(f"{x.shape[-2] - 1} tokens for the grid {tuple(self.grid_shape)} of "
                             f"{table.shape[0] - 1}")
        dtype = self.dtype or x.dtype
        return x.astype(dtype) + table.astype(dtype)


class MaskGITTransformer(nn.Module):
    """``(tokens [B, N] in [0, K], labels [B] in [0, C]) -> logits [B, N, K]`` float32.

    ``labels == num_classes`` is the null class (unconditional). ``depth`` is the official
    ``num_hidden_layers``: ``vit`` has ``depth`` layers, ``uvit`` ``depth + 1`` blocks.
    ``grid_shape``: the tokens are a flattened grid (a video's ``(T', h, w)``, ``prod ==
    num_tokens``; always all ``N`` of them) with factorised position embeddings.
    """

    codebook_size: int
    num_tokens: int
    num_classes: int = 1000
    width: int = 768
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attention_dropout: float = 0.1
    arch: str = "vit"
    remat: bool = False
    grid_shape: tuple[int, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def frame_tokens(self) -> int:
        """Tokens of one latent frame ``h w`` (a grid's axes after the first); 0 without a grid."""
        return math.prod(self.grid_shape[1:]) if self.grid_shape else 0

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 2

    def _check(self, tokens: jax.Array, labels: jax.Array) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown MaskGIT arch {self.arch!r}; expected one of {ARCHS}")
        if self.arch == "uvit" and self.depth % 2:
            raise ValueError(f"uvit needs an even depth (in/out halves), got {self.depth}")
        if self.grid_shape is not None:
            if math.prod(self.grid_shape) != self.num_tokens or min(self.grid_shape) < 1:
                raise ValueError(f"grid_shape {tuple(self.grid_shape)} does not hold num_tokens "
                                 f"{self.num_tokens} tokens")
            if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
                raise ValueError(f"tokens must be [B, {self.num_tokens}] (the grid "
                                 f"{tuple(self.grid_shape)} flattened), got shape {tokens.shape}")
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.num_tokens:
            raise ValueError(f"tokens must be [B, N] with 1 <= N <= {self.num_tokens}, "
                             f"got shape {tokens.shape}")
        if labels.shape != tokens.shape[:1]:
            raise ValueError(f"labels must be [B] = [{tokens.shape[0]}], got shape {labels.shape}")
        for name, a in (("tokens", tokens), ("labels", labels)):
            if not jnp.issubdtype(a.dtype, jnp.integer):
                raise ValueError(f"{name} must be integer ids, got dtype {a.dtype}")

    @nn.compact
    def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False
                 ) -> jax.Array:
        tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
        self._check(tokens, labels)
        w, det = self.width, not train
        ids = jnp.concatenate([(labels + self.codebook_size + 1)[:, None].astype(jnp.int32),
                               tokens.astype(jnp.int32)], axis=1)
        table = self.param("word_embeddings", boxed(init_normal, ("vocab", "embed")),
                           (self.vocab_size, w), self.param_dtype)
        x = constrain(take_rows(gathered(table), ids).astype(self.dtype), BTD)
        if self.grid_shape is None:
            x = LearnedPositionEmbedding(self.num_tokens + 1, w, embedding_init=init_normal,
                                         dtype=self.dtype, param_dtype=self.param_dtype,
                                         name="position_embeddings")(x)
        else:
            x = GridPositionEmbedding(tuple(int(d) for d in self.grid_shape), w, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name="position_embeddings")(x)
        mlp_dim = int(self.mlp_ratio * w)
        if self.arch == "vit":
            x = self._bert(x, mlp_dim, det)
        else:
            x = self._uvit(x, mlp_dim, det)
        logits = nn.Dense(self.codebook_size, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=boxed(init_normal, ("embed", "vocab")),
                          bias_init=boxed(zeros, ("vocab",)), name="lm_head")(constrain(x[:, 1:], BTD))
        return constrain(logits.astype(jnp.float32), ("batch", "tokens", None))

    def _bert(self, x: jax.Array, mlp_dim: int, det: bool) -> jax.Array:
        type_emb = self.param("token_type_embeddings", boxed(init_normal, (None, "embed")),
                              (2, self.width), self.param_dtype)
        x = x + type_emb[0].astype(self.dtype)
        x = make_norm("layernorm", epsilon=1e-12, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="embeddings_ln")(x)
        x = Dropout(self.dropout)(x, deterministic=det)
        layer = nn.remat(BertLayer, static_argnums=(2,)) if self.remat else BertLayer
        for i in range(self.depth):
            x = layer(self.num_heads, mlp_dim, self.dropout, self.attention_dropout,
                      dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer_{i}")(x, det)
        return x

    def _uvit(self, x: jax.Array, mlp_dim: int, det: bool) -> jax.Array:
        block_cls = nn.remat(_UViTBlock, static_argnums=(2,)) if self.remat else _UViTBlock
        block = functools.partial(
            block_cls, num_heads=self.num_heads, mlp_dim=mlp_dim, qkv_bias=False, norm_eps=1e-5,
            dropout_rate=self.dropout, attention_dropout_rate=self.attention_dropout,
            kernel_init=init_normal, dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for i in range(self.depth // 2):
            x = block(name=f"in_blocks_{i}")(x, det)
            skips.append(x)
        x = block(name="mid_block")(x, det)
        for i in range(self.depth // 2):
            x = constrain(nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                   kernel_init=boxed(init_normal, ("mlp", "embed")),
                                   bias_init=boxed(zeros, ("embed",)),
                                   name=f"out_blocks_{i}_skip_linear")(
                jnp.concatenate([x, skips.pop()], axis=-1)), BTD)
            x = block(name=f"out_blocks_{i}")(x, det)
        return make_norm("layernorm", epsilon=1e-5, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")(x)


# --------------------------------------------------------------------------- sampling glue


def class_logits_fn(model: MaskGITTransformer, variables: Any, labels: jax.Array
                    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The sampler's ``logits_fn`` for class labels ``[B]``: rows of a stacked ``[B', N]`` batch
    (``B' = k B``) take ``labels[i mod B]``, or the null class where ``uncond`` is True."""
    labels = jnp.asarray(labels, jnp.int32)

    def logits_fn(tokens: jax.Array, uncond: jax.Array) -> jax.Array:
        rows = jnp.concatenate([labels] * (tokens.shape[0] // labels.shape[0]))  # not tile: sharded
        rows = jnp.where(uncond, model.null_label, rows)
        return model.apply(variables, tokens, rows, train=False)

    return logits_fn


@functools.partial(jax.jit, static_argnames=(
    "model", "steps", "guidance_scale", "guidance_schedule", "guidance_power",
    "softmax_temperature_annealing", "mask_schedule", "confidence"))
def generate_tokens(model: MaskGITTransformer, variables: Any, labels: jax.Array, key: jax.Array,
                    *, steps: int = 8, guidance_scale: float = 0.0,
                    guidance_schedule: str = "constant", guidance_power: float = 3.0,
                    randomize_temperature: float = 1.0,
                    softmax_temperature_annealing: bool = False, mask_schedule: str = "arccos",
                    confidence: str = "logits", first_frame: jax.Array | None = None) -> jax.Array:
    """Jitted class-conditional sampling: ``labels [B]`` -> code ids ``[B, N]`` (int32).

    ``first_frame`` (a grid model: int ids ``[B, h w]`` of the first latent frame, e.g. a causal
    video tokenizer's ids of a first frame): frame prediction, those ``h w`` leading tokens are
    given, never masked, and the schedule spreads the other ``N - h w`` over the steps."""
    # all-mask start built from `labels` so that it carries their (batch) sharding
    init = jnp.zeros_like(labels, jnp.int32)[:, None] + jnp.full((1, model.num_tokens),
                                                                   model.mask_id, jnp.int32)
    num_fixed = 0
    if first_frame is not None:
        num_fixed = model.frame_tokens
        if not num_fixed or first_frame.shape != (labels.shape[0], num_fixed):
            raise ValueError(f"first_frame must be ids [{labels.shape[0]}, {num_fixed}] of a grid "
                             f"model's first latent frame, got {first_frame.shape}"
                             if num_fixed else "first_frame needs a model with a grid_shape")
        init = init.at[:, :num_fixed].set(first_frame.astype(jnp.int32))
    return maskgit_sample(
        class_logits_fn(model, variables, labels), key, labels.shape[0], model.num_tokens,
        model.mask_id, init_tokens=init, steps=steps, guidance_scale=guidance_scale,
        guidance_schedule=guidance_schedule, guidance_power=guidance_power,
        randomize_temperature=randomize_temperature,
        softmax_temperature_annealing=softmax_temperature_annealing,
        mask_schedule=mask_schedule, confidence=confidence, num_fixed=num_fixed)


# --------------------------------------------------------------------------- variants

_PUBLISHED_VIT = dict(codebook_size=4096, num_classes=1000, width=768, depth=24, num_heads=16,
                      mlp_ratio=4.0, dropout=0.1, attention_dropout=0.1, arch="vit")

# name -> MaskGITTransformer kwargs. titok_l32 / titok_b64: ImageBert 768x24 (HF card: 177M);
# titok_s128: UViTBert 1024 wide, num_hidden_layers 20 (10 in + mid + 10 out = 21 blocks), FFN 4096,
# no dropout (the official UViTBlocks are built without it). Counts by jax.eval_shape (test):
# titok_l32 177,202,432, titok_b64 177,227,008, titok_s128 294,990,848.
GENERATOR_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(codebook_size=64, num_tokens=32, num_classes=10, width=64, depth=2, num_heads=4,
                 mlp_ratio=4.0, dropout=0.0, attention_dropout=0.0, arch="vit"),
    "tiny_uvit": dict(codebook_size=64, num_tokens=32, num_classes=10, width=64, depth=2,
                      num_heads=4, mlp_ratio=4.0, dropout=0.0, attention_dropout=0.0,
                      arch="uvit"),
    "titok_l32": dict(_PUBLISHED_VIT, num_tokens=32),
    "titok_b64": dict(_PUBLISHED_VIT, num_tokens=64),
    "titok_s128": dict(codebook_size=4096, num_tokens=128, num_classes=1000, width=1024, depth=20,
                       num_heads=16, mlp_ratio=4.0, dropout=0.0, attention_dropout=0.0,
                       arch="uvit"),
}

# Published sampler settings (configs/infer/TiTok/*.yaml), for the `generate` command.
SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "titok_l32": dict(steps=8, randomize_temperature=9.5, guidance_scale=4.5,
                      guidance_schedule="linear"),
    "titok_b64": dict(steps=8, randomize_temperature=11.0, guidance_scale=3.0,
                      guidance_schedule="linear"),
    "titok_s128": dict(steps=64, randomize_temperature=2.8, guidance_scale=6.9,
                       guidance_schedule="power-cosine"),
}


def generator_variant(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of ``GENERATOR_VARIANTS[name]`` updated with ``overrides``."""
    if name not in GENERATOR_VARIANTS:
        raise ValueError(f"unknown generator variant {name!r}; known: {sorted(GENERATOR_VARIANTS)}")
    unknown = set(overrides) - set(MaskGITTransformer.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown MaskGITTransformer fields {sorted(unknown)}")
    return {**GENERATOR_VARIANTS[name], **overrides}
