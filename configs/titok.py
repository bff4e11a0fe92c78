"""TiTok, single-stage (pixels in, pixels out): `tiny` for a CPU, and the published sizes; and the
two-stage recipes `<tiny|l32|b64|s128>_stage<1|2>` (see `_two_stage` below).

COMMAND (CPU, minutes):
  titok-jax train --config configs/titok.py:tiny --workdir workdirs/tiny
COMMAND (published size, one GPU host or a TPU pod via launch/):
  titok-jax train --config configs/titok.py:bl64_vq --workdir gs://BUCKET/runs/bl64_vq \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors

The published single-stage recipe (reference/titok.md 3.3; no official training config exists):
AdamW 1e-4, betas (0.9, 0.999), wd 1e-4, 10k warmup, cosine, batch 256, EMA 0.999, L2 + LPIPS
(weight 1) + hinge GAN (0.1 from step 200k, LeCam 0.001); VQ: beta 0.25; VAE: KL 1e-6.

The bottleneck is one sub-config, `model.quantizer = {"name": "vq" | "vae", **its arguments}`
(titok_jax.quantizers.factory; "vq" takes VectorQuantizer's arguments: codebook_size,
l2_normalize, commitment_weight, use_ema, kmeans_init, dead_code_threshold, ...; "vae" kl_weight),
so each knob is set from the command line as e.g. `--config.model.quantizer.codebook_size=1024`.
Another quantizer at about the same bits per token is an option of the variant string:
`configs/titok.py:tiny,quantizer=fsq` (FSQ with the paper's levels; token_size follows), `quantizer=
lfq|bsq|vq|vae`, `quantizer=fq|rq` (factorized / residual: 2 VQ codebooks of 2**ceil(N/2) codes, 2 ids
per token), and `bits=N` for 2**N codes (`configs/titok.py:bl64_vq,quantizer=fsq,bits=14`).
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.titok_variants import titok_variant

# Shared sections and their defaults (configs/common.py).
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("bl64_vq", "bl128_vq", "sl256_vq", "ll32_vae", "bl64_vae", "bl128_vae")
# tiny: the README's main job (FSQ, 16 tokens, token prior); tiny_vq: the earlier VQ recipe (32
# tokens of an EMA k-means VQ-256), the base of the tests' micro runs.
VARIANTS = ("tiny", "tiny_vq") + PUBLISHED
# Two-stage recipes (reference/titok.md 3.1, 3.2): <size>_stage1 / <size>_stage2 (see _two_stage).
# Listed apart: their tasks need files (the teacher's weights; stage 2 a stage-1 workdir).
STAGES = tuple(f"{s}_stage{k}" for k in (1, 2) for s in ("tiny", "l32", "b64", "s128"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _COMMON["split_variant"](arg, "tiny")
    if variant not in VARIANTS + STAGES:
        raise ValueError(f"unknown titok variant {variant!r}; choose one of "
                         f"{', '.join(VARIANTS + STAGES)}")
    if variant in STAGES:
        if options:
            raise ValueError(f"the two-stage recipes take no options, got {sorted(options)}")
        return _two_stage(variant)
    tiny = variant in ("tiny", "tiny_vq")
    c = ml_collections.ConfigDict()
    c.family = "titok"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "tokenizer"})
    c.seed = 0

    model = titok_variant("tiny" if tiny else variant)
    if variant == "tiny_vq":
        # 64x64 crops, 8x8 patches, 32 tokens of a 256-entry VQ codebook (15.9 dB held-out at
        # 1500 steps). From scratch on a few photos the latent slots start almost image-independent
        # and a gradient-learned codebook maps every image to the same tokens; EMA codes with
        # k-means init and dead-code restarts break that symmetry early.
        model.update(image_size=64, patch_size=8, encoder_width=128, encoder_depth=2, encoder_heads=4,
                     decoder_width=128, decoder_depth=2, decoder_heads=4, num_latent_tokens=32,
                     token_size=12,
                     quantizer={"name": "vq", "codebook_size": 256, "l2_normalize": True,
                                "use_ema": True, "kmeans_init": True, "dead_code_threshold": 0.5},
                     init_scheme="xavier")
    elif tiny:
        # 64x64 crops of the sample photographs, 8x8 patches, 16 tokens of FSQ [8,8,8,5,5,5]
        # (64,000 codes: 16 x 15.97 = 255.5 bits per image, the budget of a 4x4 5-bit thumbnail).
        # saturation_weight: from some seeds the FSQ inputs ran into tanh's flat tails within a
        # few hundred steps and stayed there (5 of 6 dimensions constant over 256 images, 13.8 dB
        # held-out); the penalty keeps them in range (seed 1 at 2300 steps: 17.3 -> 18.6 dB).
        model.update(image_size=64, patch_size=8, encoder_width=128, encoder_depth=2, encoder_heads=4,
                     decoder_width=128, decoder_depth=2, decoder_heads=4, num_latent_tokens=16,
                     token_size=6, quantizer={"name": "fsq", "levels": [8, 8, 8, 5, 5, 5],
                                              "saturation_weight": 0.1},
                     # From scratch every latent token first reads the same average of the patches
                     # (one global descriptor, a flat-colour reconstruction); the token prior gives
                     # each token a home region (models/token_prior.py). Measured held-out at 1500
                     # steps: 17.1 dB, against 15.9 for the earlier 32 x VQ-256 recipe; at 600
                     # steps the prior alone took that VQ recipe from 14.1 to 15.5 dB.
                     token_prior=1.0,
                     # xavier-uniform weights instead of TiTok's N(0, .02): image content reaches
                     # the decoder of this small model within the first few hundred steps.
                     init_scheme="xavier",
                     # The pixel head's options (models/titok.py): a bilinearly enlarged 16x16
                     # colour image from the grid slots plus a 16-channel conv layer at full
                     # resolution, instead of flat, blocky 8x8 patches for the first thousand
                     # steps. Held-out at 1500 steps: 18.35 -> 18.73 (lowres) -> 18.93 dB (both).
                     lowres_head=2, head_channels=16)
    model.update(_layers(tiny))
    model = _COMMON["quantizer_options"](model, options, "titok")
    c.model = ml_collections.ConfigDict({"name": "titok", **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU

    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": model["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 0,  # 0 = the whole held-out split
    })
    if variant == "tiny":
        # Hue rotations (luminance kept) on 80% of the crops: the six training photographs are
        # reds, browns and blacks, and without them a blue sky came back grey-brown (held-out
        # rocket 17.4 -> 19.8 dB at 1500 steps). With the FSQ penalty, before the pixel head's
        # options, held-out PSNR at 1500 steps: 18.35 / 18.14 dB from seeds 0 / 1 (2300 steps:
        # 18.45 / 18.60 / 18.58 from seeds 0 / 1 / 2); with them 18.93 (2000 steps and the cosine
        # ending at 3e-4: 18.99; tried and not kept: overlapping 16x16 output windows 18.41,
        # crops of 60-100% of the photo 18.44, a 4x4 or 1x1 low-resolution path 18.68 / 18.53).
        c.data.hue = 0.8
    c.total_steps = 1500 if tiny else 1_000_000
    c.batch_size = 16 if tiny else 256

    c.optimizer = ml_collections.ConfigDict({
        "lr": 1e-3 if tiny else 1e-4, "end_lr": 1e-4 if tiny else 1e-5,
        "warmup_steps": 100 if tiny else 10_000, "b1": 0.9, "b2": 0.999 if tiny else 0.999,
        "eps": 1e-8, "weight_decay": 1e-4, "grad_clip": 1.0, "accumulation_steps": 1,
        "ema_decay": 0.99 if variant == "tiny" else 0.999, "no_decay": "", "frozen": "",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": 1e-4, "weight_decay": 1e-4}})

    # ConvNeXt-S logit MSE (convnext_weight) is off; TA-TiTok's recipe uses 0.1.
    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l2", perceptual_weight=0.0 if tiny else 1.0,
        gan_weight=0.0 if tiny else 0.1, gan_start_step=200_000, lecam_weight=0.001,
        discriminator={"ndf": 64, "n_layers": 3, "norm": "group"})

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


def _layers(tiny: bool) -> dict:
    """The transformer stacks: published sizes scan their layers (``nn.scan``: compiled once,
    whatever the depth; params ``{encoder,decoder}/layers/...`` with a leading layer axis) and
    rematerialise each block keeping the matmul outputs but not the attention logits ("dots");
    the tiny models keep unrolled blocks (``transformer_{i}``) without remat."""
    return dict(scan_layers=not tiny, remat=not tiny, remat_policy="" if tiny else "dots")


def _two_stage(variant: str) -> ml_collections.ConfigDict:
    """Two-stage TiTok (legacy L-32 / B-64 / S-128 recipe; ``tiny_*`` run on a CPU in seconds).

    COMMAND (stage 1 then stage 2; the teacher is the official MaskGIT-VQGAN, imported first):
      titok-jax import-torch --input DIR_WITH_maskgit-vqgan-imagenet-f16-256.bin --output maskgit
      titok-jax train --config configs/titok.py:l32_stage1 --workdir runs/l32_s1 \
          --config.teacher.weights=maskgit --config.data.source=tfds:imagenet2012
      titok-jax train --config configs/titok.py:l32_stage2 --workdir runs/l32_s2 \
          --config.init_from=runs/l32_s1 --config.data.source=tfds:imagenet2012

    Stage 1 (3.1): CE on the teacher's proxy codes + quantizer loss (weight 1, beta 0.25); AdamW
    1e-4, betas (0.9, 0.99), wd 1e-4, eps 1e-8, 10k warmup, cosine to 1e-5, 1M steps, batch 256
    (32/GPU x 8), clip 1.0, EMA 0.999. Stage 2 (3.2): encoder / quantizer / latent tokens frozen;
    L2 (1.0) + ConvNeXt-S logits MSE (0.1, losses.convnext_weight) + hinge GAN (0.01 from step 20k,
    MaskBit discriminator, own AdamW 1e-4) + LeCam (0.001); AdamW 1e-4, betas (0.9, 0.999), wd 1e-4,
    5k warmup, cosine to 1e-5, 500k steps, batch 256, clip 1.0, EMA 0.999.
    """
    from titok_jax.models.vqgan import MASKGIT_F16_256

    size, stage = variant.rsplit("_stage", 1)
    stage = int(stage)
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.family = "titok"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": f"titok_stage{stage}"})
    c.seed = 0 if tiny else 42
    model = titok_variant("tiny_two_stage" if tiny else size, finetune_decoder=stage == 2)
    model.update(_layers(tiny))
    model["pixel_channel_mult"] = list(model.get("pixel_channel_mult", MASKGIT_F16_256["channel_mult"]))
    c.model = ml_collections.ConfigDict({"name": "titok_two_stage", **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    teacher = (dict(name="maskgit_vqgan", image_size=32, hidden_channels=32, channel_mult=[1, 1, 2, 2],
                    num_res_blocks=1, z_channels=32, quantizer={"name": "vq", "codebook_size": 64})
               if tiny else
               dict(MASKGIT_F16_256, name="maskgit_vqgan",
                    channel_mult=list(MASKGIT_F16_256["channel_mult"])))
    # weights: a workdir written by `titok-jax import-torch` from maskgit-vqgan-imagenet-f16-256.bin
    # (or that file). Stage 2 falls back to its stage-1 run's teacher when empty.
    c.teacher = ml_collections.ConfigDict({"weights": "", "allow_random": tiny, "seed": 0,
                                           "model": teacher})
    c.init_from = ""   # stage 2: the stage-1 workdir
    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": model["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 8 if tiny else 0,
    })
    c.total_steps = 4 if tiny else (1_000_000 if stage == 1 else 500_000)
    c.batch_size = 8 if tiny else 256
    c.optimizer = ml_collections.ConfigDict({
        "lr": 1e-3 if tiny else 1e-4, "end_lr": 1e-4 if tiny else 1e-5,
        "warmup_steps": 1 if tiny else (10_000 if stage == 1 else 5_000),
        "b1": 0.9, "b2": 0.99 if stage == 1 else 0.999, "eps": 1e-8, "weight_decay": 1e-4,
        "grad_clip": 1.0, "accumulation_steps": 1, "ema_decay": 0.999, "no_decay": "",
        # Stage 2 trains only the ViT decoder, pixel_quantize and pixel_decoder.
        "frozen": "" if stage == 1 else r"^model/(encoder|quantize|latent_tokens)(/|$)",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": 1e-3 if tiny else 1e-4,
                                                       "weight_decay": 1e-4}})
    if stage == 1:
        c.losses = ml_collections.ConfigDict({"quantizer_weight": 1.0})
    else:
        c.losses = _COMMON["tokenizer_losses"](
            perceptual_weight=0.0, convnext_weight=0.0 if tiny else 0.1,
            gan_weight=0.01, gan_start_step=2 if tiny else 20_000, lecam_weight=0.001,
            discriminator={"name": "maskbit", "hidden_channels": 32 if tiny else 128,
                           "num_stages": 1 if tiny else 3})
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 4 if tiny else 50_000, "keep": 3,
                                              "keep_every_steps": 0, "async_save": not tiny})
    c.log_every_steps = 1 if tiny else 50
    c.eval_every_steps = 4 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    c.eval = _COMMON["eval_section"]()
    return c

