"""grain pipelines: train (shuffled, repeated, checkpointable) and eval (ordered, padded, masked).

Train, per process ``p`` of ``n``::

    MapDataset.source(src).shuffle(seed).repeat(epochs)   # global stream, reshuffled every epoch
      .map_with_index(TrainTransform(seed))               # augmentation = f(seed, stream position)
      [p::n]                                              # this process's share, no overlap
      .batch(global_batch // n, drop_remainder=True)
      .to_iter_dataset(ReadOptions)[.mp_prefetch(workers)]

Global step ``k`` therefore holds stream positions ``k*G .. k*G + G - 1`` whatever ``n`` is, with the
same crops: the run is reproducible across worker and process counts. ``iter(ds).get_state()`` /
``set_state()`` checkpoint the position (save it with ``grain.checkpoint.CheckpointSave``).

Eval: positions ``0 .. N-1`` padded up to a whole number of global batches, sliced ``[p::n]``, centre
crops; every element carries ``mask`` (False for padding and for stand-ins of corrupt files), so all
processes run the same number of steps and metrics count each image once.
"""
from __future__ import annotations

from typing import Any

import grain

from titok_jax.data.grain_utils import (
    cfg_get,
    check_not_empty,
    check_seed,
    eval_batch_size,
    eval_config_kwargs,
    eval_positions,
    finish,
    train_config_kwargs,
    train_stream,
)
from titok_jax.data.hosts import local_batch_size, process_info
from titok_jax.data.sources import make_source
from titok_jax.data.transforms import EvalTransform, TrainTransform, _check_size
from titok_jax.data.video import (
    is_video_spec,
    video_eval_iterator_from_config,
    video_train_iterator_from_config,
)


def make_train_dataset(
    source: Any,
    image_size: int,
    global_batch_size: int,
    seed: int,
    *,
    split: str = "train",
    data_dir: str | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    crop_scale: tuple[float, float] | None = None,
    flip: bool = True,
    value_range: tuple[float, float] = (0.0, 1.0),
    hue: float = 0.0,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    prefetch_buffer_size: int = 4,
) -> grain.IterDataset:
    """The training ``IterDataset`` of per-process batches (see the module docstring).

    ``source``: a spec (``sample``, ``folder:PATH``, ``tfds:NAME[:split]``) or a source object.
    ``num_epochs=None`` repeats forever; a finite count is cut to whole global batches.
    ``crop_scale=None`` takes the source's ``default_crop_scale`` (sample: (0.35, 1)) or (1, 1):
    resize the shorter side, then a random crop. Batches are dicts of NumPy arrays:
    ``image`` float32 ``[B, S, S, 3]`` in ``value_range``, ``label`` int32 ``[B]``, ``index`` int64 ``[B]``.
    """
    image_size = _check_size(image_size)
    seed = check_seed(seed)
    p, n = process_info(process_index, process_count)
    local = local_batch_size(global_batch_size, n)
    src = make_source(source, split, data_dir=data_dir)
    check_not_empty(len(src), source, split)
    if crop_scale is None:
        crop_scale = getattr(src, "default_crop_scale", (1.0, 1.0))
    transform = TrainTransform(image_size, seed, crop_scale=crop_scale, flip=flip,
                               value_range=value_range, hue=hue)
    ds = train_stream(grain.MapDataset.source(src), seed, global_batch_size, shuffle=shuffle,
                      num_epochs=num_epochs)
    ds = ds.map_with_index(transform)[p::n].batch(local, drop_remainder=True)
    return finish(ds, read_threads, prefetch_buffer_size, worker_count, worker_buffer_size)


def make_train_iterator(*args, **kwargs) -> grain.DatasetIterator:
    """``iter(make_train_dataset(...))``: a ``grain.DatasetIterator`` with ``get_state``/``set_state``.

    Signature: ``make_train_iterator(source, image_size, global_batch_size, seed, *, split="train",
    data_dir=None, num_epochs=None, shuffle=True, crop_scale=None, flip=True, value_range=(0, 1),
    hue=0.0, process_index=None, process_count=None, worker_count=0, worker_buffer_size=2,
    read_threads=4, prefetch_buffer_size=4)``.
    """
    return iter(make_train_dataset(*args, **kwargs))


class _EvalElement:
    """Position -> transformed record, or padding past the end of the source."""

    def __init__(self, source: Any, transform: EvalTransform):
        self.source = source
        self.transform = transform
        self.num_records = len(source)

    def __call__(self, position: int) -> dict[str, Any]:
        position = int(position)
        record = self.source[position] if position < self.num_records else None
        return self.transform(position, record)


def make_eval_dataset(
    source: Any,
    image_size: int,
    global_batch_size: int,
    *,
    split: str = "eval",
    data_dir: str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Batched eval ``MapDataset``: ``len()`` = number of global steps = ``ceil(N / global_batch)``.

    Every record once, in order, centre-cropped; the last global batch is padded, and ``mask``
    (bool ``[B]``) is False for padding. Process ``p`` gets positions ``p, p + n, ...``.
    """
    image_size = _check_size(image_size)
    p, n = process_info(process_index, process_count)
    local = local_batch_size(global_batch_size, n)
    src = make_source(source, split, data_dir=data_dir, sample_repeats=1)
    ds = eval_positions(check_not_empty(len(src), source, split), global_batch_size, p, n)
    ds = ds.map(_EvalElement(src, EvalTransform(image_size, value_range=value_range)))
    return ds.batch(local, drop_remainder=True)


def make_eval_iterator(
    source: Any,
    image_size: int,
    global_batch_size: int,
    *,
    read_threads: int = 4,
    prefetch_buffer_size: int = 4,
    **kwargs,
) -> grain.DatasetIterator:
    """Iterator over ``make_eval_dataset(source, image_size, global_batch_size, **kwargs)``; finite.

    Batches: ``image`` float32 ``[B, S, S, 3]``, ``label`` int32, ``index`` int64 (-1 on padding),
    ``mask`` bool (True = a real image, counted in metrics).
    """
    ds = make_eval_dataset(source, image_size, global_batch_size, **kwargs)
    return iter(finish(ds, read_threads, prefetch_buffer_size, 0, 1))


def train_iterator_from_config(config, **overrides) -> grain.DatasetIterator:
    """``make_train_iterator`` from a run config: ``data.source``, ``data.image_size``,
    ``batch_size`` (global), ``seed``; optional ``data.{data_dir, worker_count, crop_scale, flip,
    value_range, hue, train_split}``. Keyword ``overrides`` win."""
    data = config.data
    if is_video_spec(data.source):  # clips [T, H, W, 3] for video tokenizers (data/video.py)
        return video_train_iterator_from_config(config, **overrides)
    if str(data.source).startswith("tokens:"):  # pre-tokenized shards for generators
        from titok_jax.data.tokens import make_token_train_dataset
        return iter(make_token_train_dataset(str(data.source)[len("tokens:"):], config.batch_size,
                                             config.seed, **overrides))
    kwargs = dict(train_config_kwargs(data), data_dir=cfg_get(data, "data_dir", None))
    kwargs.update(overrides)
    return make_train_iterator(data.source, data.image_size, config.batch_size, config.seed, **kwargs)


def eval_iterator_from_config(config, **overrides) -> grain.DatasetIterator:
    """``make_eval_iterator`` from a run config (``data.eval_split`` default "eval",
    ``data.eval_batch_size`` default ``batch_size``)."""
    data = config.data
    if is_video_spec(data.source):
        return video_eval_iterator_from_config(config, **overrides)
    kwargs = dict(eval_config_kwargs(data), data_dir=cfg_get(data, "data_dir", None))
    kwargs.update(overrides)
    return make_eval_iterator(data.source, data.image_size, eval_batch_size(config), **kwargs)
