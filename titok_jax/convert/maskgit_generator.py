"""Official TiTok MaskGIT generators (bytedance/1d-tokenizer ``modeling/maskgit.py``) -> a
``maskgit`` generator (``generators.maskgit.MaskGITTransformer``).

Released: ``generator_titok_l32.bin`` / ``generator_titok_b64.bin`` (``ImageBert``: HF
``BertModel`` + ``lm_head``, our ``arch="vit"``) and ``generator_titok_s128.bin`` (``UViTBert``,
our ``arch="uvit"``), bare state dicts, and the HF folders (``config.json`` + ``model.safetensors``).
The kind is recognised by tensor names (:func:`generator_arch`); every size but the head count is
read from the tensors. Heads come from ``config.json`` (``model.generator.num_attention_heads``) or,
without one, from the published variant whose shapes match (all three have 16). The released
config.json keeps ``image_seq_len: "${model.vq_model.num_latent_tokens}"`` unresolved: it is
resolved from the position table (checked against ``vq_model.num_latent_tokens`` when present);
every other size the config gives must agree with the tensors.

Name table (``L = model.encoder.layer.{i}``, ``B`` = ``{in_blocks.{i},mid_block,out_blocks.{i}}``
-> ``{in_blocks_{i},mid_block,out_blocks_{i}}``; PyTorch ``Linear [out, in]`` -> ``[in, out]``; ``W``
width, ``H`` heads, ``d = W/H``, ``V = K + C + 2`` rows, ``N`` tokens)::

    vit   model.embeddings.word_embeddings.weight [V, W]   -> word_embeddings
          model.embeddings.position_embeddings.weight [N+1, W] -> position_embeddings/embedding
          model.embeddings.token_type_embeddings.weight [2, W] -> token_type_embeddings
          model.embeddings.LayerNorm.{weight,bias}         -> embeddings_ln/{scale,bias}
          L.attention.self.{query,key,value}.weight [W, W] -> layer_{i}/attn/{query,key,value}/kernel [W, H, d]
          L.attention.self.{query,key,value}.bias [W]      -> .../bias [H, d]
          L.attention.output.dense.weight [W, W] / .bias   -> layer_{i}/attn/out/kernel [H, d, W] / bias
          L.attention.output.LayerNorm                     -> layer_{i}/attn_ln
          L.intermediate.dense / L.output.dense            -> layer_{i}/mlp/fc_in, mlp/fc_out
          L.output.LayerNorm                               -> layer_{i}/mlp_ln
          model.lm_head.{weight [K, W],bias}               -> lm_head
          (buffers model.embeddings.position_ids / token_type_ids, if saved, are ignored)
    uvit  embeddings.weight [V, W]                         -> word_embeddings
          pos_embed [1, N+1, W]                            -> position_embeddings/embedding
          B.norm1 / B.norm2                                -> .../ln_1, ln_2
          B.attn.qkv.weight [3W, W] (rows q, k, v; no bias) -> .../attn/qkv/kernel [W, 3, H, d]
          B.attn.proj.{weight,bias}                        -> .../attn/out/kernel [H, d, W] / bias
          B.mlp.fc1 / B.mlp.fc2                            -> .../mlp/fc_in, mlp/fc_out
          out_blocks.{i}.skip_linear [W, 2W]               -> out_blocks_{i}_skip_linear
          norm, lm_head                                    -> norm, lm_head

Every tensor is consumed and every param filled (``convert.common.StateDictReader``,
``trees.check_tree_matches``); the first problem raises one ``ValueError`` naming it.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from titok_jax.convert.common import StateDictReader, linear_kernel, out_kernel, qkv_kernel
from titok_jax.generators.maskgit import GENERATOR_VARIANTS, SAMPLER_DEFAULTS, MaskGITTransformer
from titok_jax.trees import check_tree_matches, unflatten

Row = tuple[str, str, tuple[int, ...], Any]
BERT_BUFFERS = ("model.embeddings.position_ids", "model.embeddings.token_type_ids")
PUBLISHED = ("titok_l32", "titok_b64", "titok_s128")
DEFAULT_SAMPLER = dict(steps=8, randomize_temperature=1.0, guidance_scale=2.0,
                       guidance_schedule="linear")


def generator_arch(keys: Any) -> str | None:
    """``"vit"`` (ImageBert), ``"uvit"`` (UViTBert) or None, from the state dict's names."""
    keys = set(keys)
    if "model.lm_head.weight" in keys and "model.embeddings.word_embeddings.weight" in keys:
        return "vit"
    if {"lm_head.weight", "embeddings.weight", "pos_embed"} <= keys:
        return "uvit"
    return None


def _shape(sd: Mapping[str, np.ndarray], key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{source}: missing tensor {key!r}")
    shape = tuple(int(s) for s in np.shape(sd[key]))
    if len(shape) != ndim:
        raise ValueError(f"{source}: tensor {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def _count(keys: Any, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def _generator_section(config: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    if config is None:
        return {}
    gen = config.get("model", {}).get("generator") if isinstance(config.get("model"), Mapping) else None
    if not isinstance(gen, Mapping):
        raise ValueError(f"{source}: config has no 'model.generator' (not a TiTok generator config.json)")
    return dict(gen)


def infer_generator_kwargs(sd: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None,
                           source: str = "state dict", config_source: str = "config.json"
                           ) -> tuple[dict[str, Any], str | None]:
    """``(MaskGITTransformer kwargs, published variant name or None)`` from the tensor shapes and
    the release's ``config.json`` (``config``; None for a bare state dict)."""
    arch = generator_arch(sd)
    if arch is None:
        raise ValueError(f"{source}: not a TiTok generator state dict (no 'model.lm_head.weight' "
                         "nor 'lm_head.weight' + 'pos_embed')")
    if arch == "vit":
        vocab, width = _shape(sd, "model.embeddings.word_embeddings.weight", 2, source)
        k = _shape(sd, "model.lm_head.weight", 2, source)[0]
        n = _shape(sd, "model.embeddings.position_embeddings.weight", 2, source)[0] - 1
        depth = _count(sd, r"model\.encoder\.layer\.(\d+)\..*")
        mlp_key = "model.encoder.layer.0.intermediate.dense.weight"
    else:
        vocab, width = _shape(sd, "embeddings.weight", 2, source)
        k = _shape(sd, "lm_head.weight", 2, source)[0]
        n = _shape(sd, "pos_embed", 3, source)[1] - 1
        depth = 2 * _count(sd, r"in_blocks\.(\d+)\..*")
        mlp_key = "mid_block.mlp.fc1.weight"
    mlp = _shape(sd, mlp_key, 2, source)[0]
    classes = vocab - k - 2
    if classes < 1 or depth < 1 or n < 1:
        raise ValueError(f"{source}: inconsistent generator shapes (vocabulary {vocab} rows for "
                         f"{k} codes, {depth} layers, {n} tokens)")
    kw: dict[str, Any] = dict(codebook_size=k, num_tokens=n, num_classes=classes, width=width,
                              depth=depth, mlp_ratio=mlp / width, arch=arch)
    if int(kw["mlp_ratio"] * width) != mlp:
        raise ValueError(f"{source}: intermediate size {mlp} is not a whole multiple ratio of width {width}")
    variant = next((v for v in PUBLISHED if all(GENERATOR_VARIANTS[v][f] == kw[f] for f in kw)), None)
    gen = _generator_section(config, config_source)
    if gen:
        seq = gen.get("image_seq_len", n)
        if isinstance(seq, str):   # the unresolved "${model.vq_model.num_latent_tokens}"
            seq = (config["model"].get("vq_model") or {}).get("num_latent_tokens", n)
        vq = config.get("model", {}).get("vq_model") or {}
        checks = {"vq_model.codebook_size": (vq.get("codebook_size", k), k),
                  "hidden_size": (gen.get("hidden_size", width), width),
                  "num_hidden_layers": (gen.get("num_hidden_layers", depth), depth),
                  "intermediate_size": (gen.get("intermediate_size", mlp), mlp),
                  "condition_num_classes": (gen.get("condition_num_classes", classes), classes),
                  "image_seq_len": (seq, n)}
        for name, (said, found) in checks.items():
            if isinstance(said, str) or int(said) != found:
                raise ValueError(f"{config_source}: {name} is {said!r} but the tensors of {source} "
                                 f"give {found}")
        if "num_attention_heads" not in gen:
            raise ValueError(f"{config_source}: model.generator has no num_attention_heads")
        kw["num_heads"] = int(gen["num_attention_heads"])
        drop = 0.0 if arch == "uvit" else float(gen.get("dropout", 0.1))
        kw.update(dropout=drop,
                  attention_dropout=0.0 if arch == "uvit" else float(gen.get("attn_drop", drop)))
    elif variant is not None:
        kw.update(num_heads=GENERATOR_VARIANTS[variant]["num_heads"],
                  dropout=GENERATOR_VARIANTS[variant]["dropout"],
                  attention_dropout=GENERATOR_VARIANTS[variant]["attention_dropout"])
    else:
        raise ValueError(f"{source}: the head count is not in the tensors and the shapes match no "
                         f"released generator ({', '.join(PUBLISHED)}); put its config.json beside it")
    if width % kw["num_heads"]:
        raise ValueError(f"{config_source}: width {width} is not divisible by {kw['num_heads']} heads")
    if variant is not None and kw["num_heads"] != GENERATOR_VARIANTS[variant]["num_heads"]:
        variant = None
    return kw, variant


def generator_name_table(kw: Mapping[str, Any]) -> list[Row]:
    """Rows ``(torch key, flat flax key, torch shape, transform)`` (module docstring)."""
    w, h, n, k = int(kw["width"]), int(kw["num_heads"]), int(kw["num_tokens"]), int(kw["codebook_size"])
    vocab, m = k + int(kw["num_classes"]) + 2, int(float(kw["mlp_ratio"]) * w)
    qk = lambda x: np.ascontiguousarray(x.T.reshape(w, h, w // h))  # noqa: E731
    heads_bias = lambda x: x.reshape(h, w // h)  # noqa: E731

    def mlp_rows(t: str, f: str, fc_in: str, fc_out: str) -> list[Row]:
        return [(f"{t}.{fc_in}.weight", f"{f}/mlp/fc_in/kernel", (m, w), linear_kernel),
                (f"{t}.{fc_in}.bias", f"{f}/mlp/fc_in/bias", (m,), None),
                (f"{t}.{fc_out}.weight", f"{f}/mlp/fc_out/kernel", (w, m), linear_kernel),
                (f"{t}.{fc_out}.bias", f"{f}/mlp/fc_out/bias", (w,), None)]

    def norm_rows(t: str, f: str) -> list[Row]:
        return [(f"{t}.weight", f"{f}/scale", (w,), None), (f"{t}.bias", f"{f}/bias", (w,), None)]

    if kw["arch"] == "vit":
        e = "model.embeddings"
        rows: list[Row] = [
            (f"{e}.word_embeddings.weight", "word_embeddings", (vocab, w), None),
            (f"{e}.position_embeddings.weight", "position_embeddings/embedding", (n + 1, w), None),
            (f"{e}.token_type_embeddings.weight", "token_type_embeddings", (2, w), None),
            *norm_rows(f"{e}.LayerNorm", "embeddings_ln")]
        for i in range(int(kw["depth"])):
            t, f = f"model.encoder.layer.{i}", f"layer_{i}"
            for q in ("query", "key", "value"):
                rows += [(f"{t}.attention.self.{q}.weight", f"{f}/attn/{q}/kernel", (w, w), qk),
                         (f"{t}.attention.self.{q}.bias", f"{f}/attn/{q}/bias", (w,), heads_bias)]
            rows += [(f"{t}.attention.output.dense.weight", f"{f}/attn/out/kernel", (w, w),
                      out_kernel(h)),
                     (f"{t}.attention.output.dense.bias", f"{f}/attn/out/bias", (w,), None),
                     *norm_rows(f"{t}.attention.output.LayerNorm", f"{f}/attn_ln"),
                     *mlp_rows(t, f, "intermediate.dense", "output.dense"),
                     *norm_rows(f"{t}.output.LayerNorm", f"{f}/mlp_ln")]
        head = "model.lm_head"
    else:
        rows = [("embeddings.weight", "word_embeddings", (vocab, w), None),
                ("pos_embed", "position_embeddings/embedding", (1, n + 1, w), lambda x: x[0])]
        half = int(kw["depth"]) // 2
        blocks = ([(f"in_blocks.{i}", f"in_blocks_{i}") for i in range(half)] + [("mid_block", "mid_block")]
                  + [(f"out_blocks.{i}", f"out_blocks_{i}") for i in range(half)])
        for t, f in blocks:
            if t.startswith("out_blocks"):
                rows += [(f"{t}.skip_linear.weight", f"{f}_skip_linear/kernel", (w, 2 * w), linear_kernel),
                         (f"{t}.skip_linear.bias", f"{f}_skip_linear/bias", (w,), None)]
            rows += [*norm_rows(f"{t}.norm1", f"{f}/ln_1"),
                     (f"{t}.attn.qkv.weight", f"{f}/attn/qkv/kernel", (3 * w, w), qkv_kernel(h)),
                     (f"{t}.attn.proj.weight", f"{f}/attn/out/kernel", (w, w), out_kernel(h)),
                     (f"{t}.attn.proj.bias", f"{f}/attn/out/bias", (w,), None),
                     *norm_rows(f"{t}.norm2", f"{f}/ln_2"),
                     *mlp_rows(t, f, "mlp.fc1", "mlp.fc2")]
        rows += norm_rows("norm", "norm")
        head = "lm_head"
    rows += [(f"{head}.weight", "lm_head/kernel", (k, w), linear_kernel),
             (f"{head}.bias", "lm_head/bias", (k,), None)]
    return rows


def abstract_generator_params(kw: Mapping[str, Any]) -> Any:
    """The params of ``MaskGITTransformer(**kw)`` as ShapeDtypeStructs."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    model = MaskGITTransformer(**kw)
    tokens, labels = jnp.zeros((1, model.num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32)
    return nn.unbox(jax.eval_shape(lambda key: model.init(key, tokens, labels)["params"],
                                   jax.random.key(0)))


def generator_params_from_state_dict(sd: Mapping[str, np.ndarray], kw: Mapping[str, Any],
                                     source: str = "state dict") -> dict:
    """Official generator state dict -> params of ``MaskGITTransformer(**kw)`` (float32 numpy)."""
    reader = StateDictReader(sd, source)
    flat = {f: reader.take(t, shape, transform or (lambda x: x), what=f)
            for t, f, shape, transform in generator_name_table(kw)}
    reader.finish(ignore=[lambda key: key in BERT_BUFFERS])
    params = unflatten(flat)
    check_tree_matches(params, abstract_generator_params(kw), source=f"{source} (converted)")
    return params


def generator_workdir_config(kw: Mapping[str, Any], variant: str | None,
                             config: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """A full ``configs/maskgit.py``-style run config (task ``maskgit``, inference-only:
    everything frozen, no EMA, float32 compute) for the imported generator."""
    gen = _generator_section(config, source) if config else {}
    sampler = dict(SAMPLER_DEFAULTS.get(variant or "", DEFAULT_SAMPLER))
    if variant is None:
        for ours, theirs in (("steps", "num_steps"), ("randomize_temperature", "randomize_temperature"),
                             ("guidance_scale", "guidance_scale"), ("guidance_schedule", "guidance_decay")):
            if theirs in gen:
                sampler[ours] = gen[theirs]
    return {
        "family": "maskgit", "variant": variant or "imported", "source": source,
        "task": {"name": "maskgit"}, "seed": 0, "model": {"name": "maskgit", **kw},
        "compute_dtype": "float32",
        "data": {"source": "tokens:", "image_size": 256, "data_dir": "", "worker_count": 0,
                 "eval_batch_size": 8, "eval_num_images": 0},
        "tokenizer": {"workdir": ""}, "total_steps": 0, "batch_size": 8,
        "optimizer": {"lr": 0.0, "end_lr": 0.0, "warmup_steps": 0, "b1": 0.9, "b2": 0.96,
                      "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 0.0, "accumulation_steps": 1,
                      "ema_decay": 0.0, "no_decay": "", "frozen": ".*"},
        "generator": {"mask_schedule": "arccos", "label_smoothing": 0.1, "unmasked_weight": 0.1,
                      "class_dropout": 0.1, "sampler": sampler},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "logical_axis_rules": [],
        "checkpoint": {"every_steps": 1, "keep": 1, "keep_every_steps": 0, "async_save": False},
        "log_every_steps": 1, "eval_every_steps": 0, "samples": {"num_images": 8},
    }
