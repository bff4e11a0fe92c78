"""Generator evaluation (``GeneratorTaskBase.evaluate``, during training and with ``titok-jax
eval``): the task's token metrics (masked-token loss and accuracy for MaskGIT, next-token for AR) on
a fixed held-out batch, and a grid of sampled images decoded by the tokenizer of the run.

With ``pictures`` (``titok-jax eval``; training's evaluations skip the extra sampling) also
``per_class``: ``samples.grid_per_class`` (4) samples of each of ``samples.grid_classes`` (4)
classes spread evenly over the label range, one captioned row per class; and, given ``lengths``
(a causal generator whose tokenizer decodes prefixes: AR on FlexTok tokens), ``per_class_lengths``:
the first sample of each class decoded from its first ``k`` tokens for each ``k`` of ``lengths``
(an AR sample stopped after ``k`` tokens is exactly that prefix, so nothing is sampled again)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import numpy as np

from titok_jax import data as data_lib
from titok_jax.evaluation.images import caption_grid, tile_grid
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
    tokens = np.asarray(jax.jit(task.batch_tokens)({"image": jax.numpy.asarray(batch["image"])}, constants))
    return tokens[keep], np.asarray(batch["label"], np.int32)[keep]


def evaluate_generation(task: Any, model_params: Any, ctx: EvalContext, pictures: bool = False,
                        lengths: Sequence[int] = ()) -> EvalResult:
    """Token metrics on the fixed batch and, when a tokenizer is known, ``images["generated"]``: one
    sample per class for the first ``samples.num_images`` classes (or unconditional), decoded;
    with ``pictures`` also the per-class grids of ``class_pictures``."""
    config = ctx.config
    constants = ctx.constants if ctx.constants is not None else task.constants()
    tokens, labels = eval_token_batch(task, config, constants)
    params = jax.device_get(model_params)
    metrics = {k: float(v) for k, v in jax.jit(task.token_metrics)(params, tokens, labels).items()}
    metrics["num_sequences"] = int(tokens.shape[0])
    decoder = task.decoder()
    if decoder is None:
        return EvalResult(metrics=metrics)
    num = int(config.get("samples", {}).get("num_images", 8))
    classes = task.generator_spec.num_classes
    sample_labels = np.arange(num) % classes if classes > 0 else np.full(num, classes)
    ids = task.sample(params, sample_labels, seed=int(config.seed))
    images = {"generated": tile_grid(decoder(ids), ncol=min(num, 8))}
    if pictures:
        samples = config.get("samples", {})
        images.update(class_pictures(task, params, decoder, int(config.seed),
                                     int(samples.get("grid_classes", 4)),
                                     int(samples.get("grid_per_class", 4)), lengths))
    return EvalResult(metrics=metrics, images=images)


def grid_classes(num_classes: int, count: int) -> np.ndarray:
    """``count`` class ids spread evenly over ``[0, num_classes)`` (``[num_classes]``, the null
    label, for an unconditional generator)."""
    if num_classes <= 0:
        return np.asarray([num_classes], np.int32)
    picked = np.round(np.linspace(0, num_classes - 1, max(1, min(count, num_classes))))
    return np.unique(picked.astype(np.int32))


def class_pictures(task: Any, params: Any, decoder: Callable[[np.ndarray], np.ndarray], seed: int,
                   classes: int = 4, per_class: int = 4, lengths: Sequence[int] = ()) -> dict:
    """``{"per_class": grid}`` (row ``r``: ``per_class`` samples of class ``grid_classes(...)[r]``,
    captioned) and, with ``lengths``, ``"per_class_lengths"`` (row ``r``: the first sample of that
    class decoded from its first ``k`` tokens, one column per ``k``). One ``task.sample`` call."""
    spec = task.generator_spec
    picked = grid_classes(spec.num_classes, classes)
    per_class = max(1, per_class)
    ids = np.asarray(task.sample(params, np.repeat(picked, per_class), seed=seed))
    decoded = np.asarray(decoder(ids))
    h, w = decoded.shape[1:3]
    names = [f"class {c}" if spec.num_classes > 0 else "uncond." for c in picked]
    out = {"per_class": caption_grid(tile_grid(decoded, ncol=per_class), (h, w), rows=names)}
    if lengths:
        first = ids[::per_class]                       # the first sample of each class
        cells = np.stack([decoded[::per_class] if k == ids.shape[1] else np.asarray(decoder(first[:, :k]))
                          for k in lengths], axis=1)
        out["per_class_lengths"] = caption_grid(tile_grid(cells.reshape(-1, *cells.shape[2:]),
                                                          ncol=len(lengths)), (h, w),
                                                columns=[f"k={k}" for k in lengths], rows=names)
    return out
