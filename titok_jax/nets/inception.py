"""InceptionV3 as the FID feature extractor of pytorch-fid (the TF "2015-12-05" graph ported to PyTorch).

Input: NHWC images ``[B, H, W, 3]`` in ``[0, 1]``. Preprocessing (pytorch-fid's defaults)::

    x = bilinear resize to 299 x 299 (align_corners=False, no antialias)   # titok_jax.nn.resize
    x = 2 * x - 1                                                          # [0, 1] -> [-1, 1]

Every ``BasicConv`` is ``conv (no bias) -> BatchNorm (eval: running stats, eps 1e-3) -> ReLU``::

    y = relu((conv(x) - mean) * scale / sqrt(var + 1e-3) + bias)

Trunk (pools are VALID unless noted; spatial sizes for a 299 input)::

    Conv2d_1a_3x3 3->32 s2 (149) | Conv2d_2a_3x3 32->32 (147) | Conv2d_2b_3x3 32->64 pad 1 | maxpool 3 s2 (73)
    Conv2d_3b_1x1 64->80 | Conv2d_4a_3x3 80->192 (71) | maxpool 3 s2 (35)
    Mixed_5b/5c/5d  A(192, 32) A(256, 64) A(288, 64)                -> 288 x 35 x 35
    Mixed_6a        B(288)                                          -> 768 x 17 x 17
    Mixed_6b..6e    C(768, c7 = 128, 160, 160, 192)                 -> 768 x 17 x 17
    Mixed_7a        D(768)                                          -> 1280 x 8 x 8
    Mixed_7b, 7c    E(1280, pool = avg), E(2048, pool = max)        -> 2048 x 8 x 8
    pool3 = global mean -> [B, 2048];  fc: Linear(2048, 1008) -> logits

The FID variants differ from torchvision's Inception3: the 3x3 stride-1 average pools inside A, C and
the first E block exclude the zero padding from the mean (``count_include_pad=False``, as TF does), and
the second E block uses a 3x3 stride-1 **max** pool (padding 1). Branch outputs are concatenated on the
channel axis in the order ``1x1, 5x5 / 7x7 / 3x3, double branch, pool``.

Params: every sub-module keeps its PyTorch name (``Mixed_6b/branch7x7_2/conv/kernel``), BatchNorm
tensors live in the ``params`` collection as ``bn/{scale, bias, mean, var}`` (the net is frozen), the
head is ``fc/{kernel [2048, 1008], bias}``. :func:`titok_jax.convert.inception` fills them from
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nets.files import load_frozen_params
from titok_jax.nn.resize import resize_bilinear

INCEPTION_SIZE = 299
BN_EPS = 1e-3
POOL_FEATURES = 2048
NUM_LOGITS = 1008


class BasicConv(nn.Module):
    """``relu(BN_eval(conv(x)))``: conv without bias, BatchNorm with frozen running stats."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                    name="conv")(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


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


def _avg_pool3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 mean over the valid (unpadded) neighbours (TF's SAME average pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda f, k=(1, 1), p=(0, 0), name=None: BasicConv(f, k, 1, p, self.precision, name=name)
        b1 = c(64, name="branch1x1")(x)
        b5 = c(48, name="branch5x5_1")(x)
        b5 = c(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
        b3 = c(64, name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, name="branch_pool")(_avg_pool3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(384, (3, 3), 2, precision=self.precision, name="branch3x3")(x)
        bd = BasicConv(64, precision=self.precision, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), 1, (1, 1), self.precision, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), 2, precision=self.precision, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))   # (kernel, padding) of the 1x7 and 7x1 convs
        c = lambda f, kp=((1, 1), (0, 0)), name=None: BasicConv(f, kp[0], 1, kp[1], self.precision,
                                                                name=name)
        b1 = c(192, name="branch1x1")(x)
        b7 = c(c7, name="branch7x7_1")(x)
        b7 = c(c7, row, name="branch7x7_2")(b7)
        b7 = c(192, col, name="branch7x7_3")(b7)
        bd = c(c7, name="branch7x7dbl_1")(x)
        bd = c(c7, col, name="branch7x7dbl_2")(bd)
        bd = c(c7, row, name="branch7x7dbl_3")(bd)
        bd = c(c7, col, name="branch7x7dbl_4")(bd)
        bd = c(192, row, name="branch7x7dbl_5")(bd)
        bp = c(192, name="branch_pool")(_avg_pool3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        b3 = BasicConv(192, precision=p, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), 2, precision=p, name="branch3x3_2")(b3)
        b7 = BasicConv(192, precision=p, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), 1, (0, 3), p, name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), 1, (3, 0), p, name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), 2, precision=p, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """``pool="avg"``: pytorch-fid's ``FIDInceptionE_1``; ``pool="max"``: ``FIDInceptionE_2``."""

    pool: str = "avg"
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.precision
        b1 = BasicConv(320, precision=p, name="branch1x1")(x)
        b3 = BasicConv(384, precision=p, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), 1, (0, 1), p, name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), 1, (1, 0), p, name="branch3x3_2b")(b3)], -1)
        bd = BasicConv(448, precision=p, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), 1, (1, 1), p, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), 1, (0, 1), p, name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), 1, (1, 0), p, name="branch3x3dbl_3b")(bd)], -1)
        pooled = _avg_pool3(x) if self.pool == "avg" else _max_pool(x, 1, 1)
        bp = BasicConv(192, precision=p, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """pytorch-fid's InceptionV3: ``[B, H, W, 3]`` in [0, 1] -> dict with ``pool`` ``[B, 2048]``
    (the FID features), ``logits`` ``[B, 1008]`` (``fc`` with bias) and ``logits_unbiased``
    (``pool @ fc.kernel``, the Inception-Score input of torch-fidelity / the TiTok evaluator).

    ``resize_input=False`` feeds the image at its own size (it must be at least 75 x 75).
    ``precision`` goes to every conv and to the head; the computation is float32.
    """

    resize_input: bool = True
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3FID expects [B, H, W, 3] images, got shape {x.shape}")
        x = x.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        elif min(x.shape[1:3]) < 75:
            raise ValueError(f"InceptionV3FID needs images of at least 75x75, got {x.shape[1:3]}")
        x = 2.0 * x - 1.0
        p = self.precision
        x = BasicConv(32, (3, 3), 2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), 1, (1, 1), p, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 2)
        x = BasicConv(80, precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool(x, 2)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, p, name=name)(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, p, name=name)(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE("avg", p, name="Mixed_7b")(x)
        x = InceptionE("max", p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        unbiased, logits = _Head(NUM_LOGITS, p, name="fc")(pool)
        return {"pool": pool, "logits": logits, "logits_unbiased": unbiased}


class _Head(nn.Module):
    """``Linear(2048, 1008)`` returning ``(x @ kernel, x @ kernel + bias)``."""

    features: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        unbiased = jnp.dot(x, kernel, precision=self.precision)
        return unbiased, unbiased + bias


@functools.lru_cache(maxsize=1)
def inception_abstract_params() -> Any:
    """Shapes of every InceptionV3FID param (a tree of ``ShapeDtypeStruct``), without computing."""
    model = InceptionV3FID(resize_input=False)
    x = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def load_inception_params(path: str) -> dict:
    """The params tree of :class:`InceptionV3FID` from a file written by
    ``titok-jax convert-inception`` (format: :mod:`titok_jax.nets.files`)."""
    return load_frozen_params(path, inception_abstract_params(), "InceptionV3 (FID)",
                              "titok-jax convert-inception --input pt_inception.pth "
                              "--output inception_fid.safetensors")


@functools.lru_cache(maxsize=4)
def inception_feature_fn(quantize: bool = True, precision: str = "highest"):
    """A jitted ``(params, images [B, H, W, 3] in [0, 1]) -> {"pool", "logits", "logits_unbiased"}``.

    ``quantize`` first rounds the images to the uint8 grid (``round(255 x) / 255`` after clipping to
    [0, 1]), as if they were saved as PNGs and read back; ``precision`` applies to every conv (the
    default ``highest`` keeps TF32 / bf16 passes out of the features on accelerators). The function
    is built once per argument pair, so repeated evaluations reuse its compilation.
    """
    model = InceptionV3FID(precision=precision)

    def fn(params: Any, images: jax.Array) -> dict[str, jax.Array]:
        x = jnp.clip(images.astype(jnp.float32), 0.0, 1.0)
        if quantize:
            x = jnp.round(x * 255.0) / 255.0
        return model.apply({"params": params}, x)

    return jax.jit(fn)
