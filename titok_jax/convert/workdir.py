"""``titok-jax import-torch --input HF_DIR --output DIR``: an official PyTorch release -> a workdir.

``HF_DIR`` holds either

- an official TiTok release: ``config.json`` (the OmegaConf config ``TiTok._save_pretrained``
  writes) and ``model.safetensors`` (read without torch) or ``pytorch_model.bin`` (needs the
  ``torch`` extra); converted by ``convert.titok``; or
- a MaskGIT-VQGAN state dict (``maskgit-vqgan-imagenet-f16-256.bin`` or a ``.safetensors`` of it)
  and no ``config.json``: recognised by its keys (``encoder.conv_in.weight``,
  ``decoder.conv_in.weight``, ``quantize.embedding.weight``), shapes read from the tensors,
  ``image_size`` 256 unless given; converted by ``convert.vqgan``; or
- a taming-transformers VQGAN (its Lightning ``last.ckpt``, weights under ``state_dict``, ``loss.*``
  dropped; or a bare state dict), recognised by ``quant_conv`` / ``post_quant_conv`` around the
  codebook, shapes read from the tensors, ``image_size`` 256 unless given; converted by
  ``convert.taming`` into a ``taming_vqgan`` tokenizer workdir; or
- an Open-MAGVIT2 image tokenizer (its Lightning ``.ckpt``: the EMA weights ``model_ema.*`` when
  present, else the raw ones; ``loss.*`` dropped; or a bare state dict), recognised by the
  decoder's AdaGN layers, shapes read from the tensors, ``image_size`` a 16x16 grid unless given;
  converted by ``convert.magvit2`` into a ``magvit2`` tokenizer workdir; or
- an FQGAN Dual / Triple tokenizer (showlab/FQGAN ``fqgan_{dual,triple}_ds{16,8}.pt``: weights
  under ``model``, or ``ema`` when present; or a bare state dict), recognised by its per-factor
  ``quantize_{vis,sem...}`` codebooks, shapes read from the tensors, ``image_size`` from the
  adapters' position tables; converted by ``convert.fqgan`` into an ``fqgan`` tokenizer workdir; or
- a TiTok MaskGIT generator (``generator_titok_{l32,b64,s128}.bin``: ``ImageBert`` / ``UViTBert``,
  or its HF folder), recognised by its tensor names, with its ``config.json`` where the release has
  one; converted by ``convert.maskgit_generator`` into a generator workdir (task ``maskgit``) that
  ``load_generator`` and ``generate`` read; or
- a released FlexTok ``model.safetensors`` (HF ``EPFL-VILAB/flextok_*``; the VAE inside it, the
  Hydra config in its safetensors metadata), recognised by its tensor names; converted by
  ``convert.flextok`` into a ``flextok`` task workdir (no torch needed; ``--image_size`` may pick a
  smaller size than the released position table's); or
- an official FlowMo checkpoint (``flowmo_lo.pth`` / ``flowmo_hi.pth``: EMA weights under
  ``model_ema_state_dict``, or a ``.safetensors`` state dict), optionally with the ``.yaml`` it was
  trained with, recognised by its tensor names; converted by ``convert.flowmo`` into a ``flowmo``
  task workdir.

``DIR`` becomes a workdir like one written by ``train`` (``config.json`` with task ``tokenizer``, a
``model`` section and an inference-only optimizer: ``frozen: ".*"``, no EMA; an Orbax checkpoint
at step 0 holding the inference part of a train state, ``checkpoint.inference_state``), so
``load_tokenizer`` and ``eval`` / ``reconstruct`` / ``tokenize`` / ``detokenize`` read it. ``DIR``
must not exist or be empty: nothing is ever overwritten. Writing it is
``titok_jax.checkpoint.write_workdir``; nothing here needs ``titok_jax.train``.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping

import numpy as np

from titok_jax.checkpoint import check_new_workdir, inference_state, write_workdir
from titok_jax.convert.common import read_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
VQGAN_KEYS = ("encoder.conv_in.weight", "decoder.conv_in.weight", "quantize.embedding.weight")


def _weights_file(input_dir: str, has_config: bool) -> str:
    for name in WEIGHT_FILES:
        path = os.path.join(input_dir, name)
        if os.path.isfile(path):
            return path
    # otherwise a bare state dict (MaskGIT-VQGAN, generator_titok_*.bin): the only weights file
    found = sorted(n for n in os.listdir(input_dir)
                   if n.endswith((".safetensors", ".bin", ".pth", ".pt", ".ckpt")))
    if len(found) == 1:
        return os.path.join(input_dir, found[0])
    if len(found) > 1 and not has_config:
        raise ValueError(f"{input_dir} holds several weight files ({', '.join(found)}) and no "
                         "config.json; keep only the one to import")
    raise FileNotFoundError(f"{input_dir} has no {' or '.join(WEIGHT_FILES)}"
                            + ("" if has_config else " (nor any .safetensors/.bin/.pth/.ckpt state dict)"))


def read_input(input_dir: str) -> tuple[dict[str, np.ndarray], str, dict[str, Any] | None, str]:
    """``(state dict, weights path, parsed config.json or None, config path)`` of ``input_dir``."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input {input_dir} does not exist or is not a directory")
    cfg_path = os.path.join(input_dir, "config.json")
    has_config = os.path.isfile(cfg_path)
    hf_config = read_release_config(cfg_path) if has_config else None  # before the (large) weights
    weights = _weights_file(input_dir, has_config)
    # a training checkpoint's weights: FQGAN's files hold "model" (and "ema", which its loaders
    # prefer); Lightning's (taming, Open-MAGVIT2) "state_dict"
    sd = read_state_dict(weights, state_keys=("ema", "model", "state_dict"))
    return sd, weights, hf_config, cfg_path


# JSON's names for the Python types json.load gives.
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def read_release_config(path: str) -> dict[str, Any]:
    """A release's ``config.json`` as a dict; a one-line ValueError when it is not valid JSON or
    not a JSON object (a list, a number ...), before any converter indexes into it."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        kind = _JSON_TYPES.get(type(config), type(config).__name__)
        raise ValueError(f"{path} is not a release config: a JSON {kind}, not an object")
    return config


def model_from_input(input_dir: str, image_size: int | None = None, read: Any = None
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """``(model section, params, weights path)`` of a tokenizer converted from ``input_dir``
    (``read``: :func:`read_input`'s result, when already read)."""
    from titok_jax.convert import fqgan as fqgan_conv
    from titok_jax.convert import magvit2 as magvit2_conv
    from titok_jax.convert import taming as taming_conv
    from titok_jax.convert import titok as titok_conv
    from titok_jax.convert import vqgan as vqgan_conv

    sd, weights, hf_config, cfg_path = read or read_input(input_dir)
    if hf_config is not None:
        if image_size is not None:
            raise ValueError("--image_size is only for a MaskGIT-VQGAN, taming VQGAN or "
                             "Open-MAGVIT2 state dict without config.json; the TiTok config.json "
                             "sets crop_size")
        model = titok_conv.titok_model_from_hf_config(hf_config, sd, source=cfg_path)
        params = titok_conv.titok_params_from_state_dict(sd, model, source=weights)
        return model, params, weights
    if magvit2_conv.is_magvit2(sd):   # an Open-MAGVIT2 .ckpt: AdaGN layers in the decoder
        kw = magvit2_conv.infer_magvit2_kwargs(sd, image_size, source=weights)
        params = magvit2_conv.magvit2_params_from_state_dict(sd, kw, source=weights)
        return magvit2_conv.magvit2_model_section(kw), params, weights
    if fqgan_conv.is_fqgan(sd):   # an FQGAN Dual / Triple: one quantize_{factor} per factor
        kw = fqgan_conv.infer_fqgan_kwargs(sd, image_size, source=weights)
        params = fqgan_conv.fqgan_params_from_state_dict(sd, kw, source=weights)
        return fqgan_conv.fqgan_model_section(kw), params, weights
    if taming_conv.is_taming(sd):   # a taming VQGAN (last.ckpt): quant_conv around the quantizer
        kw = taming_conv.infer_taming_kwargs(sd, int(image_size or 256), source=weights)
        params = taming_conv.taming_params_from_state_dict(sd, kw, source=weights)
        return taming_conv.taming_model_section(kw), params, weights
    if not all(k in sd for k in VQGAN_KEYS):
        hint = " (it looks like TiTok weights: config.json is missing)" if "latent_tokens" in sd else ""
        raise ValueError(f"{input_dir} has no config.json and {os.path.basename(weights)} is not a "
                         f"MaskGIT-VQGAN state dict (no {VQGAN_KEYS[0]!r}){hint}")
    kw = vqgan_conv.infer_vqgan_kwargs(sd, source=weights)
    kw["image_size"] = int(image_size or 256)
    params = vqgan_conv.vqgan_params_from_state_dict(sd, kw, source=weights)
    model = {"name": "maskgit_vqgan", **kw, "channel_mult": list(kw["channel_mult"])}
    return model, params, weights


def workdir_config(model: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The run config of an imported workdir (inference-only: everything frozen, no EMA)."""
    size = int(model["image_size"])
    return {
        "family": "imported", "variant": model["name"], "source": source,
        "task": {"name": "tokenizer"}, "seed": 0, "model": dict(model), "compute_dtype": "float32",
        "data": {"source": "sample", "image_size": size, "data_dir": "", "worker_count": 0,
                 "eval_batch_size": 8, "eval_num_images": 0},
        "total_steps": 0, "batch_size": 8,
        "optimizer": {"lr": 0.0, "end_lr": 0.0, "warmup_steps": 0, "b1": 0.9, "b2": 0.999,
                      "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 0.0, "accumulation_steps": 1,
                      "ema_decay": 0.0, "no_decay": "", "frozen": ".*"},
        "optimizers": {},
        "losses": {"reconstruction": "l2", "reconstruction_weight": 1.0, "perceptual_weight": 0.0,
                   "perceptual_weights": "", "convnext_weight": 0.0, "convnext_weights": "",
                   "gan_weight": 0.0, "gan_start_step": 0,
                   "gan_loss": "hinge", "lecam_weight": 0.0, "lecam_decay": 0.999,
                   "discriminator": {}},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "logical_axis_rules": [],
        "checkpoint": {"every_steps": 1, "keep": 1, "keep_every_steps": 0, "async_save": False},
        "log_every_steps": 1, "eval_every_steps": 0, "samples": {"num_images": 8},
    }


def _zero_state(model: Mapping[str, Any]) -> Any:
    import jax
    from titok_jax.convert.titok import abstract_params
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params(model)[1])


def _import_generator(read: Any, source: str, output_dir: str) -> tuple[str, Any, str]:
    from titok_jax.convert import maskgit_generator as gen
    sd, weights, hf_config, cfg_path = read
    kw, variant = gen.infer_generator_kwargs(sd, hf_config, source=weights, config_source=cfg_path)
    params = gen.generator_params_from_state_dict(sd, kw, source=weights)
    config = gen.generator_workdir_config(kw, variant, hf_config, source)
    path = write_workdir(output_dir, config, inference_state(params, {}))
    return f"maskgit {kw['arch']} generator ({variant or 'custom size'})", params, path


def _flowmo_weights(input_dir: str) -> str | None:
    """The single ``.pth`` of ``input_dir`` (no config.json): possibly a FlowMo release."""
    if not os.path.isdir(input_dir) or os.path.isfile(os.path.join(input_dir, "config.json")):
        return None
    names = sorted(os.listdir(input_dir))
    pth = [n for n in names if n.endswith(".pth")]
    if len(pth) == 1:
        return os.path.join(input_dir, pth[0])
    return None


def _import_flowmo(input_dir: str, weights: str, sd: Any, source: str, output_dir: str
                   ) -> tuple[str, Any, str, str]:
    from titok_jax.convert import flowmo as fm
    yamls = sorted(n for n in os.listdir(input_dir) if n.endswith((".yaml", ".yml")))
    if len(yamls) > 1:
        raise ValueError(f"{input_dir} holds several yaml files ({', '.join(yamls)}); keep the one "
                         "the checkpoint was trained with")
    cfg = None
    if yamls:
        import yaml
        with open(os.path.join(input_dir, yamls[0]), encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    kw, variant, sampler = fm.infer_flowmo_kwargs(sd, cfg, source=weights)
    params = fm.flowmo_params_from_state_dict(sd, kw, source=weights)
    config = fm.flowmo_workdir_config(kw, variant, sampler, source)
    path = write_workdir(output_dir, config, inference_state(params, _zero_state(config["model"])))
    return f"flowmo ({variant})", params, path, weights


def import_torch(input_dir: str, output_dir: str, image_size: int | None = None) -> dict[str, Any]:
    """Convert ``input_dir`` and write the workdir ``output_dir``; returns a summary
    ``{"model", "num_params", "weights", "checkpoint"}``."""
    from titok_jax.convert import flextok
    from titok_jax.convert.maskgit_generator import generator_arch

    input_dir, output_dir = os.fspath(input_dir), os.path.abspath(os.fspath(output_dir))
    check_new_workdir(output_dir, "import-torch never overwrites: choose a new --output")  # before slow work
    from titok_jax.convert import flowmo as fm
    flowmo_pth, sd, read = _flowmo_weights(input_dir), None, None
    if flowmo_pth is not None:   # a .pth: FlowMo's release nests the state dict, so read it first
        sd = fm.read_release(flowmo_pth)
        if not fm.is_flowmo(sd):
            flowmo_pth, sd = None, None
    if flowmo_pth is None:
        read = read_input(input_dir)
        if fm.is_flowmo(read[0]):
            flowmo_pth, sd = read[1], read[0]
    if flowmo_pth is not None:
        if image_size is not None:
            raise ValueError("--image_size is only for a MaskGIT-VQGAN state dict, not FlowMo "
                             "(its yaml sets data.image_size)")
        name, params, path, weights = _import_flowmo(input_dir, flowmo_pth, sd,
                                                     os.path.abspath(input_dir), output_dir)
    elif read[1].endswith(".safetensors") and flextok.is_flextok(read[0].keys()):   # a FlexTok release
        weights = read[1]
        kw, params = flextok.import_release(weights, image_size=image_size)
        config = {**workdir_config(flextok.flextok_model_section(kw), os.path.abspath(weights)),
                  **copy.deepcopy(flextok.WORKDIR_SECTIONS)}
        path = write_workdir(output_dir, config, inference_state(params, _zero_state(config["model"])))
        name = (f"flextok (encoder d{kw['encoder_depth']} w{kw['encoder_width']}, decoder "
                f"d{kw['decoder_depth']} w{kw['decoder_width']}, {kw['num_registers']} tokens)")
    elif generator_arch(read[0]) is not None:   # a TiTok MaskGIT generator (ImageBert / UViTBert)
        if image_size is not None:
            raise ValueError("--image_size is only for a MaskGIT-VQGAN state dict, not a generator")
        weights = read[1]
        name, params, path = _import_generator(read, os.path.abspath(input_dir), output_dir)
    else:
        model, params, weights = model_from_input(input_dir, image_size, read=read)
        config = workdir_config(model, source=os.path.abspath(input_dir))
        path = write_workdir(output_dir, config, inference_state(params, _zero_state(model)))
        name = model["name"]
    import jax
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    return {"model": name, "num_params": n, "weights": weights, "checkpoint": path}
