"""Inception-I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition?") as the FVD feature network.

Layout and names are those of the PyTorch ``InceptionI3d`` of piergiaj/pytorch-i3d, whose state dict
is the file most FVD code loads: ``i3d_pretrained_400.pt`` (Kinetics-400; VideoGPT's
``videogpt/fvd``, TATS, Open-MAGVIT2, Open-Sora-Plan's ``eval/fvd/videogpt``) and piergiaj's own
``rgb_imagenet.pt`` / ``rgb_charades.pt``. The two differ only in the BatchNorm epsilon of the code
that runs them: ``1e-5`` in VideoGPT's copy (``i3d_pretrained_400.pt``, the default here), ``1e-3``
in piergiaj's original (``bn_eps``).

Input: clips ``[B, T, 224, 224, 3]`` in ``[-1, 1]`` (channels last; ``T >= 9`` so that the last
temporal window exists). Every ``Unit3D`` is::

    y = relu(BN_eval(conv3d(pad_same(x))))      BN_eval(x) = (x - mean) * scale / sqrt(var + eps) + bias

with TensorFlow ``'SAME'`` zero padding per axis (size ``n``, kernel ``k``, stride ``s``):
``total = max((ceil(n / s) - 1) s + k - n, 0)``, ``front = total // 2``, ``back = total - front``.
Max pools pad the same way **with zeros** (the PyTorch port calls ``F.pad`` before ``MaxPool3d``;
inputs are post-ReLU, so this equals TF's -inf padding). Trunk (kernel ``t x h x w`` / stride)::

    Conv3d_1a_7x7  3->64   7x7x7 / 2,2,2        MaxPool3d_2a  1x3x3 / 1,2,2
    Conv3d_2b_1x1  64->64                        Conv3d_2c_3x3 64->192 3x3x3
    MaxPool3d_3a   1x3x3 / 1,2,2                 Mixed_3b, Mixed_3c
    MaxPool3d_4a   3x3x3 / 2,2,2                 Mixed_4b .. Mixed_4f
    MaxPool3d_5a   2x2x2 / 2,2,2                 Mixed_5b, Mixed_5c             -> [B, T', 7, 7, 1024]
    avg pool 2x7x7 / 1 (VALID) -> [B, T'-1, 1, 1, 1024];  logits = 1x1x1 conv with bias (dropout: eval)

An ``InceptionModule(c0, c1a, c1b, c2a, c2b, c3)`` concatenates on channels, in this order:
``b0 = Unit(c0, 1)``, ``b1b(b1a(x))`` (1x1 then 3x3x3), ``b2b(b2a(x))`` (1x1 then 3x3x3) and
``b3b(maxpool_3x3x3_s1(x))``. Outputs: ``logits`` ``[B, classes]`` = the per-window logits averaged
over time (what VideoGPT / TATS / Open-MAGVIT2 compute FVD on) and ``pool`` ``[B, 1024]`` = the pooled
features averaged over time.

Params keep the PyTorch module names (``Mixed_4b/b1b/conv3d/kernel`` ``[kt, kh, kw, in, out]``,
``.../bn/{scale, bias, mean, var}`` in the ``params`` collection, ``logits/conv3d/{kernel, bias}``);
:mod:`titok_jax.convert.i3d` fills them from the state dict. ``channel_div`` divides every width
(tests build a small network of the same layout with it).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nets.files import read_flat_params
from titok_jax.nn.resize import resize_bilinear
from titok_jax.trees import check_tree_matches, flatten, unflatten

I3D_SIZE = 224
I3D_MIN_FRAMES = 9
NUM_CLASSES = 400
POOL_FEATURES = 1024
BN_EPS = 1e-5   # VideoGPT's copy, which runs i3d_pretrained_400.pt; piergiaj's original uses 1e-3

# name -> (b0, b1a, b1b, b2a, b2b, b3b) output channels; ``None`` marks a max pool (kernel, stride)
_TRUNK: Sequence[tuple[str, Any]] = (
    ("MaxPool3d_3a", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF ``'SAME'`` ``(front, back)`` padding of one axis (formula in the module docstring)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: jax.Array, kernel: Sequence[int], stride: Sequence[int]) -> jax.Array:
    pads = [same_padding(n, k, s) for n, k, s in zip(x.shape[1:4], kernel, stride)]
    return jnp.pad(x, [(0, 0), *pads, (0, 0)])


def max_pool_same(x: jax.Array, kernel: Sequence[int], stride: Sequence[int]) -> jax.Array:
    """Max pool of ``[B, T, H, W, C]`` after zero ``'SAME'`` padding (the PyTorch port's pool)."""
    return nn.max_pool(_pad_same(x, kernel, stride), tuple(kernel), strides=tuple(stride))


class FrozenBatchNorm(nn.Module):
    """Eval-mode BatchNorm over the last axis with ``scale, bias, mean, var`` as (frozen) params."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class Unit3D(nn.Module):
    """``relu(BN(conv3d(pad_same(x))))`` (conv without bias); ``head=True``: conv with bias only."""

    features: int
    kernel: tuple[int, int, int] = (1, 1, 1)
    stride: tuple[int, int, int] = (1, 1, 1)
    head: bool = False
    bn_eps: float = BN_EPS
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding="VALID",
                    use_bias=self.head, precision=self.precision,
                    name="conv3d")(_pad_same(x, self.kernel, self.stride))
        if self.head:
            return x
        return nn.relu(FrozenBatchNorm(self.bn_eps, name="bn")(x))


class InceptionModule(nn.Module):
    """The four-branch block; ``channels`` = ``(b0, b1a, b1b, b2a, b2b, b3b)``."""

    channels: tuple[int, ...]
    bn_eps: float = BN_EPS
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c0, c1a, c1b, c2a, c2b, c3 = self.channels
        unit = functools.partial(Unit3D, bn_eps=self.bn_eps, precision=self.precision)
        b0 = unit(c0, name="b0")(x)
        b1 = unit(c1b, (3, 3, 3), name="b1b")(unit(c1a, name="b1a")(x))
        b2 = unit(c2b, (3, 3, 3), name="b2b")(unit(c2a, name="b2a")(x))
        b3 = unit(c3, name="b3b")(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3D(nn.Module):
    """``[B, T, 224, 224, 3]`` in [-1, 1] -> ``{"logits": [B, classes], "pool": [B, 1024 / div]}``
    (module docstring). Computation in float32; ``precision`` goes to every conv."""

    num_classes: int = NUM_CLASSES
    channel_div: int = 1
    bn_eps: float = BN_EPS
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"InceptionI3D expects clips [B, T, H, W, 3], got shape {x.shape}")
        if x.shape[1] < I3D_MIN_FRAMES or x.shape[2:4] != (I3D_SIZE, I3D_SIZE):
            raise ValueError(f"InceptionI3D needs clips of at least {I3D_MIN_FRAMES} frames of "
                             f"{I3D_SIZE}x{I3D_SIZE}, got {x.shape[1]} frames of {x.shape[2:4]}")
        w = lambda c: max(1, c // self.channel_div)  # noqa: E731
        unit = functools.partial(Unit3D, bn_eps=self.bn_eps, precision=self.precision)
        x = x.astype(jnp.float32)
        x = unit(w(64), (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = unit(w(64), name="Conv3d_2b_1x1")(x)
        x = unit(w(192), (3, 3, 3), name="Conv3d_2c_3x3")(x)
        for name, spec in _TRUNK:
            if name.startswith("MaxPool"):
                x = max_pool_same(x, *spec)
            else:
                x = InceptionModule(tuple(w(c) for c in spec), self.bn_eps, self.precision,
                                    name=name)(x)
        x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1))        # [B, T' - 1, 1, 1, C]
        pool = x[:, :, 0, 0]
        logits = Unit3D(self.num_classes, head=True, precision=self.precision, name="logits")(x)
        return {"logits": jnp.mean(logits[:, :, 0, 0], axis=1), "pool": jnp.mean(pool, axis=1)}


@functools.lru_cache(maxsize=4)
def i3d_abstract_params(num_classes: int = NUM_CLASSES, channel_div: int = 1) -> Any:
    """Shapes of every :class:`InceptionI3D` param (a tree of ``ShapeDtypeStruct``), no compute."""
    model = InceptionI3D(num_classes, channel_div)
    x = jax.ShapeDtypeStruct((1, I3D_MIN_FRAMES, I3D_SIZE, I3D_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


_WHAT, _HINT = ("Inception-I3D (FVD)",
                "titok-jax convert-i3d --input i3d_pretrained_400.pt --output i3d_fvd.safetensors")


def i3d_variant(shapes: Any) -> tuple[int, int]:
    """``(num_classes, channel_div)`` of an I3D param tree or flat ``{key: array}`` mapping, read
    from the stem (``64 / div`` filters) and the head (``classes`` outputs)."""
    flat = shapes if "logits/conv3d/kernel" in shapes else flatten(shapes)
    try:
        stem, head = flat["Conv3d_1a_7x7/conv3d/kernel"].shape, flat["logits/conv3d/kernel"].shape
    except KeyError as e:
        raise ValueError(f"not Inception-I3D params: no {e.args[0]!r}") from None
    return int(head[-1]), max(1, 64 // int(stem[-1]))


def load_i3d_params(path: str) -> dict:
    """The params tree of :class:`InceptionI3D` from a file written by ``titok-jax convert-i3d``
    (format: :mod:`titok_jax.nets.files`); the class count (and width) are read from the file
    (:func:`i3d_variant`), every other shape is checked."""
    flat = read_flat_params(path, _WHAT, _HINT)
    try:
        variant = i3d_variant(flat)
    except ValueError as e:
        raise ValueError(f"{path}: {e} (create it with `{_HINT}`)") from None
    check_tree_matches(flat, i3d_abstract_params(*variant), source=str(path), what="param")
    return unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def i3d_feature_fn(quantize: bool = True, precision: str = "highest", bn_eps: float = BN_EPS,
                   num_classes: int = NUM_CLASSES, channel_div: int = 1):
    """A jitted ``(params, clips [B, T, H, W, 3] in [0, 1]) -> {"logits", "pool"}``: FVD's
    preprocessing, then :class:`InceptionI3D`.

    Preprocessing (VideoGPT / TATS / Open-MAGVIT2): clip to [0, 1]; with ``quantize`` round to the
    uint8 grid (``round(255 x) / 255``, clips as saved videos); bilinear resize of every frame to
    224 x 224 (``F.interpolate(align_corners=False)``, no antialias; :mod:`titok_jax.nn.resize`);
    ``2 x - 1``. Built once per argument tuple, so repeated evaluations reuse the compilation.
    """
    return _feature_fn(bool(quantize), str(precision), float(bn_eps), int(num_classes),
                       int(channel_div))


@functools.lru_cache(maxsize=8)
def _feature_fn(quantize: bool, precision: str, bn_eps: float, num_classes: int, channel_div: int):
    model = InceptionI3D(num_classes, channel_div, bn_eps, precision)

    def fn(params: Any, clips: jax.Array) -> dict[str, jax.Array]:
        if clips.ndim != 5:
            raise ValueError(f"FVD features need clips [B, T, H, W, 3], got shape {clips.shape}")
        x = jnp.clip(clips.astype(jnp.float32), 0.0, 1.0)
        if quantize:
            x = jnp.round(x * 255.0) / 255.0
        b, t = x.shape[:2]
        x = resize_bilinear(x.reshape((b * t, *x.shape[2:])), (I3D_SIZE, I3D_SIZE))
        return model.apply({"params": params}, 2.0 * x.reshape((b, t, *x.shape[1:])) - 1.0)

    return jax.jit(fn)
