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

Published multi-index AR sizes (issue 17 §3; shapes in generators/ar.py AR_VARIANTS, parameter
counts below, checked in tests/test_ar_published_variants.py), class-conditional on 256 grid cells
(16 x 16, 256 px), ``position_embedding=rope_2d``, LlamaGen blocks (RMSNorm 1e-5, SwiGLU hidden
``find_multiple(int(8 D / 3), 256)``: 2816 / 3584 / 4096 for D = 1024 / 1280 / 1536, no biases),
1001 class rows (class dropout 0.1), token / residual / FFN dropout 0.1, attention dropout 0:
- ``far_b_dual``, ``far_l_dual``: FQGAN's FAR (reference lineage_2d.md §2) on FQGAN-Dual ids
  ``[256, 2]`` (vis, sem; 16384 codes each), ``factor_embedding=concat`` (+ Linear with bias, as
  FAR's ``aggregation_layer``), factor head of 3 (B) / 4 (L) blocks; ``far_b_triple`` the same on
  FQGAN-Triple ids ``[256, 3]`` (far_triple.py: same FAR-B shapes, a 3 D -> D aggregation, a third
  table and output). Recipe §2.5: AdamW lr 1e-4 constant (LlamaGen's trainer: no warm-up, no
  schedule), betas (0.9, 0.95), wd 0.05 on >= 2-D params only (embeddings included), clip 1.0,
  batch 256, 300 epochs = the evaluated step 1,500,000, no EMA (train_far_dual.sh passes no
  --ema); sampler of eval_far.sh: CFG 2.0, top-k 0, top-p 1.0, temperature 1.
- ``om2_ar_b``, ``om2_ar_l``, ``om2_ar_xl``: Open-MAGVIT2's AR (reference magvit.md §6) on one
  18-bit LFQ index per cell, ``split_bits=(6, 12)`` (pre = low 6 bits, post = high 12: the AR
  configs' ``factorized_bits: [6, 12]``, not the class default [9, 9]), the two tables summed at
  the input, 2 / 3 / 4 intra blocks. Recipe (TencentARC/Open-MAGVIT2
  configs/Open-MAGVIT2/gpu/imagenet_conditional_llama_{B,L,XL}.yaml): AdamW lr 3e-4 / 3e-4 /
  2.4e-4, betas (0.9, 0.95), wd 0.05 on >= 2-D params, clip 1.0, global batch 768 (24 x 32 GPUs,
  12 x 64, 8 x 96), 300 / 300 / 350 epochs of ImageNet's 1,281,167 images (1669 steps an epoch:
  500,700 / 500,700 / 584,150 steps), warm-up 6 / 6 / 7 epochs, decay to 0.1 x lr; sampler top-k 0,
  top-p 1.0 with the post group's CFG and temperature (below).

Where these differ from the published models (gaps; none changes a parameter count):
- RoPE: LlamaGen / FAR / Open-MAGVIT2 rotate position ``p >= 1`` (reading ``t_{p-1}``) by the
  grid cell of ``t_{p-1}`` and give the class prefix an all-zero table row (cos = sin = 0: its q
  and k are zeroed in every layer), and the sub-token head reuses rows 0..G-1 of the same table
  (sub-position 0 zeroed, 1 the identity); ours rotates position ``p`` by the cell of the token it
  predicts (the class by cell (0, 0), the identity) and the head by 1D RoPE over its sub-positions
  (reference lineage_2d.md §2.4 and pitfall 11, magvit.md §6). Same parameters, different
  function: not weight-compatible with a released checkpoint.
- FAR's loss is the mean of the per-factor CEs (``generator.subtoken_reduction="mean"`` in the
  far_* variants; the others keep the sum, the whole token's CE).
- Open-MAGVIT2's schedule (VAR-style: warm-up from 0.005 x lr, then a linear decay to 0.1 x lr) is
  approximated by our warm-up from 0 and a cosine to 0.1 x lr (train/optimizer.py has no linear
  decay); its sampler takes a (pre, post) pair of CFG scales and temperatures (B (1.9, 2.0) and
  1.0, L (1.9, 1.9) and (1.1, 1.0), XL (1.75, 1.85) and (1.1, 1.0)), ours one of each: the post
  group's (2.0 / 1.9 / 1.85, temperature 1.0).
- FAR trains in bf16 and Open-MAGVIT2 in fp16 mixed precision; ours ``compute_dtype=auto``.

Parameter counts (jax.eval_shape on init; "published" as each source rounds it):
  variant        published                          ours            ours / published
  far_b_dual     415M  (FQGAN paper, FAR-Base) *    417,104,896     1.0051
  far_l_dual     898M  (FQGAN paper, FAR-Large) *   901,195,520     1.0036
  far_b_triple   - (no published count)             451,707,904     -
  om2_ar_b       343M  (OM2 docs/Open-MAGVIT2.md)   343,570,432     1.0017
  om2_ar_l       804M                               804,362,240     1.0005
  om2_ar_xl      1.5B                               1,486,679,040   0.9911
* not in the reference files (lineage_2d.md lists no FAR count, FQGAN's README shows its table
  only as an image): the FQGAN paper's generation table (arXiv 2411.16681), unverified here. Our
  counts less FAR's aggregation Linear (2,098,176 / 3,278,080) are 415,006,720 / 897,917,440,
  so the paper appears to count without it.
"""
from __future__ import annotations

import ml_collections

from titok_jax.generators.ar import AR_VARIANTS

PUBLISHED = ("flextok_d10", "flextok_d30", "far_b_dual", "far_l_dual", "far_b_triple", "om2_ar_b",
             "om2_ar_l", "om2_ar_xl")
# Several sub-tokens per position (generators/ar_subtokens.py), tiny: FQGAN's factorized head on
# the ids [32, 2] of configs/titok.py:tiny_vq,quantizer=fq (2 factors of 16 codes), and
# Open-MAGVIT2's split-bit head on the 12-bit index of tiny_vq,quantizer=lfq,bits=12 (2 x 6 bits).
SUB_TOKENS = {
    "tiny_factorized": dict(codebook_size=16, num_codebooks=2, factor_embedding="sum", head_depth=1),
    "tiny_split_bits": dict(codebook_size=4096, split_bits=(6, 6), factor_embedding="sum",
                            head_depth=1),
}
SHARDS = {"tiny_factorized": "_fq", "tiny_split_bits": "_lfq"}
# The published recipes (module docstring). no_decay "(?!)" matches no path: weight decay on every
# >= 2-D param, embeddings included, as LlamaGen's optimizer groups (the default regex skips them).
_FLEXTOK_SAMPLER = dict(temperature=1.0, top_k=2000, top_p=1.0, guidance_scale=4.0, max_len=0)
_FAR_RECIPE = dict(lr=1e-4, end_lr=1e-4, warmup_steps=0, total_steps=1_500_000, batch_size=256,
                   ema_decay=0.0, no_decay="(?!)", subtoken_reduction="mean",
                   sampler=dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=2.0, max_len=0))
_OM2_EPOCH = 1669   # ceil(1,281,167 / 768) steps at the global batch of 768


def _om2_recipe(lr: float, epochs: int, warmup_epochs: int, guidance: float) -> dict:
    return dict(lr=lr, end_lr=lr / 10, warmup_steps=warmup_epochs * _OM2_EPOCH,
                total_steps=epochs * _OM2_EPOCH, batch_size=768, ema_decay=0.0, no_decay="(?!)",
                sampler=dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=guidance,
                             max_len=0))


RECIPES = {
    "flextok_d10": dict(lr=1.2e-3, end_lr=1.2e-3 / 100, warmup_steps=10_000, total_steps=1_500_000,
                        batch_size=256, ema_decay=0.9999, no_decay="", sampler=_FLEXTOK_SAMPLER),
    "flextok_d30": dict(lr=1e-4, end_lr=1e-4, warmup_steps=10_000, total_steps=1_500_000,
                        batch_size=256, ema_decay=0.9999, no_decay="", sampler=_FLEXTOK_SAMPLER),
    "far_b_dual": _FAR_RECIPE, "far_l_dual": _FAR_RECIPE, "far_b_triple": _FAR_RECIPE,
    "om2_ar_b": _om2_recipe(3e-4, 300, 6, 2.0),
    "om2_ar_l": _om2_recipe(3e-4, 300, 6, 1.9),
    "om2_ar_xl": _om2_recipe(2.4e-4, 350, 7, 1.85),
}
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
    recipe = (dict(lr=1e-3, end_lr=1e-3 / 100, warmup_steps=100, total_steps=2000, batch_size=64,
                   ema_decay=0.99, no_decay="",
                   sampler=dict(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=2.0, max_len=0))
              if tiny else RECIPES[variant])
    c.total_steps = recipe["total_steps"]
    c.batch_size = recipe["batch_size"]
    c.optimizer = ml_collections.ConfigDict({
        "lr": recipe["lr"], "end_lr": recipe["end_lr"], "warmup_steps": recipe["warmup_steps"],
        "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.05, "grad_clip": 1.0,
        "accumulation_steps": 1, "ema_decay": recipe["ema_decay"], "no_decay": recipe["no_decay"],
        "frozen": ""})
    sampler = dict(recipe["sampler"])
    c.generator = ml_collections.ConfigDict({
        "label_smoothing": 0.0, "class_dropout": 0.1, "sampler": sampler,
        # sub-token CEs summed (the whole token's CE) or averaged (FAR); tasks/ar.py
        "subtoken_reduction": (RECIPES.get(variant) or {}).get("subtoken_reduction", "sum")})
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000 if tiny else 10_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 100_000, "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 1000 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    return c
