"""Official DINOv2 weights -> the params of :class:`titok_jax.nets.dinov2.ViTFeatures` (FlexTok's
REPA teacher, ``config.repa.teacher.weights``).

Input: a facebookresearch/dinov2 state dict, ``dinov2_vit{s,b,l}14_pretrain.pth`` or the register
variants ``dinov2_vit{s,b,l}14_reg4_pretrain.pth`` (nothing is downloaded here), or the same tensors
as ``.safetensors`` / ``.npz``. The shape (width, depth, heads, patch, registers, LayerScale, the
position grid) is read from the tensors; the name table is in :mod:`titok_jax.nets.dinov2`. The
position table is kept at its own grid (37 x 37 for the released files); the model resizes it to
the grid in use as the official ``interpolate_pos_encoding`` does. ``mask_token`` (masked-image
training only) is read and dropped. Every tensor must be consumed and every param filled; the first
missing / unexpected / misshaped tensor is a one-line error naming it.

Command line::

    titok-jax convert-dinov2 --input dinov2_vitl14_pretrain.pth --output dinov2_l14.safetensors

and then, for FlexTok (ViT-L, 224 px -> a 16 x 16 grid)::

    --config.repa.teacher.weights=dinov2_l14.safetensors
    --config.repa.teacher.model='{"image_size": 224, "patch_size": 14, "width": 1024, "depth": 24,
        "num_heads": 16, "layerscale": true, "pos_grid": 37}'     (+ "num_registers": 4 for _reg4)
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping

import numpy as np

from titok_jax.convert.common import (StateDictReader, identity, read_state_dict, vit_block_rows,
                                      vit_grid_depth_heads)
from titok_jax.convert.inception import save_params

Row = tuple  # (torch key, our flat key or None (dropped), torch shape, transform)
HEAD_DIM = 64   # every released DINOv2 (s: 6 x 64, b: 12 x 64, l: 16 x 64)


# Torch names inside one official DINOv2 block (NestedTensorBlock with a fused qkv).
DINOV2_BLOCK = {"ln_1": "norm1.weight", "ln_1_bias": "norm1.bias", "qkv": "attn.qkv.weight",
                "qkv_bias": "attn.qkv.bias", "out": "attn.proj.weight", "out_bias": "attn.proj.bias",
                "ln_2": "norm2.weight", "ln_2_bias": "norm2.bias", "fc_in": "mlp.fc1.weight",
                "fc_in_bias": "mlp.fc1.bias", "fc_out": "mlp.fc2.weight", "fc_out_bias": "mlp.fc2.bias"}


def dinov2_arch(sd: Mapping[str, np.ndarray], source: str = "state dict",
                num_heads: int | None = None) -> dict:
    """``ViTFeatures`` kwargs (``patch_size``, ``width``, ``depth``, ``num_heads``, ``layerscale``,
    ``num_registers``, ``pos_grid``) read from a DINOv2 state dict's tensors. The tensors do not
    show the head count: ``num_heads`` (default ``width / 64``, as every released DINOv2 has)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm1.weight"):
        if key not in sd:
            raise ValueError(f"{source}: not a DINOv2 state dict (no {key!r})")
    w, _, p, p2 = np.shape(sd["patch_embed.proj.weight"])
    if p != p2:
        raise ValueError(f"{source}: tensor 'patch_embed.proj.weight' has non-square patches {p}x{p2}")
    g, depth, heads = vit_grid_depth_heads(sd, source, "pos_embed", np.shape(sd["pos_embed"])[1],
                                           "blocks.{}.norm1.weight", int(w), num_heads, "DINOv2",
                                           HEAD_DIM)
    reg = sd.get("register_tokens")
    return {"patch_size": int(p), "width": int(w), "depth": depth, "num_heads": heads,
            "layerscale": "blocks.0.ls1.gamma" in sd,
            "num_registers": int(np.shape(reg)[1]) if reg is not None else 0, "pos_grid": g}


def dinov2_name_table(patch_size: int, width: int, depth: int, num_heads: int, layerscale: bool,
                      num_registers: int, pos_grid: int) -> list[Row]:
    """``(torch key, our flat key, torch shape, transform)`` for every tensor of the official
    state dict (``our key`` None: read and dropped)."""
    w, p, h = width, patch_size, num_heads
    t: list[Row] = [
        ("patch_embed.proj.weight", "patch_embed/proj/kernel", (w, 3, p, p),
         lambda x: np.ascontiguousarray(x.reshape(x.shape[0], -1).T)),
        ("patch_embed.proj.bias", "patch_embed/proj/bias", (w,), identity),
        ("cls_token", "cls_token", (1, 1, w), lambda x: x.reshape(1, w)),
        ("pos_embed", "pos_embed", (1, pos_grid * pos_grid + 1, w), lambda x: x[0]),
        ("mask_token", None, (1, w), identity),
    ]
    if num_registers:
        t.append(("register_tokens", "register_tokens", (1, num_registers, w), lambda x: x[0]))
    for i in range(depth):
        a, b = f"blocks.{i}", f"block_{i}"
        t += vit_block_rows(a, b, w, h, DINOV2_BLOCK, identity)
        if layerscale:
            t += [(f"{a}.ls1.gamma", f"{b}/ls1", (w,), identity),
                  (f"{a}.ls2.gamma", f"{b}/ls2", (w,), identity)]
    t += [("norm.weight", "norm/scale", (w,), identity), ("norm.bias", "norm/bias", (w,), identity)]
    return t


def _unchunk(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``blocks.{chunk}.{i}.*`` (``block_chunks > 0``, the training layout) -> ``blocks.{i}.*``."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.\d+\.(\d+\..*)$", k)
        out[f"blocks.{m.group(1)}" if m else k] = v
    return out


def convert_dinov2_state_dict(sd: Mapping[str, np.ndarray], source: str = "state dict",
                              num_heads: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Flat official state dict -> ``(flat float32 params, ViTFeatures kwargs read from it)``."""
    from titok_jax.nets.dinov2 import ViTFeatures
    from titok_jax.trees import check_tree_matches, unflatten
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    sd = _unchunk(sd)
    arch = dinov2_arch(sd, source, num_heads)
    reader = StateDictReader(sd, source)
    out = {}
    for tkey, key, shape, f in dinov2_name_table(**arch):
        value = reader.take(tkey, shape, f, what=key or "dropped")
        if key is not None:
            out[key] = value
    reader.finish()
    grid = arch["pos_grid"]
    model = ViTFeatures(image_size=grid * arch["patch_size"], **arch)
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    check_tree_matches(unflatten(out), abstract, source="converted params")
    return out, arch


def convert_dinov2_file(input_path: str | os.PathLike, output_path: str | os.PathLike,
                        num_heads: int | None = None) -> dict[str, np.ndarray]:
    """Read an official DINOv2 state dict, convert, write ``output_path`` (never overwritten; the
    model kwargs are stored in the safetensors metadata); returns the flat params."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if not output_path.endswith((".safetensors", ".npz")):
        raise ValueError(f"{output_path}: output must end in .safetensors or .npz")
    if os.path.exists(output_path):
        raise ValueError(f"{output_path} exists; not overwriting it")
    flat, arch = convert_dinov2_state_dict(read_state_dict(input_path), input_path, num_heads)
    save_params(flat, output_path, "titok_jax.dinov2")
    return flat


def describe(flat: Mapping[str, np.ndarray]) -> str:
    """The ``repa.teacher.model`` kwargs of converted params, for the command's message."""
    w = flat["norm/scale"].shape[0]
    depth = sum(1 for k in flat if k.endswith("/ln_1/scale"))
    reg = flat["register_tokens"].shape[0] if "register_tokens" in flat else 0
    grid = math.isqrt(flat["pos_embed"].shape[0] - 1)
    p = math.isqrt(flat["patch_embed/proj/kernel"].shape[0] // 3)
    return (f'patch_size={p}, width={w}, depth={depth}, '
            f'layerscale={"block_0/ls1" in flat}, num_registers={reg}, pos_grid={grid}')
