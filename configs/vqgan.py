"""MaskGIT-VQGAN (a 2D CNN tokenizer, f16, 1024 codes): `tiny` for a CPU, and the published shape.

COMMAND (CPU, minutes):
  titok-jax train --config configs/vqgan.py:tiny --workdir workdirs/vqgan_tiny
COMMAND (published shape, one GPU host or a TPU pod via launch/):
  titok-jax train --config configs/vqgan.py:maskgit_f16_256 --workdir gs://BUCKET/runs/maskgit_vqgan \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors
To use the released weights instead of training, `titok-jax import-torch` converts
`maskgit-vqgan-imagenet-f16-256.bin` (titok_jax.convert.vqgan).
COMMAND (taming VQGAN: CPU tens of minutes, and the ImageNet f16 release's shape and recipe):
  titok-jax train --config configs/vqgan.py:taming_tiny --workdir workdirs/taming_tiny
  titok-jax train --config configs/vqgan.py:taming_f16_1024 --workdir gs://BUCKET/runs/taming \
      --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors
  titok-jax import-torch --input DIR_WITH_last.ckpt --output workdirs/taming_f16   # the release
COMMAND (VQ-VAE, van den Oord et al. 2017: CPU minutes, and the paper's ImageNet 128 px shape and
recipe; see _vqvae below):
  titok-jax train --config configs/vqgan.py:vqvae_tiny --workdir workdirs/vqvae_tiny
  titok-jax train --config configs/vqgan.py:vqvae --workdir gs://BUCKET/runs/vqvae \
      --config.data.source=tfds:imagenet2012

The released model was trained in JAX by the MaskGIT authors; no official PyTorch training config
exists. The recipe here is TiTok's (reference/titok.md 3.2 / 3.3) on this model: AdamW 1e-4,
betas (0.9, 0.999), wd 1e-4, 10k warmup, cosine, batch 256, EMA 0.999, L2 + LPIPS (weight 1) +
hinge GAN (0.1 from step 200k, LeCam 0.001) with the MaskBit discriminator; VQ beta 0.25.

The bottleneck is one sub-config, `model.quantizer = {"name": "vq", **VectorQuantizer's arguments}`
(titok_jax.quantizers.factory; "vae" with kl_weight also builds), set from the command line as e.g.
`--config.model.quantizer.codebook_size=512 --config.model.quantizer.use_ema=False`.
Another quantizer at about the same bits per token is an option of the variant string, as in
configs/titok.py: `configs/vqgan.py:tiny,quantizer=fsq` (FSQ with the paper's levels; z_channels
follows), `quantizer=lfq|bsq|vq|vae`, `quantizer=fq|rq` (factorized / residual: 2 VQ codebooks of
2**ceil(N/2) codes, 2 ids per token), and `bits=N` for 2**N codes
(`configs/vqgan.py:vqvae,quantizer=fsq,bits=10`).
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.vqgan import MASKGIT_F16_256
from titok_jax.models.taming import TAMING_F16_1024
from titok_jax.models.vqvae import VQVAE_IMAGENET_128

# Shared sections and their defaults (configs/common.py).
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("maskgit_f16_256", "vqvae")
# VQ-VAE (van den Oord et al. 2017; titok_jax/models/vqvae.py): the paper's ImageNet-128 shape and
# recipe, and a CPU-sized one (see _vqvae below).
VQVAE_VARIANTS = ("vqvae", "vqvae_tiny")
VARIANTS = ("tiny",) + PUBLISHED + ("vqvae_tiny",)
# taming VQGAN (Esser et al. 2021; titok_jax/models/taming.py): the ImageNet f16 release's shape and
# recipe, and a CPU-sized one (see _taming below).
TAMING_VARIANTS = ("taming_f16_1024", "taming_tiny")
PUBLISHED += ("taming_f16_1024",)
VARIANTS += TAMING_VARIANTS


def _skeleton(variant: str, model_name: str, model: dict, tiny: bool) -> ml_collections.ConfigDict:
    """The sections every variant of this file shares: names, the ``tokenizer`` task, the model,
    the compute dtype and the sample-data section (``tiny``: CPU settings)."""
    c = ml_collections.ConfigDict()
    c.family = "vqgan"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "tokenizer"})
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": model_name, **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": model["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 0,  # 0 = the whole held-out split
    })
    return c


def _finish(c: ml_collections.ConfigDict, tiny: bool, eval_every: int = 50_000
            ) -> ml_collections.ConfigDict:
    """The mesh, checkpoint, logging, sample and eval sections every variant shares."""
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()  # () = titok_jax.train.sharding.DEFAULT_RULES
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500 if tiny else 5_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 50_000,
                                              "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 500 if tiny else eval_every
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    c.eval = _COMMON["eval_section"]()
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _COMMON["split_variant"](arg, "tiny")
    if variant not in VARIANTS:
        raise ValueError(f"unknown vqgan variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant in VQVAE_VARIANTS:
        return _vqvae(variant, options)
    if variant in TAMING_VARIANTS:
        return _taming(variant, options)
    tiny = variant == "tiny"
    model = {**MASKGIT_F16_256, "quantizer": dict(MASKGIT_F16_256["quantizer"])}
    if tiny:
        # 64x64 crops of the sample photographs, f4 (16x16 = 256 tokens of a 256-entry codebook),
        # widths 32/64/64. EMA codes with k-means init and dead-code restarts, as TiTok's tiny.
        model.update(image_size=64, hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     z_channels=32,
                     quantizer={"name": "vq", "codebook_size": 256, "use_ema": True,
                                "kmeans_init": True, "dead_code_threshold": 0.5})
    # configs/vqgan.py:tiny,quantizer=fsq[,bits=N]: another quantizer at about the same bits per token
    model = _COMMON["quantizer_options"](model, options, "vqgan", dim_key="z_channels")
    c = _skeleton(variant, "maskgit_vqgan", model, tiny)
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

    return _finish(c, tiny)


def _vqvae(variant: str, options: dict[str, str]) -> ml_collections.ConfigDict:
    """VQ-VAE (reference/lineage_2d.md 4): ``vqvae`` is the paper's ImageNet model, 128 px -> a
    32x32 grid of K = 512 codes (two 4x4 stride-2 convs, 256 hidden units, two residual blocks,
    beta 0.25), trained with Adam 2e-4 (constant, no weight decay, no clipping), batch 128, 250k
    steps, on the pixel loss and the VQ terms alone. ``vqvae_tiny``: 64 px crops of the sample
    photographs -> a 16x16 grid, narrower CNNs (1500 steps on a 2-core CPU in a few minutes)
    with an EMA k-means codebook (the paper's appendix EMA; k-means and dead-code restarts as
    the vqgan tiny, since a gradient-learned codebook collapses on six photographs).

    COMMAND (CPU, minutes):
      titok-jax train --config configs/vqgan.py:vqvae_tiny --workdir workdirs/vqvae_tiny
    COMMAND (the paper's shape, one GPU host or a TPU pod via launch/):
      titok-jax train --config configs/vqgan.py:vqvae --workdir gs://BUCKET/runs/vqvae \
          --config.data.source=tfds:imagenet2012
    """
    tiny = variant == "vqvae_tiny"
    model = {**VQVAE_IMAGENET_128, "quantizer": dict(VQVAE_IMAGENET_128["quantizer"])}
    if tiny:
        model.update(image_size=64, hidden_channels=64, residual_channels=32, z_channels=32,
                     quantizer={"name": "vq", "codebook_size": 512, "use_ema": True,
                                "ema_decay": 0.99, "kmeans_init": True,
                                "dead_code_threshold": 0.5})
    model = _COMMON["quantizer_options"](model, options, "vqgan", dim_key="z_channels")
    c = _skeleton(variant, "vqvae", model, tiny)
    c.total_steps = 1500 if tiny else 250_000
    c.batch_size = 16 if tiny else 128
    lr = 1e-3 if tiny else 2e-4
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "end_lr": lr, "warmup_steps": 0, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "weight_decay": 0.0, "grad_clip": 0.0, "accumulation_steps": 1, "ema_decay": 0.0,
        "no_decay": "", "frozen": "",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": 1e-4, "weight_decay": 1e-4}})
    c.losses = _COMMON["tokenizer_losses"](reconstruction="l2")   # no LPIPS, no GAN
    return _finish(c, tiny, eval_every=25_000)


def _taming(variant: str, options: dict[str, str]) -> ml_collections.ConfigDict:
    """taming VQGAN (reference/lineage_2d.md 3): ``taming_f16_1024`` is the ImageNet f16 release
    (configs/imagenet_vqgan.yaml: ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attention at 16,
    z 256, 1024 codes of dim 256, 256 px) with its recipe: Adam betas (0.5, 0.9) for the model
    and the discriminator, no weight decay, constant lr = 4.5e-6 x batch (taming's main.py scales
    base_learning_rate 4.5e-6 by accumulation x GPUs x batch), no EMA; loss L1 + LPIPS
    1.0 + the legacy VQ terms (codebook_weight 1.0) + hinge PatchGAN (taming's NLayerDiscriminator,
    ndf 64, 3 layers) from step 250001 with the adaptive weight ``0.8 * clip(||dnll/dW|| /
    (||dg/dW|| + 1e-4), 0, 1e4)`` on the decoder's ``conv_out`` kernel. Our L1 is on [0, 1]
    images, half of taming's on [-1, 1], so ``reconstruction_weight`` 2 gives taming's nll. The
    yaml's batch is 12 per GPU (GPU count unpublished); 64 here, and lr follows it. The PatchGAN
    has taming's BatchNorm, in train mode in both passes as taming runs it (statistics of each
    call's global batch; taming's DDP uses each GPU's 12 images). ``taming_tiny``: 64 px crops
    of the sample photographs -> a 16x16 grid (f4), width 32 at every level (GroupNorm(32)'s
    least), attention at the 16x16 level, 256 EMA k-means codes, batch 8, pixel loss only (as
    the other tiny variants). Even so a step is ~20 GFLOP (the decoder runs two 3x3 convs more
    per level than the encoder, at full resolution too), several times the other tiny models: 1500 steps took 12.6 CPU-minutes (34
    min wall on a shared, loaded 2-core machine) to 16.6 dB held-out PSNR (seed 0).

    COMMAND (CPU, tens of minutes):
      titok-jax train --config configs/vqgan.py:taming_tiny --workdir workdirs/taming_tiny
    COMMAND (the release's shape, one GPU host or a TPU pod via launch/):
      titok-jax train --config configs/vqgan.py:taming_f16_1024 --workdir gs://BUCKET/runs/taming \
          --config.data.source=tfds:imagenet2012 --config.losses.perceptual_weights=lpips_vgg.safetensors
    """
    tiny = variant == "taming_tiny"
    model = {**TAMING_F16_1024, "quantizer": dict(TAMING_F16_1024["quantizer"])}
    if tiny:
        model.update(image_size=64, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                     attn_resolutions=(16,), z_channels=32, embed_dim=32,
                     quantizer={"name": "vq", "codebook_size": 256, "use_ema": True,
                                "kmeans_init": True, "dead_code_threshold": 0.5})
    model = _COMMON["quantizer_options"](model, options, "vqgan", dim_key="embed_dim")
    c = _skeleton(variant, "taming_vqgan", model, tiny)
    c.total_steps = 1500 if tiny else 1_000_000
    c.batch_size = 8 if tiny else 64
    lr = 1e-3 if tiny else 4.5e-6 * c.batch_size
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "end_lr": 1e-4 if tiny else lr, "warmup_steps": 100 if tiny else 0,
        "b1": 0.9 if tiny else 0.5, "b2": 0.999 if tiny else 0.9, "eps": 1e-8,
        "weight_decay": 1e-4 if tiny else 0.0, "grad_clip": 1.0 if tiny else 0.0,
        "accumulation_steps": 1, "ema_decay": 0.999 if tiny else 0.0, "no_decay": "", "frozen": "",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": lr, "weight_decay": 0.0}})
    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l2" if tiny else "l1", reconstruction_weight=1.0 if tiny else 2.0,
        perceptual_weight=0.0 if tiny else 1.0, gan_weight=0.0 if tiny else 0.8,
        gan_start_step=250_001, adaptive_weight_layer="" if tiny else "decoder/conv_out/kernel",
        # taming's PatchGAN with its BatchNorm (running statistics in the train state)
        discriminator={"name": "patchgan", "ndf": 64, "n_layers": 3, "norm": "batch"})
    return _finish(c, tiny)
