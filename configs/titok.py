"""TiTok, single-stage (pixels in, pixels out): `tiny` for a CPU, and the published sizes.

COMMAND (CPU, minutes):
  titok-jax train --config configs/titok.py:tiny --workdir workdirs/tiny
COMMAND (published size, one GPU host or a TPU pod via launch/):
  titok-jax train --config configs/titok.py:bl64_vq --workdir gs://BUCKET/runs/bl64_vq \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors

The published single-stage recipe (reference/titok.md 3.3; no official training config exists):
AdamW 1e-4, betas (0.9, 0.999), wd 1e-4, 10k warmup, cosine, batch 256, EMA 0.999, L2 + LPIPS
(weight 1) + hinge GAN (0.1 from step 200k, LeCam 0.001); VQ: beta 0.25; VAE: KL 1e-6.
"""
from __future__ import annotations

import ml_collections

from titok_jax.models.titok import TITOK_VARIANTS

PUBLISHED = ("bl64_vq", "bl128_vq", "sl256_vq", "ll32_vae", "bl64_vae", "bl128_vae")
VARIANTS = ("tiny",) + PUBLISHED


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown titok variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.family = "titok"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "tokenizer"})
    c.seed = 0

    model = dict(TITOK_VARIANTS[variant])
    if tiny:
        # 64x64 crops of the sample photographs, 8x8 patches, 32 tokens of a 256-entry codebook.
        model.update(image_size=64, patch_size=8, encoder_width=128, encoder_depth=2, encoder_heads=4,
                     decoder_width=128, decoder_depth=2, decoder_heads=4, num_latent_tokens=32,
                     token_size=12, codebook_size=256, use_l2_norm=True,
                     # From scratch on a few photos the latent slots start almost image-independent
                     # and a gradient-learned codebook maps every image to the same tokens; EMA codes
                     # with k-means init and dead-code restarts break that symmetry early.
                     ema_codebook=True, kmeans_init=True, dead_code_threshold=0.5,
                     # xavier-uniform weights instead of TiTok's N(0, .02): image content reaches
                     # the decoder of this small model within the first few hundred steps.
                     init_scheme="xavier")
    c.model = ml_collections.ConfigDict({"name": "titok", **model})
    c.compute_dtype = "float32" if tiny else "bfloat16"

    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": model["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 0,  # 0 = the whole held-out split
    })
    c.total_steps = 1500 if tiny else 1_000_000
    c.batch_size = 16 if tiny else 256

    c.optimizer = ml_collections.ConfigDict({
        "lr": 1e-3 if tiny else 1e-4, "end_lr": 1e-4 if tiny else 1e-5,
        "warmup_steps": 100 if tiny else 10_000, "b1": 0.9, "b2": 0.999 if tiny else 0.999,
        "eps": 1e-8, "weight_decay": 1e-4, "grad_clip": 1.0, "accumulation_steps": 1,
        "ema_decay": 0.999, "no_decay": "", "frozen": "",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": 1e-4, "weight_decay": 1e-4}})

    c.losses = ml_collections.ConfigDict({
        "reconstruction": "l2", "reconstruction_weight": 1.0,
        "perceptual_weight": 0.0 if tiny else 1.0, "perceptual_weights": "",
        "gan_weight": 0.0 if tiny else 0.1, "gan_start_step": 200_000, "gan_loss": "hinge",
        "lecam_weight": 0.001, "lecam_decay": 0.999,
        "discriminator": {"ndf": 64, "n_layers": 3, "norm": "group"},
    })

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()  # () = titok_jax.train.sharding.DEFAULT_RULES
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500 if tiny else 5_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 50_000,
                                              "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 500 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    return c
