"""Official TiTok PyTorch checkpoints (bytedance/1d-tokenizer, HF ``yucornetto/tokenizer_titok_*``)
-> titok_jax params.

The HF release is ``config.json`` (what ``TiTok._save_pretrained`` writes: the OmegaConf config as
JSON, ``{"model": {"vq_model": {...}}, "dataset": {"preprocessing": {"crop_size": S}}, ...}``) plus
``model.safetensors`` (or a torch ``pytorch_model.bin``). :func:`titok_model_from_hf_config` maps the
config to a model: ``vit_{enc,dec}_model_size`` in small/base/large (width, depth, heads 512/8/8,
768/12/12, 1024/24/16; other names need the titok_jax keys ``vit_{enc,dec}_width``, ``_depth``,
``_num_heads``), ``num_latent_tokens``, ``token_size``, ``codebook_size``, ``use_l2_norm``,
``commitment_cost``, ``quantize_mode`` (vq | vae), ``is_legacy`` (default True),
``finetune_decoder`` (default True). The quantizer keys become our ``quantizer`` sub-config
(``{"name": "vq", "codebook_size", "l2_normalize", "commitment_weight"}`` or ``{"name": "vae"}``).
Two kinds load:

- ``is_legacy`` and ``finetune_decoder`` (TiTok-L-32 / B-64 / S-128): ``titok_two_stage`` with the
  MaskGIT pixel decoder (its shape read from the ``pixel_decoder.*`` tensors).
- neither (the single-stage VQ / VAE weights): ``titok``.

Name table (PyTorch ``Linear [out, in]`` -> ``[in, out]``; ``E`` = ``encoder``, ``D`` =
``decoder``, ``T`` = ``transformer.{i}`` -> ``transformer_{i}``; ``W`` width, ``H`` heads, ``d =
W/H``)::

    latent_tokens [N, We]                          -> latent_tokens
    E.patch_embed.weight [We, 3, p, p] / .bias     -> encoder/patch_embed/proj/kernel [3 p p, We]
                                                      ("chw" flattening) / bias
    {E,D}.class_embedding [1, W]                   -> {encoder,decoder}/class_embedding
    {E,D}.positional_embedding [g*g+1, W]          -> .../positional_embedding/embedding
    {E,D}.latent_token_positional_embedding [N, W] -> .../latent_token_positional_embedding/embedding
    {E,D}.{ln_pre,ln_post}.{weight,bias}           -> .../{ln_pre,ln_post}/{scale,bias}
    T.ln_1 / T.ln_2                                -> transformer_{i}/ln_1, ln_2 (scale, bias)
    T.attn.in_proj_weight [3W, W] (rows q, k, v)   -> transformer_{i}/attn/qkv/kernel [W, 3, H, d]
    T.attn.in_proj_bias [3W]                       -> .../attn/qkv/bias [3, H, d]
    T.attn.out_proj.weight [W, W] / .bias          -> .../attn/out/kernel [H, d, W] / bias
    T.mlp.c_fc / T.mlp.c_proj                      -> .../mlp/fc_in, mlp/fc_out (Dense)
    E.conv_out.weight [C or 2C, We, 1, 1] / .bias  -> encoder/conv_out (Dense We -> C)
    D.decoder_embed.weight [Wd, C] / .bias         -> decoder/decoder_embed
    D.mask_token [1, 1, Wd]                        -> decoder/mask_token
    quantize.embedding.weight [K, C]               -> quantize/codebook            (VQ only)
    single-stage: D.ffn.0.weight [p p 3, Wd, 1, 1] -> decoder/ffn (Dense);  D.conv_out [3, 3, 3, 3]
                  -> decoder/conv_out (Conv 3x3)
    legacy:       D.ffn.0 [2Wd, Wd, 1, 1], D.ffn.2 [1024, 2Wd, 1, 1] -> decoder/ffn_0, decoder/ffn_2
                  pixel_quantize.embedding.weight [1024, Z] -> pixel_quantize/codebook
                  pixel_decoder.*                -> pixel_decoder/* (``convert.vqgan`` table)

Every tensor is consumed and every param filled, shapes checked (``convert.common``); the first
problem raises ``ValueError`` naming it. The table is written in the unrolled layout; a model
config with ``scan_layers`` gets the blocks stacked (``{encoder,decoder}/layers/transformer/...``,
``titok_jax.nn.scan.match_layers``). Imported workdirs say ``scan_layers: false``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from titok_jax.convert.common import (StateDictReader, conv1x1_as_linear, conv_kernel, linear_kernel,
                                      vit_block_rows)
from titok_jax.convert.vqgan import infer_vqgan_kwargs, maskgit_decoder_params_from_state_dict
from titok_jax.nn.scan import match_layers
from titok_jax.quantizers.factory import input_dim
from titok_jax.trees import check_tree_matches, unflatten

SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}


def _get(node: Any, path: str, source: str) -> Any:
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"{source}: config has no {path!r} (not an official TiTok config.json)")
        node = node[part]
    return node


def _vit_size(vq: Mapping[str, Any], side: str, source: str) -> tuple[int, int, int]:
    name = vq.get(f"vit_{side}_model_size")
    explicit = [vq.get(f"vit_{side}_{k}") for k in ("width", "depth", "num_heads")]
    if all(v is not None for v in explicit):
        return tuple(int(v) for v in explicit)  # type: ignore[return-value]
    if name not in SIZES:
        raise ValueError(f"{source}: unknown vit_{side}_model_size {name!r} (known: "
                         f"{', '.join(SIZES)}; other sizes need vit_{side}_width, "
                         f"vit_{side}_depth and vit_{side}_num_heads)")
    return SIZES[name]


def titok_model_from_hf_config(config: Mapping[str, Any], sd: Mapping[str, np.ndarray],
                               source: str = "config.json") -> dict[str, Any]:
    """The ``model`` section (``name`` + kwargs) for an official TiTok ``config.json``;
    ``sd`` (the state dict) gives the pixel decoder's shape of two-stage models."""
    vq = _get(config, "model.vq_model", source)
    size = int(_get(config, "dataset.preprocessing.crop_size", source))
    mode = vq.get("quantize_mode", "vq")
    legacy = bool(vq.get("is_legacy", True))
    finetune = bool(vq.get("finetune_decoder", True))
    if mode not in ("vq", "vae"):
        raise ValueError(f"{source}: unsupported quantize_mode {mode!r} (vq or vae)")
    p_enc, p_dec = int(vq["vit_enc_patch_size"]), int(vq["vit_dec_patch_size"])
    if p_enc != p_dec:
        raise ValueError(f"{source}: encoder patch size {p_enc} != decoder patch size {p_dec}; "
                         "titok_jax models use one patch size")
    (ew, ed, eh), (dw, dd, dh) = _vit_size(vq, "enc", source), _vit_size(vq, "dec", source)
    kw: dict[str, Any] = dict(
        image_size=size, patch_size=p_enc, encoder_width=ew, encoder_depth=ed, encoder_heads=eh,
        decoder_width=dw, decoder_depth=dd, decoder_heads=dh,
        num_latent_tokens=int(vq["num_latent_tokens"]), token_size=int(vq["token_size"]),
        is_legacy=legacy, scan_layers=False)
    if mode == "vq":
        kw["quantizer"] = {"name": "vq", "codebook_size": int(vq["codebook_size"]),
                           "l2_normalize": bool(vq.get("use_l2_norm", False)),
                           "commitment_weight": float(vq.get("commitment_cost", 0.25))}
    else:
        kw["quantizer"] = {"name": "vae"}
    if legacy and finetune:
        if mode != "vq":
            raise ValueError(f"{source}: finetune_decoder needs quantize_mode vq")
        pix = infer_vqgan_kwargs(sd, decoder_prefix="pixel_decoder.",
                                 codebook_key="pixel_quantize.embedding.weight",
                                 encoder_prefix=None, source=source)
        if "quantizer" not in pix:
            raise ValueError(f"{source}: missing tensor 'pixel_quantize.embedding.weight'")
        kw.update(proxy_codebook_size=int(pix["quantizer"]["codebook_size"]), finetune_decoder=True,
                  pixel_hidden_channels=int(pix["hidden_channels"]),
                  pixel_channel_mult=list(pix["channel_mult"]),
                  pixel_num_res_blocks=int(pix["num_res_blocks"]),
                  pixel_z_channels=int(pix["z_channels"]))
        return {"name": "titok_two_stage", **kw}
    if legacy or finetune:
        what = ("a stage-1 checkpoint (is_legacy, finetune_decoder false): it predicts proxy "
                "codes and cannot decode pixels alone" if legacy else
                "finetune_decoder with is_legacy false is not a released TiTok layout")
        raise ValueError(f"{source}: {what}")
    return {"name": "titok", **kw}


# ----------------------------------------------------------------------------- the name table
def _patch_kernel(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


# Torch names inside one block of the official TiTok ViT (open_clip's ResidualAttentionBlock).
OPENCLIP_BLOCK = {"ln_1": "ln_1.weight", "ln_1_bias": "ln_1.bias", "qkv": "attn.in_proj_weight",
                  "qkv_bias": "attn.in_proj_bias", "out": "attn.out_proj.weight",
                  "out_bias": "attn.out_proj.bias", "ln_2": "ln_2.weight", "ln_2_bias": "ln_2.bias",
                  "fc_in": "mlp.c_fc.weight", "fc_in_bias": "mlp.c_fc.bias",
                  "fc_out": "mlp.c_proj.weight", "fc_out_bias": "mlp.c_proj.bias"}


def vit_name_table(side: str, width: int, depth: int, heads: int, grid: int, tokens: int
                   ) -> list[tuple[str, str, tuple[int, ...], Any]]:
    """Rows ``(torch key, flat flax key, torch shape, transform)`` shared by the two ViTs."""
    t, w = side, width
    rows = [(f"{t}.class_embedding", f"{t}/class_embedding", (1, w), None),
            (f"{t}.positional_embedding", f"{t}/positional_embedding/embedding",
             (grid * grid + 1, w), None),
            (f"{t}.latent_token_positional_embedding",
             f"{t}/latent_token_positional_embedding/embedding", (tokens, w), None)]
    for ln in ("ln_pre", "ln_post"):
        rows += [(f"{t}.{ln}.weight", f"{t}/{ln}/scale", (w,), None),
                 (f"{t}.{ln}.bias", f"{t}/{ln}/bias", (w,), None)]
    for i in range(depth):
        a, b = f"{t}.transformer.{i}", f"{t}/transformer_{i}"
        rows += vit_block_rows(a, b, w, heads, OPENCLIP_BLOCK)
    return rows


def with_defaults(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model section with the model class's defaults filled in (``name`` kept; a legacy flat
    quantizer translated; ``quantizer`` a dict with every argument, ``factory.resolve_spec``)."""
    import dataclasses

    from titok_jax.models.registry import translate_legacy_quantizer
    from titok_jax.models.titok import TiTok
    from titok_jax.models.titok_two_stage import TiTokTwoStage
    from titok_jax.quantizers.factory import resolve_spec
    cls = TiTokTwoStage if model_config.get("name") == "titok_two_stage" else TiTok
    out = {f.name: f.default for f in dataclasses.fields(cls)
           if f.default is not dataclasses.MISSING
           and f.name not in ("parent", "name", "dtype", "param_dtype")}
    out = {**out, **translate_legacy_quantizer(model_config)}
    return {**out, "quantizer": resolve_spec(out["quantizer"])}


def titok_name_table(kw: Mapping[str, Any], two_stage: bool
                     ) -> list[tuple[str, str, tuple[int, ...], Any]]:
    """Every TiTok tensor except the pixel decoder (see the module docstring)."""
    kw = with_defaults(kw)
    p, n, c = int(kw["patch_size"]), int(kw["num_latent_tokens"]), int(kw["token_size"])
    g = int(kw["image_size"]) // p
    ew, dw = int(kw["encoder_width"]), int(kw["decoder_width"])
    quantizer = kw["quantizer"]
    rows = [("latent_tokens", "latent_tokens", (n, ew), None),
            ("encoder.patch_embed.weight", "encoder/patch_embed/proj/kernel", (ew, 3, p, p),
             _patch_kernel),
            ("encoder.patch_embed.bias", "encoder/patch_embed/proj/bias", (ew,), None)]
    rows += vit_name_table("encoder", ew, int(kw["encoder_depth"]), int(kw["encoder_heads"]), g, n)
    c_enc = input_dim(quantizer, c)
    rows += [("encoder.conv_out.weight", "encoder/conv_out/kernel", (c_enc, ew, 1, 1),
              conv1x1_as_linear),
             ("encoder.conv_out.bias", "encoder/conv_out/bias", (c_enc,), None),
             ("decoder.decoder_embed.weight", "decoder/decoder_embed/kernel", (dw, c), linear_kernel),
             ("decoder.decoder_embed.bias", "decoder/decoder_embed/bias", (dw,), None),
             ("decoder.mask_token", "decoder/mask_token", (1, 1, dw), None)]
    rows += vit_name_table("decoder", dw, int(kw["decoder_depth"]), int(kw["decoder_heads"]), g, n)
    if two_stage:
        k = int(kw["proxy_codebook_size"])
        rows += [("decoder.ffn.0.weight", "decoder/ffn_0/kernel", (2 * dw, dw, 1, 1), conv1x1_as_linear),
                 ("decoder.ffn.0.bias", "decoder/ffn_0/bias", (2 * dw,), None),
                 ("decoder.ffn.2.weight", "decoder/ffn_2/kernel", (k, 2 * dw, 1, 1), conv1x1_as_linear),
                 ("decoder.ffn.2.bias", "decoder/ffn_2/bias", (k,), None),
                 ("pixel_quantize.embedding.weight", "pixel_quantize/codebook",
                  (k, int(kw["pixel_z_channels"])), None)]
    else:
        rows += [("decoder.ffn.0.weight", "decoder/ffn/kernel", (p * p * 3, dw, 1, 1), conv1x1_as_linear),
                 ("decoder.ffn.0.bias", "decoder/ffn/bias", (p * p * 3,), None),
                 ("decoder.conv_out.weight", "decoder/conv_out/kernel", (3, 3, 3, 3), conv_kernel),
                 ("decoder.conv_out.bias", "decoder/conv_out/bias", (3,), None)]
    if quantizer["name"] == "vq":
        rows.append(("quantize.embedding.weight", "quantize/codebook",
                     (int(quantizer["codebook_size"]), c), None))
    return rows


def abstract_params(model_config: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(params, other collections)`` of the model as ShapeDtypeStructs (``jax.eval_shape``)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from titok_jax.models.registry import build_model

    model = build_model(dict(model_config))
    s = int(model.image_size)

    def init(key):
        v = model.init({"params": key, "sample": key, "quantizer": key},
                       jnp.zeros((1, s, s, 3), jnp.float32), train=False)
        return v["params"], {k: x for k, x in v.items() if k != "params"}

    return nn.unbox(jax.eval_shape(init, jax.random.key(0)))


def titok_params_from_state_dict(sd: Mapping[str, np.ndarray], model_config: Mapping[str, Any],
                                 source: str = "state dict") -> dict:
    """Official TiTok state dict -> params of ``build_model(model_config)`` (float32 numpy),
    checked against the model's abstract params."""
    two_stage = model_config["name"] == "titok_two_stage"
    full = with_defaults(model_config)
    reader = StateDictReader(sd, source)
    flat = {f: reader.take(t, shape, transform or (lambda x: x), what=f)
            for t, f, shape, transform in titok_name_table(full, two_stage)}
    params = unflatten(flat)
    if two_stage:
        pix = {k[len("pixel_"):]: v for k, v in full.items() if k.startswith("pixel_")}
        params["pixel_decoder"] = maskgit_decoder_params_from_state_dict(
            reader, "pixel_decoder.", pix)
    reader.finish()
    abstract = abstract_params(model_config)[0]
    params = match_layers(params, abstract)   # stacked "layers" when the config has scan_layers
    check_tree_matches(params, abstract, source=f"{source} (converted)")
    return params
