"""FlowMo (reference/flextok_flowmo.md part B): `tiny` for a CPU, the published `lo` / `hi`, and
their mode-seeking post-training stages `*_post`.

COMMAND (CPU, minutes):
  titok-jax train --config configs/flowmo.py:tiny --workdir workdirs/flowmo_tiny
  titok-jax train --config configs/flowmo.py:tiny_post --workdir workdirs/flowmo_tiny_post \
      --config.init_from=workdirs/flowmo_tiny
COMMAND (published, GPU host / TPU pod via launch/):
  titok-jax train --config configs/flowmo.py:lo --workdir gs://BUCKET/runs/flowmo_lo \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors
  titok-jax train --config configs/flowmo.py:lo_post --workdir gs://BUCKET/runs/flowmo_lo_post \
      --config.init_from=gs://BUCKET/runs/flowmo_lo --config.data.source=tfds:imagenet2012 \
      --config.losses.convnext_weights=convnext_s.safetensors

Published shapes (B2): 256x256 pixels, patch 4 (4096 image tokens), 256 latent tokens; encoder
width 768, 8 double-stream blocks, 12 heads; decoder width 1152, 16 blocks, 12 heads; MLP ratio 4;
RoPE axes (8, 28, 28) / (12, 42, 42). `lo`: 18 bits per token (0.0703 bpp), entropy over 9-bit
sub-tokens, ids: 256 of 18 bits. `hi`: 56 bits per token (0.219 bpp), entropy over 14-bit
sub-tokens, ids: 1024 of 14 bits (models/flowmo.py states the bit order).

Parameters (jax.eval_shape): lo 860,220,866 / hi 860,293,864 (encoder 108.1M, decoder 752.1M).
The reference's layout counts 945,374,085 / 945,520,081 (the "~945M" of B2): it also holds 85.2M
parameters its forward never uses (encoder: time MLP, adaLN, image head, the last block's image
update, the latent head's adaLN; decoder: the last block's latent update and the latent head), which
this implementation does not create; tests/test_flowmo_model.py checks both counts.

Published recipe (B3): Adam (muP at width multiplier 1 = plain Adam) lr 1e-4 constant, betas
(0.9, 0.95), no weight decay, batch 128 in 2 accumulation steps, EMA 0.9999, bf16; loss = flow MSE
+ LFQ (entropy 0.0025, commitment 0.000625) + 0.1 LPIPS-VGG on the one-step x0; t from
0.9 logit-normal + 0.1 uniform; CFG dropout 0.1; encoder frozen after 200k steps; 1.3M (lo) /
800k (hi) steps. Post-training: from the main run's raw params, lr 5e-5, batch 64 (2 accumulation
steps), 25k steps, 8-step random-time Euler chain back-propagated with remat, reward weight 0.01
(FlowMo: ResNet-50 logit MSE; here the ConvNeXt-S logit MSE, `post_reward`), encoder frozen.
Sampler: 25 Euler steps on t_i = (i/n)^4, CFG 1.5 on t in [0.145, 0.505].
Weight normalisation as FlowMo's `fix_initial_norms`: `optimizer.fix_norms` (block linear weights
keep their initial Frobenius norm).
"""
from __future__ import annotations

import os
import runpy

import ml_collections

# Shared sections and their defaults (configs/common.py).
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("lo", "hi")
VARIANTS = ("tiny", "lo", "hi", "tiny_post", "lo_post", "hi_post")

_PUBLISHED_MODEL = dict(image_size=256, patch_size=4, code_length=256, encoder_width=768,
                        encoder_depth=8, encoder_heads=12, decoder_width=1152, decoder_depth=16,
                        decoder_heads=12, mlp_ratio=4.0)
MODELS = {
    "tiny": dict(image_size=32, patch_size=4, code_length=16, token_bits=12, id_bits=12,
                 entropy_group_bits=6, encoder_width=64, encoder_depth=2, encoder_heads=2,
                 decoder_width=128, decoder_depth=2, decoder_heads=4),
    "lo": dict(_PUBLISHED_MODEL, token_bits=18, id_bits=18, entropy_group_bits=9),
    "hi": dict(_PUBLISHED_MODEL, token_bits=56, id_bits=14, entropy_group_bits=14),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown flowmo variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    size, _, post = variant.partition("_")
    post = post == "post"
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.family = "flowmo"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "flowmo"})
    c.seed = 0
    # Published sizes rematerialise every double-stream block, saving nothing ("full": 4,352 tokens
    # per image), and scan their blocks (layers/block/..., one leading layer axis; the readout-only
    # last block stays block_{depth-1}); `optimizer.fix_norms` keeps each layer's own norm.
    c.model = ml_collections.ConfigDict({"name": "flowmo", **MODELS[size], "remat": not tiny,
                                         "remat_policy": "" if tiny else "full",
                                         "scan_layers": not tiny})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    c.init_from = ""   # post stages: the main-stage workdir (its raw, non-EMA params)

    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": MODELS[size]["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 8 if tiny else 0,
    })
    if tiny:
        c.total_steps = 100 if post else 400
        c.batch_size = 16
    else:
        c.total_steps = 25_000 if post else (1_300_000 if size == "lo" else 800_000)
        c.batch_size = 64 if post else 128

    c.flowmo = ml_collections.ConfigDict({
        "stage": "post" if post else "main",
        # The encoder trains for this many steps, then is frozen (a step past total_steps: never).
        "freeze_encoder_after": 300 if tiny else 200_000,
        "cfg_dropout": 0.1,
        "time_sampler": "flowmo",          # 0.9 logit-normal(0, 1) + 0.1 U(0, 1)
        "eval_steps": 8 if tiny else 25,
        "eval_guidance": 1.5,
        "eval_seed": 0,
        "post_steps": 4 if tiny else 8,
        "post_reward": "l2" if tiny else "convnext",
        "post_reward_weight": 0.1 if tiny else 0.01,
    })
    lr = (1e-3 if not post else 5e-4) if tiny else (1e-4 if not post else 5e-5)
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "end_lr": lr, "warmup_steps": 0, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
        "weight_decay": 0.0, "grad_clip": 1.0 if tiny else 0.0,
        "accumulation_steps": 1 if tiny else 2, "ema_decay": 0.999 if tiny else 0.9999, "no_decay": "",
        # The encoder freeze (tasks/flowmo.py): no updates from `frozen_from_step` on (post: always).
        "frozen": r"^model/encoder/", "frozen_from_step": 0,
        # FlowMo's fix_initial_norms (l2): every linear weight of the double-stream blocks is
        # rescaled to its initial Frobenius norm after each update (per layer in a scanned stack).
        "fix_norms": r"^model/(encoder|decoder)/(block_\d+|layers/block)/.+/kernel$",
    })
    if not post:
        c.optimizer.frozen_from_step = c.flowmo.get_ref("freeze_encoder_after")

    c.losses = ml_collections.ConfigDict({
        # LPIPS-VGG on the one-step prediction x0 = x_t - t v (main stage).
        "perceptual_weight": 0.0 if (tiny or post) else 0.1, "perceptual_weights": "",
        "convnext_weights": "",            # post_reward = "convnext"
    })

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 200 if tiny else 5_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 100_000,
                                              "async_save": not tiny})
    c.log_every_steps = 25 if tiny else 100
    c.eval_every_steps = 200 if tiny else (5_000 if post else 50_000)
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    c.eval = _COMMON["eval_section"]()
    return c
