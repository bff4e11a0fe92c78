"""GPT-style autoregressive generators on tokenizer ids (issue 6; reference/flextok_flowmo.md A4).

COMMANDS (CPU, minutes: tiny on the tiny TiTok's tokens of the sample photographs):
  titok-jax train --config configs/titok.py:tiny --workdir workdirs/tiny
  titok-jax tokenize --workdir workdirs/tiny --data sample --epochs 8 --output workdirs/tiny_tokens
  titok-jax train --config configs/ar.py:tiny --workdir workdirs/tiny_ar \\
      --config.data.source=tokens:workdirs/tiny_tokens
  titok-jax generate --workdir workdirs/tiny_ar --tokenizer workdirs/tiny --output samples/
(or tokens on the fly: --config.data.source=sample --config.tokenizer.workdir=workdirs/tiny).

Published sizes: class-conditional AR models on FlexTok's 256 ordered FSQ tokens (64,000 codes),
w = 64 d and d heads, LlamaGen-style blocks (RMSNorm, SwiGLU, RoPE, no biases), as the unofficial
re-implementation deboradum/ml-flextok-ar-generation sizes them: ``flextok_d10`` ("AR_49M") and
``flextok_d30`` ("AR_1330M", the 1.33B third-party tables list next to FlexTok). No official
FlexTok AR code or recipe is released; the recipe here is LlamaGen's c2i one (AdamW lr 1e-4, betas
(0.9, 0.95), wd 0.05, clip 1.0, batch 256, 300 ImageNet epochs = 1.5M steps at batch 256, class
dropout 0.1, dropout 0.1) and its sampler defaults (temperature 1, top-k 2000, top-p 1, CFG 4.0);
d10 uses the re-implementation's lr 1.2e-3 with a cosine to 1%. The EMA (0.9999) is ours.
Multi-index tokens: ``tiny_factorized`` (FQGAN's factorized head: ``model.num_codebooks = k``
for fq / rq ids [N, k], per-factor embeddings summed at the input, or ``factor_embedding=concat``
and a Linear as FAR; a ``head_depth``-block head predicts factor after factor, CE summed over the
factors) and ``tiny_split_bits`` (Open-MAGVIT2's head for a many-bit LFQ index:
``model.split_bits`` = bit widths, LSB first, each group a softmax over 2^bits);
``--config.model.position_embedding=rope_2d`` for grid tokens (a square number of them):
  titok-jax train --config configs/titok.py:tiny_vq,quantizer=fq --workdir workdirs/tiny_fq
  titok-jax tokenize --workdir workdirs/tiny_fq --data sample --output workdirs/tiny_fq_tokens
  titok-jax train --config configs/ar.py:tiny_factorized --workdir workdirs/tiny_far \\
      --config.data.source=tokens:workdirs/tiny_fq_tokens
Sample any prefix length with ``--config.generator.sampler.max_len=k`` (or
``Generator.sample(..., max_len=k)``).
"""
from __future__ import annotations

import ml_collections

from titok_jax.generators.ar import AR_VARIANTS

PUBLISHED = ("flextok_d10", "flextok_d30")
# Several sub-tokens per position (generators/ar_subtokens.py), tiny: FQGAN's factorized head on
# the ids [32, 2] of configs/titok.py:tiny_vq,quantizer=fq (2 factors of 16 codes), and
# Open-MAGVIT2's split-bit head on the 12-bit index of tiny_vq,quantizer=lfq,bits=12 (2 x 6 bits).
SUB_TOKENS = {
    "tiny_factorized": dict(codebook_size=16, num_codebooks=2, factor_embedding="sum", head_depth=1),
    "tiny_split_bits": dict(codebook_size=4096, split_bits=(6, 6), factor_embedding="sum",
                            head_depth=1),
}
SHARDS = {"tiny_factorized": "_fq", "tiny_split_bits": "_lfq"}
VARIANTS = ("tiny",) + tuple(SUB_TOKENS) + PUBLISHED


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown ar variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tiny = variant == "tiny" or variant in SUB_TOKENS
    c = ml_collections.ConfigDict()
    c.family = "ar"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "ar"})
    c.seed = 0
    model = dict(AR_VARIANTS["tiny" if tiny else variant])
    if tiny:
        # The tiny TiTok's tokens (32 ids from 256 codes); one class per sample photograph.
        model.update(codebook_size=256, num_tokens=32, num_classes=6, width=128, depth=4, num_heads=4,
                     token_dropout=0.1, dropout=0.1)
        model.update(SUB_TOKENS.get(variant, {}))
    model.update(remat=not tiny)
    c.model = ml_collections.ConfigDict({"name": "ar", **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    # data.source: "tokens:DIR" (pre-tokenized shards) or an image source tokenized on the fly by
    # the frozen tokenizer of tokenizer.workdir.
    c.data = ml_collections.ConfigDict({
        "source": (f"tokens:workdirs/tiny{SHARDS.get(variant, '')}_tokens" if tiny else "tokens:"),
        "image_size": 64 if tiny else 256, "data_dir": "", "worker_count": 0,
        "eval_batch_size": 32 if tiny else 256, "eval_num_images": 0})
    c.tokenizer = ml_collections.ConfigDict({"workdir": ""})
    c.total_steps = 2000 if tiny else 1_500_000
    c.batch_size = 64 if tiny else 256
    lr = 1e-3 if tiny else {"flextok_d10": 1.2e-3, "flextok_d30": 1e-4}[variant]
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "end_lr": lr / 100 if variant != "flextok_d30" else lr,
        "warmup_steps": 100 if tiny else 10_000,
        "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.05, "grad_clip": 1.0,
        "accumulation_steps": 1, "ema_decay": 0.99 if tiny else 0.9999, "no_decay": "", "frozen": ""})
    sampler = (dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=2.0, max_len=0) if tiny else
               dict(temperature=1.0, top_k=2000, top_p=1.0, guidance_scale=4.0, max_len=0))
    c.generator = ml_collections.ConfigDict({"label_smoothing": 0.0, "class_dropout": 0.1,
                                             "sampler": sampler})
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000 if tiny else 10_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 100_000, "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 1000 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    return c
