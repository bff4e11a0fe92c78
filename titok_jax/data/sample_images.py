"""The built-in ``sample`` image set: colour photographs that ship inside scikit-image.

Every image here is a file in ``skimage.data.data_dir`` (installed with the wheel, no network), read
with PIL as uint8 RGB. Nine colour photographs of very different content; a fixed split holds three
out for evaluation. The two motorcycle views show the same scene, so both stay on the training side.

| name | size (H x W) | split |
|---|---|---|
| astronaut            | 512 x 512   | train |
| hubble_deep_field    | 872 x 1000  | train |
| immunohistochemistry | 512 x 512   | train |
| motorcycle_left      | 500 x 741   | train |
| motorcycle_right     | 500 x 741   | train |
| retina               | 1411 x 1411 | train |
| chelsea              | 300 x 451   | eval  |
| coffee               | 400 x 600   | eval  |
| rocket               | 427 x 640   | eval  |

Grayscale images in skimage (camera, coins, moon, ...) are left out: the set is for colour tokenizers.
"""
from __future__ import annotations

import functools
import os

import numpy as np

# name -> file name inside skimage.data.data_dir
SAMPLE_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
}

TRAIN_IMAGES: tuple[str, ...] = (
    "astronaut",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
    "retina",
)
EVAL_IMAGES: tuple[str, ...] = ("chelsea", "coffee", "rocket")

# Split names accepted for each side of the fixed split.
TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("eval", "validation", "val", "test")


def sample_split_names(split: str) -> tuple[str, ...]:
    """The image names of a split of the sample set ("train", or "eval"/"validation"/"val"/"test")."""
    if split in TRAIN_SPLITS:
        return TRAIN_IMAGES
    if split in EVAL_SPLITS:
        return EVAL_IMAGES
    raise ValueError(
        f"unknown split {split!r} for the sample data set; use one of {TRAIN_SPLITS + EVAL_SPLITS}"
    )


@functools.lru_cache(maxsize=None)
def load_sample_image(name: str) -> np.ndarray:
    """One sample image as uint8 ``[H, W, 3]`` RGB, read from scikit-image's installed data (cached)."""
    if name not in SAMPLE_FILES:
        raise ValueError(f"unknown sample image {name!r}; known: {sorted(SAMPLE_FILES)}")
    from PIL import Image
    import skimage.data

    path = os.path.join(skimage.data.data_dir, SAMPLE_FILES[name])
    if os.path.isfile(path):
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    else:  # pragma: no cover - only when a scikit-image build moves files into the pooch cache
        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            image = left if name.endswith("left") else right
        else:
            image = getattr(skimage.data, name)()
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image.setflags(write=False)  # shared by the cache: nobody may modify it in place
    return image
