"""Small helpers shared by the grain pipelines (images in ``pipeline.py``, clips in ``video.py``):
seed checks, the global training stream and the padded eval positions, the ``MapDataset ->
IterDataset`` tail (read threads, worker processes) and run-config access.

``noun`` (``"records"``, ``"clips"``) and ``what`` (``"data source"``, ``"video source"``) only
word the error messages; the datasets built do not depend on them."""
from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

from titok_jax.errors import ConfigError


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def check_not_empty(num: int, source: Any, split: str, what: str = "data source") -> int:
    """``num`` (a source's length), or a ValueError naming the source and split when it is 0."""
    if num == 0:
        raise ValueError(f"{what} {source!r} split {split!r} is empty")
    return num


def train_stream(ds: grain.MapDataset, seed: int, global_batch_size: int, *, shuffle: bool,
                 num_epochs: int | None, noun: str = "records") -> grain.MapDataset:
    """The global training stream: ``ds`` shuffled (reshuffled every epoch), repeated
    ``num_epochs`` times (forever for None) and, when finite, cut to whole global batches."""
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        whole = (len(ds) // global_batch_size) * global_batch_size
        if whole == 0:
            raise ValueError(
                f"{len(ds)} {noun} x epochs is less than one global batch of {global_batch_size}"
            )
        ds = ds[:whole]
    return ds


def eval_positions(num: int, global_batch_size: int, process_index: int,
                   process_count: int) -> grain.MapDataset:
    """Positions ``0 .. N-1`` padded up to whole global batches (``ceil(N / G) * G``), this
    process's share ``[p::n]``; positions ``>= N`` are padding."""
    padded = math.ceil(num / global_batch_size) * global_batch_size
    return grain.MapDataset.range(padded)[process_index::process_count]


def finish(ds: grain.MapDataset, read_threads: int, prefetch_buffer_size: int,
           worker_count: int, worker_buffer_size: int) -> grain.IterDataset:
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app.run mark
            flags.FLAGS.mark_as_parsed()  # them parsed (defaults) instead of failing
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return it


def cfg_get(cfg, key, default):
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


def config_value_range(data) -> tuple[float, float]:
    """``data.value_range`` of a run config: the trainer's tasks, metrics, thumbnails and sample
    grids all work on images in [0, 1] (the models map to their own range inside), so any other
    range would train and then report garbage PSNR; a one-line ``ConfigError`` instead."""
    value_range = tuple(float(v) for v in cfg_get(data, "value_range", (0.0, 1.0)))
    if value_range != (0.0, 1.0):
        raise ConfigError(f"data.value_range must be (0, 1) in a run config (the tasks, metrics and "
                          f"pictures expect images in [0, 1]; models rescale inside), got "
                          f"{value_range}")
    return value_range


def train_config_kwargs(data) -> dict[str, Any]:
    """The keyword arguments every ``*_train_iterator`` takes from ``config.data``: ``split``
    (``data.train_split``, default "train"), ``worker_count``, ``crop_scale``, ``flip``,
    ``value_range`` (checked, ``config_value_range``) and ``hue``."""
    return dict(
        split=cfg_get(data, "train_split", "train"),
        worker_count=cfg_get(data, "worker_count", 0),
        crop_scale=cfg_get(data, "crop_scale", None),
        flip=cfg_get(data, "flip", True),
        value_range=config_value_range(data),
        hue=cfg_get(data, "hue", 0.0),
    )


def eval_config_kwargs(data) -> dict[str, Any]:
    """The keyword arguments every ``*_eval_iterator`` takes from ``config.data``: ``split``
    (``data.eval_split``, default "eval") and ``value_range`` (checked)."""
    return dict(split=cfg_get(data, "eval_split", "eval"), value_range=config_value_range(data))


def eval_batch_size(config) -> int:
    """``data.eval_batch_size``, or ``batch_size`` when unset (or 0)."""
    return cfg_get(config.data, "eval_batch_size", None) or config.batch_size
