"""The autoregressive (GPT-style) generator task: next-token prediction on tokenizer ids.

Per batch (``tokens [B, N]`` int ids, ``labels [B]`` class ids or -1)::

    labels = null class with prob. p_drop          (and wherever the label is unknown, -1)
    logits = model(tokens, labels)                 teacher forcing: logits[:, p] ~ t_p | t_<p, label
    loss   = mean_{b, p} CE(logits[b, p], t_p)     (optional label smoothing, default 0)

Multi-index tokens (``tokens [B, N, k]`` of an fq / rq tokenizer, ``model.num_codebooks = k``) and
many-bit LFQ indices (``model.split_bits``) are predicted sub-token after sub-token by the model's
per-position head; the loss is then the sum of the sub-tokens' CEs (``subtoken_loss``; their mean
with ``generator.subtoken_reduction="mean"``, FAR's).

The data paths, the evaluation and the spec are shared with MaskGIT (``tasks/generator.py``,
``TokenGeneratorTask``):
pre-tokenized shards (``data.source = "tokens:DIR"``) or ids computed on the fly by the frozen
tokenizer of ``config.tokenizer.workdir``. Evaluation reports the next-token loss and accuracy on the
first eval batch (deterministic: no dropout, no mask) and samples a grid with the KV-cached sampler.
Because the model is causal, the same training serves any prefix length: FlexTok's ordered tokens
are sampled at ``max_len = k`` by stopping after ``k`` positions.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.generators import masking
from titok_jax.generators.ar import ARTransformer, generate_tokens
from titok_jax.tasks.base import register_task
from titok_jax.tasks.generator import DROPOUT_RNG, TokenGeneratorTask

# generator.sampler keys (``Generator.sample`` / ``titok-jax generate`` overrides);
# ``randomize_temperature`` is accepted as a name of ``temperature`` (the CLI's --temperature).
SAMPLER_KEYS = ("temperature", "top_k", "top_p", "guidance_scale", "max_len",
                "randomize_temperature")


def next_token_loss(logits: jax.Array, tokens: jax.Array, label_smoothing: float = 0.0
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean (label-smoothed) cross-entropy of ``logits [B, n, K]`` against ``tokens [B, n]`` and
    the argmax accuracy ``next_token_accuracy``."""
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"next_token_loss needs logits [B, n, K] and tokens [B, n]; got "
                         f"{logits.shape}, {tokens.shape}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    per_token = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    loss = jnp.mean(per_token)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32))
    return loss, {"loss": loss, "nll": jnp.mean(nll), "next_token_accuracy": accuracy}


SUBTOKEN_REDUCTIONS = ("sum", "mean")


def subtoken_loss(logits: tuple[jax.Array, ...], subs: jax.Array, label_smoothing: float = 0.0,
                  reduction: str = "sum") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sub-token heads (``generators/ar_subtokens.py``): ``loss = sum_i mean CE(logits[i], s_i)``
    for ``G`` logits ``[B, n, V_i]`` and sub-ids ``subs [B, n, G]`` (teacher forcing, so the sum
    is the CE of the whole token under the factorised distribution); ``reduction="mean"``: that sum
    / G, as FAR averages its factors (the same objective at 1/G the scale, which matters to the
    gradient clip). Metrics: ``loss``, ``nll`` (summed), ``nll_i``, ``accuracy_i`` and
    ``next_token_accuracy`` (every sub-token's argmax right)."""
    if reduction not in SUBTOKEN_REDUCTIONS:
        raise ValueError(f"generator.subtoken_reduction must be one of {SUBTOKEN_REDUCTIONS}, "
                         f"got {reduction!r}")
    if subs.ndim != 3 or subs.shape[-1] != len(logits):
        raise ValueError(f"subtoken_loss needs {len(logits)} logits and sub-ids [B, n, "
                         f"{len(logits)}]; got sub-ids {subs.shape}")
    loss, nll, metrics, right = 0.0, 0.0, {}, True
    for i, l in enumerate(logits):
        loss_i, m = next_token_loss(l, subs[..., i], label_smoothing)
        loss, nll = loss + loss_i, nll + m["nll"]
        metrics[f"nll_{i}"], metrics[f"accuracy_{i}"] = m["nll"], m["next_token_accuracy"]
        right = right & (jnp.argmax(l, axis=-1) == subs[..., i])
    accuracy = jnp.mean(jnp.asarray(right, jnp.float32))
    if reduction == "mean":
        loss = loss / len(logits)
    return loss, {"loss": loss, "nll": nll, "next_token_accuracy": accuracy, **metrics}


def ar_loss(model: ARTransformer, logits: Any, tokens: jax.Array, label_smoothing: float = 0.0,
            subtoken_reduction: str = "sum") -> tuple[jax.Array, dict[str, jax.Array]]:
    """``next_token_loss``, or ``subtoken_loss`` for a model with sub-tokens."""
    if model.multi:
        return subtoken_loss(logits, model.subtoken_ids(tokens), label_smoothing,
                             subtoken_reduction)
    return next_token_loss(logits, tokens, label_smoothing)


@register_task("ar")
class ARTask(TokenGeneratorTask):
    """Task ``"ar"`` (module docstring). ``sample(model_params, labels, seed, **sampler)`` drives
    ``titok_jax.generation``."""

    model_class = ARTransformer
    sampler_keys = SAMPLER_KEYS
    causal = True

    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        self.label_smoothing = float(config.generator.label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"generator.label_smoothing must be in [0, 1], got {self.label_smoothing}")
        self.subtoken_reduction = str(config.generator.get("subtoken_reduction", "sum"))
        if self.subtoken_reduction not in SUBTOKEN_REDUCTIONS:
            raise ValueError(f"generator.subtoken_reduction must be one of {SUBTOKEN_REDUCTIONS}, "
                             f"got {self.subtoken_reduction!r}")

    def sampler_settings(self, settings: dict) -> dict:
        """Validated sampler settings (``randomize_temperature`` renamed ``temperature``)."""
        out = super().sampler_settings(settings)
        if "randomize_temperature" in out:
            out["temperature"] = out.pop("randomize_temperature")
        if float(out.get("temperature", 1.0)) < 0:
            raise ValueError(f"temperature must be >= 0, got {out['temperature']}")
        top_k = out.get("top_k", 0)
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
        out["top_k"] = int(top_k)
        max_len = int(out.get("max_len", 0) or 0)
        if not 0 <= max_len <= self.model.num_tokens:
            raise ValueError(f"max_len must be in [1, {self.model.num_tokens}] (0 = all), got {max_len}")
        out["max_len"] = max_len or None
        if "guidance_scale" in out:
            out["guidance_scale"] = float(out["guidance_scale"])
        return out

    # ------------------------------------------------------------------ training
    def loss(self, params: dict, state: dict, batch: dict, key: jax.Array, step: jax.Array,
             constants: dict) -> tuple[jax.Array, tuple[dict, dict]]:
        tokens = self.batch_tokens(batch, constants)
        k_drop, k_dropout = jax.random.split(key)
        labels = masking.drop_classes(k_drop, batch["label"], self.class_dropout, self.model.num_classes)
        logits = self.model.apply({"params": params["model"]}, tokens, labels, train=True,
                                  rngs={DROPOUT_RNG: k_dropout})
        loss, metrics = ar_loss(self.model, logits, tokens, self.label_smoothing,
                                self.subtoken_reduction)
        return loss, (state, metrics)

    # ------------------------------------------------------------------ evaluation
    def token_metrics(self, model_params: Any, tokens: Any, labels: Any) -> dict:
        """Next-token loss and accuracy of the eval batch (deterministic: no dropout, no mask)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        _, metrics = ar_loss(self.model, self.logits(model_params, tokens, labels), tokens,
                             self.label_smoothing, self.subtoken_reduction)
        return metrics

    def sample(self, model_params: Any, labels: np.ndarray, seed: int, **overrides: Any) -> np.ndarray:
        """Token ids ``[B, max_len or N]`` (``[B, max_len or N, k]`` factorized) for class
        ``labels`` (``num_classes`` = unconditional)."""
        kw = self.sampler_settings({**self.sampler, **overrides})
        return np.asarray(generate_tokens(self.model, {"params": model_params},
                                          jnp.asarray(labels, jnp.int32), jax.random.key(seed), **kw))
