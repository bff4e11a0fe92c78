"""Random-access image sources: ``sample``, ``folder:PATH`` and ``tfds:NAME[:split]``.

A source has ``__len__`` and ``__getitem__(i)``; a record is a dict
``{"image": uint8 [H, W, 3] RGB, "label": int32 (-1 when unknown), "index": int64, "file": str}``
where ``index`` is the source index the image was actually read from (see ``FolderSource`` for why
it can differ from ``i``). Sources are picklable (grain spawns its workers) and import no JAX.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, Sequence

import numpy as np

from titok_jax.data import sample_images
from titok_jax.data.folders import SkipLog, first_line, folder_labels, walk_folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Sub-folders of a `folder:` root that name splits, by logical split.
_FOLDER_SPLIT_DIRS = {
    "train": ("train",),
    "eval": ("eval", "validation", "val", "test"),
    "validation": ("validation", "val", "eval"),
    "val": ("val", "validation", "eval"),
    "test": ("test",),
}
_ALL_SPLIT_DIRS = ("train", "eval", "validation", "val", "test")


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Any decoded image array -> uint8 ``[H, W, 3]``.

    Grayscale ``[H, W]`` / ``[H, W, 1]`` is repeated over channels; ``[H, W, 4]`` is composited over
    white with its alpha; bool -> {0, 255}; uint16 -> top 8 bits; floats are taken to be in [0, 1].
    """
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an image [H, W] or [H, W, C] with C in 1..4, got shape {x.shape}")
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    elif x.dtype == np.uint16:
        x = (x >> 8).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.floating):
        x = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif x.dtype != np.uint8:
        x = np.clip(x, 0, 255).astype(np.uint8)
    c = x.shape[-1]
    if c in (2, 4):  # gray+alpha / RGBA: composite over a white background
        alpha = x[..., -1:].astype(np.float32) / 255.0
        color = x[..., :-1].astype(np.float32)
        x = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        c -= 1
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.ascontiguousarray(x)


def decode_image_file(path: str) -> np.ndarray:
    """Decode an image file with PIL (EXIF orientation applied) -> uint8 ``[H, W, 3]`` RGB.

    Raises whatever PIL raises on a corrupt or truncated file (OSError, SyntaxError, ValueError ...),
    and ValueError for a path that is not a regular file (a FIFO would block the read forever).
    """
    from PIL import Image, ImageOps

    from titok_jax.data.paths import file_kind, is_regular_file
    if not is_regular_file(path):
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{path} does not exist")
        raise ValueError(f"{path} is a {file_kind(path)}, not a regular image file")

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            return to_rgb_uint8(np.asarray(im))
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im).astype(np.int64)
            arr = np.clip(arr >> 8 if arr.max() > 255 else arr, 0, 255).astype(np.uint8)
            return to_rgb_uint8(arr)
        return np.ascontiguousarray(np.asarray(im.convert("RGB")), dtype=np.uint8)


def _record(image: np.ndarray, label: int, index: int, file: str) -> dict[str, Any]:
    return {
        "image": image,
        "label": np.int32(label),
        "index": np.int64(index),
        "file": file,
    }


class SampleSource:
    """The built-in scikit-image photographs (see ``sample_images``), as a data source.

    ``split="train"`` has a virtual length of ``len(TRAIN_IMAGES) * repeats`` (record ``i`` is image
    ``i % n``), so an "epoch" holds many random crops of each photograph; eval splits default to
    ``repeats=1``: every held-out image once. Training crops default to random squares of
    35-100% of the shorter side (``default_crop_scale``), so the few photographs give varied crops.
    Each photograph is its own class: the label is its position in the split's name list
    (``num_classes`` = that list's length), which gives class-conditional generators a toy task.
    """

    default_crop_scale = (0.35, 1.0)

    def __init__(self, split: str = "train", repeats: int | None = None):
        self.split = split
        self.names = sample_images.sample_split_names(split)
        if repeats is None:
            repeats = 128 if split in sample_images.TRAIN_SPLITS else 1
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats = int(repeats)
        self.num_classes = len(self.names)

    def __len__(self) -> int:
        return len(self.names) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        label = index % len(self.names)
        name = self.names[label]
        return _record(sample_images.load_sample_image(name), label, index, f"sample:{name}")

    def __repr__(self) -> str:
        return f"SampleSource(split={self.split!r}, images={len(self.names)}, repeats={self.repeats})"


def _resolve_folder_root(path: str, split: str | None) -> str:
    """``path`` itself, or its split sub-folder when the root is laid out as train/ val/ ..."""
    if split is None:
        return path
    present = [d for d in _ALL_SPLIT_DIRS if os.path.isdir(os.path.join(path, d))]
    if not present:
        return path  # no split layout: every split reads the whole folder
    for d in _FOLDER_SPLIT_DIRS.get(split, (split,)):
        if os.path.isdir(os.path.join(path, d)):
            return os.path.join(path, d)
    raise ValueError(f"folder {path} has split sub-folders {present} but none for split {split!r}")


def list_image_files(root: str, skipped: dict[str, str] | None = None) -> list[str]:
    """Image files under ``root`` (recursive, following directory links once each; .jpg/.jpeg/.png
    /.webp in any case; hidden files and folders skipped), as sorted paths relative to ``root``.

    Entries with an image name that are not regular files (a FIFO, socket or device would block
    or fail the decoder; a broken link) are left out: into ``skipped`` (relative path -> reason)
    when given, else each with a ``CorruptImageWarning``. Only links cost a ``stat`` (the others
    are typed by ``scandir``), so indexing a million files stays cheap."""
    from titok_jax.data.paths import file_kind

    files: list[str] = []
    for _, entries, descend in walk_folders(root):
        for e in entries:
            try:
                is_dir = e.is_dir()
                is_file = not is_dir and e.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                descend.append(e.path)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                rel = os.path.relpath(e.path, root)
                if is_file:
                    files.append(rel)
                else:
                    reason = f"a {file_kind(e.path)}, not a regular image file"
                    if skipped is not None:
                        skipped[rel] = reason
                    else:
                        warnings.warn(f"skipping {e.path}: {reason}", CorruptImageWarning, stacklevel=2)
    return sorted(files, key=lambda p: p.replace(os.sep, "/"))


class FolderSource(SkipLog):
    """Every image file under a folder (recursive, sorted), decoded to uint8 RGB.

    Labels: when images sit in first-level sub-folders (``root/<class>/...``, the ImageNet layout)
    the label is that sub-folder's index among the sorted class names; images directly in the root
    get -1. If the root has split sub-folders (``train/``, ``val/`` ...) ``split`` picks one;
    otherwise every split reads the whole folder.

    Corrupt files (an image extension that PIL cannot decode):
      * ``verify=True`` decodes every file once here, at index time: bad files are left out of the
        index, each with a ``CorruptImageWarning``;
      * at read time (always on): ``source[i]`` on a bad file warns once per file, counts it, and
        returns the next readable record ``i+1, i+2, ...`` (wrapping) instead - deterministic, so
        results do not depend on worker count. The returned ``"index"`` is the substitute's, which
        lets evaluation mask the duplicate out (``record["index"] != i``).
    ``num_skipped`` / ``skipped_files`` count both (per process: grain workers keep their own count).
    """

    skip_warning = CorruptImageWarning
    skip_noun = "unreadable image"

    def __init__(self, path: str, split: str | None = None, verify: bool = False):
        path = os.path.expanduser(str(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"image folder not found: {path}")
        if not os.path.isdir(path):
            raise ValueError(f"not a folder: {path}")
        self.path = path
        self.split = split
        self.root = _resolve_folder_root(path, split)
        self._init_skips()
        special: dict[str, str] = {}
        files = list_image_files(self.root, special)
        for f, reason in special.items():  # FIFOs, sockets, broken links: skipped, counted, warned
            self._note_bad(f, OSError(reason))
        if not files:
            raise ValueError(
                f"no images (.jpg/.jpeg/.png/.webp) found in folder {self.root}"
            )
        if verify:
            good = []
            for f in files:
                try:
                    decode_image_file(os.path.join(self.root, f))
                    good.append(f)
                except Exception as e:  # noqa: BLE001 - any decode failure means "corrupt"
                    self._note_bad(f, e)
            if not good:
                raise ValueError(f"no readable images in folder {self.root} ({len(files)} corrupt)")
            files = good
        self.files = files
        self.class_names, self.labels = folder_labels(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        read = self._read_usable(index, lambda f, j: decode_image_file(os.path.join(self.root, f)))
        if read is None:
            raise ValueError(f"no readable images in folder {self.root}: all {len(self.files)} "
                             f"files are corrupt")
        j, image = read
        return _record(image, int(self.labels[j]), j, self.files[j])

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, files={len(self.files)}, classes={len(self.class_names)})"


class TfdsSource:
    """``tfds.data_source(name, split=..., data_dir=...)`` (ArrayRecord; no TensorFlow at run time).

    The data dir is ``data_dir`` or ``$TFDS_DATA_DIR`` (or TFDS's default). Records are normalised
    to the common record dict; ``image_key``/``label_key`` name the TFDS features.
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        import tensorflow_datasets as tfds

        self.name = name
        self.data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
        self.image_key = image_key
        self.label_key = label_key
        try:
            self._source = tfds.data_source(name, split=split, data_dir=self.data_dir)
        except Exception as e:  # noqa: BLE001 - turn TFDS's many errors into one clear line
            where = self.data_dir or "TFDS's default data dir"
            raise ValueError(
                f"cannot open TFDS data set {name!r} split {split!r} in {where} as ArrayRecord "
                f"(prepare it with file_format='array_record'): {type(e).__name__}: {first_line(e)}"
            ) from e
        self.split = split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        rec = self._source[index]
        if self.image_key not in rec:  # another data set's layout: the user's to fix, not a bug
            raise ValueError(f"TFDS record {index} of {self.name!r} (split {self.split!r}) has no "
                             f"{self.image_key!r} feature (its features: {sorted(rec)})")
        label = rec.get(self.label_key, -1)
        label = int(np.asarray(label)) if np.ndim(label) == 0 else -1
        file = rec.get("file_name", None)
        if isinstance(file, bytes):
            file = file.decode("utf-8", "replace")
        if not isinstance(file, str):
            file = f"tfds:{self.name}/{self.split}/{index}"
        return _record(to_rgb_uint8(rec[self.image_key]), label, index, file)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, records={len(self)})"


_TFDS_VERSION = re.compile(r"^\d+\.(\d+|\*)\.(\d+|\*)$")
_TFDS_SPLITS = {"eval": ("validation", "test"), "val": ("validation",)}


def parse_source_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``"sample"`` / ``"folder:PATH"`` / ``"tfds:NAME[:VERSION][:SPLIT]"`` -> (kind, arg, split).

    A TFDS split may itself hold colons (``train[:10%]``); a ``x.y.z`` part right after the name is
    taken as its version.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data source must be 'sample', 'folder:PATH' or 'tfds:NAME[:split]', got {spec!r}")
    if spec == "sample":
        return "sample", None, None
    kind, sep, rest = spec.partition(":")
    if kind == "folder" and sep and rest:
        return "folder", rest, None
    if kind == "tfds" and sep and rest:
        parts = rest.split(":")
        name, parts = parts[0], parts[1:]
        if parts and _TFDS_VERSION.match(parts[0]):
            name, parts = f"{name}:{parts[0]}", parts[1:]
        if not name:
            raise ValueError(f"empty TFDS name in data source {spec!r}")
        split = ":".join(parts) or None
        return "tfds", name, split
    raise ValueError(
        f"unknown data source {spec!r}: use 'sample', 'folder:PATH' or 'tfds:NAME[:split]'"
    )


def make_source(
    spec: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    sample_repeats: int | None = None,
    verify: bool = False,
):
    """Build the source a spec names, for a logical split ("train", or "eval"/"validation"/"test").

    ``sample``: the fixed train/eval split of ``sample_images``. ``folder:PATH``: ``PATH/<split>``
    when the folder has split sub-folders, else the whole folder. ``tfds:NAME``: "train" -> "train",
    "eval" -> "validation" (falling back to "test"); a split written in the spec wins for every role.
    A source object (anything with ``__len__`` and ``__getitem__``) is returned unchanged.
    """
    if not isinstance(spec, str):
        if hasattr(spec, "__len__") and hasattr(spec, "__getitem__"):
            return spec
        raise ValueError(
            f"data source must be a spec string or a random-access source, got {type(spec).__name__}"
        )
    kind, arg, spec_split = parse_source_spec(spec)
    if kind == "sample":
        return SampleSource(split, repeats=sample_repeats)
    if kind == "folder":
        return FolderSource(arg, split=split, verify=verify)
    if spec_split is not None:
        return TfdsSource(arg, spec_split, data_dir=data_dir)
    candidates: Sequence[str] = _TFDS_SPLITS.get(split, (split,))
    error: Exception | None = None
    for s in candidates:
        try:
            return TfdsSource(arg, s, data_dir=data_dir)
        except ValueError as e:
            error = e
    assert error is not None
    raise error
