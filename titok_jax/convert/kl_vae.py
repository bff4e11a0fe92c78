"""diffusers ``AutoencoderKL`` (the SD / FlexTok VAE) -> :class:`titok_jax.models.kl_vae.KLVAE` params.

The shape is read from the tensors, never assumed (a FlexTok checkpoint may carry another VAE than
the SD one): ``base_channels = encoder.conv_in`` out channels, ``channel_mult`` from each down
block's first resnet, ``num_res_blocks`` = resnets in down block 0, ``latent_channels`` = half of
``quant_conv``'s outputs. Name table (``E`` = ``encoder.``, ``D`` = ``decoder.``; every conv and
dense has a bias, GroupNorm ``weight`` -> ``scale``)::

    E conv_in                               -> encoder/conv_in
    E down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut}
                                            -> encoder/down_{i}_resnet_{j}/...
    E down_blocks.{i}.downsamplers.0.conv   -> encoder/down_{i}_downsample
    {E,D} mid_block.resnets.{0,1}           -> {encoder,decoder}/mid_resnet_{0,1}
    {E,D} mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
                                            -> .../mid_attention/{norm,query,key,value,proj_out}
    {E,D} conv_norm_out, conv_out           -> .../norm_out, .../conv_out
    quant_conv                              -> encoder/quant_conv
    post_quant_conv                         -> decoder/post_quant_conv
    D up_blocks.{k}.resnets.{j}             -> decoder/up_{k}_resnet_{j}      (k = 0 deepest)
    D up_blocks.{k}.upsamplers.0.conv       -> decoder/up_{k}_upsample

Checked against the official FlexTok's VAE (diffusers) in tests/test_import_flextok.py.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from titok_jax.convert.common import StateDictReader, conv_kernel, identity, linear_kernel

DIFFUSERS_VAE_PROBE = "encoder.conv_in.weight"


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def infer_klvae_kwargs(sd: Mapping[str, np.ndarray], prefix: str = "", source: str = "state dict"
                       ) -> dict[str, Any]:
    """``KLVAE`` shape kwargs (base_channels, channel_mult, num_res_blocks, latent_channels) of the
    diffusers VAE whose keys start with ``prefix``."""
    probe = prefix + DIFFUSERS_VAE_PROBE
    if probe not in sd:
        raise ValueError(f"{source}: no diffusers AutoencoderKL here (missing {probe!r})")
    base = int(sd[probe].shape[0])
    levels = _count(sd, f"{prefix}encoder.down_blocks.")
    if levels < 1:
        raise ValueError(f"{source}: the VAE has no encoder.down_blocks")
    chans = [int(sd[f"{prefix}encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
             for i in range(levels)]
    if any(c % base for c in chans):
        raise ValueError(f"{source}: VAE level widths {chans} are not multiples of conv_in's "
                         f"{base}; titok_jax's KLVAE cannot hold them")
    quant = f"{prefix}quant_conv.weight"
    if quant not in sd:
        raise ValueError(f"{source}: missing tensor {quant!r}")
    return {"base_channels": base, "channel_mult": [c // base for c in chans],
            "num_res_blocks": _count(sd, f"{prefix}encoder.down_blocks.0.resnets."),
            "latent_channels": int(sd[quant].shape[0]) // 2}


def _resnet(src: str, dst: str, cin: int, cout: int) -> list[tuple]:
    rows = [(f"{src}.norm1.weight", f"{dst}/norm1/scale", (cin,), identity),
            (f"{src}.norm1.bias", f"{dst}/norm1/bias", (cin,), identity),
            (f"{src}.conv1.weight", f"{dst}/conv1/kernel", (cout, cin, 3, 3), conv_kernel),
            (f"{src}.conv1.bias", f"{dst}/conv1/bias", (cout,), identity),
            (f"{src}.norm2.weight", f"{dst}/norm2/scale", (cout,), identity),
            (f"{src}.norm2.bias", f"{dst}/norm2/bias", (cout,), identity),
            (f"{src}.conv2.weight", f"{dst}/conv2/kernel", (cout, cout, 3, 3), conv_kernel),
            (f"{src}.conv2.bias", f"{dst}/conv2/bias", (cout,), identity)]
    if cin != cout:
        rows += [(f"{src}.conv_shortcut.weight", f"{dst}/conv_shortcut/kernel", (cout, cin, 1, 1),
                  conv_kernel),
                 (f"{src}.conv_shortcut.bias", f"{dst}/conv_shortcut/bias", (cout,), identity)]
    return rows


def _conv(src: str, dst: str, cin: int, cout: int, k: int) -> list[tuple]:
    return [(f"{src}.weight", f"{dst}/kernel", (cout, cin, k, k), conv_kernel),
            (f"{src}.bias", f"{dst}/bias", (cout,), identity)]


def _norm(src: str, dst: str, c: int) -> list[tuple]:
    return [(f"{src}.weight", f"{dst}/scale", (c,), identity),
            (f"{src}.bias", f"{dst}/bias", (c,), identity)]


def _mid(src: str, dst: str, c: int) -> list[tuple]:
    a, b = f"{src}.mid_block.attentions.0", f"{dst}/mid_attention"
    rows = _resnet(f"{src}.mid_block.resnets.0", f"{dst}/mid_resnet_0", c, c)
    rows += _norm(f"{a}.group_norm", f"{b}/norm", c)
    for theirs, ours in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_out")):
        rows += [(f"{a}.{theirs}.weight", f"{b}/{ours}/kernel", (c, c), linear_kernel),
                 (f"{a}.{theirs}.bias", f"{b}/{ours}/bias", (c,), identity)]
    return rows + _resnet(f"{src}.mid_block.resnets.1", f"{dst}/mid_resnet_1", c, c)


def klvae_rows(kw: Mapping[str, Any], prefix: str = "") -> list[tuple]:
    """``(torch key, our path, torch shape, transform)`` for every param of the VAE ``kw``."""
    base, lat, nres = int(kw["base_channels"]), int(kw["latent_channels"]), int(kw["num_res_blocks"])
    chans = [base * int(m) for m in kw["channel_mult"]]
    e, d = f"{prefix}encoder", f"{prefix}decoder"
    rows = _conv(f"{e}.conv_in", "encoder/conv_in", 3, chans[0], 3)
    cin = chans[0]
    for i, c in enumerate(chans):
        for j in range(nres):
            rows += _resnet(f"{e}.down_blocks.{i}.resnets.{j}", f"encoder/down_{i}_resnet_{j}", cin, c)
            cin = c
        if i < len(chans) - 1:
            rows += _conv(f"{e}.down_blocks.{i}.downsamplers.0.conv", f"encoder/down_{i}_downsample",
                          c, c, 3)
    rows += _mid(e, "encoder", chans[-1])
    rows += _norm(f"{e}.conv_norm_out", "encoder/norm_out", chans[-1])
    rows += _conv(f"{e}.conv_out", "encoder/conv_out", chans[-1], 2 * lat, 3)
    rows += _conv(f"{prefix}quant_conv", "encoder/quant_conv", 2 * lat, 2 * lat, 1)
    rows += _conv(f"{prefix}post_quant_conv", "decoder/post_quant_conv", lat, lat, 1)
    rows += _conv(f"{d}.conv_in", "decoder/conv_in", lat, chans[-1], 3)
    rows += _mid(d, "decoder", chans[-1])
    cin = chans[-1]
    for k, i in enumerate(reversed(range(len(chans)))):
        for j in range(nres + 1):
            rows += _resnet(f"{d}.up_blocks.{k}.resnets.{j}", f"decoder/up_{k}_resnet_{j}", cin, chans[i])
            cin = chans[i]
        if i > 0:
            rows += _conv(f"{d}.up_blocks.{k}.upsamplers.0.conv", f"decoder/up_{k}_upsample",
                          chans[i], chans[i], 3)
    rows += _norm(f"{d}.conv_norm_out", "decoder/norm_out", chans[0])
    rows += _conv(f"{d}.conv_out", "decoder/conv_out", chans[0], 3, 3)
    return rows


def klvae_flat_params(reader: StateDictReader, kw: Mapping[str, Any], prefix: str = "",
                      dst_prefix: str = "") -> dict[str, np.ndarray]:
    """Take every VAE tensor through ``reader``: ``{dst_prefix + our path: array}``."""
    return {dst_prefix + path: reader.take(key, shape, fn, what="the VAE")
            for key, path, shape, fn in klvae_rows(kw, prefix)}


def diffusers_vae_params(path: str) -> dict[str, Any]:
    """Our nested ``KLVAE`` params from a diffusers ``AutoencoderKL`` file (e.g. the released
    ``diffusion_pytorch_model.safetensors`` of ``EPFL-VILAB/flextok_vae_c16``), shape from its
    tensors, every tensor consumed."""
    from titok_jax.convert.common import read_state_dict
    from titok_jax.trees import unflatten
    sd = read_state_dict(path)
    reader = StateDictReader(sd, path)
    flat = klvae_flat_params(reader, infer_klvae_kwargs(sd, "", path))
    reader.finish()
    return unflatten(flat)
