"""Random-access clip sources for video tokenizers: ``video_folder:PATH``,
``tfds_video:NAME[:VERSION][:SPLIT]`` (:class:`TfdsVideoSource`; and the clip helpers
``sample_video.py`` shares; the spec parser is ``video.make_video_source``).

A clip source has ``__len__``, ``__getitem__(i)`` (the fixed, evaluation clip of entry ``i``) and
``get_clip(i, rng)`` (a random clip of entry ``i``, drawn from ``rng``; training). A record is
``{"video": uint8 [T, H, W, 3] RGB, "label": int32 (-1 when unknown), "index": int64, "file": str}``
with ``index`` the entry actually read (it differs from ``i`` when entry ``i`` was unusable and the
next usable one stood in, as in ``FolderSource``). Sources are picklable and import no JAX; PyAV
(the ``video`` extra) is imported only when a compressed video file is read.

Temporal crops: a clip of ``T = num_frames`` frames at ``frame_stride`` ``k`` takes frames
``start, start + k, ..., start + (T - 1) k`` of a video of ``n >= span = (T - 1) k + 1`` frames,
``start ~ U{0 .. n - span}`` in training and ``start = (n - span) // 2`` (the central clip) at eval.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any

import numpy as np

from titok_jax.data.folders import SkipLog, first_line, folder_labels, walk_folders
from titok_jax.data.sources import (
    IMAGE_EXTENSIONS,
    CorruptImageWarning,
    _resolve_folder_root,
    decode_image_file,
    to_rgb_uint8,
)
from titok_jax.errors import UserError

# Decoded with PIL (no extra needed).
PIL_VIDEO_EXTENSIONS = (".gif",)
# Decoded with PyAV (``pip install 'titok_jax[video]'``).
AV_VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
VIDEO_EXTENSIONS = PIL_VIDEO_EXTENSIONS + AV_VIDEO_EXTENSIONS
VIDEO_EXTRA_HINT = "pip install 'titok_jax[video]' (or: pip install av)"


class CorruptVideoWarning(CorruptImageWarning):
    """A video (file or frame folder) was unreadable or too short for one clip, and was skipped."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is needed for this input: the message names the extra to install."""


def _check_positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def clip_span(num_frames: int, frame_stride: int) -> int:
    """Frames of the source video one clip covers: ``(num_frames - 1) * frame_stride + 1``."""
    return (int(num_frames) - 1) * int(frame_stride) + 1


def temporal_crop(n: int, num_frames: int, frame_stride: int,
                  rng: np.random.Generator | None) -> np.ndarray | None:
    """Frame indices of one clip of a video of ``n`` frames (see the module docstring): a random
    start from ``rng``, or the central clip when ``rng`` is None; None when the video is too short."""
    span = clip_span(num_frames, frame_stride)
    if n < span:
        return None
    start = int(rng.integers(0, n - span + 1)) if rng is not None else (n - span) // 2
    return start + np.arange(num_frames) * int(frame_stride)


def _record(video: np.ndarray, label: int, index: int, file: str) -> dict[str, Any]:
    return {"video": video, "label": np.int32(label), "index": np.int64(index), "file": file}


# --------------------------------------------------------------------------------------------
# video_folder:PATH: video files and folders of frames
# --------------------------------------------------------------------------------------------

def natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: ``f2.png`` before ``f10.png``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _import_av(path: str):
    try:
        import av
    except ImportError:
        raise MissingExtraError(f"reading the video {path} needs PyAV, which is not installed: "
                                f"{VIDEO_EXTRA_HINT}") from None
    return av


def frame_folder_files(path: str) -> list[str]:
    """The frame images directly in ``path`` (hidden files skipped), in natural name order."""
    names = [e.name for e in os.scandir(path)
             if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
             and e.is_file()]
    return sorted(names, key=natural_key)


def list_videos(root: str, skipped: dict[str, str] | None = None) -> list[str]:
    """The videos under ``root`` as sorted relative paths: every video file (``VIDEO_EXTENSIONS``)
    and every folder that directly holds images (a frame folder: one video; its own sub-folders
    are not read). ``root`` itself holding images is one video, ``"."``. Hidden entries skipped;
    directory links followed once each. An entry with a video name that is not a regular file (a
    FIFO would block the decoder; a broken link) goes to ``skipped`` (relative path -> reason)."""
    from titok_jax.data.paths import file_kind

    out: list[str] = []
    for top, entries, descend in walk_folders(root):
        dirs, videos, has_frames = [], [], False
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            low = e.name.lower()
            if is_dir:
                dirs.append(e.path)
            elif low.endswith(VIDEO_EXTENSIONS):
                rel = os.path.relpath(e.path, root)
                try:
                    regular = e.is_file()
                except OSError:
                    regular = False
                if regular:
                    videos.append(rel)
                elif skipped is not None:
                    skipped[rel] = f"OSError: a {file_kind(e.path)}, not a regular video file"
            elif low.endswith(IMAGE_EXTENSIONS):
                has_frames = True
        if has_frames:
            out.append(os.path.relpath(top, root))
        else:
            descend.extend(dirs)
        out.extend(videos)
    return sorted(out, key=lambda p: p.replace(os.sep, "/"))


def _gif_num_frames(path: str) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return int(getattr(im, "n_frames", 1))


def _read_gif(path: str, indices: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = []
    with Image.open(path) as im:
        for i in indices:
            im.seek(int(i))
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def _av_num_frames(path: str) -> int | None:
    """The frame count the container declares (None when it does not say)."""
    av = _import_av(path)
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        n = int(container.streams.video[0].frames or 0)
    return n or None


def _read_av(path: str, indices: np.ndarray | None) -> np.ndarray:
    """Decode frames ``indices`` (all when None) of the first video stream, stopping after the last
    one needed -> uint8 ``[N, H, W, 3]``; fewer rows when the stream ends early."""
    av = _import_av(path)
    want = None if indices is None else {int(i): k for k, i in enumerate(indices)}
    last = None if indices is None else int(np.max(indices))
    frames: list[np.ndarray | None] = [] if want is None else [None] * len(want)
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if want is None:
                frames.append(frame.to_ndarray(format="rgb24"))
            elif i in want:
                frames[want[i]] = frame.to_ndarray(format="rgb24")
            if last is not None and i >= last:
                break
    got = [f for f in frames if f is not None]
    if not got:
        raise ValueError("no decodable frames")
    return np.stack(got)


class _TooShort(Exception):
    """A readable video with fewer frames than one clip spans."""


class VideoFolderSource(SkipLog):
    """Every video under a folder: video files (``.gif`` with PIL; ``.mp4 .webm .mkv .mov .avi .m4v``
    with PyAV, the ``video`` extra) and frame folders (a folder of images is one video, frames in
    natural name order: ``f2`` before ``f10``). Layout as for ``FolderSource``: split sub-folders
    (``train/``, ``val/`` ...) pick the split; first-level sub-folders are classes (label = index
    among the sorted class names, -1 for videos directly in the root).

    Unusable videos (corrupt, or shorter than ``span = (num_frames - 1) * frame_stride + 1``) are
    skipped, never fatal: frame folders too short are known from the listing and left out at
    construction (with ``verify=True`` every video is decoded once there too), with one summary
    ``CorruptVideoWarning``; at read time a video found unusable warns once and the next usable
    one stands in (``record["index"]`` is then the stand-in's). ``num_skipped`` / ``skipped_files``
    count both (per process). No usable video at all is one ``ValueError``; a compressed video
    without PyAV is one ``MissingExtraError`` naming the extra (at construction).
    """

    default_crop_scale = (1.0, 1.0)
    skip_warning = CorruptVideoWarning
    skip_noun = "video"

    def __init__(self, path: str, split: str | None = None, num_frames: int = 16,
                 frame_stride: int = 1, verify: bool = False):
        path = os.path.expanduser(str(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"video folder not found: {path}")
        if not os.path.isdir(path):
            raise ValueError(f"not a folder: {path}")
        self.path, self.split = path, split
        self.num_frames = _check_positive(num_frames, "num_frames")
        self.frame_stride = _check_positive(frame_stride, "frame_stride")
        self.span = clip_span(self.num_frames, self.frame_stride)
        self.root = _resolve_folder_root(path, split)
        self._init_skips()
        self._lengths: dict[str, int] = {}  # per process: frame counts already known
        self._frames: dict[str, list[str]] = {}  # frame folder -> its frame file names
        bad: dict[str, str] = {}  # FIFOs, sockets, broken links: skipped, counted, warned
        entries = list_videos(self.root, bad)
        if not entries:
            raise ValueError(f"no videos ({'/'.join(VIDEO_EXTENSIONS)} files or folders of frame "
                             f"images) found in folder {self.root}")
        needs_av = next((e for e in entries if e.lower().endswith(AV_VIDEO_EXTENSIONS)), None)
        if needs_av is not None:
            _import_av(os.path.join(self.root, needs_av))
        good = []
        for e in entries:
            full = os.path.join(self.root, e)
            if os.path.isdir(full):
                self._frames[e] = frame_folder_files(full)
                self._lengths[e] = len(self._frames[e])
            try:
                if verify:
                    self._read(e, None)
                elif e in self._lengths and self._lengths[e] < self.span:
                    raise _TooShort(self._short_reason(self._lengths[e]))
                good.append(e)
            except Exception as err:  # noqa: BLE001 - any failure means "unusable"
                bad[e] = self._reason(err)
        self._skipped.update(bad)
        if not good:
            raise ValueError(f"no usable video in folder {self.root}: all {len(bad)} are "
                             f"unreadable or shorter than {self.span} frames "
                             f"(num_frames={self.num_frames}, frame_stride={self.frame_stride}); "
                             f"e.g. {next(iter(bad))}: {next(iter(bad.values()))}")
        if bad:
            short = sum(v.startswith("too short") for v in bad.values())
            warnings.warn(f"skipping {len(bad)} of {len(bad) + len(good)} videos in {self.root} "
                          f"({short} too short for {self.span} frames, {len(bad) - short} "
                          f"unreadable; see .skipped_files), e.g. {next(iter(bad))}: "
                          f"{next(iter(bad.values()))}", CorruptVideoWarning, stacklevel=2)
        self.files = good
        self.class_names, self.labels = folder_labels(good)

    def _short_reason(self, n: int) -> str:
        return (f"too short: {n} frames, a clip of {self.num_frames} at stride "
                f"{self.frame_stride} spans {self.span}")

    @staticmethod
    def _reason(error: BaseException) -> str:
        return str(error) if isinstance(error, _TooShort) else SkipLog._reason(error)

    def _length(self, f: str) -> int | None:
        if f not in self._lengths:
            full = os.path.join(self.root, f)
            n = _gif_num_frames(full) if f.lower().endswith(PIL_VIDEO_EXTENSIONS) else _av_num_frames(full)
            if n is None:
                return None
            self._lengths[f] = n
        return self._lengths[f]

    def _read(self, f: str, seed: list[int] | None) -> np.ndarray:
        """One clip of video ``f`` -> uint8 ``[T, H, W, 3]``; raises on anything unusable. The
        temporal crop is ``temporal_crop(n, ...)`` with a fresh ``default_rng(seed)`` (the central
        clip for None): a function of ``seed`` and the video only, whichever path reads it."""
        def crop(n: int) -> np.ndarray:
            idx = temporal_crop(n, self.num_frames, self.frame_stride,
                                None if seed is None else np.random.default_rng(seed))
            if idx is None:
                raise _TooShort(self._short_reason(n))
            return idx

        full = os.path.join(self.root, f)
        n = self._length(f)
        if f in self._frames:
            frames = [decode_image_file(os.path.join(full, self._frames[f][i])) for i in crop(n)]
            if len({fr.shape for fr in frames}) != 1:
                raise ValueError(f"frames of different sizes: {sorted({fr.shape[:2] for fr in frames})}")
            return np.stack(frames)
        if f.lower().endswith(PIL_VIDEO_EXTENSIONS):
            return _read_gif(full, crop(n))
        if n is not None:  # the container declares its length: decode only up to the clip's end
            idx = crop(n)
            clip = _read_av(full, idx)
            if len(clip) == len(idx):
                return clip
        everything = _read_av(full, None)  # length unknown, or declared wrongly: decode it all
        self._lengths[f] = len(everything)
        return everything[crop(len(everything))]

    def __len__(self) -> int:
        return len(self.files)

    def get_clip(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """A clip of video ``index`` (random temporal crop from ``rng``; the central one when None),
        or of the next usable video when that one is not. The crop drawn for a video depends only
        on ``rng``'s state and that video, not on which videos this process found unusable before."""
        index = self._check_index(index)  # before drawing from rng
        base = None if rng is None else int(rng.integers(2**63))
        read = self._read_usable(
            index, lambda f, j: self._read(f, None if base is None else [base, j]),
            fatal=(MissingExtraError,), stacklevel=4)
        if read is None:
            raise ValueError(f"no usable video in folder {self.root}: all {len(self.files)} are "
                             f"unreadable or shorter than {self.span} frames")
        j, clip = read
        return _record(clip, int(self.labels[j]), j, self.files[j])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get_clip(index, None)

    def __repr__(self) -> str:
        return (f"VideoFolderSource({self.root!r}, videos={len(self.files)}, "
                f"classes={len(self.class_names)}, num_frames={self.num_frames}, "
                f"frame_stride={self.frame_stride})")


# --------------------------------------------------------------------------------------------
# tfds_video:NAME[:VERSION][:SPLIT]: an ArrayRecord-prepared TFDS video data set
# --------------------------------------------------------------------------------------------

class TfdsVideoSource:
    """``tfds.data_source(name, split=..., data_dir=...)`` of a video data set (ArrayRecord; no
    TensorFlow at run time): each record's ``video_key`` feature ``[T, H, W, C]`` (uint8, or
    floats in [0, 1]; 1 or 3 channels) is the whole video, RGB uint8, and ``label_key`` its label
    (-1 when absent). A plain clip source: the temporal crop is ``video._clip``'s (random in
    training, central at eval). The data dir is ``data_dir`` or ``$TFDS_DATA_DIR`` (or TFDS's
    default)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 video_key: str = "video", label_key: str = "label"):
        import tensorflow_datasets as tfds

        self.name, self.split, self.video_key, self.label_key = name, split, video_key, label_key
        self.data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
        try:
            self._source = tfds.data_source(name, split=split, data_dir=self.data_dir)
        except Exception as e:  # noqa: BLE001 - turn TFDS's many errors into one clear line
            where = self.data_dir or "TFDS's default data dir"
            raise ValueError(
                f"cannot open TFDS video data set {name!r} split {split!r} in {where} as "
                f"ArrayRecord (prepare it with file_format='array_record'): "
                f"{type(e).__name__}: {first_line(e)}") from e

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        rec = self._source[index]
        video = rec.get(self.video_key) if hasattr(rec, "get") else None
        if video is None or np.ndim(video) != 4:
            what = "no" if video is None else f"a {np.ndim(video)}-D"
            raise ValueError(f"TFDS record {index} of {self.name!r} (split {self.split!r}) has "
                             f"{what} {self.video_key!r} feature, not a video [T, H, W, C] (its "
                             f"features: {sorted(rec)})")
        frames = np.stack([to_rgb_uint8(f) for f in np.asarray(video)])
        label = rec.get(self.label_key, -1)
        label = int(np.asarray(label)) if np.ndim(label) == 0 else -1
        return _record(frames, label, index, f"tfds:{self.name}/{self.split}/{index}")

    def __repr__(self) -> str:
        return f"TfdsVideoSource({self.name!r}, split={self.split!r}, records={len(self)})"
