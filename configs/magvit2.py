"""Open-MAGVIT2 (TencentARC/SEED-Voken; MAGVIT-v2's tokenizer re-implemented): a 2D CNN with an LFQ
bottleneck of 2^18 codes. `tiny` for a CPU, and the two ImageNet releases' shapes and recipes.

COMMAND (CPU, 10-20 minutes: 17 GFLOP a step, ~2 steps/s on a loaded 2-core machine):
  titok-jax train --config configs/magvit2.py:tiny --workdir workdirs/magvit2_tiny
COMMAND (a published shape and recipe, one GPU host or a TPU pod via launch/):
  titok-jax train --config configs/magvit2.py:open_magvit2_128 --workdir gs://BUCKET/runs/om2_128 \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors
To use the released weights instead of training, `titok-jax import-torch --input DIR --output W`
converts `imagenet_128_L.ckpt` / `imagenet_256_L.ckpt` (a DIR holding that one file; its EMA
weights; titok_jax.convert.magvit2).

The model (titok_jax/models/magvit2.py): no-bias residual blocks, stride-2 conv downsampling, a
decoder with adaptive GroupNorm on the quantized latent and depth-to-space upsampling; 18 LFQ bits.
`open_magvit2_128` = imagenet_lfqgan_128_L.yaml (ch 128, ch_mult (1,2,2,4), 4 blocks, 128 px ->
16x16 tokens), `open_magvit2_256` = imagenet_lfqgan_256_L.yaml (ch_mult (1,1,2,2,4), 256 px -> 16x16).
Recipe (reference/magvit.md 4.4-4.5): Adam lr 1e-4, betas (0.5, 0.9), no weight decay, no
clipping, constant but multiplied by 0.1 once epochs 250 and 300 of 350 (resp. 200 and 250 of 270)
have ended, for the model and the discriminator alike (OM2's `scheduler_type: "None"` with
`lr_drop_epoch`; here `schedule="step"` with `decay_steps` = those epochs x 5005 steps and
`decay_factor` 0.1, train/optimizer.py), EMA 0.999, batch 256 (8 x 32 GPUs) for 350
(resp. 270) ImageNet epochs of 5005 steps; loss L1 (OM2's on [-1, 1] images, so weight 2 on ours
in [0, 1]) + LPIPS 1.0 + LFQ (entropy 0.1 x (per-sample - codebook), commitment 0.25; the exact
2^18 mixture with OM2's 1e-5 in the codebook log: quantizers/lfq.py) + GAN from step 0: a fixed
generator weight 0.1, the non-saturating loss of each sample's mean PatchGAN logit, hinge for D
with LeCam (per logit, EMA decay 0.999) 0.01 (resp. 0.05); the PatchGAN is OM2's (ndf 64, 3
layers, BatchNorm in train mode in both passes; its running statistics are in the train state).
Differences: LeCam uses the EMAs before their update (OM2 updates first); the codebook entropy and
the discriminator's BatchNorm average over the global batch (OM2: each GPU's 8 images). OM2's
entropy annealing (off in its released configs) is
`--config.losses.entropy_anneal_ratio=3 --config.losses.entropy_anneal_steps=2000`.

Another quantizer is an option of the variant string, as in configs/vqgan.py:
`configs/magvit2.py:tiny,quantizer=fsq` (FSQ at about the same bits per token, at most 16;
z_channels follows), `quantizer=lfq|bsq|vq|fq|rq|vae`, and `bits=N`
(`open_magvit2_128,bits=16`: OM2's LFQ with 16 bits).
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.magvit2 import DEFAULT_QUANTIZER, OPEN_MAGVIT2_128, OPEN_MAGVIT2_256

# Shared sections and their defaults (configs/common.py).
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("open_magvit2_128", "open_magvit2_256")
VARIANTS = ("tiny",) + PUBLISHED
_MODELS = {"open_magvit2_128": OPEN_MAGVIT2_128, "open_magvit2_256": OPEN_MAGVIT2_256}
STEPS_PER_EPOCH = 5005   # ImageNet's 1 281 167 images in batches of 256 (the last one partial)
EPOCHS = {"open_magvit2_128": 350, "open_magvit2_256": 270}
# OM2's lr_drop_epoch: the lr is multiplied by LR_DROP_RATE once each of these epochs has ended
LR_DROP_EPOCHS = {"open_magvit2_128": (250, 300), "open_magvit2_256": (200, 250)}
LR_DROP_RATE = 0.1
LECAM = {"open_magvit2_128": 0.01, "open_magvit2_256": 0.05}
MAX_EXACT_GROUP = 24     # quantizers.lfq.MAX_GROUP_BITS


def om2_lfq(bits: int) -> dict:
    """OM2's LFQ sub-config for ``bits`` channels: its loss weights, T, the 1e-5 in the codebook
    log, and the exact batch entropy (one group of ``bits``; above 24 bits LFQ's default
    grouping splits the mixture)."""
    q = {**DEFAULT_QUANTIZER, "bits": int(bits), "batch_entropy_group_size": int(bits)}
    if bits > MAX_EXACT_GROUP:
        del q["batch_entropy_group_size"]
    return q


def _quantizer(model: dict, options: dict[str, str]) -> dict:
    """``quantizer=NAME`` / ``bits=N`` (``configs/common.py``) at the model's own bits by default
    (at most 16 for ``fsq``: the largest of its recommended level sets); an ``lfq`` result is
    OM2's LFQ (:func:`om2_lfq`) at those bits."""
    options = dict(options)
    if "quantizer" in options and "bits" not in options:   # common.py would assume 12 for an LFQ
        bits = model["z_channels"]
        # FSQ's paper recommends levels up to 2^16 codes
        options["bits"] = str(min(bits, 16) if options["quantizer"] == "fsq" else bits)
    model = _COMMON["quantizer_options"](model, options, "magvit2", dim_key="z_channels")
    if model["quantizer"]["name"] == "lfq":
        model["quantizer"] = om2_lfq(model["quantizer"]["bits"])
    return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _COMMON["split_variant"](arg, "tiny")
    if variant not in VARIANTS:
        raise ValueError(f"unknown magvit2 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tiny = variant == "tiny"
    if tiny:
        # 64x64 crops of the sample photographs, f4 (16x16 = 256 tokens of 2^10 codes: OM2's LFQ
        # loss at 10 bits), widths 32/32/64, one block per level (GroupNorm(32) needs widths of
        # 32 at least); batch 8, L1 and the LFQ terms only.
        model = dict(image_size=64, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=10,
                     quantizer=om2_lfq(10))
    else:
        base = _MODELS[variant]
        model = {**base, "quantizer": dict(base["quantizer"])}
    model = _quantizer(model, options)

    c = ml_collections.ConfigDict()
    c.family = "magvit2"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "tokenizer"})
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "magvit2", **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": model["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 0,  # 0 = the whole held-out split
    })
    c.total_steps = 1500 if tiny else EPOCHS[variant] * STEPS_PER_EPOCH
    c.batch_size = 8 if tiny else 256
    lr = 1e-3 if tiny else 1e-4
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "end_lr": 1e-4 if tiny else lr, "warmup_steps": 100 if tiny else 0,
        "b1": 0.9 if tiny else 0.5, "b2": 0.999 if tiny else 0.9, "eps": 1e-8,
        "weight_decay": 1e-4 if tiny else 0.0, "grad_clip": 1.0 if tiny else 0.0,
        "accumulation_steps": 1, "ema_decay": 0.999, "no_decay": "", "frozen": "",
    })
    if not tiny:   # OM2's constant lr with its epoch drops (the disc group inherits them)
        c.optimizer.update({"schedule": "step", "decay_factor": LR_DROP_RATE,
                            "decay_steps": [e * STEPS_PER_EPOCH for e in LR_DROP_EPOCHS[variant]]})
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": lr, "weight_decay": 0.0}})
    # tiny: the pixel loss and LFQ's terms only (no LPIPS weights, no GAN on six photographs)
    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l1", reconstruction_weight=2.0, perceptual_weight=0.0 if tiny else 1.0,
        gan_weight=0.0 if tiny else 0.1, gan_start_step=0, gan_loss="hinge_nonsat",
        lecam_weight=0.0 if tiny else LECAM[variant], lecam_decay=0.999, lecam_per_sample=True,
        # OM2's PatchGAN: taming's, with BatchNorm (running statistics in the train state)
        discriminator={"name": "patchgan", "ndf": 64, "n_layers": 3, "norm": "batch"})

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()  # () = titok_jax.train.sharding.DEFAULT_RULES
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500 if tiny else 5_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 50_000,
                                              "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 500 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    c.eval = _COMMON["eval_section"]()
    return c
