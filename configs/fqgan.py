"""FQGAN (showlab/FQGAN, "Factorized Visual Tokenization and Generation"): the LlamaGen VQGAN CNN
with one transformer-adapter branch and one l2-normalised 16384 x 8 codebook per factor, a
disentanglement regulariser and representation heads aligned with frozen teachers. `tiny_dual`
for a CPU; `dual` / `triple` (VQ-16, 256 px -> 16x16 tokens with 2 / 3 ids each) and `dual_ds8` /
`triple_ds8` (VQ-8, 32x32) are the released models' shapes and recipe.

COMMAND (CPU, minutes; a tiny RANDOM teacher, said loudly):
  titok-jax train --config configs/fqgan.py:tiny_dual --workdir workdirs/fqgan_tiny
COMMAND (a published shape and recipe; the teacher weights are files of the teachers' params:
`titok-jax convert-clip --input ViT-B-16.pt --output clip_b16.safetensors` (OpenAI .pt or a HF
openai/clip-vit-base-patch16 snapshot), `titok-jax convert-dinov2` for DINOv2-S):
  titok-jax train --config configs/fqgan.py:triple --workdir gs://BUCKET/runs/fqgan_triple \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors \
      --config.teachers.sem_mid.weights=dinov2_vits14.safetensors \
      --config.teachers.sem_high.weights=clip_b16.safetensors
To use the released weights, `titok-jax import-torch --input DIR --output W` converts
`fqgan_{dual,triple}_ds{16,8}.pt` (titok_jax.convert.fqgan).

Model (titok_jax/models/fqgan.py; reference/lineage_2d.md section 1): ch 128, ch_mult
(1,1,2,2,4) / (1,2,2,4), 2 res blocks (3 in the decoder), attention at the lowest level, z 256;
per factor a 6-layer adapter (width 512, 8 heads), GroupNorm-swish-conv3x3 to 256, quant_conv to
8, VQ 16384 x 8 with l2-normalised lookup (codebook 1.0, commitment 0.25, entropy 0.03 at T 0.01);
the codes concatenated [vis, sem...] -> post_quant_conv -> decoder. Dual: factors (vis, sem), the
sem head (width 1024, 3 blocks) aligned with CLIP ViT-L/14's CLS; Triple: (vis, sem_mid,
sem_high) with DINOv2-S/14 (384) and CLIP ViT-B/16 (768). Disentanglement 0.1, representation 0.5
per head (summed). Recipe (train_fqgan_{dual,triple}.sh): Adam lr 2e-4 constant, betas (0.9,
0.95), no weight decay, grad clip 1.0, batch 256, 40 epochs; MSE on [-1, 1] images (weight 4 on
ours in [0, 1]) + LPIPS 1.0 + hinge GAN 0.5 from step 20000 (LlamaGen's PatchGAN: ndf 64, 3
layers, BatchNorm in train mode in both passes). The teachers (tasks/fqgan.py) are CLIP's visual tower
(`"arch": "clip"`, `nets.clip.CLIPVisionTower`: the CLS token before `ln_post`, no projection)
and DINOv2 (`"arch": "dinov2"`, `nets.dinov2.ViTFeatures`), both exact, fed FQGAN's torch-`nearest`
256 -> 224 resize (`"resize": "nearest"`); the tiny config's random teacher is DINOv2-shaped.
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.fqgan import (DUAL, FQGAN_DUAL_DS8, FQGAN_DUAL_DS16, FQGAN_TRIPLE_DS8,
                                    FQGAN_TRIPLE_DS16, fqgan_quantizer)

_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("dual", "triple", "dual_ds8", "triple_ds8")
VARIANTS = ("tiny", "tiny_dual") + PUBLISHED   # "tiny" = "tiny_dual"
_MODELS = {"dual": FQGAN_DUAL_DS16, "triple": FQGAN_TRIPLE_DS16, "dual_ds8": FQGAN_DUAL_DS8,
           "triple_ds8": FQGAN_TRIPLE_DS8}
STEPS_PER_EPOCH = 5005   # ImageNet in batches of 256
EPOCHS = 40
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# teacher kwargs: CLIP ViT-L/14 and ViT-B/16 (nets.clip.CLIPVisionTower; 224 px, the CLIP
# mean / std), DINOv2-S/14 (nets.dinov2.ViTFeatures; the released table is 37 x 37, interpolated
# to 16 x 16 at 224 px); all take FQGAN's torch-legacy nearest resize of the 256-px batch
CLIP_L14 = dict(image_size=224, patch_size=14, width=1024, depth=24, num_heads=16,
                mean=CLIP_MEAN, std=CLIP_STD, resize="nearest")
CLIP_B16 = dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                mean=CLIP_MEAN, std=CLIP_STD, resize="nearest")
DINOV2_S14 = dict(image_size=224, patch_size=14, width=384, depth=12, num_heads=6,
                  layerscale=True, pos_grid=37, resize="nearest")


def _teacher(model: dict, arch: str = "dinov2", allow_random: bool = False) -> dict:
    return {"arch": arch, "model": dict(model), "weights": "", "allow_random": allow_random,
            "seed": 0}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _COMMON["split_variant"](arg, "tiny_dual")
    if variant not in VARIANTS:
        raise ValueError(f"unknown fqgan variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if options:
        raise ValueError(f"fqgan: unknown options {sorted(options)}")
    variant = "tiny_dual" if variant == "tiny" else variant
    tiny = variant == "tiny_dual"
    if tiny:
        # 64x64 crops, f4 (16x16 tokens of 2 x 512 codes), widths 32/64/64, one block per level,
        # one-layer adapters / head; a one-block random 64-wide ViT as the sem teacher.
        model = dict(image_size=64, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                     embed_dim=8, norm_groups=32, factors=DUAL, adapter_layers=1,
                     adapter_heads=4, head_widths=(0, 64), head_layers=1, head_heads=4,
                     representation_weight=0.5, quantizer=fqgan_quantizer(2, 512, 0.03))
        teachers = {"sem": _teacher(dict(image_size=64, patch_size=16, width=64, depth=1,
                                         num_heads=2), "dinov2", allow_random=True)}
    else:
        model = {**_MODELS[variant], "quantizer": dict(_MODELS[variant]["quantizer"])}
        if variant.startswith("dual"):
            teachers = {"sem": _teacher(CLIP_L14, "clip")}
        else:
            teachers = {"sem_mid": _teacher(DINOV2_S14, "dinov2"),
                        "sem_high": _teacher(CLIP_B16, "clip")}
    model = {**model, "ch_mult": list(model["ch_mult"]), "factors": list(model["factors"]),
             "head_widths": list(model["head_widths"])}

    c = ml_collections.ConfigDict()
    c.family = "fqgan"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "fqgan"})
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "fqgan", **model})
    c.teachers = ml_collections.ConfigDict(teachers)   # factor -> frozen teacher (tasks/fqgan.py)
    c.compute_dtype = "float32" if tiny else "auto"
    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": model["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 0,
    })
    c.total_steps = 1500 if tiny else EPOCHS * STEPS_PER_EPOCH
    c.batch_size = 8 if tiny else 256
    lr = 1e-3 if tiny else 2e-4
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "end_lr": 1e-4 if tiny else lr, "warmup_steps": 100 if tiny else 0,
        "b1": 0.9, "b2": 0.999 if tiny else 0.95, "eps": 1e-8,
        "weight_decay": 1e-4 if tiny else 0.0, "grad_clip": 1.0,
        "accumulation_steps": 1, "ema_decay": 0.999, "no_decay": "", "frozen": "",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": lr, "weight_decay": 0.0}})
    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l2", reconstruction_weight=4.0, perceptual_weight=0.0 if tiny else 1.0,
        gan_weight=0.0 if tiny else 0.5, gan_start_step=0 if tiny else 20_000, gan_loss="hinge",
        # LlamaGen's (taming's) PatchGAN with BatchNorm (running statistics in the train state)
        discriminator={"name": "patchgan", "ndf": 64, "n_layers": 3, "norm": "batch"})

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500 if tiny else 5_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 50_000,
                                              "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 500 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    c.eval = _COMMON["eval_section"]()
    return c
