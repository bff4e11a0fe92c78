"""MAGVIT v1's 3D-VQ video tokenizer (Yu et al. 2023; google-research/magvit): a non-causal 3D CNN
with a VQ of 1024 codes. `tiny` for a CPU, and the UCF-101 B model's shape and recipe.

COMMAND (CPU, minutes):
  titok-jax train --config configs/magvit.py:tiny --workdir workdirs/magvit_tiny
COMMAND (the published shape, one GPU host or a TPU pod via launch/):
  titok-jax train --config configs/magvit.py:ucf_16x128 --workdir gs://BUCKET/runs/magvit_ucf \
      --config.data.source=video_folder:/data/UCF-101
Then `titok-jax reconstruct --workdir W --input clip.gif --output rec.gif` (an animated GIF and a
frame grid `rec_frames.png`; mp4 in and out with PyAV, the `video` extra).

Data: clips [B, T, S, S, 3] in [0, 1] from `sample_video` (the sample photographs under synthetic
pans and zooms), `video_folder:PATH` or `tfds_video:NAME` (data.num_frames frames every
data.frame_stride).

The model (titok_jax/models/magvit3d.py): MAGVIT v1's 3D-CNN encoder / decoder (no attention,
average-pool down, nearest + conv up, 'SAME' 3x3x3 convs: not causal) around its VQ (commitment
0.25, codebook 1.0, entropy 0.1 at T 0.01). `ucf_16x128` = vqgan3d_ucf101_config.py's B model:
filters 64, channel multipliers (1, 2, 2, 4), temporal downsampling in the first two stages, 2
res blocks, 256-d codes, 1024 codes: 16 x 128^2 -> 4 x 16 x 16 = 1024 tokens (reference/magvit.md
1.1-1.4).
Recipe (reference/magvit.md 1.6): L2 on [0, 1] pixels, EMA 0.999, AdamW lr 1e-4 with betas (0.0,
0.99), no weight decay, linear warmup over one epoch then cosine decay, batch 128 for 500 epochs
(the epoch here is UCF-101's 13 320 videos / 128 = 104 steps: an assumption, the v1 configs count
epochs of their own UCF-101 split). The GAN (reference/magvit.md 1.5-1.6): MAGVIT v1's
StyleGAN-style 3D discriminator (`stylegan3d`, models/discriminator3d.py: filters 64, multipliers
(2, 4, 4, 4, 4), no norm, 2x2x2 average-pool down; one logit per clip), the non-saturating loss
with a fixed generator weight 0.1 from step 0 (v1 has no start step), the R1 penalty 10 x
mean_b ||dD/dx_real||^2, no LeCam; D's optimizer is the model's (AdamW 1e-4, betas (0.0, 0.99),
same schedule), as v1's. (Our non-saturating D loss is halved, taming's convention; v1 sums the
real and fake terms.) `tiny` carries a small stylegan3d but keeps gan_weight 0:
`--config.losses.gan_weight=0.1` turns it on. NOT here yet, so this variant is NOT the full
recipe:
- the perceptual loss: 0.1 x L2 between ResNet-50 ImageNet logits of the frames; no ResNet-50 is
  available, so perceptual_weight is 0 (LPIPS per frame is available as
  `--config.losses.perceptual_weight=W --config.losses.perceptual_weights=lpips_vgg.safetensors`,
  but it is not MAGVIT's);
- an ImageNet-trained 2-D model to inflate from (below: the wiring is here, the weights are not).
No MAGVIT v1 weights were ever released.

2-D -> 3-D inflation (MAGVIT v1's `init_from.inflation = '2d->3d'`, central): train the image
twin first - this config with `temporal_kernel_size=1`, `num_frames=1` and no temporal
downsampling (`models.magvit3d.image_twin`: every conv 1 x 3 x 3, an image is a 1-frame clip) -
then start the video run from it:
  titok-jax train --config configs/magvit.py:ucf_16x128 --workdir W3D \
      --config.init_from=TWIN_WORKDIR ...
Its params (EMA when kept) are inflated into the 3-D model (each kernel in the centre time slice,
`tasks/video_init.py`); the discriminator and the optimizer start fresh.

Memory (BENCHMARKS.md, "Video tokenizers"): `--config.model.remat=True` recomputes every
ResBlock3D in the backward pass; `--config.optimizer.accumulation_steps=N` splits the batch.
`data.source=tfds_video:NAME[:split]` reads an ArrayRecord-prepared TFDS video set (a `video`
feature [T, H, W, 3]; data.data_dir or $TFDS_DATA_DIR).

Another quantizer is an option of the variant string, as in configs/vqgan.py:
`configs/magvit.py:tiny,quantizer=fsq` (z_channels follows), `quantizer=lfq|bsq|vq|rq`, `bits=N`.
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.magvit3d import DEFAULT_QUANTIZER, MAGVIT3D_UCF_B

_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("ucf_16x128",)
VARIANTS = ("tiny",) + PUBLISHED
UCF_VIDEOS = 13_320           # UCF-101 (train + test); see the module docstring
BATCH = 128
STEPS_PER_EPOCH = -(-UCF_VIDEOS // BATCH)   # 104
EPOCHS = 500


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _COMMON["split_variant"](arg, "tiny")
    if variant not in VARIANTS:
        raise ValueError(f"unknown magvit variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tiny = variant == "tiny"
    if tiny:
        # 4 frames of 32x32, f4 in space and 2 in time (2 x 8 x 8 = 128 tokens of 256 codes),
        # widths 32/32/64, one block per level; batch 4, L2 and the VQ terms only.
        model = dict(num_frames=4, image_size=32, hidden_channels=32, channel_mult=(1, 1, 2),
                     num_res_blocks=1, temporal_downsample=(True, False), z_channels=32,
                     quantizer={**DEFAULT_QUANTIZER, "codebook_size": 256})
    else:
        model = {**MAGVIT3D_UCF_B, "quantizer": dict(MAGVIT3D_UCF_B["quantizer"])}
    model = _COMMON["quantizer_options"](model, options, "magvit", dim_key="z_channels")

    c = ml_collections.ConfigDict()
    c.family = "magvit"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "tokenizer"})
    c.seed = 0
    # remat: every ResBlock3D recomputed in the backward pass (less memory, ~1/3 more compute)
    c.model = ml_collections.ConfigDict({"remat": False, "name": "magvit3d", **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    c.data = ml_collections.ConfigDict({
        "source": "sample_video" if tiny else "video_folder:/path/to/UCF-101",
        "image_size": model["image_size"], "num_frames": model["num_frames"], "frame_stride": 1,
        "data_dir": "", "worker_count": 0,
        "eval_batch_size": 4 if tiny else 32, "eval_num_images": 0,  # 0 = the whole held-out split
    })
    c.total_steps = 1000 if tiny else EPOCHS * STEPS_PER_EPOCH
    c.batch_size = 4 if tiny else BATCH
    lr = 1e-3 if tiny else 1e-4
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "end_lr": 1e-4 if tiny else 0.0, "warmup_steps": 50 if tiny else STEPS_PER_EPOCH,
        "b1": 0.9 if tiny else 0.0, "b2": 0.999 if tiny else 0.99, "eps": 1e-8,
        "weight_decay": 1e-4 if tiny else 0.0, "grad_clip": 1.0 if tiny else 0.0,
        "accumulation_steps": 1, "ema_decay": 0.999, "no_decay": "", "frozen": "",
    })
    # L2 + the VQ's terms + (published) the 3D StyleGAN discriminator with R1; no perceptual loss
    # (module docstring)
    disc = ({"name": "stylegan3d", "filters": 16, "channel_multipliers": (1, 2)} if tiny else
            {"name": "stylegan3d", "filters": model["hidden_channels"],
             "channel_multipliers": (2, 4, 4, 4, 4)})
    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l2", reconstruction_weight=1.0, perceptual_weight=0.0,
        gan_weight=0.0 if tiny else 0.1, gan_start_step=0, gan_loss="non_saturating",
        lecam_weight=0.0, r1_weight=10.0, discriminator=disc)

    c.init_from = ""   # an image model's workdir to inflate from (module docstring)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()  # () = titok_jax.train.sharding.DEFAULT_RULES
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500 if tiny else 5_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 10_000,
                                              "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 500 if tiny else 10_000
    c.samples = ml_collections.ConfigDict({"num_images": 4})
    c.eval = _COMMON["eval_section"](video=True)
    return c
