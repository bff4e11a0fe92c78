"""CLIP visual-tower weights -> the params of :class:`titok_jax.nets.clip.CLIPVisionTower` (FQGAN's
teachers, ``config.teachers.<factor>.weights`` with ``"arch": "clip"``).

Two layouts are read (nothing is downloaded here):

- Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` (``openai/clip-vit-large-patch14``,
  ``openai/clip-vit-base-patch16``): ``vision_model.embeddings.patch_embedding.weight``,
  ``vision_model.encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``pre_layrnorm`` (sic),
  ``post_layernorm`` (the ``vision_model.`` prefix optional: transformers 5 saves a
  ``CLIPVisionModel`` without it), from a ``.safetensors`` / ``.bin`` file or a snapshot directory
  (``model.safetensors``, a sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``; its
  ``config.json`` gives the head count and activation). The text tower, ``visual_projection``,
  ``text_projection``, ``logit_scale`` and ``position_ids`` buffers are read and dropped.
- OpenAI (``ViT-L-14.pt``, ``ViT-B-16.pt`` of openai/CLIP, or open_clip's ``openai`` ViT files):
  ``visual.conv1.weight``, ``visual.class_embedding``, ``visual.transformer.resblocks.N.attn.
  in_proj_weight``, ``ln_1``, ``mlp.c_fc``, ``visual.ln_pre`` ... (the ``visual.`` prefix optional),
  from a TorchScript archive (``torch.jit.load``, then its ``state_dict()``) or a plain state dict
  (``.pt`` / ``.pth`` need torch; ``.safetensors`` / ``.npz`` do not). Everything outside
  ``visual.`` (the text tower, ``logit_scale``, ``input_resolution`` ...) and ``visual.proj`` are
  dropped.

fp16 tensors (the OpenAI releases) are cast to float32. Width, patch, depth and the position grid
(hence ``image_size = grid * patch``) are read from the shapes; heads from ``config.json`` when
there is one, else ``--num_heads``, else ``width / 64`` (every released CLIP ViT). A text-only
file, or one that is not CLIP, is a one-line error, as is the first missing / unexpected /
misshaped tensor. The name table is in :mod:`titok_jax.nets.clip`.

Command line::

    titok-jax convert-clip --input ViT-L-14.pt --output clip_l14.safetensors
    titok-jax convert-clip --input ~/hf/clip-vit-large-patch14 --output clip_l14.safetensors

and then ``--config.teachers.sem.weights=clip_l14.safetensors`` (``configs/fqgan.py:dual``).
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Callable, Mapping

import numpy as np

from titok_jax.convert.common import (TORCH_SUFFIXES, StateDictReader, identity, read_state_dict,
                                      vit_block_rows, vit_grid_depth_heads)
from titok_jax.convert.inception import save_params

Row = tuple  # (torch key, our flat key or None (dropped), torch shape, transform)
HEAD_DIM = 64
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}

# Torch names inside one block. HF's separate q/k/v projections are stacked into the synthetic
# ``self_attn.qkv_proj`` (:func:`_fuse_hf_qkv`) so both layouts share ``vit_block_rows``.
HF_BLOCK = {"ln_1": "layer_norm1.weight", "ln_1_bias": "layer_norm1.bias",
            "qkv": "self_attn.qkv_proj.weight", "qkv_bias": "self_attn.qkv_proj.bias",
            "out": "self_attn.out_proj.weight", "out_bias": "self_attn.out_proj.bias",
            "ln_2": "layer_norm2.weight", "ln_2_bias": "layer_norm2.bias",
            "fc_in": "mlp.fc1.weight", "fc_in_bias": "mlp.fc1.bias",
            "fc_out": "mlp.fc2.weight", "fc_out_bias": "mlp.fc2.bias"}
OPENAI_BLOCK = {"ln_1": "ln_1.weight", "ln_1_bias": "ln_1.bias",
                "qkv": "attn.in_proj_weight", "qkv_bias": "attn.in_proj_bias",
                "out": "attn.out_proj.weight", "out_bias": "attn.out_proj.bias",
                "ln_2": "ln_2.weight", "ln_2_bias": "ln_2.bias",
                "fc_in": "mlp.c_fc.weight", "fc_in_bias": "mlp.c_fc.bias",
                "fc_out": "mlp.c_proj.weight", "fc_out_bias": "mlp.c_proj.bias"}
# per layout: (patch, class, position, ln_pre, block prefix, block names, ln_post)
LAYOUTS = {
    "hf": ("embeddings.patch_embedding.weight", "embeddings.class_embedding",
           "embeddings.position_embedding.weight", "pre_layrnorm", "encoder.layers", HF_BLOCK,
           "post_layernorm"),
    "openai": ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre",
               "transformer.resblocks", OPENAI_BLOCK, "ln_post"),
}
PREFIXES = {"hf": ("vision_model.", ""), "openai": ("visual.", "")}


def clip_layout(sd: Mapping[str, np.ndarray], source: str = "state dict") -> tuple[str, str]:
    """``(layout, prefix)`` of a CLIP state dict (``"hf"`` / ``"openai"``); a one-line error for a
    text-only CLIP file or anything else."""
    for layout, prefixes in PREFIXES.items():
        for prefix in prefixes:
            if prefix + LAYOUTS[layout][0] in sd:
                return layout, prefix
    if any(k.startswith("text_model.") for k in sd) or "token_embedding.weight" in sd:
        raise ValueError(f"{source}: a CLIP text tower only, no vision weights (need "
                         "'vision_model.embeddings.patch_embedding.weight' or 'visual.conv1.weight')")
    raise ValueError(f"{source}: not a CLIP vision state dict (no "
                     "'vision_model.embeddings.patch_embedding.weight' or 'visual.conv1.weight')")


def clip_arch(sd: Mapping[str, np.ndarray], source: str = "state dict",
              num_heads: int | None = None) -> dict:
    """``CLIPVisionTower`` kwargs (``image_size``, ``patch_size``, ``width``, ``depth``,
    ``num_heads``) read from the tensors (heads: ``num_heads``, default ``width / 64``)."""
    layout, prefix = clip_layout(sd, source)
    patch, _, position, _, blocks, names, _ = LAYOUTS[layout]
    w, c, p, p2 = np.shape(sd[prefix + patch])
    if p != p2 or c != 3:
        raise ValueError(f"{source}: tensor {prefix + patch!r} has shape {np.shape(sd[prefix + patch])}, "
                         "not [width, 3, p, p]")
    if prefix + position not in sd:
        raise ValueError(f"{source}: missing tensor {prefix + position!r}")
    g, depth, heads = vit_grid_depth_heads(
        sd, source, prefix + position, np.shape(sd[prefix + position])[0],
        f"{prefix}{blocks}.{{}}.{names['ln_1']}", int(w), num_heads, "CLIP", HEAD_DIM)
    return {"image_size": int(g * p), "patch_size": int(p), "width": int(w), "depth": depth,
            "num_heads": heads}


def clip_name_table(layout: str, prefix: str, image_size: int, patch_size: int, width: int,
                    depth: int, num_heads: int) -> list[Row]:
    """``(torch key, our flat key, torch shape, transform)`` for every vision-tower tensor."""
    patch, cls, position, ln_pre, blocks, names, ln_post = LAYOUTS[layout]
    w, p, n = width, patch_size, (image_size // patch_size) ** 2 + 1
    t: list[Row] = [
        (prefix + patch, "patch_embed/proj/kernel", (w, 3, p, p),
         lambda x: np.ascontiguousarray(x.reshape(x.shape[0], -1).T)),
        (prefix + cls, "class_embedding", (w,), identity),
        (prefix + position, "pos_embed", (n, w), identity),
        (f"{prefix}{ln_pre}.weight", "ln_pre/scale", (w,), identity),
        (f"{prefix}{ln_pre}.bias", "ln_pre/bias", (w,), identity),
    ]
    for i in range(depth):
        t += vit_block_rows(f"{prefix}{blocks}.{i}", f"block_{i}", w, num_heads, names, identity)
    t += [(f"{prefix}{ln_post}.weight", "ln_post/scale", (w,), identity),
          (f"{prefix}{ln_post}.bias", "ln_post/bias", (w,), identity)]
    return t


def _fuse_hf_qkv(sd: Mapping[str, np.ndarray], prefix: str, source: str) -> dict[str, np.ndarray]:
    """HF ``self_attn.{q,k,v}_proj.{weight,bias}`` -> one ``self_attn.qkv_proj.*`` (rows q, k, v:
    OpenAI's ``in_proj`` order); a block with only some of the three names the first missing."""
    out = dict(sd)
    for key in list(sd):
        if not (key.startswith(prefix + "encoder.layers.") and ".self_attn.q_proj." in key):
            continue
        parts = [key.replace(".q_proj.", f".{n}_proj.") for n in "qkv"]
        for part in parts:
            if part not in sd:
                raise ValueError(f"{source}: missing tensor {part!r}")
        out[key.replace(".q_proj.", ".qkv_proj.")] = np.concatenate([np.asarray(sd[k]) for k in parts])
        for part in parts:
            del out[part]
    return out


def _dropped(layout: str, prefix: str) -> list[Callable[[str], bool]]:
    """What ``finish`` may leave: everything but the vision tower, its projection and buffers."""
    if layout == "hf":
        return [lambda k: not k.startswith(prefix) if prefix else k.startswith("text_model."),
                lambda k: k in ("visual_projection.weight", "text_projection.weight", "logit_scale"),
                lambda k: k.endswith("position_ids")]
    return [lambda k: not k.startswith(prefix) if prefix else False,
            lambda k: k == prefix + "proj"]


def convert_clip_state_dict(sd: Mapping[str, np.ndarray], source: str = "state dict",
                            num_heads: int | None = None, activation: str = "quick_gelu"
                            ) -> tuple[dict[str, np.ndarray], dict]:
    """Flat CLIP state dict (either layout) -> ``(flat float32 params, CLIPVisionTower kwargs)``."""
    from titok_jax.nets.clip import CLIPVisionTower
    from titok_jax.trees import check_tree_matches, unflatten
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    layout, prefix = clip_layout(sd, source)
    if layout == "hf":
        sd = _fuse_hf_qkv(sd, prefix, source)
    arch = clip_arch(sd, source, num_heads)
    reader = StateDictReader(sd, source)
    out = {key: reader.take(tkey, shape, f, what=key)
           for tkey, key, shape, f in clip_name_table(layout, prefix, **arch)}
    reader.finish(_dropped(layout, prefix))
    arch = {**arch, "activation": activation}
    model = CLIPVisionTower(**arch)
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    check_tree_matches(unflatten(out), abstract, source="converted params")
    return out, arch


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (``torch.jit.save``: a zip with ``code/`` and ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _read_torchscript(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} (a TorchScript archive) needs PyTorch "
                          "(pip install 'titok_jax[torch]')") from e
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged archive
        text = str(e).strip().splitlines()
        raise ValueError(f"{path} is not a readable TorchScript archive: "
                         f"{text[0] if text else type(e).__name__}") from None
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in module.state_dict().items()}


def _read_snapshot(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and ``config.json`` (``{}`` when absent) of a Hugging Face snapshot directory."""
    config: dict = {}
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' (not a safetensors shard index)")
        shards = sorted(set(weight_map.values()))
        sd: dict[str, np.ndarray] = {}
        for shard in shards:
            sd.update(read_state_dict(os.path.join(path, shard)))
        return sd, config
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return read_state_dict(os.path.join(path, name)), config
    raise ValueError(f"{path}: a directory without model.safetensors, model.safetensors.index.json "
                     "or pytorch_model.bin (not a Hugging Face CLIP snapshot)")


def _hf_settings(config: Mapping, source: str) -> tuple[int | None, str]:
    """``(num_heads, activation)`` from a snapshot's ``config.json`` (``CLIPConfig`` or
    ``CLIPVisionConfig``)."""
    vc = config.get("vision_config", config) if config else {}
    if config and "vision_config" not in config and config.get("model_type") == "clip_text_model":
        raise ValueError(f"{source}: a CLIP text tower only (config.json model_type clip_text_model)")
    act = vc.get("hidden_act", "quick_gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: config.json hidden_act {act!r} is not supported "
                         f"(expected one of {sorted(HF_ACTIVATIONS)})")
    eps = vc.get("layer_norm_eps", 1e-5)
    if abs(float(eps) - 1e-5) > 1e-12:
        raise ValueError(f"{source}: config.json layer_norm_eps {eps} is not CLIP's 1e-5")
    if not config:
        return None, HF_ACTIVATIONS[act]
    # config.json may leave out a value equal to transformers' default (12 heads)
    return int(vc.get("num_attention_heads", 12)), HF_ACTIVATIONS[act]


def read_clip_input(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], int | None, str]:
    """``(state dict, heads from config.json or None, activation)`` of ``path``: a file (any
    :func:`read_state_dict` format, or a TorchScript ``.pt``) or a HF snapshot directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        sd, config = _read_snapshot(path)
        heads, act = _hf_settings(config, path)
        return sd, heads, act
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.endswith(TORCH_SUFFIXES) and _is_torchscript(path):
        return _read_torchscript(path), None, "quick_gelu"
    return read_state_dict(path), None, "quick_gelu"


def convert_clip_file(input_path: str | os.PathLike, output_path: str | os.PathLike,
                      num_heads: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a CLIP file or snapshot, convert, write ``output_path`` (``.safetensors`` / ``.npz``);
    returns ``(flat params, CLIPVisionTower kwargs)``. ``num_heads`` overrides ``config.json``."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if not output_path.endswith((".safetensors", ".npz")):
        raise ValueError(f"{output_path}: output must end in .safetensors or .npz")
    sd, heads, act = read_clip_input(input_path)
    flat, arch = convert_clip_state_dict(sd, input_path, num_heads or heads, act)
    save_params(flat, output_path, "titok_jax.clip")
    return flat, arch


def describe(arch: Mapping) -> str:
    """The ``teachers.<factor>.model`` kwargs of a conversion, for the command's message."""
    return ", ".join(f"{k}={arch[k]}" for k in ("image_size", "patch_size", "width", "depth",
                                                 "num_heads", "activation"))
