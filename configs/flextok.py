"""FlexTok (ordered 1D tokens, any-prefix decoding) and the KL-VAE it runs on.

COMMAND (CPU, minutes; random frozen VAE and REPA teacher, said loudly):
  titok-jax train --config configs/flextok.py:tiny --workdir workdirs/flextok_tiny
COMMAND (the VAE first, through the tokenizer task; then FlexTok on it):
  titok-jax train --config configs/flextok.py:vae_c16 --workdir runs/vae_c16 \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors
  titok-jax train --config configs/flextok.py:d18_d18 --workdir runs/flextok_d18_d18 \
      --config.vae.weights=runs/vae_c16 --config.repa.teacher.weights=dinov2_l14.safetensors \
      --config.data.source=tfds:imagenet2012

Variants: ``tiny`` (64 px, 16 tokens); ``d12_d12``, ``d18_d18``, ``d18_d28`` (the released shapes:
width 64 x depth, head dim 64, 2x2 patches of a 16-channel f8 VAE latent, 256 registers, FSQ
[8,8,8,5,5,5]); ``vae_tiny``, ``vae_c4``, ``vae_c8``, ``vae_c16`` (the KL-VAE as a ``tokenizer`` run).

Not published (flextok_flowmo.md A8): optimizer, schedule, batch, steps, CFG-dropout rate, REPA
weight / projector, VAE training recipe. The values below are stated choices: AdamW 1e-4 with
betas (0.9, 0.99), wd 0.05, 10k warmup, cosine, batch 256, EMA 0.9999; REPA weight 1 on decoder
block 1 with DINOv2-L/14 features (REPA paper defaults); CFG dropout 0.1; uniform nested dropout
(the d18-d28 config reportedly uses it); logit-normal(0, 1) flow times; decoding with 25 Euler steps
and APG w = 7.5. The VAE recipe follows SD's (L1 + LPIPS + a hinge GAN, KL 1e-6).

The model itself is the official one (apple/ml-flextok): row-first 2D sin-cos tables, the decoder's
register chain posemb -> mask token -> null condition, adaLN per patches / registers. The settings
that differ between released configs are model keys here: ``null_cond`` (learned | zeros |
single_token), ``max_timestep`` (time embedding at ``t * 1000 / max_timestep``), ``head_adaln``,
``vae_scaling_factor`` / ``vae_sample_posterior``; the defaults below are our choice for training
from scratch, and ``titok-jax import-torch`` of a released ``model.safetensors`` writes the
release's own values (read from its metadata). There is no official training code: the recipe above
is ours.
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.flextok import FLEXTOK_VARIANTS

# Shared sections and their defaults (configs/common.py).
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("d12_d12", "d18_d18", "d18_d28")
VAES = ("vae_tiny", "vae_c4", "vae_c8", "vae_c16")
VARIANTS = ("tiny",) + PUBLISHED + VAES
FROZEN_VAE = r"^model/vae/"


def _common(c: ml_collections.ConfigDict, tiny: bool, image_size: int) -> None:
    c.seed = 0
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": image_size, "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 8 if tiny else 0,
    })
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 200 if tiny else 10_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 100_000,
                                              "async_save": True})
    c.log_every_steps = 20 if tiny else 100
    c.eval_every_steps = 200 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    c.eval = _COMMON["eval_section"]()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown flextok variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant in VAES:
        return _vae(variant)
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.family = "flextok"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "flextok"})
    model = dict(FLEXTOK_VARIANTS[variant])
    model = {**dict(image_size=256, nested_dropout="uniform", cfg_dropout=0.1, null_cond="learned",
                    max_timestep=1.0, head_adaln=True), **model}
    # Published sizes: each transformer is one nn.scan over its blocks (compiled once whatever the
    # depth; params {encoder,decoder}/layers/block/... [depth, ...]), every block rematerialised
    # keeping the matmul outputs but not the attention logits ("dots"); tiny: unrolled, no remat.
    model.update(scan_layers=not tiny, remat=not tiny, remat_policy="" if tiny else "dots")
    for key in ("vae_channel_mult",):
        if key in model:
            model[key] = list(model[key])
    c.model = ml_collections.ConfigDict({"name": "flextok", **model})
    _common(c, tiny, model["image_size"])
    c.total_steps = 600 if tiny else 1_000_000
    c.batch_size = 16 if tiny else 256
    c.optimizer = ml_collections.ConfigDict({
        "lr": 1e-3 if tiny else 1e-4, "end_lr": 1e-4 if tiny else 1e-5,
        "warmup_steps": 50 if tiny else 10_000, "b1": 0.9, "b2": 0.99, "eps": 1e-8,
        "weight_decay": 0.05, "grad_clip": 1.0, "accumulation_steps": 1,
        "ema_decay": 0.999 if tiny else 0.9999,
        "no_decay": r"(^|/)(bias|scale)$|norm|embed|posemb|registers|_token",
        "frozen": FROZEN_VAE,   # the VAE is frozen (checked by the task)
    })
    # weights: a kl_vae workdir (the vae_* variants) or a .safetensors/.npz of its params.
    c.vae = ml_collections.ConfigDict({"weights": "", "allow_random": tiny})
    c.flow = ml_collections.ConfigDict({"time_sampler": "logit_normal",
                                        "time_params": {"loc": 0.0, "scale": 1.0}})
    teacher = (dict(image_size=64, patch_size=16, width=64, depth=1, num_heads=2) if tiny else
               dict(image_size=224, patch_size=14, width=1024, depth=24, num_heads=16,
                    layerscale=True, num_registers=0, pos_grid=37))   # dinov2_vitl14 (convert-dinov2)
    c.repa = ml_collections.ConfigDict({
        "weight": 1.0,
        "teacher": {"weights": "", "allow_random": tiny, "seed": 0, "model": teacher},
    })
    # Decoding for evaluation (fixed seed: deterministic). tiny: few steps, mild guidance.
    c.sampler = ml_collections.ConfigDict({"steps": 4 if tiny else 25,
                                           "guidance": 1.5 if tiny else 7.5, "seed": 0})
    return c


def _vae(variant: str) -> ml_collections.ConfigDict:
    """The KL-VAE as a continuous tokenizer (``tokenizer`` task, model ``kl_vae``)."""
    tiny = variant == "vae_tiny"
    c = ml_collections.ConfigDict()
    c.family = "flextok"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "tokenizer"})
    tv = FLEXTOK_VARIANTS["tiny"]
    model = (dict(image_size=64, latent_channels=tv["vae_latent_channels"],
                  base_channels=tv["vae_base_channels"], channel_mult=list(tv["vae_channel_mult"]),
                  num_res_blocks=tv["vae_num_res_blocks"]) if tiny else
             dict(image_size=256, latent_channels=int(variant[len("vae_c"):]), base_channels=128,
                  channel_mult=[1, 2, 4, 4], num_res_blocks=2))
    c.model = ml_collections.ConfigDict({"name": "kl_vae", "kl_weight": 1e-6, **model})
    _common(c, tiny, model["image_size"])
    c.total_steps = 300 if tiny else 500_000
    c.batch_size = 16 if tiny else 64
    c.optimizer = ml_collections.ConfigDict({
        "lr": 1e-3 if tiny else 4.5e-6 * 64, "end_lr": 1e-4 if tiny else 1e-5,
        "warmup_steps": 20 if tiny else 5_000, "b1": 0.5, "b2": 0.9, "eps": 1e-8,
        "weight_decay": 0.0, "grad_clip": 1.0, "accumulation_steps": 1,
        "ema_decay": 0.999, "no_decay": "", "frozen": "",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": 1e-4, "weight_decay": 0.0}})
    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l1", perceptual_weight=0.0 if tiny else 1.0,
        gan_weight=0.0 if tiny else 0.5, gan_start_step=50_000, lecam_weight=0.0,
        discriminator={"ndf": 64, "n_layers": 3, "norm": "group"})
    return c
