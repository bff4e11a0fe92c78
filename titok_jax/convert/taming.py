"""taming-transformers VQGAN checkpoints (``last.ckpt`` of CompVis/taming-transformers) -> our params.

Input: a PyTorch-Lightning checkpoint (weights under ``state_dict``; read weights-only by
``convert.common.read_state_dict``, which stands in inert classes for the pickled Lightning
callbacks, so ``pytorch_lightning`` is not needed) or a bare state dict (``.bin`` / ``.pth`` /
``.safetensors``). Everything under ``loss.`` (LPIPS VGG + lin layers, the PatchGAN discriminator
and its BatchNorm buffers) is training-only and dropped. Name table (``E`` = ``encoder.``, ``D`` =
``decoder.``; PyTorch ``Conv2d [out, in, kh, kw]`` -> Flax ``[kh, kw, in, out]``, 1x1 convs
included; GroupNorm ``weight`` -> ``scale``)::

    E conv_in, norm_out, conv_out                 -> encoder/{conv_in,norm_out,conv_out}
    E down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}
                                                  -> encoder/down_{i}_block_{j}/...
    E down.{i}.attn.{j}.{norm,q,k,v,proj_out}     -> encoder/down_{i}_attn_{j}/...
    E down.{i}.downsample.conv                    -> encoder/down_{i}_downsample       (i < L-1)
    E mid.{block_1,attn_1,block_2}                -> encoder/mid_{block_1,attn_1,block_2}
    D conv_in, mid.*, norm_out, conv_out          -> decoder/... (as the encoder)
    D up.{i}.block.{j} (j <= num_res_blocks), up.{i}.attn.{j}
                                                  -> decoder/up_{i}_block_{j}, up_{i}_attn_{j}
    D up.{i}.upsample.conv                        -> decoder/up_{i}_upsample           (i > 0)
    quant_conv, post_quant_conv                   -> quant_conv, post_quant_conv
    quantize.embedding.weight [n_embed, embed_dim] -> quantize/codebook

``decoder.up[i]`` is resolution level ``i`` (taming builds the list lowest-resolution first and
prepends), so ``up_{i}`` here is level ``i`` too. ``nin_shortcut`` exists where a block changes
width. The shape (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``z_channels``,
``embed_dim``, ``n_embed``) is read from the tensors (:func:`infer_taming_kwargs`; attention
levels become resolutions of ``image_size``), or given (e.g. ``models.taming.TAMING_F16_1024``).
Every tensor is consumed, every param filled and every shape checked; the first problem raises a
one-line ``ValueError`` naming the tensor (``convert.common.StateDictReader``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from titok_jax.convert.common import StateDictReader
from titok_jax.convert.compvis_names import (Entry, abstract_params, attn_rows as _attn,
                                           conv_rows as _conv, norm_rows as _norm,
                                           resnet_rows as _resnet)
from titok_jax.models.taming import DEFAULT_QUANTIZER, TAMING_F16_1024
from titok_jax.trees import check_tree_matches, unflatten

PROBE_KEYS = ("encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight",
              "quantize.embedding.weight")
DROPPED_PREFIX = "loss."


def is_taming(keys: Any) -> bool:
    """A taming VQGAN state dict: its ``quant_conv`` / ``post_quant_conv`` and codebook (MaskGIT's
    VQGAN has no 1x1 projections around the quantizer)."""
    keys = set(keys)
    return all(k in keys for k in PROBE_KEYS)


def _mid(t: str, f: str, c: int) -> list[Entry]:
    return (_resnet(f"{t}mid.block_1", f"{f}mid_block_1", c, c) + _attn(f"{t}mid.attn_1", f"{f}mid_attn_1", c)
            + _resnet(f"{t}mid.block_2", f"{f}mid_block_2", c, c))


def _shape_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    kw = {**TAMING_F16_1024, **dict(kwargs)}
    return dict(image_size=int(kw["image_size"]), ch=int(kw["ch"]),
                ch_mult=tuple(int(m) for m in kw["ch_mult"]),
                num_res_blocks=int(kw["num_res_blocks"]),
                attn_resolutions=tuple(int(r) for r in kw["attn_resolutions"]),
                z_channels=int(kw["z_channels"]), embed_dim=int(kw["embed_dim"]),
                codebook_size=int(dict(kw["quantizer"]).get("codebook_size", 1024)))


def taming_name_table(model_kwargs: Mapping[str, Any]) -> list[Entry]:
    """Every row of the official state dict of ``TamingVQGAN(**model_kwargs)`` (``loss.*`` aside)."""
    kw = _shape_kwargs(model_kwargs)
    ch, mult, blocks, attn = kw["ch"], kw["ch_mult"], kw["num_res_blocks"], kw["attn_resolutions"]
    levels, z, e = len(mult), kw["z_channels"], kw["embed_dim"]
    res = [kw["image_size"] // 2 ** i for i in range(levels)]
    rows = _conv("encoder.conv_in", "encoder/conv_in", ch, 3, 3)
    c_in = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            rows += _resnet(f"encoder.down.{i}.block.{j}", f"encoder/down_{i}_block_{j}", c_in, ch * m)
            c_in = ch * m
            if res[i] in attn:
                rows += _attn(f"encoder.down.{i}.attn.{j}", f"encoder/down_{i}_attn_{j}", c_in)
        if i != levels - 1:
            rows += _conv(f"encoder.down.{i}.downsample.conv", f"encoder/down_{i}_downsample",
                          c_in, c_in, 3)
    rows += _mid("encoder.", "encoder/", c_in)
    rows += _norm("encoder.norm_out", "encoder/norm_out", c_in)
    rows += _conv("encoder.conv_out", "encoder/conv_out", z, c_in, 3)
    rows += _conv("quant_conv", "quant_conv", e, z, 1)
    rows += [("quantize.embedding.weight", "quantize/codebook", (kw["codebook_size"], e), None)]
    rows += _conv("post_quant_conv", "post_quant_conv", z, e, 1)
    c_in = ch * mult[-1]
    rows += _conv("decoder.conv_in", "decoder/conv_in", c_in, z, 3)
    rows += _mid("decoder.", "decoder/", c_in)
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            rows += _resnet(f"decoder.up.{i}.block.{j}", f"decoder/up_{i}_block_{j}", c_in, ch * mult[i])
            c_in = ch * mult[i]
            if res[i] in attn:
                rows += _attn(f"decoder.up.{i}.attn.{j}", f"decoder/up_{i}_attn_{j}", c_in)
        if i != 0:
            rows += _conv(f"decoder.up.{i}.upsample.conv", f"decoder/up_{i}_upsample", c_in, c_in, 3)
    rows += _norm("decoder.norm_out", "decoder/norm_out", c_in)
    rows += _conv("decoder.conv_out", "decoder/conv_out", 3, c_in, 3)
    return rows


def _dim(sd: Mapping[str, np.ndarray], key: str, axis: int, source: str) -> int:
    if key not in sd:
        raise ValueError(f"{source}: missing tensor {key!r}; cannot infer the taming VQGAN shape")
    return int(np.shape(sd[key])[axis])


def _levels(sd: Mapping[str, Any], pattern: str) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for m in map(re.compile(pattern).match, sd):
        if m:
            out.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return out


def infer_taming_kwargs(sd: Mapping[str, np.ndarray], image_size: int = 256,
                        source: str = "state dict") -> dict[str, Any]:
    """The ``TamingVQGAN`` kwargs of a taming state dict: ``ch`` (``encoder.conv_in`` width),
    ``ch_mult`` (``encoder.down.{i}.block.0.conv1`` widths / ``ch``), ``num_res_blocks``,
    ``attn_resolutions`` (``image_size / 2**i`` for the levels with ``encoder.down.{i}.attn``),
    ``z_channels``, ``embed_dim`` and the legacy VQ quantizer with ``n_embed`` codes."""
    if not is_taming(sd):
        missing = next(k for k in PROBE_KEYS if k not in sd)
        raise ValueError(f"{source} is not a taming VQGAN state dict (no {missing!r})")
    blocks = _levels(sd, r"encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight$")
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{source}: no consecutive encoder.down.{{i}}.block.{{j}} tensors; "
                         "not a taming VQGAN encoder")
    ch = _dim(sd, "encoder.conv_in.weight", 0, source)
    widths = [_dim(sd, f"encoder.down.{i}.block.0.conv1.weight", 0, source) for i in sorted(blocks)]
    if any(w % ch for w in widths):
        raise ValueError(f"{source}: level widths {widths} are not multiples of ch = {ch}")
    levels = len(widths)
    attn_enc = sorted(_levels(sd, r"encoder\.down\.(\d+)\.attn\.(\d+)\.q\.weight$"))
    attn_dec = sorted(_levels(sd, r"decoder\.up\.(\d+)\.attn\.(\d+)\.q\.weight$"))
    if attn_enc != attn_dec:
        raise ValueError(f"{source}: attention at encoder levels {attn_enc} but decoder levels "
                         f"{attn_dec}; taming places both by resolution")
    z = _dim(sd, "decoder.conv_in.weight", 1, source)
    z_enc = _dim(sd, "encoder.conv_out.weight", 0, source)
    if z_enc != z:
        raise ValueError(f"{source}: encoder.conv_out gives {z_enc} channels but the decoder reads "
                         f"{z} (double_z=True is a KL autoencoder, not a VQGAN)")
    n_embed, embed_dim = (int(d) for d in np.shape(sd["quantize.embedding.weight"]))
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size {image_size} is not a multiple of the downsampling factor "
                         f"{2 ** (levels - 1)}")
    return dict(image_size=int(image_size), ch=ch, ch_mult=tuple(w // ch for w in widths),
                num_res_blocks=len(blocks[0]),
                attn_resolutions=tuple(image_size // 2 ** i for i in attn_enc), z_channels=z,
                embed_dim=embed_dim, quantizer={**DEFAULT_QUANTIZER, "codebook_size": n_embed})


def taming_params_from_state_dict(sd: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any],
                                  source: str = "state dict") -> dict:
    """taming state dict -> ``TamingVQGAN(**model_kwargs)`` params (float32 numpy), ``loss.*``
    dropped; a missing, misshapen or left-over tensor is a one-line ``ValueError``."""
    reader = StateDictReader(sd, source)
    flat = {f: reader.take(t, shape, transform or (lambda x: x), what=f)
            for t, f, shape, transform in taming_name_table(model_kwargs)}
    reader.finish(ignore=[lambda k: k.startswith(DROPPED_PREFIX)])
    params = unflatten(flat)
    check_tree_matches(params, _abstract_params(model_kwargs), source=f"{source} (converted)")
    return params


def _abstract_params(model_kwargs: Mapping[str, Any]) -> Any:
    kw = {**TAMING_F16_1024, **dict(model_kwargs), "name": "taming_vqgan"}
    q = dict(kw["quantizer"])
    if q.get("name") != "vq" or q.get("use_ema"):
        raise ValueError("the taming codebook is a param of a 'vq' quantizer with use_ema=False; "
                         f"got quantizer {q}")
    return abstract_params(kw)


def taming_model_section(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The workdir ``model`` section (JSON-ready) of converted ``kwargs``."""
    return {"name": "taming_vqgan", **dict(kwargs), "ch_mult": list(kwargs["ch_mult"]),
            "attn_resolutions": list(kwargs["attn_resolutions"]),
            "quantizer": dict(kwargs["quantizer"])}
