"""MAGVIT-v2's causal video tokenizer as Open-MAGVIT2 builds it (TencentARC/SEED-Voken): causal 3D
convs (the first frame encoded alone: an image is a 1-frame clip), LFQ with 2^18 codes and its
entropy loss. `tiny` for a CPU, and the 17-frame 128^2 shape and recipe.

COMMAND (CPU, minutes):
  titok-jax train --config configs/magvit2_video.py:tiny --workdir workdirs/magvit2_video_tiny
COMMAND (the published shape, one GPU host or a TPU pod via launch/):
  titok-jax train --config configs/magvit2_video.py:k600_17x128 --workdir gs://BUCKET/runs/mv2v \
      --config.data.source=video_folder:/data/kinetics600 \
      --config.losses.perceptual_weights=lpips_vgg.safetensors
Then `titok-jax reconstruct --workdir W --input clip.gif --output rec.gif` (an animated GIF and a
frame grid `rec_frames.png`; mp4 in and out with PyAV, the `video` extra).

Data: clips [B, T, S, S, 3] in [0, 1], T = 1 + 4k (1 + ft k: 17 frames -> 5 latent frames),
from `sample_video`, `video_folder:PATH` or `tfds_video:NAME` (data.num_frames frames every
data.frame_stride).

The model (titok_jax/models/magvit2_video.py). `k600_17x128` is Open-MAGVIT2's only released
video tokenizer shape (ucf101_lfqfan_128_L.yaml, `OPEN_MAGVIT2_VIDEO_UCF_128`): ch 128, ch_mult
(1, 2, 2, 4), 4 blocks, 18 LFQ bits; 17 x 128^2 -> 5 x 16 x 16 = 1280 tokens; its clip-wide
GroupNorm statistics (causal_norm=False: only the convs are causal, as Open-MAGVIT2; set
`--config.model.causal_norm=True` for a strictly causal encoder and decoder). MAGVIT-v2 trains
this size on Kinetics-600; its own recipe was not released, so the recipe is Open-MAGVIT2's
video one (reference/magvit.md 5), the one published for this architecture: L1 (weight 2 on our
[0, 1] clips: OM2's L1 on [-1, 1]) + LPIPS 1.0 per frame + LFQ (entropy 0.1 x (per-sample -
codebook), commitment 0.25), Adam lr 1e-4 betas (0.5, 0.9), no weight decay, cosine decay to
0.01 x lr after a warmup of 2 epochs, EMA 0.999, batch 128; the length is OM2's 2000 epochs of
UCF-101 (9 537 clips of trainlist01 / 128 = 75 steps an epoch: 150 000 steps), to be set for
Kinetics-600 with --config.total_steps. The GAN is OM2's video one (reference/magvit.md 5): a 3D
PatchGAN (`patchgan3d`, models/discriminator3d.py: ndf 64, 3 layers, 3x3x3 kernels, BatchNorm in
train mode, time halved by the first two convs: 17 x 128^2 -> 5 x 16 x 16 logits), hinge D loss,
the non-saturating generator loss of each clip's mean logit with a fixed weight 0.3, LeCam 0.05
(per logit, decay 0.999), from step 0 (as OM2's image recipe; the video config's start step
is not in the notes); D's optimizer is the model's. `tiny` carries a small patchgan3d
(GroupNorm) but keeps gan_weight 0: `--config.losses.gan_weight=0.3` turns it on. NOT here yet,
so this variant is NOT the full recipe:
- the import of Open-MAGVIT2's video checkpoint.

Inflation from the image model (Open-MAGVIT2's `video_lfqgan.py`, as MAGVIT-v2 starts from its
image tokenizer): `--config.init_from=IMAGE_WORKDIR`, a configs/magvit2.py run (or an import of
Open-MAGVIT2's image release) with this config's ch, ch_mult, num_res_blocks and quantizer. Its
params (EMA when kept) are inflated into the causal 3-D model (each 2-D kernel in the last time
slice, the temporal upsamplers tiled; `tasks/video_init.py`), so with causal_norm=True a 1-frame
clip reconstructs exactly as the image model; the discriminator and the optimizer start fresh.

Memory (BENCHMARKS.md, "Video tokenizers"): `--config.model.remat=True` recomputes every
ResBlock3D in the backward pass; `--config.optimizer.accumulation_steps=N` splits the batch.
`data.source=tfds_video:NAME[:split]` reads an ArrayRecord-prepared TFDS video set (a `video`
feature [T, H, W, 3]; data.data_dir or $TFDS_DATA_DIR).

`tiny` is strictly causal (causal_norm=True, the model's default). Another quantizer:
`configs/magvit2_video.py:tiny,quantizer=fsq`, `bits=N`, as configs/magvit2.py.
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.magvit2_video import OPEN_MAGVIT2_VIDEO_UCF_128

_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))
_MAGVIT2 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "magvit2.py"))

PUBLISHED = ("k600_17x128",)
VARIANTS = ("tiny",) + PUBLISHED
BATCH = 128
STEPS_PER_EPOCH = -(-9_537 // BATCH)   # OM2's UCF-101 epoch (trainlist01): 75 steps
EPOCHS = 2000
WARMUP_EPOCHS = 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _COMMON["split_variant"](arg, "tiny")
    if variant not in VARIANTS:
        raise ValueError(f"unknown magvit2_video variant {variant!r}; choose one of "
                         f"{', '.join(VARIANTS)}")
    tiny = variant == "tiny"
    if tiny:
        # 5 frames of 32x32 (1 + 2 x 2: time halved once, at level 1), f4 (3 x 8 x 8 = 192
        # tokens of 2^10 codes: OM2's LFQ loss at 10 bits), widths 32/64/64, one block per
        # level; batch 4, L1 and the LFQ terms only.
        model = dict(num_frames=5, image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                     temporal_downsample=(False, True), z_channels=10,
                     quantizer=_MAGVIT2["om2_lfq"](10))
    else:
        model = {**OPEN_MAGVIT2_VIDEO_UCF_128,
                 "quantizer": _MAGVIT2["om2_lfq"](OPEN_MAGVIT2_VIDEO_UCF_128["z_channels"])}
    model = _MAGVIT2["_quantizer"](model, options)

    c = ml_collections.ConfigDict()
    c.family = "magvit2_video"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "tokenizer"})
    c.seed = 0
    # remat: every ResBlock3D recomputed in the backward pass (less memory, ~1/3 more compute)
    c.model = ml_collections.ConfigDict({"remat": False, "name": "magvit2_video", **model})
    c.compute_dtype = "float32" if tiny else "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    c.data = ml_collections.ConfigDict({
        "source": "sample_video" if tiny else "video_folder:/path/to/kinetics600",
        "image_size": model["image_size"], "num_frames": model["num_frames"],
        "frame_stride": 1 if tiny else 4,   # OM2's frame_sample_rate 4
        "data_dir": "", "worker_count": 0,
        "eval_batch_size": 4 if tiny else 32, "eval_num_images": 0,  # 0 = the whole held-out split
    })
    c.total_steps = 1000 if tiny else EPOCHS * STEPS_PER_EPOCH
    c.batch_size = 4 if tiny else BATCH
    lr = 1e-3 if tiny else 1e-4
    c.optimizer = ml_collections.ConfigDict({
        "lr": lr, "end_lr": 1e-4 if tiny else 0.01 * lr,
        "warmup_steps": 50 if tiny else WARMUP_EPOCHS * STEPS_PER_EPOCH,
        "b1": 0.9 if tiny else 0.5, "b2": 0.999 if tiny else 0.9, "eps": 1e-8,
        "weight_decay": 1e-4 if tiny else 0.0, "grad_clip": 1.0 if tiny else 0.0,
        "accumulation_steps": 1, "ema_decay": 0.999, "no_decay": "", "frozen": "",
    })
    # L1 + (published) LPIPS per frame + LFQ's terms + (published) OM2's 3D PatchGAN (docstring)
    disc = ({"name": "patchgan3d", "ndf": 16, "n_layers": 2, "norm": "group", "num_groups": 8}
            if tiny else {"name": "patchgan3d", "ndf": 64, "n_layers": 3, "norm": "batch"})
    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l1", reconstruction_weight=2.0, perceptual_weight=0.0 if tiny else 1.0,
        gan_weight=0.0 if tiny else 0.3, gan_start_step=0, gan_loss="hinge_nonsat",
        lecam_weight=0.0 if tiny else 0.05, lecam_decay=0.999, lecam_per_sample=True,
        discriminator=disc)

    c.init_from = ""   # an image model's workdir to inflate from (module docstring)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()  # () = titok_jax.train.sharding.DEFAULT_RULES
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500 if tiny else 5_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 50_000,
                                              "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 500 if tiny else 10_000
    c.samples = ml_collections.ConfigDict({"num_images": 4})
    c.eval = _COMMON["eval_section"](video=True)
    return c
