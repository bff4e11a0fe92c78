"""NumPy-only image transforms (grain spawns its workers: everything here is picklable, no JAX).

Images are uint8 ``[H, W, 3]`` until ``to_float``. Randomness comes from ``record_rng(seed, index)``
where ``index`` is the element's position in the global (shuffled, repeated) stream, so the same
seed gives the same augmentations whatever the worker or process count, and a record gets a new
crop each epoch.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {size!r}")
    return int(size)


def _pil_resize(image: np.ndarray, height: int, width: int,
                reducing_gap: float | None = None) -> np.ndarray:
    """Bicubic resize with PIL (antialiased when shrinking: the kernel widens with the scale).
    ``reducing_gap`` (PIL's): shrink by whole factors with a box filter first while the image stays
    at least that many times the target (training crops use 3: 4x faster from a 1000 px crop to
    64 px, at most 2/255 from the exact resize)."""
    from PIL import Image

    if image.shape[0] == height and image.shape[1] == width:
        return image
    out = Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC,
                                        reducing_gap=reducing_gap)
    return np.asarray(out)


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so that ``min(H, W) == size``; the longer side becomes ``round(L * size / S)`` (aspect kept)."""
    size = _check_size(size)
    h, w = image.shape[:2]
    if h <= w:
        nh, nw = size, max(size, int(round(w * size / h)))
    else:
        nh, nw = max(size, int(round(h * size / w))), size
    return _pil_resize(image, nh, nw)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The ``size x size`` window at ``top = (H - size) // 2``, ``left = (W - size) // 2``."""
    size = _check_size(size)
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size x size`` window at a uniform random (top, left)."""
    size = _check_size(size)
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return image[top : top + size, left : left + size]


def random_resized_square_crop(
    image: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float]
) -> np.ndarray:
    """A random square of side ``s * min(H, W)``, ``s ~ U[scale]``, at a random place, resized to
    ``size`` (PIL ``reducing_gap=3``: see ``_pil_resize``)."""
    size = _check_size(size)
    h, w = image.shape[:2]
    short = min(h, w)
    side = int(round(rng.uniform(scale[0], scale[1]) * short))
    side = min(max(side, 1), short)
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    return _pil_resize(image[top : top + side, left : left + side], size, size, reducing_gap=3.0)


def horizontal_flip(image: np.ndarray) -> np.ndarray:
    """Mirror left-right: ``out[:, j] = image[:, W - 1 - j]``."""
    return image[:, ::-1]


# RGB -> YIQ (NTSC): Y the luminance, (I, Q) the chroma plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.595716, -0.274453, -0.321263],
                        [0.211456, -0.522591, 0.311135]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def rotate_hue(image: np.ndarray, angle: float, saturation: float = 1.0) -> np.ndarray:
    """uint8 ``[H, W, 3]`` with its chroma rotated by ``angle`` radians and scaled by
    ``saturation`` in the YIQ plane, luminance kept: ``rgb' = M^-1 diag(1, sR) M rgb`` (clipped
    to [0, 255]). ``angle = 0, saturation = 1`` is the identity up to rounding."""
    c, s = np.cos(angle) * saturation, np.sin(angle) * saturation
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], np.float32)
    m = _YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ
    out = image.astype(np.float32) @ m.T
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def to_float(image: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """uint8 -> float32 ``lo + (x / 255) * (hi - lo)``: [0, 1] by default, (-1, 1) gives ``2x/255 - 1``."""
    lo, hi = float(value_range[0]), float(value_range[1])
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    if (lo, hi) != (0.0, 1.0):
        x = x * np.float32(hi - lo) + np.float32(lo)
    return np.ascontiguousarray(x)


def record_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of one stream element: a function of (seed, index) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]))


def _check_range(value_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    return lo, hi


def _check_scale(crop_scale) -> tuple[float, float]:
    lo, hi = (float(v) for v in crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
    return lo, hi


class TrainTransform:
    """``(stream_index, record) -> {"image": float32 [S, S, 3], "label": int32, "index": int64}``.

    Crop: with ``crop_scale == (1, 1)`` resize the shorter side to ``S`` then take a random
    ``S x S`` crop; otherwise a random square of ``s * min(H, W)`` (``s ~ U[crop_scale]``) resized
    to ``S``. Then a horizontal flip with probability 1/2 (``flip=True``); with probability
    ``hue`` a hue rotation by a uniform angle and a saturation factor ``~ U[0.5, 1.5]``
    (``rotate_hue``: luminance kept, so a few photographs cover every colour); then ``to_float``.
    """

    def __init__(
        self,
        image_size: int,
        seed: int,
        crop_scale: tuple[float, float] = (1.0, 1.0),
        flip: bool = True,
        value_range: tuple[float, float] = (0.0, 1.0),
        hue: float = 0.0,
    ):
        if not 0.0 <= float(hue) <= 1.0:
            raise ValueError(f"hue (a probability) must be in [0, 1], got {hue!r}")
        self.hue = float(hue)
        self.image_size = _check_size(image_size)
        self.seed = int(seed)
        self.crop_scale = _check_scale(crop_scale)
        self.flip = bool(flip)
        self.value_range = _check_range(value_range)

    def __call__(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        rng = record_rng(self.seed, index)
        image = record["image"]
        if self.crop_scale == (1.0, 1.0):
            image = random_crop(resize_shorter_side(image, self.image_size), self.image_size, rng)
        else:
            image = random_resized_square_crop(image, self.image_size, rng, self.crop_scale)
        return flip_hue_example(image, record, rng, flip=self.flip, hue=self.hue,
                                value_range=self.value_range)


def flip_hue_example(x: np.ndarray, record: dict[str, Any], rng: np.random.Generator, *,
                     flip: bool, hue: float,
                     value_range: tuple[float, float]) -> dict[str, Any]:
    """The augmentation tail of ``TrainTransform`` (an image ``[H, W, 3]``) and of the clip
    transform (``[T, H, W, 3]``: the same draw for every frame): when ``flip``, mirrored left-right
    with probability 1/2; with probability ``hue``, ``rotate_hue`` by an angle ``~ U[0, 2 pi)`` and a
    saturation ``~ U[0.5, 1.5]``; then ``to_float``, with the record's ``label`` and ``index``
    (-1 when it has none). Draws from ``rng`` in that order."""
    if flip and rng.random() < 0.5:
        x = x[..., ::-1, :]  # horizontal_flip, on every frame
    if hue and rng.random() < hue:
        x = rotate_hue(x, rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.5, 1.5))
    return {
        "image": to_float(x, value_range),
        "label": np.int32(record.get("label", -1)),
        "index": np.int64(record.get("index", -1)),
    }


class EvalTransform:
    """Deterministic: resize the shorter side to ``S``, centre crop, ``to_float``.

    Called with ``(position, record_or_None)`` by the eval pipeline: ``None`` is padding (zeros,
    ``mask=False``); a record whose ``"index"`` differs from ``position`` is a stand-in for a corrupt
    file (``mask=False`` too, so no image is counted twice).
    """

    def __init__(self, image_size: int, value_range: tuple[float, float] = (0.0, 1.0)):
        self.image_size = _check_size(image_size)
        self.value_range = _check_range(value_range)

    def __call__(self, position: int, record: dict[str, Any] | None) -> dict[str, Any]:
        s = self.image_size
        if record is None:
            return {
                "image": np.zeros((s, s, 3), np.float32),
                "label": np.int32(-1),
                "index": np.int64(-1),
                "mask": np.bool_(False),
            }
        image = center_crop(resize_shorter_side(record["image"], s), s)
        index = int(record.get("index", position))
        return {
            "image": to_float(image, self.value_range),
            "label": np.int32(record.get("label", -1)),
            "index": np.int64(index),
            "mask": np.bool_(index == position),
        }


def load_image(path: str, image_size: int) -> np.ndarray:
    """Decode an image file -> uint8 ``[S, S, 3]``: resize the shorter side to ``S`` (bicubic),
    centre crop (the eval transform). A file that cannot be decoded raises ValueError naming it."""
    from titok_jax.data.sources import decode_image_file
    try:
        image = decode_image_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        lines = str(e).strip().splitlines()
        raise ValueError(f"cannot read image {path}: {lines[0] if lines else type(e).__name__}") from None
    if image.ndim != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"cannot read image {path}: empty image of shape {image.shape}")
    return np.ascontiguousarray(center_crop(resize_shorter_side(image, image_size), image_size))
