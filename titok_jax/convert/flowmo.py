"""Official FlowMo checkpoints (kylesargent/FlowMo ``flowmo/models.py``) -> ``models.flowmo.FlowMo``.

Released: ``flowmo_lo.pth`` / ``flowmo_hi.pth``, torch pickles whose EMA weights are under
``model_ema_state_dict`` (also read: a bare state dict, ``model_state_dict``, or a ``.safetensors``
of it), optionally with the training yaml (``flowmo/configs/base.yaml`` + overrides). Recognised by
tensor names (:func:`is_flowmo`). Sizes come from the tensors: widths (``img_in``), depths (count of
``double_blocks``), head dim (``query_norm.scale``), MLP ratio, patch (``img_in`` fan-in = 3 p^2),
token bits (decoder ``txt_in`` fan-in - 1). Not in the tensors: ``image_size`` (yaml
``data.image_size``, default 256), the RoPE axes (FlowMo: ``(d//4) * width`` of ``[8, 28, 28]``, i.e.
``(h/8, 7h/16, 7h/16)`` of head dim ``h``; yaml ``model.{encoder,decoder}_rope_axes`` override it, a
key of ours, not FlowMo's) and the entropy sub-token size (yaml ``model.codebook_size_for_entropy``;
published: 9 for 18 bits, 14 for 56). The sampler comes from yaml ``eval.sampling`` (default
base.yaml's: 25 steps, ``pow_0.25``, CFG 1.5 on EDM sigma ``(.17, 1.02)``).

Conventions (official -> ours; proved by tests/test_import_flowmo.py against the official code):
images NCHW in [-1, 1] -> NHWC in [0, 1] (``encode``) / decodes ``(x + 1) / 2``; ``rf_sample``'s
noise ``z`` NCHW -> ``noise_shape(B)`` NHWC (same values transposed); t = 1 is noise in both;
``pow_p`` grid ``t_i = (i/n)^(1/p)`` = our power grid with ``sampler_rho = 1/p``; the CFG interval
``sigma/(1+sigma)`` (inclusive) and the null condition ``code * 0`` (mask channel too) are ours.

Name table (``E``/``D`` = ``encoder.``/``decoder.``, ``B = double_blocks.{i}``, ``s`` in ``img, txt``;
PyTorch ``Linear [out, in]`` -> ``[in, out]``; ``W`` width, ``H`` heads, ``h = W/H``, ``k`` chunks)::

    X.img_in.{weight,bias}                    -> X/img_in/{kernel,bias}
    D.txt_in.{weight,bias}                    -> decoder/txt_in/{kernel,bias}
    E.txt_in.bias                             -> encoder/latent_init (the encoder's txt_in sees zeros)
    D.time_in.{in,out}_layer                  -> decoder/time_in/fc_{in,out}
    X.B.s_mod.lin.{weight [6W, W],bias}       -> X/block_{i}/s_mod/{kernel [W, k, W], bias [k, W]}
                                                 (k = 6; k = 2, the first two chunks, for the stream
                                                 the last block does not update)
    X.B.s_attn.qkv.{weight [3W, W],bias}      -> X/block_{i}/s_qkv/{kernel [W, 3, H, h], bias [3, H, h]}
    X.B.s_attn.norm.{query,key}_norm.scale    -> X/block_{i}/s_{q,k}_norm/scale
    X.B.s_attn.proj.{weight,bias}             -> X/block_{i}/s_out/{kernel [H, h, W], bias}
    X.B.s_mlp.{0,2}.{weight,bias}             -> X/block_{i}/s_mlp/fc_{in,out}
    D.final_layer_img.linear                  -> decoder/final/proj
    D.final_layer_img.adaLN_modulation.1      -> decoder/final/mod ([2W, W] -> [W, 2, W]: shift, scale)
    E.final_layer_txt.linear                  -> encoder/final/proj

Ignored (the official forward never reads them): the encoder's ``time_in``, every ``*_mod`` of the
encoder (it runs with ``vec=None``), its ``txt_in.weight``, ``final_layer_img``, the adaLN of its
``final_layer_txt``, the last encoder block's image ``attn.proj`` / ``mlp``, the last decoder block's
latent ``attn.proj`` / ``mlp``, the decoder's ``final_layer_txt``; and the rest of a chunked
``*_mod`` of a stream that is not updated. Every other tensor is consumed and every param filled.
The LFQ quantizer has no weights (its buffers, if saved, are ignored). With ``scan_layers`` in the
kwargs, blocks ``0..depth-2`` are stacked (``X/layers/block/...``, ``titok_jax.nn.scan``); imported
workdirs say ``scan_layers: false``.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Mapping

import numpy as np

from titok_jax.convert.common import (StateDictReader, linear_kernel, out_kernel, qkv_bias,
                                      qkv_kernel)
from titok_jax.nn.scan import match_layers
from titok_jax.trees import check_tree_matches, unflatten

PUBLISHED_BITS = {18: ("lo", 9), 56: ("hi", 14)}
RELEASE_KEYS = ("model_ema_state_dict", "model_state_dict")


def is_flowmo(keys: Any) -> bool:
    keys = set(keys)
    return {"encoder.img_in.weight", "decoder.img_in.weight", "decoder.final_layer_img.linear.weight",
            "encoder.double_blocks.0.img_attn.qkv.weight"} <= keys


def read_release(path: str) -> dict[str, np.ndarray]:
    """The EMA state dict of a FlowMo ``.pth`` (``model_ema_state_dict``, else ``model_state_dict``,
    else the file is a bare state dict); ``.safetensors`` are read as a bare state dict."""
    from titok_jax.convert.common import read_state_dict
    return read_state_dict(path, state_keys=RELEASE_KEYS)


def _count(keys: Any, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"double_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if found != set(range(len(found))):
        raise ValueError(f"{prefix}double_blocks are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _shape(sd: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{source}: missing tensor {key!r}")
    return tuple(int(s) for s in np.shape(sd[key]))


def _rope_axes(head_dim: int) -> list[int]:
    return [head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16]


def infer_flowmo_kwargs(sd: Mapping[str, np.ndarray], yaml_cfg: Mapping[str, Any] | None = None,
                        source: str = "state dict") -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``(FlowMo kwargs, variant name, sampler)`` from the tensors (and the yaml, checked against
    them)."""
    y = dict(yaml_cfg or {})
    ym, yd = dict(y.get("model") or {}), dict(y.get("data") or {})
    ys = dict((y.get("eval") or {}).get("sampling") or {})
    kw: dict[str, Any] = {}
    for side in ("encoder", "decoder"):
        w, pin = _shape(sd, f"{side}.img_in.weight", source)
        head_dim = _shape(sd, f"{side}.double_blocks.0.img_attn.norm.query_norm.scale", source)[0]
        if w % head_dim:
            raise ValueError(f"{source}: {side} width {w} is not a multiple of head dim {head_dim}")
        hidden = _shape(sd, f"{side}.double_blocks.0.img_mlp.0.weight", source)[0]
        kw[f"{side}_width"] = w
        kw[f"{side}_depth"] = _count(sd, f"{side}.")
        kw[f"{side}_heads"] = w // head_dim
        kw["mlp_ratio"] = hidden / w
        axes = ym.get(f"{side}_rope_axes") or _rope_axes(head_dim)
        if sum(axes) != head_dim or any(a % 2 for a in axes):
            raise ValueError(f"{source}: {side} head dim {head_dim} has no FlowMo RoPE split {axes}")
        kw[f"{side}_rope_axes"] = [int(a) for a in axes]
    p = int(round((pin / 3) ** 0.5))
    if 3 * p * p != pin:
        raise ValueError(f"{source}: img_in fan-in {pin} is not 3 * patch^2")
    bits = _shape(sd, "decoder.txt_in.weight", source)[1] - 1
    enc_out = _shape(sd, "encoder.final_layer_txt.linear.weight", source)[0]
    if enc_out != bits:
        raise ValueError(f"{source}: encoder emits {enc_out} values per token but the decoder reads "
                         f"{bits} (+1 mask); only lfq checkpoints are supported")
    variant, group = PUBLISHED_BITS.get(bits, ("custom", None))
    group = int(ym.get("codebook_size_for_entropy") or group or bits)
    if bits % group:
        raise ValueError(f"{source}: codebook_size_for_entropy {group} does not divide {bits} bits")
    checks = {"patch_size": p, "context_dim": bits, "enc_depth": kw["encoder_depth"],
              "dec_depth": kw["decoder_depth"]}
    for k, v in checks.items():
        if k in ym and int(ym[k]) != v:
            raise ValueError(f"yaml model.{k}={ym[k]} disagrees with the tensors ({v})")
    if ym.get("quantization_type", "lfq") != "lfq":
        raise ValueError(f"yaml model.quantization_type={ym['quantization_type']!r}: only lfq is supported")
    code_length = int(ym.get("code_length", 256))
    image_size = int(yd.get("image_size", 256))
    kw.update(image_size=image_size, patch_size=p, code_length=code_length, token_bits=bits,
              id_bits=bits if bits <= 31 else group, entropy_group_bits=group,
              rope_theta=10000.0, double_norm=True)
    if variant != "custom" and not (image_size == 256 and code_length == 256 and p == 4
                                    and kw["encoder_width"] == 768 and kw["decoder_width"] == 1152):
        variant = "custom"
    interval = ys.get("cfg_interval", "(.17,1.02)")
    if interval is not None:
        lo, hi = ast.literal_eval(str(interval))
        interval = [lo / (1 + lo), hi / (1 + hi)]
    sched = str(ys.get("schedule", "pow_0.25"))
    if not sched.startswith("pow_"):
        raise ValueError(f"yaml eval.sampling.schedule={sched!r}: only pow_* is supported")
    kw["sampler_rho"] = 1.0 / float(sched.split("_")[1])
    kw["guidance_interval"] = interval
    sampler = {"steps": int(ys.get("sample_steps", 25)), "guidance": float(ys.get("cfg", 1.5))}
    return kw, variant, sampler


def flowmo_rows(kw: Mapping[str, Any]) -> list[tuple]:
    """``(torch key, our path, torch shape, transform)`` for every param."""
    rows: list[tuple] = []
    for side, readout in (("encoder", "txt"), ("decoder", "img")):
        w, depth, heads = kw[f"{side}_width"], kw[f"{side}_depth"], kw[f"{side}_heads"]
        hd, hid = w // heads, int(round(w * kw["mlp_ratio"]))
        pin = 3 * kw["patch_size"] ** 2
        t = f"{side}."
        rows += [(t + "img_in.weight", f"{side}/img_in/kernel", (w, pin), linear_kernel),
                 (t + "img_in.bias", f"{side}/img_in/bias", (w,), None)]
        if side == "encoder":
            rows.append((t + "txt_in.bias", "encoder/latent_init", (w,), None))
            rows += [(t + "final_layer_txt.linear.weight", "encoder/final/proj/kernel",
                      (kw["token_bits"], w), linear_kernel),
                     (t + "final_layer_txt.linear.bias", "encoder/final/proj/bias", (kw["token_bits"],), None)]
        else:
            cin = kw["token_bits"] + 1
            rows += [(t + "txt_in.weight", "decoder/txt_in/kernel", (w, cin), linear_kernel),
                     (t + "txt_in.bias", "decoder/txt_in/bias", (w,), None),
                     (t + "time_in.in_layer.weight", "decoder/time_in/fc_in/kernel", (w, 256), linear_kernel),
                     (t + "time_in.in_layer.bias", "decoder/time_in/fc_in/bias", (w,), None),
                     (t + "time_in.out_layer.weight", "decoder/time_in/fc_out/kernel", (w, w), linear_kernel),
                     (t + "time_in.out_layer.bias", "decoder/time_in/fc_out/bias", (w,), None),
                     (t + "final_layer_img.linear.weight", "decoder/final/proj/kernel", (pin, w), linear_kernel),
                     (t + "final_layer_img.linear.bias", "decoder/final/proj/bias", (pin,), None),
                     (t + "final_layer_img.adaLN_modulation.1.weight", "decoder/final/mod/kernel",
                      (2 * w, w), _mod_kernel(2, 2)),
                     (t + "final_layer_img.adaLN_modulation.1.bias", "decoder/final/mod/bias",
                      (2 * w,), _mod_bias(2, 2))]
        for i in range(depth):
            b, d = f"{t}double_blocks.{i}.", f"{side}/block_{i}/"
            last = i == depth - 1
            for s in ("img", "txt"):
                updated = not last or s == readout
                if side == "decoder":
                    k = 6 if updated else 2
                    rows += [(f"{b}{s}_mod.lin.weight", f"{d}{s}_mod/kernel", (6 * w, w), _mod_kernel(6, k)),
                             (f"{b}{s}_mod.lin.bias", f"{d}{s}_mod/bias", (6 * w,), _mod_bias(6, k))]
                a = f"{b}{s}_attn."
                rows += [(a + "qkv.weight", f"{d}{s}_qkv/kernel", (3 * w, w), qkv_kernel(heads)),
                         (a + "qkv.bias", f"{d}{s}_qkv/bias", (3 * w,), qkv_bias(heads)),
                         (a + "norm.query_norm.scale", f"{d}{s}_q_norm/scale", (hd,), None),
                         (a + "norm.key_norm.scale", f"{d}{s}_k_norm/scale", (hd,), None)]
                if updated:
                    rows += [(a + "proj.weight", f"{d}{s}_out/kernel", (w, w), out_kernel(heads)),
                             (a + "proj.bias", f"{d}{s}_out/bias", (w,), None),
                             (f"{b}{s}_mlp.0.weight", f"{d}{s}_mlp/fc_in/kernel", (hid, w), linear_kernel),
                             (f"{b}{s}_mlp.0.bias", f"{d}{s}_mlp/fc_in/bias", (hid,), None),
                             (f"{b}{s}_mlp.2.weight", f"{d}{s}_mlp/fc_out/kernel", (w, hid), linear_kernel),
                             (f"{b}{s}_mlp.2.bias", f"{d}{s}_mlp/fc_out/bias", (w,), None)]
    return rows


def _mod_kernel(n: int, k: int):
    """torch ``[n W, W]`` chunked adaLN weight -> ``[W, k, W]`` (first ``k`` chunks)."""
    def f(x: np.ndarray) -> np.ndarray:
        w = x.shape[1]
        return np.ascontiguousarray(x.reshape(n, w, w)[:k].transpose(2, 0, 1))
    return f


def _mod_bias(n: int, k: int):
    return lambda x: np.ascontiguousarray(x.reshape(n, -1)[:k])


def flowmo_params_from_state_dict(sd: Mapping[str, np.ndarray], kw: Mapping[str, Any],
                                  source: str = "state dict") -> dict[str, Any]:
    """Our ``params`` tree from an official FlowMo state dict (module docstring's name table)."""
    r = StateDictReader(sd, source)
    flat = {}
    for key, path, shape, fn in flowmo_rows(kw):
        flat[path] = r.take(key, shape, fn) if fn is not None else r.take(key, shape)
    unused = unused_keys(kw)
    r.finish(ignore=[lambda k: k in unused, lambda k: k.startswith("quantizer.")])
    params = unflatten(flat)
    from titok_jax.convert.titok import abstract_params
    abstract = abstract_params({"name": "flowmo", **kw})[0]
    params = match_layers(params, abstract)   # stacked "layers" when kw has scan_layers
    check_tree_matches(params, abstract, source=f"{source} (converted)")
    return params


def unused_keys(kw: Mapping[str, Any]) -> set[str]:
    """The official tensors the forward never reads (module docstring)."""
    out: set[str] = set()
    for side in ("encoder", "decoder"):
        t = f"{side}."
        if side == "encoder":
            out |= {t + "txt_in.weight"}
            out |= {t + f"time_in.{l}.{p}" for l in ("in_layer", "out_layer") for p in ("weight", "bias")}
            out |= {t + f"final_layer_img.{m}.{p}" for m in ("linear", "adaLN_modulation.1")
                    for p in ("weight", "bias")}
            out |= {t + f"final_layer_txt.adaLN_modulation.1.{p}" for p in ("weight", "bias")}
        else:
            out |= {t + f"final_layer_txt.{m}.{p}" for m in ("linear", "adaLN_modulation.1")
                    for p in ("weight", "bias")}
        depth = kw[f"{side}_depth"]
        readout = "txt" if side == "encoder" else "img"
        for i in range(depth):
            b = f"{t}double_blocks.{i}."
            for s in ("img", "txt"):
                if side == "encoder":
                    out |= {f"{b}{s}_mod.lin.{p}" for p in ("weight", "bias")}
                if i == depth - 1 and s != readout:
                    out |= {f"{b}{s}_attn.proj.{p}" for p in ("weight", "bias")}
                    out |= {f"{b}{s}_mlp.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
    return out


def flowmo_workdir_config(kw: Mapping[str, Any], variant: str, sampler: Mapping[str, Any],
                          source: str) -> dict[str, Any]:
    """A ``configs/flowmo.py``-style config (task ``flowmo``) for the imported weights: the
    published variant's config where the shapes match one, else ``tiny``'s with these shapes;
    inference-only optimizer (everything frozen, no EMA)."""
    model = {"name": "flowmo", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
             "remat": False, "scan_layers": bool(kw.get("scan_layers", False))}
    return {
        "family": "flowmo", "variant": variant, "source": source,
        "task": {"name": "flowmo"}, "seed": 0, "model": model, "compute_dtype": "float32",
        "init_from": "",
        "data": {"source": "sample", "image_size": int(kw["image_size"]), "data_dir": "",
                 "worker_count": 0, "eval_batch_size": 8, "eval_num_images": 0},
        "total_steps": 0, "batch_size": 8,
        "flowmo": {"stage": "main", "freeze_encoder_after": 0, "cfg_dropout": 0.1,
                   "time_sampler": "flowmo", "eval_steps": int(sampler["steps"]),
                   "eval_guidance": float(sampler["guidance"]), "eval_seed": 0, "post_steps": 8,
                   "post_reward": "l2", "post_reward_weight": 0.01},
        "optimizer": {"lr": 0.0, "end_lr": 0.0, "warmup_steps": 0, "b1": 0.9, "b2": 0.95,
                      "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 0.0, "accumulation_steps": 1,
                      "ema_decay": 0.0, "no_decay": "", "frozen": ".*", "frozen_from_step": 0,
                      "fix_norms": ""},
        "losses": {"perceptual_weight": 0.0, "perceptual_weights": "", "convnext_weights": ""},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "logical_axis_rules": [],
        "checkpoint": {"every_steps": 1, "keep": 1, "keep_every_steps": 0, "async_save": False},
        "log_every_steps": 1, "eval_every_steps": 0, "samples": {"num_images": 8},
        "eval": {"inception_weights": "", "fid_reference": "", "fid_method": "sqrtm"},
    }
