"""FQGAN tokenizer checkpoints (showlab/FQGAN ``fqgan_{dual,triple}_ds{16,8}.pt``) -> our params.

Input: the released file (``{"model": state_dict}``; the official loaders read ``ema``, then
``model``, then ``state_dict``: ``reconstruction_vq_ddp_dual.py:69-78``; ``convert.common.
read_state_dict``) or a bare state dict (``.safetensors`` / ``.pth``) of ``tokenizer/
vq_model_{dual,triple}.py``'s ``VQModel``. Name table (PyTorch ``Conv2d [out, in, kh, kw]`` ->
``[kh, kw, in, out]``, ``Linear [out, in]`` -> ``[in, out]``, norm ``weight`` -> ``scale``;
``f`` a factor ``vis`` / ``sem`` / ``sem_mid`` / ``sem_high``, ``i`` its position in
``models.fqgan.DUAL`` / ``TRIPLE``)::

    encoder.conv_in, encoder.mid.{0,1,2}                  -> encoder/conv_in, encoder/mid_{0,1,2}
    encoder.conv_blocks.{l}.res.{j} / .attn.{j}           -> encoder/conv_blocks_{l}_res_{j} / _attn_{j}
    encoder.conv_blocks.{l}.downsample.conv               -> encoder/conv_blocks_{l}_downsample
    encoder.{visual_head|semantic_head*}.0.*              -> encoder/{same name}/*  (adapter)
      positional_embedding, ln_pre, ln_post, transformer.{t}.{ln_1, attn.in_proj_weight/bias,
      attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}          -> transformer_{t}/{ln_1, in_proj,
                                                              out_proj, ln_2, mlp_c_fc, mlp_c_proj}
    encoder.norm_out_{f}, encoder.conv_out_{f}            -> encoder/norm_out_{f}, conv_out_{f}
    quant_conv_{f}                                        -> quant_convs_{i}
    quantize_{f}.embedding.weight                         -> quantize/quantizers_{i}/codebook
    quantize_{f}.codebook_used                            (usage buffer: dropped)
    post_quant_conv, decoder.*                            -> post_quant_conv, decoder/* (as the encoder;
                                                              decoder.conv_blocks.0 = lowest resolution)
    feat_pred_head | mid_sem_feat_pred | high_sem_feat_pred .{upscale.0, upscale.2, class_embedding,
      positional_embedding, ln_pre, transformer.{t}, ln_post}  -> heads_{i}/{upscale_0, upscale_2, ...}

The shape (Dual / Triple, ``ch``, ``ch_mult``, ``num_res_blocks``, ``z_channels``, ``embed_dim``,
codebook size, adapter / head layers, head widths) is read from the tensors
(:func:`infer_fqgan_kwargs`); ``image_size`` from the adapters' position table (``(S/f)**2``
rows: 256 for the releases); heads counts cannot be read from tensors: ``adapter_heads`` /
``head_heads`` default to the official 8; ``norm_groups`` to 32. Every tensor is consumed or
dropped by the rules above, every param filled and every shape checked (one-line ``ValueError``).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from titok_jax.convert.common import StateDictReader, linear_kernel
from titok_jax.convert.compvis_names import (Entry, abstract_params, attn_rows as _attn,
                                           conv_rows as _conv, linear_rows as _linear,
                                           norm_rows as _norm, resnet_rows as _res)
from titok_jax.models.fqgan import (ADAPTER_NAMES, DUAL, FQGAN_DUAL_DS16, HEAD_NAMES, TRIPLE,
                                    fqgan_quantizer)
from titok_jax.trees import check_tree_matches, unflatten

PROBE_DUAL = ("quantize_vis.embedding.weight", "quantize_sem.embedding.weight")
PROBE_TRIPLE = ("quantize_vis.embedding.weight", "quantize_sem_mid.embedding.weight",
                "quantize_sem_high.embedding.weight")


def fqgan_variant(keys: Any) -> tuple[str, ...] | None:
    """The factors of an FQGAN state dict (``DUAL`` / ``TRIPLE``), or None."""
    keys = set(keys)
    if all(k in keys for k in PROBE_TRIPLE):
        return TRIPLE
    if all(k in keys for k in PROBE_DUAL):
        return DUAL
    return None


def is_fqgan(keys: Any) -> bool:
    return fqgan_variant(keys) is not None


def _block(t: str, f: str, w: int) -> list[Entry]:
    return (_norm(f"{t}.ln_1", f"{f}/ln_1", w)
            + [(f"{t}.attn.in_proj_weight", f"{f}/in_proj/kernel", (3 * w, w), linear_kernel),
               (f"{t}.attn.in_proj_bias", f"{f}/in_proj/bias", (3 * w,), None)]
            + _linear(f"{t}.attn.out_proj", f"{f}/out_proj", w, w)
            + _norm(f"{t}.ln_2", f"{f}/ln_2", w)
            + _linear(f"{t}.mlp.c_fc", f"{f}/mlp_c_fc", 4 * w, w)
            + _linear(f"{t}.mlp.c_proj", f"{f}/mlp_c_proj", w, 4 * w))


def _mid(t: str, f: str, c: int) -> list[Entry]:
    return _res(f"{t}.mid.0", f"{f}/mid_0", c, c) + _attn(f"{t}.mid.1", f"{f}/mid_1", c) + _res(
        f"{t}.mid.2", f"{f}/mid_2", c, c)


def fqgan_name_table(kw: Mapping[str, Any]) -> list[Entry]:
    """Every row of the official state dict of ``FQGAN(**kw)`` (``codebook_used`` aside)."""
    kw = {**FQGAN_DUAL_DS16, **dict(kw)}
    ch, mult, n = int(kw["ch"]), [int(m) for m in kw["ch_mult"]], int(kw["num_res_blocks"])
    z, e, factors = int(kw["z_channels"]), int(kw["embed_dim"]), tuple(kw["factors"])
    levels, g2 = len(mult), (int(kw["image_size"]) // 2 ** (len(mult) - 1)) ** 2
    k = fqgan_quantizer_size(kw)
    rows = _conv("encoder.conv_in", "encoder/conv_in", ch, 3, 3)
    c = ch
    for i, m in enumerate(mult):
        for j in range(n):
            rows += _res(f"encoder.conv_blocks.{i}.res.{j}", f"encoder/conv_blocks_{i}_res_{j}", c,
                         ch * m)
            c = ch * m
            if i == levels - 1:
                rows += _attn(f"encoder.conv_blocks.{i}.attn.{j}", f"encoder/conv_blocks_{i}_attn_{j}", c)
        if i != levels - 1:
            rows += _conv(f"encoder.conv_blocks.{i}.downsample.conv",
                          f"encoder/conv_blocks_{i}_downsample", c, c, 3)
    rows += _mid("encoder", "encoder", c)
    for f in factors:
        a, fa = f"encoder.{ADAPTER_NAMES[f]}.0", f"encoder/{ADAPTER_NAMES[f]}"
        rows += [(f"{a}.positional_embedding", f"{fa}/positional_embedding", (g2, c), None)]
        rows += _norm(f"{a}.ln_pre", f"{fa}/ln_pre", c) + _norm(f"{a}.ln_post", f"{fa}/ln_post", c)
        for t in range(int(kw["adapter_layers"])):
            rows += _block(f"{a}.transformer.{t}", f"{fa}/transformer_{t}", c)
        rows += _norm(f"encoder.norm_out_{f}", f"encoder/norm_out_{f}", c)
        rows += _conv(f"encoder.conv_out_{f}", f"encoder/conv_out_{f}", z, c, 3)
    for i, f in enumerate(factors):
        rows += _conv(f"quant_conv_{f}", f"quant_convs_{i}", e, z, 1)
        rows += [(f"quantize_{f}.embedding.weight", f"quantize/quantizers_{i}/codebook", (k, e), None)]
    rows += _conv("post_quant_conv", "post_quant_conv", z, e * len(factors), 1)
    c = ch * mult[-1]
    rows += _conv("decoder.conv_in", "decoder/conv_in", c, z, 3) + _mid("decoder", "decoder", c)
    for l, i in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            rows += _res(f"decoder.conv_blocks.{l}.res.{j}", f"decoder/conv_blocks_{l}_res_{j}", c,
                         ch * mult[i])
            c = ch * mult[i]
            if l == 0:
                rows += _attn(f"decoder.conv_blocks.{l}.attn.{j}", f"decoder/conv_blocks_{l}_attn_{j}", c)
        if l != levels - 1:
            rows += _conv(f"decoder.conv_blocks.{l}.upsample.conv",
                          f"decoder/conv_blocks_{l}_upsample", c, c, 3)
    rows += _norm("decoder.norm_out", "decoder/norm_out", c)
    rows += _conv("decoder.conv_out", "decoder/conv_out", 3, c, 3)
    for i, (f, w) in enumerate(zip(factors, kw["head_widths"])):
        if not w:
            continue
        h, fh = HEAD_NAMES[f], f"heads_{i}"
        rows += _linear(f"{h}.upscale.0", f"{fh}/upscale_0", w, e)
        rows += _linear(f"{h}.upscale.2", f"{fh}/upscale_2", w, w)
        rows += [(f"{h}.class_embedding", f"{fh}/class_embedding", (1, w), None),
                 (f"{h}.positional_embedding", f"{fh}/positional_embedding", (g2 + 1, w), None)]
        rows += _norm(f"{h}.ln_pre", f"{fh}/ln_pre", w) + _norm(f"{h}.ln_post", f"{fh}/ln_post", w)
        for t in range(int(kw["head_layers"])):
            rows += _block(f"{h}.transformer.{t}", f"{fh}/transformer_{t}", w)
    return rows


def fqgan_quantizer_size(kw: Mapping[str, Any]) -> int:
    q = dict(kw["quantizer"])
    return int(q["codebook_size"])


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def infer_fqgan_kwargs(sd: Mapping[str, np.ndarray], image_size: int | None = None,
                       source: str = "state dict") -> dict[str, Any]:
    """The ``FQGAN`` kwargs of an official state dict (module docstring)."""
    factors = fqgan_variant(sd)
    if factors is None:
        raise ValueError(f"{source} is not an FQGAN state dict (no {PROBE_DUAL[1]!r})")

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"{source}: missing tensor {key!r}; cannot infer the FQGAN shape")
        return tuple(np.shape(sd[key]))
    ch = shape("encoder.conv_in.weight")[0]
    levels = _count(sd, r"encoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight$")
    n = _count(sd, r"encoder\.conv_blocks\.0\.res\.(\d+)\.conv1\.weight$")
    widths = [shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] for i in range(levels)]
    if not levels or any(w % ch for w in widths):
        raise ValueError(f"{source}: encoder level widths {widths} are not multiples of ch {ch}")
    k, e = shape(f"quantize_{factors[0]}.embedding.weight")
    z = shape(f"quant_conv_{factors[0]}.weight")[1]
    adapter = f"encoder.{ADAPTER_NAMES[factors[0]]}.0"
    g2 = shape(f"{adapter}.positional_embedding")[0]
    g = math.isqrt(g2)
    f = 2 ** (levels - 1)
    size = int(image_size) if image_size else g * f
    if size != g * f:
        raise ValueError(f"image_size {size}: the adapters' position tables fix a {g}x{g} grid, "
                         f"i.e. {g * f} px")
    heads = tuple(shape(f"{HEAD_NAMES[x]}.class_embedding")[1]
                  if f"{HEAD_NAMES.get(x, '')}.class_embedding" in sd else 0 for x in factors)
    head_layers = max([_count(sd, rf"{HEAD_NAMES[x]}\.transformer\.(\d+)\.ln_1\.weight$")
                       for x, w in zip(factors, heads) if w] or [3])
    return dict(image_size=size, ch=int(ch), ch_mult=tuple(w // ch for w in widths),
                num_res_blocks=n, z_channels=int(z), embed_dim=int(e), norm_groups=32,
                factors=factors,
                adapter_layers=_count(sd, rf"{re.escape(adapter)}\.transformer\.(\d+)\.ln_1\.weight$"),
                adapter_heads=8, head_widths=heads, head_layers=head_layers, head_heads=8,
                representation_weight=0.5,
                quantizer=fqgan_quantizer(len(factors), int(k), entropy_weight=0.03))


def fqgan_params_from_state_dict(sd: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any],
                                 source: str = "state dict") -> dict:
    """Official state dict -> ``FQGAN(**model_kwargs)`` params (float32 numpy); the
    ``codebook_used`` buffers are dropped; a missing, misshapen or left-over tensor is a one-line
    ``ValueError``."""
    reader = StateDictReader(sd, source)
    flat = {f: reader.take(t, shape, transform or (lambda x: x), what=f)
            for t, f, shape, transform in fqgan_name_table(model_kwargs)}
    reader.finish(ignore=[lambda k: k.endswith(".codebook_used")])
    params = unflatten(flat)
    check_tree_matches(params, _abstract_params(model_kwargs), source=f"{source} (converted)")
    return params


def _abstract_params(model_kwargs: Mapping[str, Any]) -> Any:
    return abstract_params({**FQGAN_DUAL_DS16, **dict(model_kwargs), "name": "fqgan"})


def fqgan_model_section(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The workdir ``model`` section (JSON-ready) of converted ``kwargs``."""
    return {"name": "fqgan", **dict(kwargs), "ch_mult": list(kwargs["ch_mult"]),
            "factors": list(kwargs["factors"]), "head_widths": list(kwargs["head_widths"]),
            "quantizer": {**dict(kwargs["quantizer"]),
                          "quantizer": dict(kwargs["quantizer"]["quantizer"])}}
