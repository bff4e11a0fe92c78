"""Clip pipelines for video tokenizers: the image pipelines of ``pipeline.py`` with clips in place
of images.

Sources (``video_sources``): ``sample_video`` (the sample photographs under synthetic pans and
zooms, offline), ``video_folder:PATH`` (video files and folders of frames) and
``tfds_video:NAME[:VERSION][:SPLIT]`` (an ArrayRecord TFDS video data set). Train, per process
``p`` of ``n``::

    MapDataset.range(len(src)).shuffle(seed).repeat(epochs)     # the image pipeline's global stream
      .map_with_index(element)    # rng = record_rng(seed, position): temporal crop (or camera
                                  # motion), then one spatial crop / flip / hue for every frame
      [p::n].batch(global_batch // n, drop_remainder=True).to_iter_dataset(...)[.mp_prefetch(...)]

so a clip is a function of ``(seed, stream position)`` only: the same guarantees as for images
(same batches whatever the worker, thread or process count; ``get_state`` / ``set_state`` resume
exactly). Eval: every clip once, in order (the central temporal crop; ``sample_video``'s fixed
motion per entry), centre-cropped frames, padded to whole global batches with ``mask``.

Batches have the image pipeline's keys: ``image`` float32 ``[B, T, S, S, 3]`` in ``value_range``,
``label`` int32 ``[B]``, ``index`` int64 ``[B]`` (+ ``mask`` bool ``[B]`` at eval).
Config keys (``*_from_config``): ``data.num_frames`` (default 16), ``data.frame_stride`` (1).
``clip_batches_for_tokenizing``: every clip of a source once per pass, for token shards
(``titok-jax tokenize --data sample_video``; ``data.tokens.tokenize_source``).
"""
from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np

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
from titok_jax.data.sample_video import SampleVideoSource
from titok_jax.data.transforms import (
    _check_range,
    _check_scale,
    _check_size,
    _pil_resize,
    flip_hue_example,
    record_rng,
    resize_shorter_side,
    to_float,
)
from titok_jax.data.sources import _TFDS_SPLITS as TFDS_SPLITS, parse_source_spec
from titok_jax.data.video_sources import TfdsVideoSource, VideoFolderSource, temporal_crop

DEFAULT_NUM_FRAMES = 16
DEFAULT_FRAME_STRIDE = 1
VIDEO_SPEC_HELP = "'sample_video', 'video_folder:PATH' or 'tfds_video:NAME[:split]'"
_TFDS_VIDEO = "tfds_video:"


def is_video_spec(spec: Any) -> bool:
    """True for the spec strings of clip sources (``sample_video``, ``video_folder:PATH``,
    ``tfds_video:NAME[:VERSION][:SPLIT]``)."""
    return isinstance(spec, str) and (spec == "sample_video" or spec.startswith("video_folder:")
                                      or spec.startswith(_TFDS_VIDEO))


def _tfds_video_source(spec: str, split: str, data_dir: str | None) -> TfdsVideoSource:
    """``tfds_video:NAME[:VERSION][:SPLIT]``, split as ``tfds:`` for images
    (``sources.make_source``): "train" -> "train", "eval" -> "validation" (falling back to
    "test"); a split in the spec wins."""
    _, name, spec_split = parse_source_spec("tfds:" + spec[len(_TFDS_VIDEO):])
    if spec_split is not None:
        return TfdsVideoSource(name, spec_split, data_dir=data_dir)
    error: Exception | None = None
    for s in TFDS_SPLITS.get(split, (split,)):
        try:
            return TfdsVideoSource(name, s, data_dir=data_dir)
        except ValueError as e:
            error = e
    assert error is not None
    raise error


def make_video_source(spec: Any, split: str = "train", *, num_frames: int = DEFAULT_NUM_FRAMES,
                      frame_stride: int = DEFAULT_FRAME_STRIDE, image_size: int = 64, seed: int = 0,
                      sample_repeats: int | None = None, verify: bool = False,
                      data_dir: str | None = None):
    """The clip source a spec names, for a logical split (as ``make_source`` for images).

    ``sample_video`` renders ``image_size`` square frames (its camera path is the spatial crop);
    ``video_folder:PATH`` reads native-size frames (the transform crops). A source object (anything
    with ``__len__`` and ``__getitem__``) is returned unchanged. ``tfds_video:NAME[:split]``: an
    ArrayRecord-prepared TFDS data set with a ``video`` feature ``[T, H, W, C]``
    (``video_sources.TfdsVideoSource``; ``data_dir`` or ``$TFDS_DATA_DIR``); ``tfds:NAME`` stays
    the image source (the spec string is what tells clips from images everywhere).
    """
    if not isinstance(spec, str):
        if hasattr(spec, "__len__") and hasattr(spec, "__getitem__"):
            return spec
        raise ValueError(f"video source must be {VIDEO_SPEC_HELP} or a random-access source, got "
                         f"{type(spec).__name__}")
    if spec == "sample_video":
        return SampleVideoSource(split, num_frames=num_frames, frame_size=image_size,
                                 frame_stride=frame_stride, repeats=sample_repeats, seed=seed)
    if spec.startswith(_TFDS_VIDEO):
        return _tfds_video_source(spec, split, data_dir)
    kind, sep, rest = spec.partition(":")
    if kind == "video_folder" and sep and rest:
        return VideoFolderSource(rest, split=split, num_frames=num_frames,
                                 frame_stride=frame_stride, verify=verify)
    raise ValueError(f"unknown video source {spec!r}: use {VIDEO_SPEC_HELP}")


def resize_clip_shorter_side(video: np.ndarray, size: int) -> np.ndarray:
    """``resize_shorter_side`` on every frame of ``[T, H, W, 3]``."""
    return np.stack([resize_shorter_side(f, size) for f in video])


def center_crop_clip(video: np.ndarray, size: int) -> np.ndarray:
    """The same centred ``size x size`` window of every frame (as ``center_crop``)."""
    h, w = video.shape[1:3]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from frames of {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return video[:, top:top + size, left:left + size]


def random_crop_clip(video: np.ndarray, size: int, rng: np.random.Generator,
                     scale: tuple[float, float]) -> np.ndarray:
    """One random window for every frame of ``[T, H, W, 3]`` -> ``[T, size, size, 3]``, drawn as the
    image transforms draw it: ``scale == (1, 1)``: shorter side resized to ``size``, then a random
    ``size x size`` window (``random_crop``); else a square of ``s * min(H, W)``, ``s ~ U[scale]``, at
    a random place, resized to ``size`` (``random_resized_square_crop``)."""
    if scale == (1.0, 1.0):
        video = resize_clip_shorter_side(video, size)
        h, w = video.shape[1:3]
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        return video[:, top:top + size, left:left + size]
    h, w = video.shape[1:3]
    short = min(h, w)
    side = min(max(int(round(rng.uniform(scale[0], scale[1]) * short)), 1), short)
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    return np.stack([_pil_resize(np.ascontiguousarray(f[top:top + side, left:left + side]),
                                 size, size, reducing_gap=3.0) for f in video])


class VideoTrainTransform:
    """``(record, rng) -> {"image": float32 [T, S, S, 3], "label": int32, "index": int64}``: one
    spatial crop (``random_crop_clip``), one flip (probability 1/2) and, with probability ``hue``,
    one hue rotation (``rotate_hue``) for every frame of the clip, then ``to_float``."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float] = (1.0, 1.0),
                 flip: bool = True, value_range: tuple[float, float] = (0.0, 1.0),
                 hue: float = 0.0):
        if not 0.0 <= float(hue) <= 1.0:
            raise ValueError(f"hue (a probability) must be in [0, 1], got {hue!r}")
        self.image_size = _check_size(image_size)
        self.crop_scale = _check_scale(crop_scale)
        self.flip = bool(flip)
        self.value_range = _check_range(value_range)
        self.hue = float(hue)

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        video = random_crop_clip(record["video"], self.image_size, rng, self.crop_scale)
        return flip_hue_example(video, record, rng, flip=self.flip, hue=self.hue,
                                value_range=self.value_range)


class VideoEvalTransform:
    """Deterministic: every frame's shorter side resized to ``S``, centre crop, ``to_float``.
    ``(position, None)`` is padding (zeros, ``mask=False``); a record whose ``index`` differs from
    ``position`` stands in for an unusable video (``mask=False``), as in ``EvalTransform``."""

    def __init__(self, image_size: int, num_frames: int,
                 value_range: tuple[float, float] = (0.0, 1.0)):
        self.image_size = _check_size(image_size)
        self.num_frames = int(num_frames)
        self.value_range = _check_range(value_range)

    def __call__(self, position: int, record: dict[str, Any] | None) -> dict[str, Any]:
        s = self.image_size
        if record is None:
            return {"image": np.zeros((self.num_frames, s, s, 3), np.float32),
                    "label": np.int32(-1), "index": np.int64(-1), "mask": np.bool_(False)}
        video = center_crop_clip(resize_clip_shorter_side(record["video"], s), s)
        index = int(record.get("index", position))
        return {"image": to_float(video, self.value_range),
                "label": np.int32(record.get("label", -1)),
                "index": np.int64(index),
                "mask": np.bool_(index == position)}


def _clip(source: Any, index: int, num_frames: int, frame_stride: int,
          rng: np.random.Generator | None) -> dict[str, Any]:
    """``source.get_clip(index, rng)``; for a plain source (a list of records with ``"video"``
    ``[N, H, W, 3]``) its record with the temporal crop of ``temporal_crop`` applied here."""
    get_clip = getattr(source, "get_clip", None)
    if get_clip is not None:
        return get_clip(index, rng)
    record = dict(source[index])
    video = np.asarray(record["video"])
    idx = temporal_crop(len(video), num_frames, frame_stride, rng)
    if idx is None:
        raise ValueError(f"record {index} has {len(video)} frames, fewer than a clip of "
                         f"{num_frames} at stride {frame_stride} needs")
    record["video"] = video[idx]
    record.setdefault("index", np.int64(index))
    return record


class _TrainElement:
    """(stream position, source index) -> transformed clip; everything random from
    ``record_rng(seed, position)``."""

    def __init__(self, source: Any, transform: VideoTrainTransform, seed: int,
                 num_frames: int, frame_stride: int):
        self.source, self.transform, self.seed = source, transform, seed
        self.num_frames, self.frame_stride = num_frames, frame_stride

    def __call__(self, position: int, index: int) -> dict[str, Any]:
        rng = record_rng(self.seed, position)
        record = _clip(self.source, int(index), self.num_frames, self.frame_stride, rng)
        return self.transform(record, rng)


class _EvalElement:
    """Position -> transformed fixed clip, or padding past the end of the source."""

    def __init__(self, source: Any, transform: VideoEvalTransform, num_frames: int,
                 frame_stride: int):
        self.source, self.transform = source, transform
        self.num_frames, self.frame_stride = num_frames, frame_stride
        self.num_records = len(source)

    def __call__(self, position: int) -> dict[str, Any]:
        position = int(position)
        record = (_clip(self.source, position, self.num_frames, self.frame_stride, None)
                  if position < self.num_records else None)
        return self.transform(position, record)


def make_video_train_dataset(
    source: Any,
    image_size: int,
    global_batch_size: int,
    seed: int,
    *,
    num_frames: int = DEFAULT_NUM_FRAMES,
    frame_stride: int = DEFAULT_FRAME_STRIDE,
    split: str = "train",
    data_dir: str | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    crop_scale: tuple[float, float] | None = None,
    flip: bool = True,
    value_range: tuple[float, float] = (0.0, 1.0),
    hue: float = 0.0,
    verify: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    prefetch_buffer_size: int = 4,
) -> grain.IterDataset:
    """The training ``IterDataset`` of per-process clip batches (see the module docstring).

    ``source``: ``sample_video``, ``video_folder:PATH`` or a clip source object. ``crop_scale=None``
    takes the source's ``default_crop_scale`` or (1, 1). Other arguments as ``make_train_dataset``
    (``data_dir``: the TFDS data dir of a ``tfds_video:`` source).
    """
    image_size = _check_size(image_size)
    seed = check_seed(seed)
    p, n = process_info(process_index, process_count)
    local = local_batch_size(global_batch_size, n)
    src = make_video_source(source, split, num_frames=num_frames, frame_stride=frame_stride,
                            image_size=image_size, seed=seed, verify=verify, data_dir=data_dir)
    check_not_empty(len(src), source, split, "video source")
    if crop_scale is None:
        crop_scale = getattr(src, "default_crop_scale", (1.0, 1.0))
    transform = VideoTrainTransform(image_size, crop_scale=crop_scale, flip=flip,
                                    value_range=value_range, hue=hue)
    ds = train_stream(grain.MapDataset.range(len(src)), seed, global_batch_size, shuffle=shuffle,
                      num_epochs=num_epochs, noun="clips")
    element = _TrainElement(src, transform, seed, int(num_frames), int(frame_stride))
    ds = ds.map_with_index(element)[p::n].batch(local, drop_remainder=True)
    return finish(ds, read_threads, prefetch_buffer_size, worker_count, worker_buffer_size)


def make_video_train_iterator(*args, **kwargs) -> grain.DatasetIterator:
    """``iter(make_video_train_dataset(...))``: a ``grain.DatasetIterator`` with
    ``get_state`` / ``set_state``."""
    return iter(make_video_train_dataset(*args, **kwargs))


def make_video_eval_dataset(
    source: Any,
    image_size: int,
    global_batch_size: int,
    *,
    num_frames: int = DEFAULT_NUM_FRAMES,
    frame_stride: int = DEFAULT_FRAME_STRIDE,
    split: str = "eval",
    data_dir: str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Batched eval ``MapDataset`` (``len()`` = ``ceil(N / global_batch)`` global steps): every clip
    once, in order, padded and masked as ``make_eval_dataset``. ``sample_video`` clips use the
    source's fixed seed 0, so the eval set does not change with the run's seed."""
    image_size = _check_size(image_size)
    p, n = process_info(process_index, process_count)
    local = local_batch_size(global_batch_size, n)
    src = make_video_source(source, split, num_frames=num_frames, frame_stride=frame_stride,
                            image_size=image_size, seed=0, sample_repeats=1, data_dir=data_dir)
    num = check_not_empty(len(src), source, split, "video source")
    ds = eval_positions(num, global_batch_size, p, n)
    transform = VideoEvalTransform(image_size, num_frames, value_range=value_range)
    ds = ds.map(_EvalElement(src, transform, int(num_frames), int(frame_stride)))
    return ds.batch(local, drop_remainder=True)


def make_video_eval_iterator(source: Any, image_size: int, global_batch_size: int, *,
                             read_threads: int = 4, prefetch_buffer_size: int = 4,
                             **kwargs) -> grain.DatasetIterator:
    """Finite iterator over ``make_video_eval_dataset(source, image_size, global_batch_size,
    **kwargs)``: ``image`` float32 ``[B, T, S, S, 3]``, ``label``, ``index`` (-1 on padding), ``mask``."""
    ds = make_video_eval_dataset(source, image_size, global_batch_size, **kwargs)
    return iter(finish(ds, read_threads, prefetch_buffer_size, 0, 1))


def _clip_config(data) -> dict[str, Any]:
    return dict(num_frames=int(cfg_get(data, "num_frames", DEFAULT_NUM_FRAMES)),
                frame_stride=int(cfg_get(data, "frame_stride", DEFAULT_FRAME_STRIDE)),
                data_dir=cfg_get(data, "data_dir", None) or None)


def video_train_iterator_from_config(config, **overrides) -> grain.DatasetIterator:
    """``make_video_train_iterator`` from a run config: as ``train_iterator_from_config`` plus
    ``data.num_frames`` / ``data.frame_stride``. Keyword ``overrides`` win."""
    data = config.data
    kwargs = dict(train_config_kwargs(data), **_clip_config(data))
    kwargs.update(overrides)
    return make_video_train_iterator(data.source, data.image_size, config.batch_size, config.seed,
                                     **kwargs)


def video_eval_iterator_from_config(config, **overrides) -> grain.DatasetIterator:
    """``make_video_eval_iterator`` from a run config (``data.eval_split`` default "eval",
    ``data.eval_batch_size`` default ``batch_size``, ``data.num_frames`` / ``data.frame_stride``)."""
    data = config.data
    kwargs = dict(eval_config_kwargs(data), **_clip_config(data))
    kwargs.update(overrides)
    return make_video_eval_iterator(data.source, data.image_size, eval_batch_size(config),
                                    **kwargs)


def clip_batches_for_tokenizing(source: Any, image_size: int, batch_size: int, *, num_frames: int,
                                frame_stride: int = 1, split: str = "train", epochs: int = 1,
                                augment: bool = True, seed: int = 0
                                ) -> tuple[Iterator[dict[str, np.ndarray]], int, Any]:
    """``data.tokens.image_batches_for_tokenizing`` for a clip source (``sample_video``,
    ``video_folder:PATH``): every clip of ``num_frames`` frames, ``epochs`` times, as batches
    ``{"image": float32 [b, T, S, S, 3], "label"}`` (the last one short). ``augment``: the video
    training transform (a random temporal crop / camera path, spatial crop and flip per clip, seeded
    by its position ``e * len + i``), else the evaluation clip (central crop; ``epochs`` must be 1)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not augment and epochs != 1:
        raise ValueError("without augmentation every pass gives the same tokens; use epochs=1")
    src = make_video_source(source, split, num_frames=num_frames, frame_stride=frame_stride,
                            image_size=image_size, seed=seed, sample_repeats=None if augment else 1)
    if len(src) == 0:
        raise ValueError(f"video source {source!r} split {split!r} is empty")
    ds = grain.MapDataset.range(len(src)).repeat(epochs)
    if augment:
        scale = getattr(src, "default_crop_scale", (1.0, 1.0))
        transform = VideoTrainTransform(image_size, crop_scale=scale, flip=True)
        ds = ds.map_with_index(_TrainElement(src, transform, seed, num_frames, frame_stride))
    else:
        transform = VideoEvalTransform(image_size, num_frames)
        ds = ds.map(_EvalElement(src, transform, num_frames, frame_stride))
    ds = ds.batch(batch_size, drop_remainder=False)
    return iter(ds), len(src) * epochs, src
