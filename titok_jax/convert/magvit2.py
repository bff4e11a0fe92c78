"""Open-MAGVIT2 image tokenizer checkpoints (TencentARC/SEED-Voken, Lightning ``.ckpt``) -> our params.

Input: the Lightning checkpoint of ``src.Open_MAGVIT2.models.lfqgan.VQModel`` (weights under
``state_dict``; read weights-only by ``convert.common.read_state_dict``, no ``lightning`` needed) or
a bare state dict (``.bin`` / ``.pth`` / ``.safetensors``). Its ``state_dict`` holds

- the raw weights ``encoder.*`` / ``decoder.*`` (LFQ has no persistent tensors);
- with ``use_ema: True`` (every released config) the EMA weights under ``model_ema.`` + the raw
  name with every dot removed (``encoder.down.0.block.1.conv1.weight`` ->
  ``model_ema.encoderdown0block1conv1weight``), plus ``model_ema.decay`` / ``num_updates``;
- ``loss.*`` (the PatchGAN with its BatchNorm buffers, the frozen LPIPS) and their EMA copies
  ``model_ema.loss*``: training-only, dropped.

OM2 evaluates with the EMA weights (``ema_scope``), so ``weights="auto"`` (the default) takes them
when the checkpoint has them (all of them), else the raw ones; ``"ema"`` / ``"raw"`` force one
(the AR models' first stage loads the raw ones). Name table (``E`` = ``encoder.``, ``D`` = ``decoder.``; PyTorch
``Conv2d [out, in, kh, kw]`` -> Flax ``[kh, kw, in, out]``, ``Linear [out, in]`` -> ``[in, out]``,
GroupNorm ``weight`` -> ``scale``)::

    E conv_in (no bias), norm_out, conv_out (1x1)  -> encoder/{conv_in,norm_out,conv_out}
    E down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}   (convs without bias)
                                                   -> encoder/down_{i}_block_{j}/...
    E down.{i}.downsample                          -> encoder/down_{i}_downsample      (i < L-1)
    E mid_block.{j}                                -> encoder/mid_block_{j}
    D conv_in, mid_block.{j}, norm_out, conv_out   -> decoder/...
    D adaptive.{i}.{gamma,beta}                    -> decoder/adaptive_{i}/{gamma,beta} (Dense)
    D up.{i}.block.{j}                             -> decoder/up_{i}_block_{j}
    D up.{i}.upsample.conv1                        -> decoder/up_{i}_upsample          (i > 0)

``decoder.up[i]`` and ``decoder.adaptive[i]`` are resolution level ``i`` (OM2 builds them top
level first and prepends). The shape (``ch``, ``ch_mult``, ``num_res_blocks``, ``z_channels``) is
read from the tensors (:func:`infer_magvit2_kwargs`); ``image_size`` defaults to a 16x16 grid
(128 for 4 levels, 256 for 5: the releases). Every tensor is consumed or dropped by the rules
above, every param filled and every shape checked; the first problem is a one-line
``ValueError`` naming the tensor (``convert.common.StateDictReader``).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from titok_jax.convert.common import StateDictReader
from titok_jax.convert.compvis_names import (Entry, abstract_params, conv_rows as _conv,
                                           linear_rows as _linear, norm_rows as _norm,
                                           resnet_rows)
from titok_jax.models.magvit2 import DEFAULT_QUANTIZER, OPEN_MAGVIT2_128
from titok_jax.trees import check_tree_matches, unflatten

EMA_PREFIX = "model_ema."
PROBE = ("encoder.conv_in.weight", "decoder.adaptive.0.gamma.weight")
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
WEIGHT_CHOICES = ("auto", "ema", "raw")
MAX_EXACT_GROUP = 24   # quantizers.lfq.MAX_GROUP_BITS: the exact mixture of up to 2^24 codes


def ema_key(key: str) -> str:
    """The EMA copy's name of a raw parameter name (``LitEma``: dots removed, ``model_ema.``)."""
    return EMA_PREFIX + key.replace(".", "")


def is_magvit2(keys: Any) -> bool:
    """An Open-MAGVIT2 image tokenizer state dict: its decoder's AdaGN layers (raw or EMA names)."""
    keys = set(keys)
    return all(k in keys or ema_key(k) in keys for k in PROBE)


def _resblock(t: str, f: str, c_in: int, c_out: int) -> list[Entry]:
    """Open-MAGVIT2's ResBlock: the CompVis rows without conv biases."""
    return resnet_rows(t, f, c_in, c_out, bias=False)


def _shape_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    kw = {**OPEN_MAGVIT2_128, **dict(kwargs)}
    return dict(ch=int(kw["ch"]), ch_mult=tuple(int(m) for m in kw["ch_mult"]),
                num_res_blocks=int(kw["num_res_blocks"]), z_channels=int(kw["z_channels"]))


def magvit2_name_table(model_kwargs: Mapping[str, Any]) -> list[Entry]:
    """Every raw row of the official state dict of ``Magvit2(**model_kwargs)`` (``loss.*`` and the
    ``model_ema.*`` copies aside)."""
    kw = _shape_kwargs(model_kwargs)
    ch, mult, n, z = kw["ch"], kw["ch_mult"], kw["num_res_blocks"], kw["z_channels"]
    levels = len(mult)
    rows = _conv("encoder.conv_in", "encoder/conv_in", ch, 3, 3, bias=False)
    c_in = ch
    for i, m in enumerate(mult):
        for j in range(n):
            rows += _resblock(f"encoder.down.{i}.block.{j}", f"encoder/down_{i}_block_{j}", c_in,
                              ch * m)
            c_in = ch * m
        if i != levels - 1:
            rows += _conv(f"encoder.down.{i}.downsample", f"encoder/down_{i}_downsample", c_in,
                          c_in, 3)
    for j in range(n):
        rows += _resblock(f"encoder.mid_block.{j}", f"encoder/mid_block_{j}", c_in, c_in)
    rows += _norm("encoder.norm_out", "encoder/norm_out", c_in)
    rows += _conv("encoder.conv_out", "encoder/conv_out", z, c_in, 1)
    c_in = ch * mult[-1]
    rows += _conv("decoder.conv_in", "decoder/conv_in", c_in, z, 3)
    for j in range(n):
        rows += _resblock(f"decoder.mid_block.{j}", f"decoder/mid_block_{j}", c_in, c_in)
    for i in reversed(range(levels)):
        for name in ("gamma", "beta"):
            rows += _linear(f"decoder.adaptive.{i}.{name}", f"decoder/adaptive_{i}/{name}", c_in, z)
        for j in range(n):
            rows += _resblock(f"decoder.up.{i}.block.{j}", f"decoder/up_{i}_block_{j}", c_in,
                              ch * mult[i])
            c_in = ch * mult[i]
        if i != 0:
            rows += _conv(f"decoder.up.{i}.upsample.conv1", f"decoder/up_{i}_upsample", 4 * c_in,
                          c_in, 3)
    rows += _norm("decoder.norm_out", "decoder/norm_out", c_in)
    rows += _conv("decoder.conv_out", "decoder/conv_out", 3, c_in, 3)
    return rows


def _lookup(sd: Mapping[str, Any]) -> Callable[[str], Any]:
    """``key -> tensor`` from the raw name or, failing that, its EMA copy (for shape inference)."""
    def get(key: str) -> Any:
        return sd[key] if key in sd else sd.get(ema_key(key))
    return get


def _levels(sd: Mapping[str, Any]) -> dict[int, set[int]]:
    raw = re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight$")
    ema = re.compile(r"model_ema\.encoderdown(\d+)block(\d+)conv1weight$")
    out: dict[int, set[int]] = {}
    for key in sd:
        m = raw.match(key) or ema.match(key)
        if m:
            out.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return out


def default_quantizer(bits: int) -> dict[str, Any]:
    """OM2's LFQ and loss weights (``models.magvit2.DEFAULT_QUANTIZER``) for ``bits`` channels."""
    q = {**DEFAULT_QUANTIZER, "bits": int(bits), "batch_entropy_group_size": int(bits)}
    if bits > MAX_EXACT_GROUP:   # LFQ's default grouping splits a larger mixture
        del q["batch_entropy_group_size"]
    return q


def infer_magvit2_kwargs(sd: Mapping[str, np.ndarray], image_size: int | None = None,
                         source: str = "state dict") -> dict[str, Any]:
    """The ``Magvit2`` kwargs of an OM2 state dict: ``ch`` (``encoder.conv_in`` width),
    ``ch_mult`` (``encoder.down.{i}.block.0.conv1`` widths / ``ch``), ``num_res_blocks``,
    ``z_channels`` (``encoder.conv_out``; the LFQ bits), OM2's LFQ, and ``image_size`` (default:
    a 16x16 grid, ``16 * 2**(levels - 1)``)."""
    if not is_magvit2(sd):
        missing = next(k for k in PROBE if k not in sd and ema_key(k) not in sd)
        raise ValueError(f"{source} is not an Open-MAGVIT2 state dict (no {missing!r})")
    get = _lookup(sd)
    blocks = _levels(sd)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{source}: no consecutive encoder.down.{{i}}.block.{{j}} tensors; "
                         "not an Open-MAGVIT2 encoder")
    counts = {len(b) for b in blocks.values()}
    if len(counts) != 1:
        raise ValueError(f"{source}: the encoder levels have different numbers of blocks")
    shapes = {}
    for key in ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight"] + [
            f"encoder.down.{i}.block.0.conv1.weight" for i in sorted(blocks)]:
        if get(key) is None:
            raise ValueError(f"{source}: missing tensor {key!r}; cannot infer the Open-MAGVIT2 shape")
        shapes[key] = tuple(np.shape(get(key)))
    ch = shapes["encoder.conv_in.weight"][0]
    widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in sorted(blocks)]
    if any(w % ch for w in widths):
        raise ValueError(f"{source}: level widths {widths} are not multiples of ch = {ch}")
    z = shapes["encoder.conv_out.weight"][0]
    if shapes["decoder.conv_in.weight"][1] != z:
        raise ValueError(f"{source}: encoder.conv_out gives {z} channels but the decoder reads "
                         f"{shapes['decoder.conv_in.weight'][1]}")
    if not 1 <= z <= 31:
        raise ValueError(f"{source}: {z} latent channels cannot be LFQ bits (1..31)")
    f = 2 ** (len(widths) - 1)
    size = int(image_size) if image_size else 16 * f
    if size % f:
        raise ValueError(f"image_size {size} is not a multiple of the downsampling factor {f}")
    return dict(image_size=size, ch=int(ch), ch_mult=tuple(w // ch for w in widths),
                num_res_blocks=counts.pop(), z_channels=int(z), quantizer=default_quantizer(z))


def has_ema(sd: Mapping[str, Any], model_kwargs: Mapping[str, Any]) -> bool:
    """Whether ``sd`` holds EMA copies (of any parameter of the name table)."""
    return any(ema_key(t) in sd for t, _, _, _ in magvit2_name_table(model_kwargs))


def magvit2_params_from_state_dict(sd: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any],
                                   source: str = "state dict", weights: str = "auto") -> dict:
    """OM2 state dict -> ``Magvit2(**model_kwargs)`` params (float32 numpy). ``weights``: "auto"
    (the EMA copies when the state dict has any - then all must be there -, else the raw
    weights), "ema" or "raw". ``loss.*``,
    ``model_ema.loss*``, the EMA bookkeeping and the copy not chosen are dropped; a missing,
    misshapen or left-over tensor is a one-line ``ValueError``."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    table = magvit2_name_table(model_kwargs)
    use_ema = has_ema(sd, model_kwargs) if weights == "auto" else weights == "ema"
    name = ema_key if use_ema else (lambda t: t)
    reader = StateDictReader(sd, source)
    flat = {f: reader.take(name(t), shape, transform or (lambda x: x), what=f)
            for t, f, shape, transform in table}
    other = {ema_key(t) for t, _, _, _ in table} if not use_ema else {t for t, _, _, _ in table}
    reader.finish(ignore=[lambda k: k.startswith("loss.") or k.startswith(EMA_PREFIX + "loss"),
                          lambda k: k in EMA_BOOKKEEPING or k in other])
    params = unflatten(flat)
    check_tree_matches(params, _abstract_params(model_kwargs), source=f"{source} (converted)")
    return params


def _abstract_params(model_kwargs: Mapping[str, Any]) -> Any:
    return abstract_params({**OPEN_MAGVIT2_128, **dict(model_kwargs), "name": "magvit2"})


def magvit2_model_section(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The workdir ``model`` section (JSON-ready) of converted ``kwargs``."""
    return {"name": "magvit2", **dict(kwargs), "ch_mult": list(kwargs["ch_mult"]),
            "quantizer": dict(kwargs["quantizer"])}
