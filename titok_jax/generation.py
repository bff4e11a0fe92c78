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
from typing import Any, Sequence

import numpy as np


class Generator:
    """A trained token generator (build it with ``load_generator``). Attributes: ``num_tokens``,
    ``codebook_size``, ``num_classes``, ``step``, ``config``, ``sampler`` (default settings)."""

    def __init__(self, task: Any, params: Any, config: Any, step: int):
        self.task, self.params, self.config, self.step = task, params, config, step
        self.num_tokens = int(task.model.num_tokens)
        self.codebook_size = int(task.model.codebook_size)
        self.num_classes = int(task.model.num_classes)
        self.sampler = dict(task.sampler)

    def __repr__(self) -> str:
        return (f"Generator(num_tokens={self.num_tokens}, codebook_size={self.codebook_size}, "
                f"num_classes={self.num_classes}, step={self.step})")

    def sample(self, labels: Sequence[int] | None = None, num: int | None = None, seed: int = 0,
               batch_size: int = 64, **sampler: Any) -> np.ndarray:
        """Token ids ``[B, num_tokens]`` (``[B, max_len]`` for an AR prefix): one row per label
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
        keys = getattr(self.task, "sampler_keys", SAMPLER_KEYS)
        unknown = set(sampler) - set(keys)
        if unknown:
            raise ValueError(f"unknown sampler settings {sorted(unknown)}; known: {sorted(keys)}")
        out = []
        for i, start in enumerate(range(0, len(labels), batch_size)):
            out.append(self.task.sample(self.params, labels[start:start + batch_size], seed=seed + i, **sampler))
        return np.concatenate(out).astype(np.int32)


GENERATOR_TASKS = ("maskgit", "ar")
# MaskGIT's settings; the AR task lists its own (temperature, top_k, top_p, guidance_scale, max_len)
# as ``task.sampler_keys``.
SAMPLER_KEYS = ("steps", "guidance_scale", "guidance_schedule", "guidance_power", "randomize_temperature",
                "softmax_temperature_annealing", "mask_schedule", "confidence")


def load_generator(workdir: str | os.PathLike, step: int | None = None) -> Generator:
    """The generator of a workdir written by ``train`` with a generator config (EMA params when the
    run kept them). Errors are one line: FileNotFoundError / ValueError."""
    import flax.linen as nn
    import jax

    from titok_jax.api import _read_config, restore_for_inference
    from titok_jax.tasks import TASKS

    workdir = os.fspath(workdir)
    config = _read_config(workdir)
    name = config.get("task", {}).get("name")
    if name not in GENERATOR_TASKS:
        raise ValueError(f"{workdir} holds a {name!r} run, not a generator (train configs/maskgit.py "
                         "or configs/ar.py)")
    task = TASKS[name](config)
    params_abs, _ = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    to_abs = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t)  # noqa: E731
    use_ema = float(config.get("optimizer", {}).get("ema_decay", 0.0) or 0.0) > 0
    abstract = {"ema_params": to_abs(params_abs["model"])} if use_ema else {"params": to_abs(params_abs)}
    restored, step = restore_for_inference(workdir, abstract, step)
    params = restored["ema_params"] if use_ema else restored["params"]["model"]
    return Generator(task, params, config, step)


class GenerationScorer:
    """gFID and Inception Score of generated images: pytorch-fid InceptionV3 pool features against
    reference statistics (``fid_reference`` .npz with ``mu``/``sigma``; without one only the IS), and
    the Inception Score of the unbiased logits. ``update`` takes float images in [0, 1] (rounded to
    the uint8 grid first, as saved PNGs would be)."""

    def __init__(self, inception_weights: str, fid_reference: str | None = None):
        from titok_jax import evaluation as ev
        from titok_jax.models.inception import POOL_FEATURES, inception_feature_fn, load_inception_params

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
