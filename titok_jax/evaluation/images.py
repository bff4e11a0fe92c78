"""Image grids for looking at reconstructions: uint8 conversion, originals-next-to-reconstructions
grids, PNG files (pillow) and TensorBoard images (tensorboardX). Host-side numpy; accepts jax
arrays.

Grid layout (``make_grid``): image ``i`` of a batch of ``N`` sits in grid column ``i % ncol``; its
pair row is ``i // ncol``. Each pair row is two image rows: the originals on top and, directly
below each original, its reconstruction - so each pair reads as one column. Every cell is
``H x W`` and ``padding`` pixels of ``pad_value`` separate the cells and frame the grid (as
torchvision's ``make_grid``)::

    top-left of the original of image i       = (p + 2r (H + p),     p + c (W + p))
    top-left of the reconstruction of image i = (p + (2r + 1)(H + p), p + c (W + p))
    r = i // ncol, c = i % ncol, p = padding
    grid shape = (p + 2 ceil(N / ncol) (H + p),  p + min(ncol, N) (W + p),  C)

Cells past the last image (when ``ncol`` does not divide ``N``) are left at ``pad_value``.
"""
from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["to_uint8", "make_grid", "tile_grid", "caption_grid", "save_png", "load_png", "log_image",
           "log_reconstructions", "save_reconstruction_grid"]


def to_uint8(x: Any) -> np.ndarray:
    """Float images in ``[0, 1]`` -> uint8 in ``[0, 255]``: clip, then ``floor(255 x + 0.5)``
    (round half up, as torchvision's ``save_image``); NaN -> 0. uint8 input is returned as is."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_grid(originals: Any, reconstructions: Any, ncol: int = 8, padding: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """uint8 ``[H_grid, W_grid, C]`` grid with each reconstruction directly below its original
    (layout in the module docstring). Inputs: ``[N, H, W, C]`` float in ``[0, 1]`` or uint8."""
    a = to_uint8(originals)
    b = to_uint8(reconstructions)
    if a.shape != b.shape:
        raise ValueError(f"originals {a.shape} and reconstructions {b.shape} differ in shape")
    if a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"expected non-empty images [N, H, W, C], got shape {a.shape}")
    if ncol < 1 or padding < 0:
        raise ValueError(f"need ncol >= 1 and padding >= 0, got ncol={ncol}, padding={padding}")
    n, h, w, c = a.shape
    ncol = min(ncol, n)
    pair_rows = math.ceil(n / ncol)
    p = padding
    grid = np.full((p + 2 * pair_rows * (h + p), p + ncol * (w + p), c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top = p + 2 * r * (h + p)
        left = p + col * (w + p)
        grid[top:top + h, left:left + w] = a[i]
        top += h + p
        grid[top:top + h, left:left + w] = b[i]
    return grid


def tile_grid(images: Any, ncol: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 grid of ``[N, H, W, C]`` images (float in [0, 1] or uint8), row-major, ``ncol`` wide."""
    a = to_uint8(images)
    if a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"expected non-empty images [N, H, W, C], got shape {a.shape}")
    n, h, w, c = a.shape
    ncol, p = max(1, min(ncol, n)), padding
    rows = math.ceil(n / ncol)
    grid = np.full((p + rows * (h + p), p + ncol * (w + p), c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[p + r * (h + p):p + r * (h + p) + h, p + col * (w + p):p + col * (w + p) + w] = a[i]
    return grid


def caption_grid(grid: Any, cell: tuple[int, int], columns: Sequence[str] = (), rows: Sequence[str] = (),
                 padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """A ``tile_grid`` of ``cell = (H, W)`` images with its captions: ``columns[c]`` centred above
    grid column ``c`` in a band added on top, ``rows[r]`` left of grid row ``r`` in a band added on
    the left (black text, PIL's default font, about ``min(12, max(8, W // 4))`` pixels high; a
    caption wider than its cell is clipped at the band's edge). RGB uint8 ``[H_grid + top,
    W_grid + left, 3]``; no captions returns ``grid`` as uint8."""
    from PIL import Image, ImageDraw, ImageFont

    g = to_uint8(grid)
    if not columns and not rows:
        return g
    if g.ndim != 3 or g.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a grid [H, W, 1|3|4], got shape {g.shape}")
    h, w = (int(v) for v in cell)
    p = padding
    size = min(12, max(8, w // 4))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    width = lambda text: font.getbbox(text)[2] if text else 0  # noqa: E731
    top = size + 4 if columns else 0
    left = (max(width(t) for t in rows) + 2 * p + 2) if rows else 0
    canvas = Image.new("RGB", (g.shape[1] + left, g.shape[0] + top), (pad_value,) * 3)
    canvas.paste(Image.fromarray(np.ascontiguousarray(g[..., 0] if g.shape[-1] == 1 else g)).convert("RGB"),
                 (left, top))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(columns):
        x = left + p + c * (w + p) + (w - width(text)) / 2
        draw.text((max(left, x), 1), str(text), fill=(0, 0, 0), font=font)
    for r, text in enumerate(rows):
        y = top + p + r * (h + p) + (h - size) / 2
        draw.text((p, y), str(text), fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_png(path: str | os.PathLike, image: Any) -> None:
    """Write one ``[H, W, C]`` (C in 1, 3, 4) or ``[H, W]`` image as PNG (float in [0, 1] is
    converted with ``to_uint8``); creates the parent directory. The PNG is written under a
    temporary name in that directory and renamed over ``path`` when complete, so a failed write
    (a full disk) leaves no half file and an existing ``path`` as it was."""
    from PIL import Image

    arr = to_uint8(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an image [H, W], [H, W, 1|3|4], got shape {arr.shape}")
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_png(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into a uint8 ``[H, W, C]`` array (``[H, W]`` for grayscale)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im).copy()


def save_reconstruction_grid(path: str | os.PathLike, originals: Any, reconstructions: Any,
                             ncol: int = 8, padding: int = 2) -> np.ndarray:
    """``make_grid`` then ``save_png``; returns the grid."""
    grid = make_grid(originals, reconstructions, ncol=ncol, padding=padding)
    save_png(path, grid)
    return grid


def log_image(writer: Any, tag: str, image: Any, step: int) -> None:
    """``writer.add_image(tag, uint8 [H, W, C], step, dataformats="HWC")`` on a tensorboardX
    ``SummaryWriter`` (float input is converted with ``to_uint8``)."""
    arr = to_uint8(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    writer.add_image(tag, arr, global_step=int(step), dataformats="HWC")


def log_reconstructions(writer: Any, tag: str, originals: Any, reconstructions: Any, step: int,
                        ncol: int = 8, padding: int = 2) -> np.ndarray:
    """Log the ``make_grid`` of originals and reconstructions as one TensorBoard image; returns it."""
    grid = make_grid(originals, reconstructions, ncol=ncol, padding=padding)
    log_image(writer, tag, grid, step)
    return grid
