"""Small helpers shared by the grain pipelines (images in ``pipeline.py``, clips in ``video.py``):
seed checks, the ``MapDataset -> IterDataset`` tail (read threads, worker processes) and run-config
access."""
from __future__ import annotations

import grain
import numpy as np

from titok_jax.errors import ConfigError


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def _finish(ds: grain.MapDataset, read_threads: int, prefetch_buffer_size: int,
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


def _cfg_get(cfg, key, default):
    try:
        return cfg.get(key, default)
    except AttributeError:
        return getattr(cfg, key, default)


def _config_value_range(data) -> tuple[float, float]:
    """``data.value_range`` of a run config: the trainer's tasks, metrics, thumbnails and sample
    grids all work on images in [0, 1] (the models map to their own range inside), so any other
    range would train and then report garbage PSNR; a one-line ``ConfigError`` instead."""
    value_range = tuple(float(v) for v in _cfg_get(data, "value_range", (0.0, 1.0)))
    if value_range != (0.0, 1.0):
        raise ConfigError(f"data.value_range must be (0, 1) in a run config (the tasks, metrics and "
                          f"pictures expect images in [0, 1]; models rescale inside), got "
                          f"{value_range}")
    return value_range
