"""Generator evaluation (``GeneratorTaskBase.evaluate``, during training and with ``titok-jax
eval``): the task's token metrics (masked-token loss and accuracy for MaskGIT, next-token for AR) on
a fixed held-out batch, and a grid of sampled images decoded by the tokenizer of the run."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from titok_jax import data as data_lib
from titok_jax.evaluation.images import tile_grid
from titok_jax.tasks.types import EvalContext, EvalResult

TOKENS_PREFIX = "tokens:"


def tokenizer_workdir(config: Any) -> str:
    """The tokenizer that decodes the generator's tokens: ``config.tokenizer.workdir``, else the one
    that wrote the token shards (their ``meta.json``)."""
    workdir = str(config.get("tokenizer", {}).get("workdir", "") or "")
    if not workdir and str(config.data.source).startswith(TOKENS_PREFIX):
        from titok_jax.data.tokens import read_token_meta
        workdir = str(read_token_meta(str(config.data.source)[len(TOKENS_PREFIX):]).get("tokenizer", "") or "")
    return workdir


def eval_token_batch(task: Any, config: Any, constants: Any) -> tuple[np.ndarray, np.ndarray]:
    """A fixed batch of ``(tokens, labels)``: the first unshuffled batch of the token shards, or the
    tokenizer's ids of the eval split's images."""
    n = int(config.data.get("eval_batch_size", 0) or config.batch_size)
    if not task.on_the_fly:
        from titok_jax.data.tokens import TokenSource
        src = TokenSource(str(config.data.source)[len(TOKENS_PREFIX):])
        rows = [src[i] for i in range(min(n, len(src)))]
        return np.stack([r["tokens"] for r in rows]), np.asarray([r["label"] for r in rows], np.int32)
    batch = next(iter(data_lib.eval_iterator_from_config(config)))
    keep = np.asarray(batch["mask"], bool)
    tokens = np.asarray(task.batch_tokens({"image": jax.numpy.asarray(batch["image"])}, constants))
    return tokens[keep], np.asarray(batch["label"], np.int32)[keep]


def evaluate_generation(task: Any, model_params: Any, ctx: EvalContext) -> EvalResult:
    """Token metrics on the fixed batch and, when a tokenizer is known, ``images["generated"]``: one
    sample per class for the first ``samples.num_images`` classes (or unconditional), decoded."""
    config = ctx.config
    constants = ctx.constants if ctx.constants is not None else task.constants()
    tokens, labels = eval_token_batch(task, config, constants)
    params = jax.device_get(model_params)
    metrics = {k: float(v) for k, v in task.token_metrics(params, tokens, labels).items()}
    metrics["num_sequences"] = int(tokens.shape[0])
    decoder = task.decoder()
    if decoder is None:
        return EvalResult(metrics=metrics)
    num = int(config.get("samples", {}).get("num_images", 8))
    classes = task.generator_spec.num_classes
    sample_labels = np.arange(num) % classes if classes > 0 else np.full(num, classes)
    ids = task.sample(params, sample_labels, seed=int(config.seed))
    return EvalResult(metrics=metrics, images={"generated": tile_grid(decoder(ids), ncol=min(num, 8))})
