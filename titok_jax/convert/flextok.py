"""A released FlexTok ``model.safetensors`` (apple/ml-flextok, HF ``EPFL-VILAB/flextok_*``) -> our
``flextok`` params and model kwargs. No torch needed.

The release stores its Hydra config in the safetensors ``__metadata__`` (one ``str(dict)`` per
top-level key, parsed with ``ast.literal_eval`` as the official ``flextok.utils.checkpoint`` does):
``vae`` / ``encoder`` / ``decoder`` / ``regularizer`` / ``pipeline`` / ``flow_matching_noise_module``,
the encoder and decoder each a ``SequentialModuleDictWrapper`` whose ``module_dict`` lists official
modules by ``_target_``. The modules are found by their class, not their names, and the settings
that differ between releases are read from them:

====================================  ==================================================
official module (``_target_`` class)  what we read
====================================  ==================================================
``StableDiffusionVAE``                ``scaling_factor``, ``sample_posterior``; shape from tensors
``PatchEmbedder`` (enc / dec)         patch size, channels, width
``Registers1D`` (enc)                 ``n_max`` = number of registers
``BlockWiseSequencePacker``           ``causal_last`` (enc) / ``full`` + per-sub-sequence adaLN (dec)
``FlexTransformer`` (enc / dec)       width, depth, head dim, ``adaLN_expansion`` 2 (dec), REPA layer
``LinearHead`` (enc)                  the register -> FSQ projection (LayerNorm, no affine)
``LinearLayer`` (dec)                 FSQ codes -> width
``PositionalEmbeddingAdder``          2D ``sincos`` on patches (checked against the stored table);
                                      ``learnable_sum`` on the decoder's registers
``MaskedNestedDropout``               ``size_sampling_mode`` -> ``nested_dropout``
``LearnedNullCond`` / ``ZeroNullCond``  ``null_cond`` learned / single_token / zeros, ``dropout_prob``
``TimestepEmbedder``                  ``max_timestep`` (frequency size must be 256)
``ToPatchesLinearHead``               ``head_adaln`` (whether ``adaLN_emb_read_key`` is set)
``FSQ`` (regularizer)                 ``levels``
====================================  ==================================================

The decoder's register chain must run ``LinearLayer -> register posemb -> MaskedNestedDropout ->
null condition`` (dropped slots carry the bare mask token; the null condition replaces every slot),
the order titok_jax implements; another order, an unknown module with weights, or a setting we do
not implement is refused with one line naming it. ``image_size`` defaults to the largest grid of the
patch position table (``max_sizes`` x patch x VAE factor); any smaller multiple decodes the same
(the official tables are cropped, and a crop of a square row-first table is the smaller table).

Name table (``E``/``D`` = ``encoder.``/``decoder.module_dict.<name>.``, PyTorch ``Linear [out, in]``
-> ``Dense [in, out]``)::

    E<patches>.patch_proj            -> encoder/patch_embed/proj
    E<registers>.registers [R, W]    -> encoder/registers
    E<trunk>.blocks.{i}.attn.{wq,wk,wv} [W, W] -> encoder/block_{i}/attn/{query,key,value} [W, H, hd]
    E<trunk>.blocks.{i}.attn.proj    -> .../attn/out [H, hd, W]
    E<trunk>.blocks.{i}.mlp.{fc1,fc3,fc2} -> .../mlp/{gate,value,fc_out}    (SwiGLU)
    E<head>.proj                     -> encoder/to_codes
    D<from_latents>.proj             -> decoder/from_codes
    D<register posemb>.posembs [1, 1, W, R] -> decoder/register_posemb [R, W]
    D<nested dropout>.dropout_mask_token   -> decoder/mask_token
    D<null cond>.nullcond            -> decoder/null_token          (learned / single token)
    D<patches>.patch_proj            -> decoder/patch_embed/proj
    D<time>.mlp.{0,2}                -> decoder/time_embed/{fc_in,fc_out}
    D<trunk>.blocks.{i}.adaLN_modulation.1 [12 W, W] -> decoder/block_{i}/adaln [W, 12, W]
                                        (chunks 0-5 patches, 6-11 registers)
    D<trunk>.blocks.{i}.attn / mlp   -> as the encoder
    D<head>.proj                     -> decoder/head
    D<head>.adaLN_modulation.1 [2 W, W] -> decoder/head_adaln [W, 2, W]   (shift, scale)
    vae.vae.*                        -> vae/*  (convert.kl_vae)
    *.posembs of the 2D sin-cos tables: not parameters here (recomputed; checked equal)

With ``scan_layers`` in the kwargs the blocks are stacked (``{encoder,decoder}/layers/block/...``,
``titok_jax.nn.scan``); imported workdirs say ``scan_layers: false``.

Checked against the official code on tiny random models (tests/data/flextok/make_vectors.py,
tests/test_import_flextok.py): equal token ids, latents and decodes to float32 round-off.
"""
from __future__ import annotations

import ast
import os
from typing import Any, Mapping

import numpy as np

from titok_jax.convert.common import (StateDictReader, identity, linear_kernel, out_kernel,
                                      read_state_dict)
from titok_jax.convert.kl_vae import infer_klvae_kwargs, klvae_flat_params
from titok_jax.models.flextok_blocks import NESTED_MODES
from titok_jax.nn.scan import match_layers
from titok_jax.trees import check_tree_matches, unflatten

VAE_PREFIX = "vae.vae."
CONFIG_KEYS = ("vae", "encoder", "decoder", "regularizer")
# official modules that carry no weights and change nothing we compute
PASSIVE = ("PerSampleOp", "SequenceUnpacker", "DictKeyFilter", "PerSampleReducer")


def is_flextok(keys: Any) -> bool:
    keys = list(keys)
    return (any(k.startswith("encoder.module_dict.") for k in keys)
            and any(k.startswith("decoder.module_dict.") for k in keys)
            and any(k.startswith(VAE_PREFIX) for k in keys))


def read_metadata(path: str) -> dict[str, Any]:
    """The release's config: safetensors ``__metadata__`` values parsed as Python literals."""
    from safetensors import safe_open
    try:
        with safe_open(path, "np") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    out = {}
    for k, v in raw.items():
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def read_release(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(state dict, config)`` of a FlexTok ``model.safetensors``."""
    sd = read_state_dict(path)
    cfg = read_metadata(path)
    missing = [k for k in CONFIG_KEYS if not isinstance(cfg.get(k), Mapping)]
    if missing:
        raise ValueError(f"{path}: the FlexTok config is missing from the safetensors metadata "
                         f"(no {missing[0]!r} section); save it with flextok.utils.checkpoint."
                         "save_safetensors(..., metadata_dict=config)")
    return sd, cfg


# ----------------------------------------------------------------------------- config reading
def _cls(node: Mapping[str, Any]) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def _modules(cfg: Mapping[str, Any], side: str, source: str) -> list[tuple[str, dict]]:
    md = cfg.get(side, {}).get("module_dict")
    if not isinstance(md, Mapping) or not md:
        raise ValueError(f"{source}: config.{side} has no module_dict")
    return [(str(name), dict(node)) for name, node in md.items() if isinstance(node, Mapping)]


class _Side:
    """The modules of one side (encoder / decoder) by class, with their order."""

    def __init__(self, cfg: Mapping[str, Any], side: str, source: str):
        self.side, self.source = side, source
        self.mods = _modules(cfg, side, source)

    def find(self, cls: str, pred=lambda node: True, required: bool = True
             ) -> tuple[str, dict, int] | None:
        hits = [(n, node, i) for i, (n, node) in enumerate(self.mods)
                if _cls(node) == cls and pred(node)]
        if len(hits) > 1:
            raise ValueError(f"{self.source}: config.{self.side} has {len(hits)} {cls} modules "
                             f"({', '.join(h[0] for h in hits)}); titok_jax's FlexTok has one")
        if not hits:
            if required:
                raise ValueError(f"{self.source}: config.{self.side} has no {cls} module; this is "
                                 "not a FlexTok layout titok_jax imports")
            return None
        return hits[0]


def _no_unknown(side: _Side, known: set[str]) -> None:
    for name, node in side.mods:
        c = _cls(node)
        if c not in known and c not in PASSIVE:
            raise ValueError(f"{side.source}: config.{side.side}.module_dict.{name} is a {c} "
                             "(not part of the FlexTok layout titok_jax implements)")


def _trunk_settings(node: Mapping[str, Any], where: str, source: str) -> None:
    want = {"mlp_ratio": 4.0, "qkv_bias": False, "proj_bias": False, "mlp_bias": False,
            "gated_mlp": True, "qk_norm": True}
    for key, value in want.items():
        got = node.get(key, value)
        if got != value:
            raise ValueError(f"{source}: {where}.{key} = {got!r}; titok_jax's FlexTok implements "
                             f"{value!r}")


def flextok_kwargs_from_release(cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray],
                                source: str = "model.safetensors",
                                image_size: int | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """``(FlexTok kwargs, {role: official module name})`` from a release's config and tensors."""
    enc, dec = _Side(cfg, "encoder", source), _Side(cfg, "decoder", source)
    names: dict[str, str] = {}

    e_patch = enc.find("PatchEmbedder")
    e_pos = enc.find("PositionalEmbeddingAdder")
    e_regs = enc.find("Registers1D")
    e_pack = enc.find("BlockWiseSequencePacker")
    e_trunk = enc.find("FlexTransformer")
    e_head = enc.find("LinearHead")
    _no_unknown(enc, {"PatchEmbedder", "PositionalEmbeddingAdder", "Registers1D",
                      "BlockWiseSequencePacker", "FlexTransformer", "LinearHead"})
    d_lin = dec.find("LinearLayer")
    d_rpos = dec.find("PositionalEmbeddingAdder", lambda n: n.get("posemb_type") != "sincos")
    d_drop = dec.find("MaskedNestedDropout")
    d_null = dec.find("LearnedNullCond", required=False) or dec.find("ZeroNullCond")
    d_patch = dec.find("PatchEmbedder")
    d_pos = dec.find("PositionalEmbeddingAdder", lambda n: n.get("posemb_type", "sincos") == "sincos")
    d_time = dec.find("TimestepEmbedder")
    d_pack = dec.find("BlockWiseSequencePacker")
    d_trunk = dec.find("FlexTransformer")
    d_head = dec.find("ToPatchesLinearHead")
    _no_unknown(dec, {"LinearLayer", "PositionalEmbeddingAdder", "MaskedNestedDropout",
                      "LearnedNullCond", "ZeroNullCond", "PatchEmbedder", "TimestepEmbedder",
                      "BlockWiseSequencePacker", "FlexTransformer", "ToPatchesLinearHead"})
    for role, hit in (("e_patch", e_patch), ("e_pos", e_pos), ("e_regs", e_regs),
                      ("e_trunk", e_trunk), ("e_head", e_head), ("d_lin", d_lin),
                      ("d_rpos", d_rpos), ("d_drop", d_drop), ("d_null", d_null),
                      ("d_patch", d_patch), ("d_pos", d_pos), ("d_time", d_time),
                      ("d_trunk", d_trunk), ("d_head", d_head)):
        names[role] = hit[0]

    # the register chain's order is the maths: posemb, then the mask token, then the null cond
    chain = [("LinearLayer", d_lin), ("the register position embedding", d_rpos),
             ("MaskedNestedDropout", d_drop), ("the null condition", d_null)]
    for (a, ha), (b, hb) in zip(chain, chain[1:]):
        if ha[2] > hb[2]:
            raise ValueError(f"{source}: the decoder applies {b} ({hb[0]}) before {a} ({ha[0]}); "
                             "titok_jax's FlexTok implements LinearLayer -> register posemb -> "
                             "nested dropout -> null condition")
    if e_pack[1].get("mask_mode") != "causal_last":
        raise ValueError(f"{source}: encoder packer mask_mode {e_pack[1].get('mask_mode')!r}; "
                         "titok_jax implements 'causal_last'")
    if d_pack[1].get("mask_mode", "full") != "full" or not d_pack[1].get("per_subseq_embs", False):
        raise ValueError(f"{source}: the decoder packer must be mask_mode 'full' with "
                         "per_subseq_embs (adaLN per patches / registers)")
    for hit, where in ((e_pos, "encoder"), (d_pos, "decoder")):
        if hit[1].get("posemb_type", "sincos") != "sincos" or \
                hit[1].get("posemb_scaling", "absolute") != "absolute":
            raise ValueError(f"{source}: {where} patch position embedding {hit[0]} is not an "
                             "'absolute' 2D 'sincos' table")
    if d_rpos[1].get("posemb_type") != "learnable_sum" or len(d_rpos[1].get("max_sizes", [])) != 1:
        raise ValueError(f"{source}: the decoder register position embedding {d_rpos[0]} is not a "
                         "1D 'learnable_sum' table")
    if int(d_trunk[1].get("adaLN_expansion", 1)) != 2 or not d_trunk[1].get("adaLN_emb_read_key"):
        raise ValueError(f"{source}: the decoder trunk must be adaLN-conditioned with "
                         "adaLN_expansion 2 (patches / registers)")
    if e_trunk[1].get("adaLN_emb_read_key"):
        raise ValueError(f"{source}: an adaLN-conditioned encoder is not implemented")
    _trunk_settings(e_trunk[1], f"encoder.{e_trunk[0]}", source)
    _trunk_settings(d_trunk[1], f"decoder.{d_trunk[0]}", source)
    if int(d_time[1].get("frequency_embedding_size", 256)) != 256:
        raise ValueError(f"{source}: TimestepEmbedder frequency_embedding_size must be 256")
    if e_regs[1].get("ordering_mode", "nested") != "nested":
        raise ValueError(f"{source}: Registers1D ordering_mode must be 'nested'")

    head_dims = {int(e_trunk[1].get("head_dim", 64)), int(d_trunk[1].get("head_dim", 64))}
    if len(head_dims) != 1:
        raise ValueError(f"{source}: encoder and decoder head dims differ ({sorted(head_dims)}); "
                         "titok_jax's FlexTok uses one head_dim")
    patch = [int(v) for v in e_patch[1]["patch_sizes"]]
    if len(set(patch)) != 1 or [int(v) for v in d_patch[1]["patch_sizes"]] != patch:
        raise ValueError(f"{source}: patch sizes {patch} / {d_patch[1]['patch_sizes']}: titok_jax "
                         "needs one square patch for encoder and decoder")
    levels = [int(v) for v in cfg["regularizer"].get("levels", [])]
    if not levels or _cls(cfg["regularizer"]) != "FSQ":
        raise ValueError(f"{source}: the regularizer is not an FSQ with levels")
    if int(e_head[1].get("dim_out", -1)) != len(levels) or \
            int(d_lin[1].get("dim_in", -1)) != len(levels):
        raise ValueError(f"{source}: the encoder head / decoder input width is not the FSQ "
                         f"dimension {len(levels)}")
    if e_head[1].get("adaLN_emb_read_key") or e_head[1].get("norm_layer", "default") is None:
        raise ValueError(f"{source}: the encoder head must be LayerNorm -> Linear (no adaLN)")

    vae_cfg = dict(cfg["vae"])
    vae = infer_klvae_kwargs(sd, VAE_PREFIX, source)
    if int(vae_cfg.get("latent_channels", vae["latent_channels"])) != vae["latent_channels"]:
        raise ValueError(f"{source}: config.vae.latent_channels {vae_cfg.get('latent_channels')} "
                         f"!= the VAE tensors' {vae['latent_channels']}")
    scaling = vae_cfg.get("scaling_factor")
    if scaling is None:
        raise ValueError(f"{source}: config.vae.scaling_factor is not set (the official code then "
                         "takes it from a diffusers config this file does not carry)")
    f = 2 ** (len(vae["channel_mult"]) - 1)
    grid = [int(v) for v in e_pos[1]["max_sizes"]]
    if len(set(grid)) != 1:
        raise ValueError(f"{source}: non-square patch position table {grid}")
    size = int(image_size) if image_size else grid[0] * patch[0] * f
    if size % (f * patch[0]) or size // (f * patch[0]) > grid[0]:
        raise ValueError(f"image_size {size}: must be a multiple of {f * patch[0]} and at most "
                         f"{grid[0] * patch[0] * f} (the released position table)")
    null_cls = _cls(d_null[1])
    null = ("zeros" if null_cls == "ZeroNullCond" else
            "single_token" if d_null[1].get("replace_with_single_token") else "learned")
    mode = str(d_drop[1].get("size_sampling_mode", "uniform"))
    if mode not in NESTED_MODES or mode == "none":
        raise ValueError(f"{source}: nested dropout size_sampling_mode {mode!r} is not one of "
                         f"{', '.join(m for m in NESTED_MODES if m != 'none')}")
    repa_layers = list(d_trunk[1].get("intermediate_layers") or [])
    kw = {
        "image_size": size,
        "vae_latent_channels": vae["latent_channels"], "vae_base_channels": vae["base_channels"],
        "vae_channel_mult": vae["channel_mult"], "vae_num_res_blocks": vae["num_res_blocks"],
        "vae_scaling_factor": float(scaling),
        "vae_sample_posterior": bool(vae_cfg.get("sample_posterior", True)),
        "patch_size": patch[0],
        "encoder_width": int(e_trunk[1].get("dim", 768)), "encoder_depth": int(e_trunk[1].get("depth", 12)),
        "decoder_width": int(d_trunk[1].get("dim", 768)), "decoder_depth": int(d_trunk[1].get("depth", 12)),
        "head_dim": head_dims.pop(), "num_registers": int(e_regs[1]["n_max"]),
        "fsq_levels": levels, "nested_dropout": mode,
        "cfg_dropout": float(d_null[1].get("dropout_prob", 0.0)), "null_cond": null,
        "max_timestep": float(d_time[1].get("max_timestep", 1000.0)),
        "head_adaln": bool(d_head[1].get("adaLN_emb_read_key")),
        "repa_layer": int(repa_layers[0]) if repa_layers else 1, "repa_dim": 0,
    }
    return kw, names


# ----------------------------------------------------------------------------- weights
def _heads_kernel(heads: int):
    """torch ``[W, W]`` q/k/v projection -> ``[W, heads, W/heads]``."""
    return lambda w: np.ascontiguousarray(w.T.reshape(w.shape[1], heads, w.shape[0] // heads))


def _chunked_kernel(n: int):
    """torch ``[n W, W]`` (n chunks of W outputs) -> ``[W, n, W]``."""
    def f(x: np.ndarray) -> np.ndarray:
        w = x.shape[1]
        return np.ascontiguousarray(x.reshape(n, w, w).transpose(2, 0, 1))
    return f


def _trunk_rows(src: str, dst: str, width: int, depth: int, head_dim: int, adaln: bool) -> list[tuple]:
    heads, hid = width // head_dim, int(2 * int(width * 4.0) / 3)
    rows = []
    for i in range(depth):
        b, d = f"{src}.blocks.{i}.", f"{dst}/block_{i}/"
        for theirs, ours in (("wq", "query"), ("wk", "key"), ("wv", "value")):
            rows.append((f"{b}attn.{theirs}.weight", f"{d}attn/{ours}/kernel", (width, width),
                         _heads_kernel(heads)))
        rows += [(f"{b}attn.proj.weight", f"{d}attn/out/kernel", (width, width), out_kernel(heads)),
                 (f"{b}mlp.fc1.weight", f"{d}mlp/gate/kernel", (hid, width), linear_kernel),
                 (f"{b}mlp.fc3.weight", f"{d}mlp/value/kernel", (hid, width), linear_kernel),
                 (f"{b}mlp.fc2.weight", f"{d}mlp/fc_out/kernel", (width, hid), linear_kernel)]
        if adaln:
            rows += [(f"{b}adaLN_modulation.1.weight", f"{d}adaln/kernel", (12 * width, width),
                      _chunked_kernel(12)),
                     (f"{b}adaLN_modulation.1.bias", f"{d}adaln/bias", (12 * width,),
                      lambda x: x.reshape(12, -1))]
    return rows


def _linear(src: str, dst: str, cin: int, cout: int) -> list[tuple]:
    return [(f"{src}.weight", f"{dst}/kernel", (cout, cin), linear_kernel),
            (f"{src}.bias", f"{dst}/bias", (cout,), identity)]


def flextok_rows(kw: Mapping[str, Any], names: Mapping[str, str]) -> list[tuple]:
    """``(torch key, our path, torch shape, transform)`` of every FlexTok (non-VAE) param."""
    E = lambda role: f"encoder.module_dict.{names[role]}"  # noqa: E731
    D = lambda role: f"decoder.module_dict.{names[role]}"  # noqa: E731
    we, wd, hd = kw["encoder_width"], kw["decoder_width"], kw["head_dim"]
    c, p, r, k = kw["vae_latent_channels"], kw["patch_size"], kw["num_registers"], len(kw["fsq_levels"])
    pin = p * p * c
    rows = _linear(f"{E('e_patch')}.patch_proj", "encoder/patch_embed/proj", pin, we)
    rows.append((f"{E('e_regs')}.registers", "encoder/registers", (r, we), identity))
    rows += _trunk_rows(f"{E('e_trunk')}", "encoder", we, kw["encoder_depth"], hd, adaln=False)
    rows += _linear(f"{E('e_head')}.proj", "encoder/to_codes", we, k)
    rows += _linear(f"{D('d_lin')}.proj", "decoder/from_codes", k, wd)
    rows.append((f"{D('d_rpos')}.posembs", "decoder/register_posemb", (1, 1, wd, r),
                 lambda x: np.ascontiguousarray(x[0, 0].T)))
    rows.append((f"{D('d_drop')}.dropout_mask_token", "decoder/mask_token", (wd,), identity))
    if kw["null_cond"] != "zeros":
        rows.append((f"{D('d_null')}.nullcond", "decoder/null_token", (wd,), identity))
    rows += _linear(f"{D('d_patch')}.patch_proj", "decoder/patch_embed/proj", pin, wd)
    rows += _linear(f"{D('d_time')}.mlp.0", "decoder/time_embed/fc_in", 256, wd)
    rows += _linear(f"{D('d_time')}.mlp.2", "decoder/time_embed/fc_out", wd, wd)
    rows += _trunk_rows(f"{D('d_trunk')}", "decoder", wd, kw["decoder_depth"], hd, adaln=True)
    rows += _linear(f"{D('d_head')}.proj", "decoder/head", wd, pin)
    if kw["head_adaln"]:
        rows += [(f"{D('d_head')}.adaLN_modulation.1.weight", "decoder/head_adaln/kernel",
                  (2 * wd, wd), _chunked_kernel(2)),
                 (f"{D('d_head')}.adaLN_modulation.1.bias", "decoder/head_adaln/bias", (2 * wd,),
                  lambda x: x.reshape(2, -1))]
    return rows


def _check_sincos(reader: StateDictReader, key: str, width: int, source: str) -> None:
    """The stored 2D sin-cos table ``[1, W, gh, gw]`` must be ours (row-first), else refuse."""
    from titok_jax.nn import sincos_2d
    table = reader.take(key, None, what="the 2D sin-cos position table")
    if table.ndim != 4 or table.shape[:2] != (1, width) or table.shape[2] != table.shape[3]:
        raise ValueError(f"{source}: {key} has shape {table.shape}, expected [1, {width}, g, g]")
    g = table.shape[2]
    ours = np.asarray(sincos_2d(g, g, width, row_first=True)).reshape(g, g, width).transpose(2, 0, 1)
    err = float(np.abs(ours - table[0]).max())
    if err > 1e-4:
        raise ValueError(f"{source}: {key} differs from the 2D sin-cos table titok_jax computes "
                         f"(max |diff| {err:.3g})")


def flextok_params_from_state_dict(sd: Mapping[str, np.ndarray], kw: Mapping[str, Any],
                                   names: Mapping[str, str], source: str = "model.safetensors"
                                   ) -> dict[str, Any]:
    """Our FlexTok ``params`` tree (module docstring's name table), checked complete both ways."""
    reader = StateDictReader(sd, source)
    flat = {path: reader.take(key, shape, fn) for key, path, shape, fn in flextok_rows(kw, names)}
    vae_kw = {"base_channels": kw["vae_base_channels"], "channel_mult": kw["vae_channel_mult"],
              "num_res_blocks": kw["vae_num_res_blocks"], "latent_channels": kw["vae_latent_channels"]}
    flat.update(klvae_flat_params(reader, vae_kw, VAE_PREFIX, "vae/"))
    _check_sincos(reader, f"encoder.module_dict.{names['e_pos']}.posembs", kw["encoder_width"], source)
    _check_sincos(reader, f"decoder.module_dict.{names['d_pos']}.posembs", kw["decoder_width"], source)
    reader.finish()
    params = unflatten(flat)
    from titok_jax.convert.titok import abstract_params
    abstract = abstract_params({"name": "flextok", **kw})[0]
    params = match_layers(params, abstract)   # stacked "layers" when kw has scan_layers
    check_tree_matches(params, abstract, source=f"{source} (converted)")
    return params


def flextok_model_section(kw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section of an imported FlexTok workdir."""
    return {"name": "flextok", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
            "remat": False, "scan_layers": bool(kw.get("scan_layers", False))}


# The flextok task's sections of an imported workdir, on top of ``convert.workdir.workdir_config``
# (inference only: everything frozen, no EMA); the sampler is the official README's (25, APG 7.5).
WORKDIR_SECTIONS: dict[str, Any] = {
    "family": "flextok", "variant": "imported", "task": {"name": "flextok"},
    "vae": {"weights": "", "allow_random": False},
    "flow": {"time_sampler": "logit_normal", "time_params": {"loc": 0.0, "scale": 1.0}},
    "repa": {"weight": 0.0, "teacher": {"weights": "", "allow_random": False, "seed": 0, "model": {}}},
    "sampler": {"steps": 25, "guidance": 7.5, "seed": 0},
    "eval": {"inception_weights": "", "fid_reference": "", "fid_method": "sqrtm"},
}


def import_release(path: str, image_size: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model kwargs, params)`` of a FlexTok ``model.safetensors``."""
    sd, cfg = read_release(path)
    kw, names = flextok_kwargs_from_release(cfg, sd, source=path, image_size=image_size)
    return kw, flextok_params_from_state_dict(sd, kw, names, source=path)
