"""ConvNeXt (Liu et al. 2022) as torchvision builds it, for the frozen ConvNeXt-S perceptual loss.

NHWC images ``[B, H, W, 3]`` (already ImageNet-normalised; see :mod:`titok_jax.losses.perceptual`)
-> class logits ``[B, num_classes]``::

    stem:    Conv 4x4 stride 4 (3 -> d0, bias) -> LayerNorm(eps 1e-6)
    stage s: depths[s] blocks of width d_s; between stages: LayerNorm -> Conv 2x2 stride 2 (d_s -> d_s+1)
    block:   y = x + gamma * Linear(4d -> d)(GELU(Linear(d -> 4d)(LayerNorm(DWConv7x7(x)))))
    head:    global mean over H, W -> LayerNorm -> Linear(d3 -> num_classes)

``DWConv7x7`` is depthwise (one 7x7 filter per channel, padding 3, bias); GELU is the exact (erf)
form; ``gamma`` is the per-channel layer scale (initialised to 1e-6). Stochastic depth is a training
regulariser and is the identity in eval, so it does not appear here. The same code serves any
``depths`` / ``dims``; ConvNeXt-S is ``depths=(3, 3, 27, 3)``, ``dims=(96, 192, 384, 768)``
(50,223,688 params).

``dtype`` is the compute dtype of the whole trunk (convolutions, MLPs and the LayerNorms' outputs;
the LayerNorm statistics are float32 whatever it is); the global mean, the head LayerNorm and the
classifier run in float32, so the logits are float32.

Param names and the torchvision keys they come from (``convert/convnext.py``)::

    stem_conv/{kernel [4,4,3,d0], bias}               features.0.0.{weight, bias}
    stem_norm/{scale, bias}                            features.0.1.{weight, bias}
    stage{s}_block{j}/dwconv/{kernel [7,7,1,d], bias}  features.{2s+1}.{j}.block.0.*
    stage{s}_block{j}/norm/{scale, bias}               features.{2s+1}.{j}.block.2.*
    stage{s}_block{j}/fc1, fc2/{kernel, bias}          features.{2s+1}.{j}.block.3.*, block.5.*
    stage{s}_block{j}/gamma [d]                        features.{2s+1}.{j}.layer_scale [d, 1, 1]
    down{s}_norm/*, down{s}_conv/*   (s = 0..2)        features.{2s+2}.0.*, features.{2s+2}.1.*
    head_norm/{scale, bias}, head_fc/{kernel, bias}    classifier.0.*, classifier.2.*
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.nets.files import load_frozen_params, read_flat_params

CONVNEXT_SMALL = {"depths": (3, 3, 27, 3), "dims": (96, 192, 384, 768), "num_classes": 1000}
LN_EPS = 1e-6


def _ln(name: str, dtype: Any = None) -> nn.LayerNorm:
    """LayerNorm (eps 1e-6): float32 statistics, output in ``dtype`` (None: float32 with its
    float32 params)."""
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


class ConvNeXtBlock(nn.Module):
    """``x + gamma * MLP(LN(DWConv7x7(x)))`` (see the module docstring)."""

    dim: int
    layer_scale: float = 1e-6
    dtype: Any = None
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, precision=self.precision)
        y = nn.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim,
                    name="dwconv", **kw)(x)
        y = _ln("norm", self.dtype)(y)
        y = nn.Dense(4 * self.dim, name="fc1", **kw)(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.dim, name="fc2", **kw)(y)
        gamma = self.param("gamma", nn.initializers.constant(self.layer_scale), (self.dim,))
        return x + (gamma * y).astype(x.dtype)


class ConvNeXt(nn.Module):
    """ConvNeXt classifier ``[B, H, W, 3] -> [B, num_classes]`` (H, W multiples of 32)."""

    depths: Sequence[int] = CONVNEXT_SMALL["depths"]
    dims: Sequence[int] = CONVNEXT_SMALL["dims"]
    num_classes: int = 1000
    layer_scale: float = 1e-6
    dtype: Any = None
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ConvNeXt expects [B, H, W, 3] images, got shape {x.shape}")
        if len(self.depths) != len(self.dims):
            raise ValueError(f"ConvNeXt: depths {tuple(self.depths)} and dims {tuple(self.dims)} "
                             "differ in length")
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = nn.Conv(self.dims[0], (4, 4), strides=(4, 4), padding="VALID", name="stem_conv", **kw)(x)
        x = _ln("stem_norm", self.dtype)(x)
        for s, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if s > 0:
                x = _ln(f"down{s - 1}_norm", self.dtype)(x)
                x = nn.Conv(dim, (2, 2), strides=(2, 2), padding="VALID", name=f"down{s - 1}_conv",
                            **kw)(x)
            for j in range(depth):
                x = ConvNeXtBlock(dim, self.layer_scale, name=f"stage{s}_block{j}", **kw)(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = _ln("head_norm", jnp.float32)(x)
        return nn.Dense(self.num_classes, dtype=jnp.float32, precision=self.precision,
                        name="head_fc")(x)


@functools.lru_cache(maxsize=8)
def _abstract(depths: tuple[int, ...], dims: tuple[int, ...], num_classes: int) -> Any:
    model = ConvNeXt(depths=depths, dims=dims, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def convnext_abstract_params(depths: Sequence[int] = CONVNEXT_SMALL["depths"],
                             dims: Sequence[int] = CONVNEXT_SMALL["dims"],
                             num_classes: int = 1000) -> Any:
    """The param tree of :class:`ConvNeXt` as ``ShapeDtypeStruct``s (no computation)."""
    return _abstract(tuple(int(d) for d in depths), tuple(int(d) for d in dims), int(num_classes))


def convnext_arch_from_flat(flat: Any) -> dict[str, Any]:
    """``depths``, ``dims``, ``num_classes`` read off flat param keys (``stage{s}_block{j}/gamma``,
    ``head_fc/bias``); ``ValueError`` if they do not describe a ConvNeXt."""
    depths: list[int] = []
    dims: list[int] = []
    while f"stage{len(depths)}_block0/gamma" in flat:
        s = len(depths)
        depths.append(len({k.split("/")[0] for k in flat if k.startswith(f"stage{s}_block")}))
        dims.append(int(np.shape(flat[f"stage{s}_block0/gamma"])[0]))
    if not depths or "head_fc/bias" not in flat:
        raise ValueError("not a ConvNeXt params file (no stage0_block0/gamma or head_fc/bias)")
    return {"depths": tuple(depths), "dims": tuple(dims),
            "num_classes": int(np.shape(flat["head_fc/bias"])[0])}


def load_convnext_params(path: str, depths: Sequence[int] | None = None,
                         dims: Sequence[int] | None = None, num_classes: int | None = None) -> dict:
    """:class:`ConvNeXt` params from a file of ``titok-jax convert-convnext`` (format:
    :mod:`titok_jax.nets.files`), checked against the architecture: the one given, or else the
    one the file's keys describe (ConvNeXt-S for the converted torchvision weights)."""
    hint = ("titok-jax convert-convnext --input convnext_small-0c510722.pth "
            "--output convnext_s.safetensors")
    if depths is None or dims is None or num_classes is None:
        arch = convnext_arch_from_flat(read_flat_params(path, "ConvNeXt", hint))
        depths = arch["depths"] if depths is None else depths
        dims = arch["dims"] if dims is None else dims
        num_classes = arch["num_classes"] if num_classes is None else num_classes
    return load_frozen_params(path, convnext_abstract_params(depths, dims, num_classes),
                              "ConvNeXt", hint)
