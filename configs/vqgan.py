"""MaskGIT-VQGAN (a 2D CNN tokenizer, f16, 1024 codes): `tiny` for a CPU, and the published shape.

COMMAND (CPU, minutes):
  titok-jax train --config configs/vqgan.py:tiny --workdir workdirs/vqgan_tiny
COMMAND (published shape, one GPU host or a TPU pod via launch/):
  titok-jax train --config configs/vqgan.py:maskgit_f16_256 --workdir gs://BUCKET/runs/maskgit_vqgan \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors
To use the released weights instead of training, `titok-jax import-torch` converts
`maskgit-vqgan-imagenet-f16-256.bin` (titok_jax.convert.vqgan).

The released model was trained in JAX by the MaskGIT authors; no official PyTorch training config
exists. The recipe here is TiTok's (reference/titok.md 3.2 / 3.3) on this model: AdamW 1e-4,
betas (0.9, 0.999), wd 1e-4, 10k warmup, cosine, batch 256, EMA 0.999, L2 + LPIPS (weight 1) +
hinge GAN (0.1 from step 200k, LeCam 0.001) with the MaskBit discriminator; VQ beta 0.25.

The bottleneck is one sub-config, `model.quantizer = {"name": "vq", **VectorQuantizer's arguments}`
(titok_jax.quantizers.factory; "vae" with kl_weight also builds), set from the command line as e.g.
`--config.model.quantizer.codebook_size=512 --config.model.quantizer.use_ema=False`.
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.vqgan import MASKGIT_F16_256

# Shared sections and their defaults (configs/common.py).
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("maskgit_f16_256",)
VARIANTS = ("tiny",) + PUBLISHED


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown vqgan variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.family = "vqgan"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "tokenizer"})
    c.seed = 0

    model = {**MASKGIT_F16_256, "quantizer": dict(MASKGIT_F16_256["quantizer"])}
    if tiny:
        # 64x64 crops of the sample photographs, f4 (16x16 = 256 tokens of a 256-entry codebook),
        # widths 32/64/64. EMA codes with k-means init and dead-code restarts, as TiTok's tiny.
        model.update(image_size=64, hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     z_channels=32,
                     quantizer={"name": "vq", "codebook_size": 256, "use_ema": True,
                                "kmeans_init": True, "dead_code_threshold": 0.5})
    c.model = ml_collections.ConfigDict({"name": "maskgit_vqgan", **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU

    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": model["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 0,  # 0 = the whole held-out split
    })
    c.total_steps = 1500 if tiny else 1_000_000
    c.batch_size = 16 if tiny else 256

    c.optimizer = ml_collections.ConfigDict({
        "lr": 1e-3 if tiny else 1e-4, "end_lr": 1e-4 if tiny else 1e-5,
        "warmup_steps": 100 if tiny else 10_000, "b1": 0.9, "b2": 0.999,
        "eps": 1e-8, "weight_decay": 1e-4, "grad_clip": 1.0, "accumulation_steps": 1,
        "ema_decay": 0.999, "no_decay": "", "frozen": "",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": 1e-4, "weight_decay": 1e-4}})

    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l2", perceptual_weight=0.0 if tiny else 1.0,
        gan_weight=0.0 if tiny else 0.1, gan_start_step=200_000, lecam_weight=0.001,
        # "maskbit" (TiTok / MaskBit) or "patchgan" (taming's NLayerDiscriminator).
        discriminator={"name": "maskbit", "hidden_channels": 32 if tiny else 128, "num_stages": 3})

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
