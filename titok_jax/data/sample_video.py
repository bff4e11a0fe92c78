"""``sample_video``: clips of the built-in sample photographs under synthetic camera motion.

Offline and deterministic: each clip is a square window moving over one photograph of the
``sample`` set (same train / held-out split) by a pan, a zoom or both (``camera_path``), every
frame resampled to ``frame_size x frame_size`` with PIL's antialiased bilinear filter
(``render_camera_path``). The motion parameters (kind, direction, speed, zoom rate, start window)
are drawn from the clip's generator, so a clip is a function of ``(seed, index)``.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from titok_jax.data import sample_images
from titok_jax.data.transforms import record_rng
from titok_jax.data.video_sources import _check_positive, _record, clip_span


MOTIONS = ("pan", "zoom", "pan_zoom")


@functools.lru_cache(maxsize=32)
def _sample_photo(name: str, reduce: int):
    """The sample photograph ``name`` as a PIL image, shrunk by the whole factor ``reduce`` (box
    filter; cached per process: the frames of a clip are all read from one photograph)."""
    from PIL import Image

    image = Image.fromarray(sample_images.load_sample_image(name))
    return image.reduce(reduce) if reduce > 1 else image


def camera_path(height: int, width: int, span: int, rng: np.random.Generator,
                motion: str | None = None) -> dict[str, Any]:
    """Random smooth camera motion over a ``height x width`` photo for ``span`` virtual frames.

    A square window of side ``s(u) = s0 (s1 / s0)^u`` centred at ``c(u) = c0 + u D``, ``u`` in
    [0, 1] (constant velocity, constant zoom rate): ``s0 ~ U[0.3, 0.8] * min(H, W)``; a pan moves
    the centre by ``U[0.01, 0.04] * s0`` per frame (at most 4% of the view) in a uniform
    direction; a zoom changes the side by a factor ``exp(+-U[0.01, 0.025])`` per frame, ``s1`` kept in
    ``[0.2, 1] * min(H, W)``. The displacement is shortened until ``|D_a| <= L_a - (s0 + s1) / 2``
    on each axis and ``c0`` is drawn among the centres that keep both end windows inside the
    photo; then every window in between is inside too (``c - s/2`` is concave and ``c + s/2``
    convex in ``u``, so their extremes are at the ends).
    Returns ``{"motion", "c0" (y, x), "d" (dy, dx), "s0", "s1"}`` in pixels of the photo.
    """
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))] if motion is None else motion
    if motion not in MOTIONS:
        raise ValueError(f"unknown camera motion {motion!r}; known: {MOTIONS}")
    short = float(min(height, width))
    frames = max(span - 1, 1)
    s0 = rng.uniform(0.3, 0.8) * short
    s1 = s0
    if motion in ("zoom", "pan_zoom"):
        rate = rng.uniform(0.01, 0.025) * (1.0 if rng.random() < 0.5 else -1.0)
        s1 = float(np.clip(s0 * np.exp(rate * frames), 0.2 * short, short))
    d = np.zeros(2)
    if motion in ("pan", "pan_zoom"):
        angle = rng.uniform(0.0, 2.0 * np.pi)
        d = rng.uniform(0.01, 0.04) * s0 * frames * np.array([np.sin(angle), np.cos(angle)])
    room = np.array([height, width], float) - 0.5 * (s0 + s1)
    over = np.abs(d) / np.maximum(room, 1e-9)
    if over.max() > 1.0:
        d = d / over.max()
    lo = np.maximum(0.5 * s0, 0.5 * s1 - d)
    hi = np.minimum(np.array([height, width]) - 0.5 * s0, np.array([height, width]) - 0.5 * s1 - d)
    c0 = lo + rng.random(2) * np.maximum(hi - lo, 0.0)
    return {"motion": motion, "c0": c0, "d": d, "s0": float(s0), "s1": float(s1)}


def render_camera_path(name: str, path: dict[str, Any], times: np.ndarray, size: int) -> np.ndarray:
    """The frames of ``path`` at virtual times ``times`` (each in [0, 1]) from the sample photo
    ``name``: each window resampled to ``size x size`` with PIL's antialiased bilinear filter ->
    uint8 ``[len(times), size, size, 3]``. Windows much larger than ``size`` read a copy of the photo
    shrunk by a whole factor (at least 2x the output left), which is only faster."""
    from PIL import Image

    smallest = min(path["s0"], path["s1"])
    reduce = max(1, int(smallest // (2 * size)))
    photo = _sample_photo(name, reduce)
    frames = []
    for u in times:
        cy, cx = (path["c0"] + u * path["d"]) / reduce
        half = 0.5 * path["s0"] * (path["s1"] / path["s0"]) ** u / reduce
        w, h = photo.size  # clamped: float rounding (and the shrunk copy's floor) nudge edges out
        box = (max(cx - half, 0.0), max(cy - half, 0.0), min(cx + half, w), min(cy + half, h))
        frames.append(np.asarray(photo.resize((size, size), Image.Resampling.BILINEAR, box=box)))
    return np.stack(frames)


class SampleVideoSource:
    """Clips of the built-in sample photographs under synthetic camera motion (offline).

    Same split as ``sample``: the training photographs for ``split="train"``, the held-out ones for
    eval splits. Entry ``i`` is photograph ``i % n`` (``repeats`` entries per photograph: 128 for
    train, 1 for eval); its label is the photograph's position in the split. A clip is ``num_frames``
    frames, ``frame_size`` square, taken every ``frame_stride`` frames of a pan, a zoom or both
    (``camera_path``; the speed is per frame, so a larger stride moves faster). ``get_clip(i, rng)``
    draws the motion from ``rng``; ``source[i]`` from ``record_rng(seed, i)``: a fixed clip per entry.
    """

    default_crop_scale = (1.0, 1.0)  # the camera path is the crop: no second one on top

    def __init__(self, split: str = "train", num_frames: int = 16, frame_size: int = 64,
                 frame_stride: int = 1, repeats: int | None = None, seed: int = 0,
                 motions: tuple[str, ...] = MOTIONS):
        self.split = split
        self.names = sample_images.sample_split_names(split)
        if repeats is None:
            repeats = 128 if split in sample_images.TRAIN_SPLITS else 1
        self.repeats = _check_positive(repeats, "repeats")
        self.num_frames = _check_positive(num_frames, "num_frames")
        self.frame_size = _check_positive(frame_size, "frame_size")
        self.frame_stride = _check_positive(frame_stride, "frame_stride")
        self.seed = int(seed)
        bad = [m for m in motions if m not in MOTIONS]
        if bad or not motions:
            raise ValueError(f"motions must be a non-empty subset of {MOTIONS}, got {motions!r}")
        self.motions = tuple(motions)
        self.num_classes = len(self.names)
        self.num_skipped = 0  # the clip-source interface: nothing here is ever unusable
        self.skipped_files: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.names) * self.repeats

    def get_clip(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Entry ``index``'s clip, its motion drawn from ``rng`` (``record_rng(seed, index)`` when
        None); the record also says which ``motion`` it is."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        rng = record_rng(self.seed, index) if rng is None else rng
        label = index % len(self.names)
        name = self.names[label]
        h, w = sample_images.load_sample_image(name).shape[:2]
        span = clip_span(self.num_frames, self.frame_stride)
        motion = self.motions[int(rng.integers(len(self.motions)))]
        path = camera_path(h, w, span, rng, motion)
        times = np.arange(self.num_frames) * self.frame_stride / max(span - 1, 1)
        video = render_camera_path(name, path, times, self.frame_size)
        record = _record(video, label, index, f"sample_video:{name}")
        record["motion"] = motion
        return record

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get_clip(index, None)

    def __repr__(self) -> str:
        return (f"SampleVideoSource(split={self.split!r}, images={len(self.names)}, "
                f"repeats={self.repeats}, num_frames={self.num_frames}, frame_size={self.frame_size})")
