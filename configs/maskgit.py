"""MaskGIT generators on the tokens of a trained tokenizer (reference/titok.md 4.1).

COMMANDS (CPU, minutes: tiny on the tiny TiTok's tokens of the sample photographs):
  titok-jax train --config configs/titok.py:tiny --workdir workdirs/tiny
  titok-jax tokenize --workdir workdirs/tiny --data sample --epochs 8 --output workdirs/tiny_tokens
  titok-jax train --config configs/maskgit.py:tiny --workdir workdirs/tiny_maskgit \\
      --config.data.source=tokens:workdirs/tiny_tokens
  titok-jax generate --workdir workdirs/tiny_maskgit --tokenizer workdirs/tiny --output samples/
(or tokens on the fly: --config.data.source=sample --config.tokenizer.workdir=workdirs/tiny).

Video (`video_tiny`: masked video generation over the tiny causal MAGVIT-v2's 3 x 8 x 8 latent
grid of 2^10 codes; factorised 3D position embeddings; a quarter of the samples trained with their
first latent frame given, MAGVIT's frame-prediction condition in its `input->input` mode):
  titok-jax train --config configs/magvit2_video.py:tiny --workdir workdirs/magvit2_video_tiny
  titok-jax tokenize --workdir workdirs/magvit2_video_tiny --data sample_video --output workdirs/video_tokens
  titok-jax train --config configs/maskgit.py:video_tiny --workdir workdirs/video_maskgit \
      --config.data.source=tokens:workdirs/video_tokens
  titok-jax generate --workdir workdirs/video_maskgit --tokenizer workdirs/magvit2_video_tiny --output clips/
  titok-jax generate ... --first_frame photo.png --output predicted/     (frame prediction)

Published generators (ImageNet, 256x256): titok_l32 / titok_b64 (ImageBert, 768 x 24, 177M) and
titok_s128 (UViT 1024 wide, 21 blocks). Recipe: AdamW lr 2e-4, betas (0.9, 0.96), wd 0.03, 10k
warmup, cosine to 1e-5, 500k steps, batch 2048, bf16, EMA; label smoothing 0.1, unmasked weight
0.1, class dropout 0.1; arccos masking.
"""
from __future__ import annotations

import ml_collections

from titok_jax.generators.maskgit import GENERATOR_VARIANTS, SAMPLER_DEFAULTS

PUBLISHED = ("titok_l32", "titok_b64", "titok_s128")
VARIANTS = ("tiny", "video_tiny") + PUBLISHED


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown maskgit variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    video = variant == "video_tiny"
    tiny = variant in ("tiny", "video_tiny")
    c = ml_collections.ConfigDict()
    c.family = "maskgit"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "maskgit"})
    c.seed = 0
    model = dict(GENERATOR_VARIANTS["tiny" if video else variant])
    if video:
        # configs/magvit2_video.py:tiny: 5 frames of 32^2 -> a latent grid 3 x 8 x 8 of 2^10 LFQ
        # codes; sample_video's 6 training photographs are the classes
        model.update(codebook_size=1024, num_tokens=3 * 8 * 8, grid_shape=(3, 8, 8), num_classes=6,
                     width=128, depth=4, num_heads=4, dropout=0.1, attention_dropout=0.1)
    elif tiny:
        # The tiny TiTok's tokens (32 ids from 256 codes); one class per sample photograph.
        model.update(codebook_size=256, num_tokens=32, num_classes=6, width=128, depth=4, num_heads=4,
                     dropout=0.1, attention_dropout=0.1)
    c.model = ml_collections.ConfigDict({"name": "maskgit", **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    # data.source: "tokens:DIR" (pre-tokenized shards) or an image source tokenized on the fly by
    # the frozen tokenizer of tokenizer.workdir.
    c.data = ml_collections.ConfigDict({
        "source": ("tokens:workdirs/video_tokens" if video else
                   "tokens:workdirs/tiny_tokens" if tiny else "tokens:"),
        "image_size": 32 if video else 64 if tiny else 256, "data_dir": "", "worker_count": 0,
        "eval_batch_size": 32 if tiny else 256, "eval_num_images": 0})
    c.tokenizer = ml_collections.ConfigDict({"workdir": ""})
    c.total_steps = 2000 if tiny else 500_000
    c.batch_size = 64 if tiny else 2048
    c.optimizer = ml_collections.ConfigDict({
        "lr": 1e-3 if tiny else 2e-4, "end_lr": 1e-5, "warmup_steps": 100 if tiny else 10_000,
        "b1": 0.9, "b2": 0.96, "eps": 1e-8, "weight_decay": 0.03, "grad_clip": 1.0,
        "accumulation_steps": 1, "ema_decay": 0.999 if not tiny else 0.99, "no_decay": "", "frozen": ""})
    sampler = dict(SAMPLER_DEFAULTS.get(variant, dict(steps=8, randomize_temperature=1.0,
                                                      guidance_scale=2.0, guidance_schedule="linear")))
    c.generator = ml_collections.ConfigDict({
        "mask_schedule": "arccos", "label_smoothing": 0.1, "unmasked_weight": 0.1, "class_dropout": 0.1,
        "sampler": sampler})
    if video:
        # the chance that a sample's first latent frame is given (never masked): frame prediction
        c.generator.first_frame_prob = 0.25
        c.data.num_frames = 5
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000 if tiny else 10_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 100_000, "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 1000 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    return c
