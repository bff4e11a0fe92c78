"""DINOv2 (Oquab et al. 2023) as facebookresearch/dinov2 ``DinoVisionTransformer`` runs it, frozen:
FlexTok's REPA teacher (``ViTFeatures``, re-exported by ``models.flextok_blocks``).

Images ``[B, S, S, 3]`` in [0, 1] (resized to ``image_size`` when they differ: ``resize="bilinear"``,
or ``"nearest"`` = PyTorch's legacy ``F.interpolate`` default, :func:`prepare_images`) ->
``(x - mean) / std`` -> patch embed (conv ``p x p`` stride ``p``) -> ``[cls || patches] + pos`` ->
``[cls || registers || patches]`` -> ``depth`` pre-LN blocks -> LayerNorm -> the normalised patch
tokens ``[B, (S/p)^2, width]`` (DINOv2's ``x_norm_patchtokens``; ``all_tokens=True`` gives also
``cls`` ``[B, width]`` and ``registers`` ``[B, R, width]``). Block (LayerNorm eps 1e-6 everywhere)::

    x = x + ls1 * proj(attn(qkv(norm1(x))));  x = x + ls2 * fc2(gelu(fc1(norm2(x))))

The token stream is constrained to ``("batch", "tokens", "act_embed")`` (``nn.activation_sharding``)
at every block boundary (entry, after attention, exit) and at the embeddings and final norm, so the
frozen teacher keeps the trainer's batch split.

``ls1`` / ``ls2`` are DINOv2's LayerScale ``gamma [width]`` (``layerscale=True``; the released
``dinov2_vit{s,b,l}14`` all have it); attention scale ``head_dim ** -0.5``; GELU exact (erf).

Position embedding: the file holds DINOv2's table for a ``pos_grid x pos_grid`` patch grid (37 for
the released 518-px models; ``pos_grid=0``: the grid in use). When the grid in use ``g`` differs,
the patch part is resized as the official ``interpolate_pos_encoding`` does: PyTorch bicubic
(``A = -0.75``, ``align_corners=False``, no antialias, borders clamped) with the scale factor
``(g + 0.1) / pos_grid`` (``interpolate_offset = 0.1``), output size ``g``. That map is a fixed
``[g, pos_grid]`` matrix per axis (:func:`bicubic_matrix`), applied in the forward.

Param names and the official keys they come from (``convert/dinov2.py``)::

    patch_embed/proj/{kernel [p*p*3, D], bias}   patch_embed.proj.{weight [D, 3, p, p], bias}
    cls_token [1, D]                              cls_token [1, 1, D]
    register_tokens [R, D]   (R > 0)              register_tokens [1, R, D]
    pos_embed [pos_grid^2 + 1, D]                 pos_embed [1, N + 1, D]
    block_{i}/ln_1, ln_2/{scale, bias}            blocks.{i}.norm1, norm2.{weight, bias}
    block_{i}/attn/qkv/{kernel [D,3,H,D/H], bias} blocks.{i}.attn.qkv.{weight [3D, D], bias}
    block_{i}/attn/out/{kernel [H,D/H,D], bias}   blocks.{i}.attn.proj.{weight, bias}
    block_{i}/mlp/fc_in, fc_out/{kernel, bias}    blocks.{i}.mlp.fc1, fc2.{weight, bias}
    block_{i}/ls1, ls2 [D]   (layerscale)         blocks.{i}.ls1, ls2.gamma
    norm/{scale, bias}                            norm.{weight, bias}
    (not kept: ``mask_token``, used only by masked-image training)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.nn import MLP, MultiHeadAttention, PatchEmbed, boxed, constrain, make_norm
from titok_jax.nn.activation_sharding import BTD

Dtype = Any
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6
INTERPOLATE_OFFSET = 0.1
CUBIC_A = -0.75
# The released checkpoints (hub ``dinov2_vit{s,b,l}14[_reg]``: 518 px, patch 14, LayerScale).
DINOV2_VARIANTS = {
    "vits14": dict(width=384, depth=12, num_heads=6),
    "vitb14": dict(width=768, depth=12, num_heads=12),
    "vitl14": dict(width=1024, depth=24, num_heads=16),
}
DINOV2_POS_GRID = 37


@functools.lru_cache(maxsize=None)
def bicubic_matrix(out_size: int, in_size: int, offset: float = INTERPOLATE_OFFSET) -> np.ndarray:
    """``[out_size, in_size]`` float64: PyTorch's ``interpolate(mode="bicubic", align_corners=False,
    antialias=False, scale_factor=(out_size + offset) / in_size)`` along one axis (DINOv2's
    ``interpolate_pos_encoding``; ``offset=0``: the plain ``size=out_size`` call)."""
    scale = in_size / (out_size + offset) if offset else in_size / out_size
    m = np.zeros((out_size, in_size))

    def near(x):   # |x| <= 1
        return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A

    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        base = math.floor(src)
        t = src - base
        for j, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[i, min(max(base - 1 + j, 0), in_size - 1)] += w
    return m


def torch_nearest_indices(out_size: int, in_size: int) -> np.ndarray:
    """Source rows of PyTorch's legacy ``F.interpolate(mode="nearest", size=out_size)`` along one
    axis: ``min(floor(i * float32(in / out)), in - 1)`` (float32 as torch computes it; JAX's
    ``"nearest"`` samples half-pixel centres instead, ``floor((i + 0.5) * in / out)``)."""
    scale = np.float32(in_size / out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


RESIZE_METHODS = ("bilinear", "nearest")


def prepare_images(images: jax.Array, size: int, mean: Sequence[float], std: Sequence[float],
                   resize: str = "bilinear") -> jax.Array:
    """``[B, H, W, 3]`` in [0, 1] -> ``[B, size, size, 3]`` float32 ``(x - mean) / std``. Resized
    when ``H, W != size``: ``"bilinear"`` (``jax.image.resize``, antialiased when shrinking) or
    ``"nearest"`` (a gather with PyTorch's legacy nearest rule, :func:`torch_nearest_indices`)."""
    if resize not in RESIZE_METHODS:
        raise ValueError(f"unknown resize {resize!r}; expected one of {RESIZE_METHODS}")
    if images.shape[1:3] != (size, size):
        if resize == "nearest":
            images = jnp.take(images, torch_nearest_indices(size, images.shape[1]), axis=1)
            images = jnp.take(images, torch_nearest_indices(size, images.shape[2]), axis=2)
        else:
            images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                                      "bilinear")
    return (images.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)


def interpolate_pos_embed(pos: jax.Array, grid: int, pos_grid: int) -> jax.Array:
    """``[pos_grid^2 + 1, D]`` -> ``[grid^2 + 1, D]`` (cls row kept; see the module docstring)."""
    if grid == pos_grid:
        return pos
    m = jnp.asarray(bicubic_matrix(grid, pos_grid), jnp.float32)
    table = pos[1:].astype(jnp.float32).reshape(pos_grid, pos_grid, -1)
    hp = jax.lax.Precision.HIGHEST
    table = jnp.einsum("hm,mnd->hnd", m, table, precision=hp)
    table = jnp.einsum("wn,hnd->hwd", m, table, precision=hp)
    return jnp.concatenate([pos[:1].astype(jnp.float32), table.reshape(grid * grid, -1)], 0).astype(pos.dtype)


class DinoBlock(nn.Module):
    """One DINOv2 block (module docstring); param names those of ``nn.TransformerBlock`` plus
    ``ls1`` / ``ls2`` with ``layerscale``. ``epsilon`` / ``activation`` (an ``nn.MLP`` one) are
    DINOv2's by default; CLIP's tower (``nets.clip``) runs the same block with 1e-5 and QuickGELU."""

    num_heads: int
    layerscale: bool = False
    epsilon: float = LN_EPS
    activation: str = "gelu"
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def scaled(h, name):
            if not self.layerscale:
                return h
            g = self.param(name, boxed(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
            return h * g.astype(h.dtype)

        x = constrain(x, BTD)
        h = make_norm("layernorm", epsilon=self.epsilon, name="ln_1", **kw)(x)
        h = MultiHeadAttention(num_heads=self.num_heads, fused_qkv=True, qkv_bias=True, out_bias=True,
                               name="attn", **kw)(h)
        x = constrain(x + scaled(h, "ls1"), BTD)
        h = make_norm("layernorm", epsilon=self.epsilon, name="ln_2", **kw)(x)
        h = MLP(hidden_dim=4 * d, activation=self.activation, use_bias=True, name="mlp", **kw)(h)
        return constrain(x + scaled(h, "ls2"), BTD)


class ViTFeatures(nn.Module):
    """DINOv2's feature network (module docstring). With ``layerscale=False, num_registers=0,
    pos_grid=0`` it is the plain ViT stand-in FlexTok's tiny configs use. Frozen: params come from
    a file (``titok-jax convert-dinov2``, read by ``nets.files``)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    layerscale: bool = False
    num_registers: int = 0
    pos_grid: int = 0
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    resize: str = "bilinear"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, all_tokens: bool = False):
        s = self.image_size
        if s % self.patch_size:
            raise ValueError(f"image_size {s} is not a multiple of patch_size {self.patch_size}")
        x = prepare_images(images, s, self.mean, self.std, self.resize)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.patch_size, self.width, name="patch_embed", **kw)(x)
        b, n, w = x.shape
        grid = s // self.patch_size
        pos_grid = self.pos_grid or grid
        cls = self.param("cls_token", boxed(nn.initializers.normal(0.02), (None, "embed")),
                         (1, w), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls[None].astype(x.dtype), (b, 1, w)), x], 1)
        pos = self.param("pos_embed", boxed(nn.initializers.normal(0.02), ("tokens", "embed")),
                         (pos_grid * pos_grid + 1, w), self.param_dtype)
        x = constrain(x + interpolate_pos_embed(pos, grid, pos_grid).astype(x.dtype)[None], BTD)
        r = self.num_registers
        if r:
            reg = self.param("register_tokens", boxed(nn.initializers.normal(1e-6), (None, "embed")),
                             (r, w), self.param_dtype)
            x = constrain(jnp.concatenate([x[:, :1], jnp.broadcast_to(reg[None].astype(x.dtype), (b, r, w)),
                                           x[:, 1:]], 1), BTD)
        for i in range(self.depth):
            x = DinoBlock(self.num_heads, self.layerscale, name=f"block_{i}", **kw)(x)
        x = constrain(make_norm("layernorm", epsilon=LN_EPS, name="norm", **kw)(x).astype(jnp.float32),
                      BTD)
        if all_tokens:
            return {"cls": x[:, 0], "registers": x[:, 1:r + 1], "patch": x[:, r + 1:]}
        return x[:, r + 1:]
