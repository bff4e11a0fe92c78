"""Sampling from a trained generator workdir: ``load_generator(DIR) -> Generator``.

```python
import titok_jax
gen = titok_jax.load_generator(GEN_DIR)                 # EMA params of the latest checkpoint
tok = titok_jax.load_tokenizer(TOK_DIR)
ids = gen.sample(labels=[0, 1, 2], seed=0)              # int32 [3, num_tokens]; same seed, same ids
images = tok.decode(ids)                                # float32 [3, H, W, 3] in [0, 1]
```
``sample`` takes the sampler settings of the run's config (``generator.sampler``: steps,
randomize_temperature, guidance_scale, guidance_schedule, ... for MaskGIT; temperature, top_k,
top_p, guidance_scale, max_len for the AR task) unless overridden by keyword.
A label equal to ``num_classes`` (or ``None`` for all) samples unconditionally.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Sequence

import numpy as np


class Generator:
    """A trained token generator (build it with ``load_generator``). Attributes: ``num_tokens``,
    ``codebook_size``, ``num_classes``, ``step``, ``config``, ``sampler`` (default settings),
    ``spec`` (the task's ``GeneratorSpec``) and ``task``."""

    def __init__(self, task: Any, params: Any, config: Any, step: int):
        self.task, self.params, self.config, self.step = task, params, config, step
        self.spec = spec = task.generator_spec
        self.num_tokens = spec.num_tokens
        self.codebook_size = spec.codebook_size
        self.num_classes = spec.num_classes
        self.sampler = dict(spec.sampler)
        self.mask_token_id = spec.mask_token_id
        self.num_codebooks = spec.num_codebooks

    def __repr__(self) -> str:
        return (f"Generator(num_tokens={self.num_tokens}, codebook_size={self.codebook_size}, "
                f"num_classes={self.num_classes}, step={self.step})")

    def sample(self, labels: Sequence[int] | None = None, num: int | None = None, seed: int = 0,
               batch_size: int = 64, **sampler: Any) -> np.ndarray:
        """Token ids ``[B, num_tokens]`` (``[B, max_len]`` for an AR prefix; ``[B, ..., k]`` for an
        AR model of ``num_codebooks = k`` factorized ids): one row per label
        (``num`` null labels when ``labels`` is None). Drawn in chunks of ``batch_size`` with seeds
        ``seed + chunk``, so a run is reproducible for a given ``(seed, batch_size)``."""
        if labels is None:
            labels = [self.num_classes] * int(num or 1)
        labels = np.asarray(list(labels), np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("labels must be a non-empty list of class ids")
        bad = labels[(labels < 0) | (labels > self.num_classes)]
        if bad.size:
            raise ValueError(f"class id {int(bad[0])} is out of range: valid ids are 0..{self.num_classes - 1} "
                             f"({self.num_classes} = unconditional)")
        unknown = set(sampler) - set(self.spec.sampler_keys)
        if unknown:
            raise ValueError(f"unknown sampler settings {sorted(unknown)}; known: {sorted(self.spec.sampler_keys)}")
        out = []
        for i, start in enumerate(range(0, len(labels), batch_size)):
            out.append(self.task.sample(self.params, labels[start:start + batch_size], seed=seed + i, **sampler))
        return np.concatenate(out).astype(np.int32)

    def logits(self, tokens: Any, labels: Any = None) -> np.ndarray:
        """float32 logits ``[B, N, K]`` for ``tokens [B, N]`` (MaskGIT: may hold ``mask_token_id``)
        and ``labels [B]`` (None or -1 = unconditional); no dropout. An AR model with sub-tokens
        (factorized ids ``[B, N, k]`` or split bits) gives a tuple of ``[B, N, V_i]``, sub-token
        ``i`` given the true sub-tokens before it."""
        tokens = np.asarray(tokens)
        k = self.num_codebooks
        want = (self.num_tokens,) if k == 1 else (self.num_tokens, k)
        if tokens.shape[1:] != want or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"logits expects integer tokens [B, {', '.join(map(str, want))}], got "
                             f"{tokens.dtype} {tokens.shape}")
        labels = np.full(tokens.shape[0], -1) if labels is None else np.asarray(labels)
        out = self.task.logits(self.params, tokens, labels)
        if isinstance(out, (tuple, list)):
            return tuple(np.asarray(o, np.float32) for o in out)
        return np.asarray(out, np.float32)


def load_generator(workdir: str | os.PathLike, step: int | None = None) -> Generator:
    """The generator of a workdir written by ``train`` with a generator config (EMA params when the
    run kept them). Errors are one line: FileNotFoundError / ValueError."""
    from titok_jax.tasks.runs import restore_run

    run = restore_run(workdir, kind="generator", step=step)
    return Generator(run.task, run.params, run.config, run.step)


class GenerationScorer:
    """gFID and Inception Score of generated images: pytorch-fid InceptionV3 pool features against
    reference statistics (``fid_reference`` .npz with ``mu``/``sigma``; without one only the IS), and
    the Inception Score of the unbiased logits. ``update`` takes float images in [0, 1] (rounded to
    the uint8 grid first, as saved PNGs would be)."""

    def __init__(self, inception_weights: str, fid_reference: str | None = None):
        from titok_jax import evaluation as ev
        from titok_jax.nets.inception import POOL_FEATURES, inception_feature_fn, load_inception_params

        self.params = load_inception_params(inception_weights)
        self.reference = ev.load_reference_stats(fid_reference, POOL_FEATURES) if fid_reference else None
        self.features = inception_feature_fn()
        self.stats = ev.FeatureStats(POOL_FEATURES)
        self.logits: list[np.ndarray] = []

    def update(self, images: np.ndarray) -> None:
        out = self.features(self.params, np.asarray(images, np.float32))
        self.stats.update(np.asarray(out["pool"]))
        self.logits.append(np.asarray(out["logits_unbiased"]))

    def result(self, splits: int = 1) -> dict:
        from titok_jax import evaluation as ev
        score, spread = ev.inception_score(np.concatenate(self.logits), splits=splits)
        out = {"inception_score": float(score), "inception_score_std": float(spread)}
        if self.reference is not None:
            out["gfid"] = float(ev.frechet_distance_stats(self.reference, self.stats))
        return out


def class_labels(num: int, num_classes: int, class_id: int | None = None) -> np.ndarray:
    """``num`` class ids: ``class_id`` every time, else ``0, 1, ...`` cycling through the classes
    (zeros for a generator without classes). ``class_id == num_classes`` samples unconditionally."""
    if class_id is not None:
        return np.full(num, class_id)
    return np.arange(num) % num_classes if num_classes else np.zeros(num, np.int64)


def check_tokenizer(generator: Generator, tokenizer: Any, tokenizer_name: str = "") -> None:
    """A ValueError unless ``tokenizer`` decodes the ids ``generator`` makes (same number of tokens,
    same codebook, as many ids per token); ``tokenizer_name`` (e.g. its workdir) names it in the
    message."""
    from titok_jax.tasks.generator import check_num_codebooks
    name = f"the tokenizer {tokenizer_name}" if tokenizer_name else "the tokenizer"
    check_num_codebooks(tokenizer.num_codebooks, getattr(generator, "num_codebooks", 1), name,
                        "the generator")
    if tokenizer.codebook_size != generator.codebook_size or tokenizer.num_tokens != generator.num_tokens:
        raise ValueError(f"the generator makes {generator.num_tokens} ids from {generator.codebook_size} "
                         f"codes but {name} takes {tokenizer.num_tokens} from {tokenizer.codebook_size}")


def generate_chunks(generator: Generator, tokenizer: Any, labels: Sequence[int], *, batch_size: int = 32,
                    seed: int = 0, tokenizer_name: str = "", **sampler: Any
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Sample one chunk of ``batch_size`` labels at a time (chunk ``i`` with seed ``seed + i``) and
    decode it with ``tokenizer``: yields ``(start, ids int32 [b, T], images float32 [b, H, W, 3])``.
    A tokenizer whose ids the generator does not make is a ValueError before any sampling."""
    check_tokenizer(generator, tokenizer, tokenizer_name)
    labels = np.asarray(labels)
    for chunk, start in enumerate(range(0, len(labels), batch_size)):
        ids = generator.sample(labels[start:start + batch_size], seed=seed + chunk, batch_size=batch_size,
                               **sampler)
        yield start, ids, tokenizer.decode(ids)


def generate_images(generator: Generator, tokenizer: Any, output: str, labels: Sequence[int], *,
                    batch_size: int = 32, seed: int = 0, sampler: dict[str, Any] | None = None,
                    inception_weights: str | None = None, fid_reference: str | None = None,
                    is_splits: int = 1, save_images: bool = True, tokenizer_name: str = "") -> dict:
    """Generate ``len(labels)`` images chunk by chunk (:func:`generate_chunks`) into ``output``: a
    PNG per image (``{index:06d}_class{K}.png``, unless ``save_images`` is False), ``grid.png`` (the
    first 64) and ``tokens.npz`` (``tokens``, ``labels``). With ``inception_weights`` also gFID
    against ``fid_reference`` and the Inception Score (:class:`GenerationScorer`), written to
    ``metrics.json``. Returns ``{"grid", "tokens", "metrics"}`` (``metrics`` None without scoring)."""
    import json

    from titok_jax.evaluation.images import save_png, tile_grid

    if fid_reference and not inception_weights:
        raise ValueError("fid_reference needs inception_weights")
    check_tokenizer(generator, tokenizer, tokenizer_name)
    labels = np.asarray(labels)
    scorer = GenerationScorer(inception_weights, fid_reference) if inception_weights else None
    os.makedirs(output, exist_ok=True)
    all_ids, grid_images = [], []
    for start, ids, images in generate_chunks(generator, tokenizer, labels, batch_size=batch_size, seed=seed,
                                              tokenizer_name=tokenizer_name, **(sampler or {})):
        all_ids.append(ids)
        grid_images.extend(images[:64 - len(grid_images)])
        if save_images:
            for i, image in enumerate(images):
                save_png(os.path.join(output, f"{start + i:06d}_class{int(labels[start + i])}.png"), image)
        if scorer is not None:
            scorer.update(images)
    grid = os.path.join(output, "grid.png")
    save_png(grid, tile_grid(np.stack(grid_images), ncol=min(8, len(grid_images))))
    tokens = os.path.join(output, "tokens.npz")
    np.savez(tokens, tokens=np.concatenate(all_ids), labels=labels.astype(np.int32))
    metrics = None
    if scorer is not None:
        metrics = {"num_images": int(len(labels)), **scorer.result(splits=is_splits)}
        with open(os.path.join(output, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f)
    return {"grid": grid, "tokens": tokens, "metrics": metrics}
