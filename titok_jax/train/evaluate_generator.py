"""Generator evaluation during training and with ``titok-jax eval``: masked-token loss and accuracy
on a seeded mask of held-out tokens, and a grid of sampled images decoded by the tokenizer."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from titok_jax import data as data_lib
from titok_jax.evaluation.images import save_png, tile_grid


def tokenizer_workdir(config: Any) -> str:
    """The tokenizer that decodes the generator's tokens: ``config.tokenizer.workdir``, else the one
    that wrote the token shards (their ``meta.json``)."""
    workdir = str(config.get("tokenizer", {}).get("workdir", "") or "")
    if not workdir and str(config.data.source).startswith("tokens:"):
        from titok_jax.data.tokens import read_token_meta
        workdir = str(read_token_meta(str(config.data.source)[len("tokens:"):]).get("tokenizer", "") or "")
    return workdir


def eval_token_batch(task: Any, config: Any, constants: Any) -> tuple[np.ndarray, np.ndarray]:
    """A fixed batch of ``(tokens, labels)``: the first unshuffled batch of the token shards, or the
    tokenizer's ids of the eval split's images."""
    n = int(config.data.get("eval_batch_size", 0) or config.batch_size)
    if not task.on_the_fly:
        from titok_jax.data.tokens import TokenSource
        src = TokenSource(str(config.data.source)[len("tokens:"):])
        rows = [src[i] for i in range(min(n, len(src)))]
        return np.stack([r["tokens"] for r in rows]), np.asarray([r["label"] for r in rows], np.int32)
    batch = next(iter(data_lib.eval_iterator_from_config(config)))
    keep = np.asarray(batch["mask"], bool)
    tokens = np.asarray(task._tokens({"image": jax.numpy.asarray(batch["image"])}, constants))
    return tokens[keep], np.asarray(batch["label"], np.int32)[keep]


def evaluate_generator(task: Any, model_params: Any, config: Any, constants: Any, workdir: str,
                       step: int, decode: Any = None) -> tuple[dict, str | None, np.ndarray | None]:
    """``(metrics, grid path or None, grid or None)``. ``decode(tokens) -> images`` draws the
    samples (one per class for the first ``samples.num_images`` classes, or unconditional)."""
    tokens, labels = eval_token_batch(task, config, constants)
    params = jax.device_get(model_params)
    metrics = {k: float(v) for k, v in task.masked_metrics(params, tokens, labels).items()}
    metrics["num_sequences"] = int(tokens.shape[0])
    if decode is None:
        return metrics, None, None
    num = int(config.get("samples", {}).get("num_images", 8))
    classes = int(task.model.num_classes)
    sample_labels = np.arange(num) % classes if classes > 0 else np.full(num, classes)
    ids = task.sample(params, sample_labels, seed=int(config.seed))
    images = decode(ids)
    grid = tile_grid(images, ncol=min(num, 8))
    path = os.path.join(workdir, "samples", f"generated_{int(step):09d}.png")
    if jax.process_index() == 0:
        save_png(path, grid)
    return metrics, path, grid
