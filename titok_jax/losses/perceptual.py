"""Frozen perceptual distances: LPIPS (Zhang et al. 2018, "vgg" variant, v0.1 linear layers) and the
ConvNeXt-S logit MSE of TiTok's stage-2 / single-stage recipes (see :func:`convnext_loss` below).

For images ``x``, ``y`` (NHWC, 3 channels) the distance is::

    u      = 2 * (x - lo) / (hi - lo) - 1                 # input_range (lo, hi) -> [-1, 1]
    s      = (u - shift) / scale                           # shift = [-.030, -.088, -.188]
                                                           # scale = [ .458,  .448,  .450]
    f_k    = VGG16 tap k of s, k = 0..4                    # relu1_2 .. relu5_3
    n_k    = f_k / (||f_k||_2 over channels + 1e-10)       # unit-normalised per pixel
    d(x,y) = sum_k  mean_{h,w}  sum_c  w_{k,c} * (n_k(x) - n_k(y))**2

``w_k`` are the non-negative 1x1 "lin" weights (no bias). The result is one value per image,
``[B]``.

Input convention: TiTok feeds images in **[0, 1]**, so that is the default ``input_range=(0., 1.)``
(identical to the ``lpips`` package with ``normalize=True``); pass ``input_range=(-1., 1.)`` for
images already in [-1, 1]. Any ``(lo, hi)`` works (e.g. ``(0., 255.)``).

Compute dtype: ``dtype`` (e.g. the model's ``compute_dtype``, ``jnp.bfloat16`` or ``"bfloat16"``)
runs the frozen trunk - every VGG16 / ConvNeXt convolution, MLP and activation - in that dtype
(halving its activation memory); the input normalisation, the unit-normalised taps, their
differences, the ``lin`` weights and every mean are float32, so the distances (and the ConvNeXt
logits) are float32. ``None`` (default) is float32 throughout.

Weights are **frozen**: :func:`lpips_distance` wraps the params in ``stop_gradient``, so the loss
sends gradient to the images only. They are never downloaded: convert the torchvision VGG16 and the
LPIPS ``vgg.pth`` linear weights once with ``titok-jax convert-lpips`` and load the result
with :func:`load_lpips_params`.

File format read by :func:`load_lpips_params` (``.safetensors`` or ``.npz``): a flat mapping of
exactly these float32 arrays (``/``-joined Flax param paths, see :func:`lpips_param_shapes`)::

    vgg/conv{b}_{i}/kernel  [3, 3, C_in, C_out]      13 convs, VGG16 trunk (nets/vgg.py)
    vgg/conv{b}_{i}/bias    [C_out]
    lin{k}/kernel           [C_k, 1]                  k = 0..4, C_k = 64, 128, 256, 512, 512
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.nets.convnext import ConvNeXt, load_convnext_params  # noqa: F401 (re-exported)
from titok_jax.nets.files import load_frozen_params
from titok_jax.nets.vgg import VGG16_CONVS, VGG16_TAP_CHANNELS, VGG16Features
from titok_jax.nn.resize import resize_bilinear
from titok_jax.trees import check_tree_matches

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10
# Smallest image side for which relu5_3 (after 4 pools) is at least 1x1.
LPIPS_MIN_SIZE = 16


def _unit_normalize(f: jax.Array, eps: float = LPIPS_EPS) -> jax.Array:
    """``f / (||f||_2 + eps)`` over the channel axis, with a finite gradient where ``f == 0``.

    ``sqrt`` has an infinite derivative at 0 and ReLU features are often exactly zero at a pixel;
    the double ``where`` keeps the forward value identical (``0 / eps = 0``) and the gradient
    finite.
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + eps)


def _compute_dtype(dtype: Any) -> Any:
    """``dtype`` as a NumPy dtype (names such as ``"bfloat16"`` from a config too); None stays."""
    return None if dtype is None else jnp.dtype(dtype)


def _interleave(x: jax.Array, y: jax.Array) -> jax.Array:
    """``[B, ...] x [B, ...] -> [2B, ...]`` with rows ``x_0, y_0, x_1, y_1, ...``: one frozen-trunk
    pass for both that keeps each example's pair on the device holding its batch rows."""
    return jnp.stack([x, y], axis=1).reshape((2 * x.shape[0],) + x.shape[1:])


def _deinterleave(f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of :func:`_interleave`: ``[2B, ...] -> ([B, ...], [B, ...])``."""
    f = f.reshape((f.shape[0] // 2, 2) + f.shape[1:])
    return f[:, 0], f[:, 1]


class LPIPS(nn.Module):
    """LPIPS-VGG distance ``[B, H, W, 3] x [B, H, W, 3] -> [B]`` (see the module docstring).

    Params: ``vgg`` (:class:`~titok_jax.nets.vgg.VGG16Features`) and ``lin0..lin4`` (``Dense(1)``
    without bias, kernel ``[C_k, 1]``). ``dtype`` is the compute dtype of the trunk; the
    normalisation, differences and averages are float32 (the distance is float32).
    """

    input_range: tuple[float, float] = (0.0, 1.0)
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {x.shape} vs {y.shape}")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects [B, H, W, 3] images, got {x.shape}")
        if min(x.shape[1:3]) < LPIPS_MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}, "
                             f"got {x.shape[1]}x{x.shape[2]}")
        lo, hi = (float(v) for v in self.input_range)
        if not hi > lo:
            raise ValueError(f"input_range must be (lo, hi) with hi > lo, got {self.input_range}")
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)

        # One trunk pass over x and y interleaved per example (x_0, y_0, x_1, ...): a device's
        # rows of x and y become its rows of the pass, so a mesh-split batch moves no data (a
        # concatenation [x; y] along the split axis would cost a collective-permute).
        both = _interleave(x, y).astype(jnp.float32)
        both = (2.0 * (both - lo) / (hi - lo) - 1.0 - shift) / scale
        taps = VGG16Features(dtype=_compute_dtype(self.dtype), param_dtype=self.param_dtype,
                             precision=self.precision, name="vgg")(both)
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for k, f in enumerate(taps):
            fx, fy = _deinterleave(_unit_normalize(f.astype(jnp.float32)))
            diff = jnp.square(fx - fy)                                        # [B, h, w, C_k]
            lin = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                           precision=self.precision, name=f"lin{k}")(diff)    # [B, h, w, 1]
            total = total + jnp.mean(lin, axis=(1, 2, 3))
        return total


def lpips_param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat LPIPS param shapes ``{"vgg/conv1_1/kernel": (3, 3, 3, 64), ..., "lin4/kernel": (512, 1)}``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for name, _, c_in, c_out in VGG16_CONVS:
        shapes[f"vgg/{name}/kernel"] = (3, 3, c_in, c_out)
        shapes[f"vgg/{name}/bias"] = (c_out,)
    for k, c in enumerate(VGG16_TAP_CHANNELS):
        shapes[f"lin{k}/kernel"] = (c, 1)
    return shapes


def check_lpips_params(flat: Mapping[str, Any], source: str = "params") -> None:
    """Raise ``ValueError`` naming the first missing, unexpected or mis-shaped LPIPS param."""
    check_tree_matches(flat, _lpips_abstract(), source=source, what="LPIPS param")


def _lpips_abstract() -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in lpips_param_shapes().items()}


def load_lpips_params(path: str | os.PathLike) -> dict[str, Any]:
    """Read an LPIPS param file (``.safetensors`` or ``.npz``, format in the module docstring).

    Returns the nested Flax params tree (``LPIPS().apply({"params": tree}, x, y)``) of float32
    ``jax.Array``s. Raises ``FileNotFoundError`` / ``ValueError`` with the offending key.
    Never downloads anything; produce the file with ``titok-jax convert-lpips``.
    """
    return load_frozen_params(path, _lpips_abstract(), "LPIPS", "titok-jax convert-lpips",
                              param="LPIPS param")


def lpips_distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array, *,
                   input_range: tuple[float, float] = (0.0, 1.0), dtype: Any = None,
                   precision: Any = None) -> jax.Array:
    """Per-image LPIPS-VGG distance ``[B]`` between ``x`` and ``y`` (``[B, H, W, 3]``, H, W >= 16).

    ``params`` is the tree from :func:`load_lpips_params` (a ``{"params": tree}`` dict is accepted
    too). The params are frozen: ``stop_gradient`` is applied, so ``jax.grad`` w.r.t. them is zero.
    ``dtype``: the VGG16 trunk's compute dtype (module docstring); the result is float32.
    """
    if "params" in params and len(params) == 1:
        params = params["params"]
    params = jax.tree.map(jax.lax.stop_gradient, params)
    model = LPIPS(input_range=input_range, dtype=_compute_dtype(dtype), precision=precision)
    return model.apply({"params": params}, x, y)


def lpips_loss(params: Mapping[str, Any], x: jax.Array, y: jax.Array, **kwargs: Any) -> jax.Array:
    """Batch mean of :func:`lpips_distance` (a scalar)."""
    return jnp.mean(lpips_distance(params, x, y, **kwargs))


# ----------------------------------------------------------------------------- ConvNeXt-S term
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONVNEXT_INPUT_SIZE = 224


def _convnext_arch(params: Mapping[str, Any]) -> dict[str, Any]:
    """``depths``, ``dims``, ``num_classes`` read off a ConvNeXt params tree."""
    depths, dims = [], []
    while f"stage{len(depths)}_block0" in params:
        s = len(depths)
        depths.append(sum(1 for k in params if k.startswith(f"stage{s}_block")))
        dims.append(int(np.shape(params[f"stage{s}_block0"]["gamma"])[0]))
    if not depths or "head_fc" not in params:
        raise ValueError("not a ConvNeXt params tree (load it with load_convnext_params)")
    return {"depths": tuple(depths), "dims": tuple(dims),
            "num_classes": int(np.shape(params["head_fc"]["bias"])[0])}


def convnext_logits(params: Mapping[str, Any], x: jax.Array, *,
                    input_range: tuple[float, float] = (0.0, 1.0), dtype: Any = None,
                    precision: Any = None) -> jax.Array:
    """Frozen ConvNeXt logits ``[B, num_classes]`` of images ``x`` ``[B, H, W, 3]``::

        u = (x - lo) / (hi - lo)                                 # -> [0, 1]
        u = bilinear resize to 224 x 224, antialias, align_corners=False   (torch F.interpolate)
        logits = ConvNeXt((u - IMAGENET_MEAN) / IMAGENET_STD)

    The architecture (depths, dims, classes) is read from ``params``; ``stop_gradient`` is applied
    to them, so only the images receive gradient. ``dtype``: the trunk's compute dtype (the resize,
    normalisation, pooled features, head and logits stay float32).
    """
    if "params" in params and len(params) == 1:
        params = params["params"]
    arch = _convnext_arch(params)
    params = jax.tree.map(jax.lax.stop_gradient, params)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"convnext_logits expects [B, H, W, 3] images, got {x.shape}")
    lo, hi = (float(v) for v in input_range)
    u = (x.astype(jnp.float32) - lo) / (hi - lo)
    u = resize_bilinear(u, (CONVNEXT_INPUT_SIZE, CONVNEXT_INPUT_SIZE), antialias=True)
    u = (u - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    model = ConvNeXt(**arch, dtype=_compute_dtype(dtype), precision=precision)
    return model.apply({"params": params}, u).astype(jnp.float32)


def convnext_loss(params: Mapping[str, Any], x: jax.Array, y: jax.Array, **kwargs: Any) -> jax.Array:
    """TiTok's ConvNeXt-S perceptual term: ``mean((logits(x) - logits(y))**2)`` over the batch and
    the 1000 classes (torch ``mse_loss`` with ``reduction="mean"``); one trunk pass for both, with
    ``x`` and ``y`` interleaved per example (no data moves between the devices of a split batch)."""
    if x.shape != y.shape:
        raise ValueError(f"convnext_loss inputs differ in shape: {x.shape} vs {y.shape}")
    lx, ly = _deinterleave(convnext_logits(params, _interleave(x, y), **kwargs))
    return jnp.mean(jnp.square(lx - ly))
