"""The MaskGIT generator task: a bidirectional transformer learns to fill masked token ids.

Per batch (``tokens [B, N]`` int ids, ``labels [B]`` class ids or -1)::

    mask   = training_mask(N, schedule)         #masked = round(N * arccos(t) / (pi/2)) >= 1, t ~ U(0,1)
    labels = null class with prob. p_drop      (and wherever the label is unknown, -1)
    logits = model(where(mask, [MASK], tokens), labels)
    loss   = label-smoothed CE on every position, unmasked positions weighted w_unmasked

Tokens come either from pre-tokenized shards (``data.source = "tokens:DIR"``, written by
``titok-jax tokenize --data``) or are computed on the fly from images by the frozen tokenizer of
``config.tokenizer.workdir`` (any other ``data.source``; its params are a constant of the step).
Evaluation (``evaluate``) reports the masked-token accuracy and loss on a fixed, seeded mask of the
first eval batch and samples one image per class (or per null label) for the grid.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.generators import masking
from titok_jax.generators.maskgit import MaskGITTransformer, generate_tokens
from titok_jax.models.registry import DTYPES
from titok_jax.tasks.base import register_task

DROPOUT_RNG = "dropout"
TOKENS_PREFIX = "tokens:"


def uses_token_shards(config: Any) -> bool:
    return str(config.data.source).startswith(TOKENS_PREFIX)


@register_task("maskgit")
class MaskGITTask:
    batch_keys = ("tokens", "label")

    def __init__(self, config: Any):
        self.config = config
        kwargs = dict(config.model)
        kwargs.pop("name", None)
        dtype = config.get("compute_dtype", "float32")
        try:
            self.model = MaskGITTransformer(**kwargs, dtype=DTYPES[dtype])
        except TypeError as e:
            raise ValueError(f"model: {e}") from None
        g = config.generator
        self.schedule = g.get("mask_schedule", "arccos")
        self.label_smoothing = float(g.get("label_smoothing", 0.1))
        self.unmasked_weight = float(g.get("unmasked_weight", 0.1))
        self.class_dropout = float(g.get("class_dropout", 0.1))
        self.sampler = dict(g.get("sampler", {}))
        self.on_the_fly = not uses_token_shards(config)
        self.batch_keys = ("image", "label") if self.on_the_fly else ("tokens", "label")
        self._tokenizer = None
        self.tokenizer_workdir = str(config.get("tokenizer", {}).get("workdir", "") or "")
        if self.on_the_fly and not self.tokenizer_workdir:
            raise ValueError(f"data.source={config.data.source!r} is images, so the generator needs "
                             "--config.tokenizer.workdir=DIR (a tokenizer workdir), or pre-tokenized data: "
                             "--config.data.source=tokens:DIR from `titok-jax tokenize --data`")

    def tokenizer(self) -> tuple[Any, dict, dict]:
        """``(model, params, model_state)`` of the frozen tokenizer (``config.tokenizer.workdir``)."""
        if self._tokenizer is None:
            from titok_jax.models.registry import build_model
            from titok_jax.tasks.titok_stages import restore_workdir

            workdir = self.tokenizer_workdir
            params, state, cfg = restore_workdir(workdir)
            model = build_model(cfg["model"])
            self._check_vocab(getattr(model, "codebook_size", None), getattr(model, "num_latent_tokens", None),
                              f"tokenizer {workdir}")
            self._tokenizer = (model, params, state)
        return self._tokenizer

    # ------------------------------------------------------------------ setup

    def _check_vocab(self, codebook_size: Any, num_tokens: Any, what: str) -> None:
        if codebook_size is None:
            raise ValueError(f"{what} is continuous (VAE); MaskGIT needs discrete token ids")
        if int(codebook_size) != self.model.codebook_size or int(num_tokens) != self.model.num_tokens:
            raise ValueError(f"{what} gives {num_tokens} tokens from {codebook_size} codes, but the generator "
                             f"is built for {self.model.num_tokens} tokens from {self.model.codebook_size} codes "
                             f"(set --config.model.num_tokens / codebook_size)")

    def check_token_data(self, meta: dict) -> None:
        self._check_vocab(meta.get("codebook_size"), meta.get("num_tokens"),
                          f"token data {self.config.data.source}")
        classes = int(meta.get("num_classes", 0) or 0)
        if classes > self.model.num_classes:
            raise ValueError(f"token data {self.config.data.source} has {classes} classes but the generator has "
                             f"{self.model.num_classes} (set --config.model.num_classes)")

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        n = self.model.num_tokens
        variables = self.model.init({"params": key}, jnp.zeros((1, n), jnp.int32),
                                    jnp.zeros((1,), jnp.int32), train=False)
        return {"model": variables["params"]}, {"model": {}}

    def constants(self) -> dict:
        if not self.on_the_fly:
            from titok_jax.data.tokens import read_token_meta
            self.check_token_data(read_token_meta(str(self.config.data.source)[len(TOKENS_PREFIX):]))
            return {}
        _, params, state = self.tokenizer()
        return {"tokenizer": {"params": params, **state}}

    def _tokens(self, batch: dict, constants: dict) -> jax.Array:
        if not self.on_the_fly:
            return batch["tokens"].astype(jnp.int32)
        model = self.tokenizer()[0]
        _, out = model.apply(constants["tokenizer"], batch["image"].astype(jnp.float32), train=False,
                             method="encode")
        return jax.lax.stop_gradient(out.indices).astype(jnp.int32)

    # ------------------------------------------------------------------ training
    def grads(self, params: dict, state: dict, batch: dict, key: jax.Array, step: jax.Array,
              constants: dict) -> tuple[dict, dict, dict]:
        tokens = self._tokens(batch, constants)
        k_mask, k_drop, k_dropout = jax.random.split(key, 3)
        b, n = tokens.shape
        mask = masking.training_mask(k_mask, b, n, self.schedule)
        labels = masking.drop_classes(k_drop, batch["label"], self.class_dropout, self.model.num_classes)
        inputs = masking.apply_mask(tokens, mask, self.model.mask_id)

        def loss_fn(model_params):
            logits = self.model.apply({"params": model_params}, inputs, labels, train=True,
                                      rngs={DROPOUT_RNG: k_dropout})
            loss, metrics = masking.maskgit_loss(logits, tokens, mask, self.label_smoothing,
                                                 self.unmasked_weight)
            return loss, dict(metrics, loss=loss, mask_ratio=jnp.mean(mask.astype(jnp.float32)))

        grads, metrics = jax.grad(loss_fn, has_aux=True)(params["model"])
        return {"model": grads}, state, metrics

    # ------------------------------------------------------------------ evaluation
    def masked_metrics(self, model_params: Any, tokens: jax.Array, labels: jax.Array,
                       seed: int = 0) -> dict:
        """Loss and accuracy on a seeded training-style mask (the same every evaluation)."""
        b, n = tokens.shape
        mask = masking.training_mask(jax.random.key(seed), b, n, self.schedule)
        labels = jnp.where(labels < 0, self.model.num_classes, labels)
        logits = self.model.apply({"params": model_params},
                                  masking.apply_mask(tokens, mask, self.model.mask_id), labels, train=False)
        loss, metrics = masking.maskgit_loss(logits, tokens, mask, self.label_smoothing, self.unmasked_weight)
        return {"loss": loss, **metrics}

    def sample(self, model_params: Any, labels: np.ndarray, seed: int, **overrides: Any) -> np.ndarray:
        """Token ids ``[B, N]`` for class ``labels`` (``num_classes`` = unconditional)."""
        kw = {**self.sampler, **overrides}
        return np.asarray(generate_tokens(self.model, {"params": model_params},
                                          jnp.asarray(labels, jnp.int32), jax.random.key(seed), **kw))
