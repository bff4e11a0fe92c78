"""The universal extractor: TiTok's 1D tokenizer with MAE input masking, nested dropout, MaskGIT-style
decoder masking and REPA (models/extractor.py, tasks/extractor.py).

COMMAND (CPU, minutes; a seeded random REPA teacher, said loudly):
  titok-jax train --config configs/extractor.py:tiny --workdir workdirs/extractor_tiny
COMMAND (published size; the REPA teacher is DINOv2-L/14 from `titok-jax convert-dinov2`):
  titok-jax train --config configs/extractor.py:bl128 --workdir runs/extractor_bl128 \
      --config.data.source=tfds:imagenet2012 --config.repa.teacher.weights=dinov2_l14.safetensors \
      --config.losses.perceptual_weights=lpips_vgg.safetensors

Variants: ``tiny`` (64 px, 8 x 8 patches, 16 FSQ tokens, 2 + 2 blocks of width 128, TiTok's
token prior) and ``bl128`` (256 px, TiTok-B encoder / TiTok-L decoder, 128 FSQ tokens; 390.3M
parameters + a 7.9M training-only REPA projector, see models/extractor.py). Options as in
configs/titok.py: ``tiny,quantizer=vq|lfq|bsq|fsq|vae`` and ``bits=N`` (``vae``: continuous
tokens); ``head=pixel|flow`` is the decoder head (the same as ``--config.model.decoder_head=``):
TiTok's deterministic pixel decoder, or a rectified-flow decoder (FlexTok's idea; ``flow``: the
training times, ``sampler``: evaluation's Euler steps / CFG weight / seed; tasks/extractor.py).
``masking.cfg_dropout`` (default 0; FlexTok and FlowMo train with 0.1) trains the flow head's
null condition, which CFG (``guidance > 1``) needs. ``model.decoder_repa_layer`` (-1: off) with
``repa.decoder_weight`` (0: off) adds REPA on a decoder block's patch slots.

``masking`` (tasks/extractor.py): ``encoder_ratios`` / ``encoder_probs`` (MAE: one ratio per step,
a ``lax.switch`` branch per ratio with its static number of kept patches), ``decoder_ratios`` /
``decoder_probs`` (per example; 1 = TiTok's all-mask-token decoder), ``loss_on_masked_only``
(pixel loss over the patches the decoder did not see), ``nested_dropout`` (FlexTok's
``uniform`` | ``pow2`` | ``uniform_pow2`` | ``none``). Empty probabilities are uniform.

No recipe for this combination is published; the values are stated choices: TiTok's single-stage
recipe (AdamW 1e-4, betas (0.9, 0.999), wd 1e-4, 10k warmup, cosine, batch 256, EMA 0.999, L2 +
LPIPS + a late hinge GAN) with the issue's default ratio sets, uniform nested dropout (FlexTok's)
and REPA weight 0.5 on encoder block 6 of 12 (the REPA paper aligns an early-middle block).
"""
from __future__ import annotations

import os
import runpy

import ml_collections

from titok_jax.models.extractor import DECODER_HEADS, EXTRACTOR_VARIANTS

# Shared sections and their defaults (configs/common.py).
_COMMON = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))

PUBLISHED = ("bl128",)
VARIANTS = ("tiny",) + PUBLISHED


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, options = _COMMON["split_variant"](arg, "tiny")
    if variant not in VARIANTS:
        raise ValueError(f"unknown extractor variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    unknown = set(options) - {"quantizer", "bits", "head"}
    if unknown:
        raise ValueError(f"unknown extractor config option(s) {sorted(unknown)}; known: quantizer, "
                         f"bits, head")
    head = options.pop("head", "pixel")
    if head not in DECODER_HEADS:
        raise ValueError(f"extractor option head={head!r}; choose one of {', '.join(DECODER_HEADS)}")
    tiny = variant == "tiny"
    c = ml_collections.ConfigDict()
    c.family = "extractor"
    c.variant = variant
    c.task = ml_collections.ConfigDict({"name": "extractor"})
    c.seed = 0

    model = dict(EXTRACTOR_VARIANTS[variant])
    model["quantizer"] = dict(model["quantizer"])
    # published size: each ViT one nn.scan, blocks rematerialised keeping matmul outputs ("dots")
    model.update(scan_layers=not tiny, remat=not tiny, remat_policy="" if tiny else "dots")
    model = _COMMON["quantizer_options"](model, options, "extractor")   # quantizer=, bits=
    if tiny and model["quantizer"]["name"] == "fsq":
        # As TiTok's tiny: FSQ's saturation penalty keeps the inputs off tanh's flat tails (with
        # hue rotations below, held-out PSNR at 1500 steps 15.5 -> 17.3 dB).
        model["quantizer"].setdefault("saturation_weight", 0.1)
    model["quantizer"] = {k: list(v) if isinstance(v, (list, tuple)) else v
                          for k, v in model["quantizer"].items()}
    # the decoder head and decoder REPA (-1: off), overridable from the command line
    model.update(decoder_head=head, flow_prediction="velocity", decoder_repa_layer=-1)
    c.model = ml_collections.ConfigDict({"name": "extractor", **model})
    c.compute_dtype = "float32" if tiny else "auto"   # auto: bfloat16 on GPU/TPU, float32 on CPU

    c.data = ml_collections.ConfigDict({
        "source": "sample", "image_size": model["image_size"], "data_dir": "", "worker_count": 0,
        "eval_batch_size": 8 if tiny else 64, "eval_num_images": 8 if tiny else 0,
    })
    if tiny:
        c.data.hue = 0.8   # hue rotations of 80% of the crops (the sample photos are reds and browns)
    c.total_steps = 1500 if tiny else 1_000_000
    c.batch_size = 16 if tiny else 256
    c.optimizer = ml_collections.ConfigDict({
        "lr": 1e-3 if tiny else 1e-4, "end_lr": 1e-4 if tiny else 1e-5,
        "warmup_steps": 100 if tiny else 10_000, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "weight_decay": 1e-4, "grad_clip": 1.0, "accumulation_steps": 1,
        "ema_decay": 0.99 if tiny else 0.999, "no_decay": "", "frozen": "",
    })
    c.optimizers = ml_collections.ConfigDict({"disc": {"lr": 1e-4, "weight_decay": 1e-4}})
    c.losses = _COMMON["tokenizer_losses"](
        reconstruction="l2", perceptual_weight=0.0 if tiny else 1.0,
        gan_weight=0.0 if tiny else 0.1, gan_start_step=200_000, lecam_weight=0.001,
        discriminator={"ndf": 64, "n_layers": 3, "norm": "group"})
    # tuples: overridable from the command line, e.g. --config.masking.encoder_ratios='(0, 0.5)'
    c.masking = ml_collections.ConfigDict({
        "encoder_ratios": (0.0, 0.25, 0.5, 0.75, 1.0), "encoder_probs": (),
        "decoder_ratios": (0.5, 0.75, 1.0), "decoder_probs": (),
        "loss_on_masked_only": True, "nested_dropout": "uniform", "cfg_dropout": 0.0,
    })
    # the flow head (model.decoder_head=flow): training times (FlowMo's pixel-space sampler,
    # flow.sample_time) and evaluation's sampler (uniform-grid Euler, CFG weight, fixed seed)
    c.flow = ml_collections.ConfigDict({"time_sampler": "mixture",
                                        "time_params": {"loc": 0.0, "scale": 1.0, "uniform_prob": 0.1}})
    c.sampler = ml_collections.ConfigDict({"steps": 25, "guidance": 1.0, "seed": 0})
    teacher = (dict(image_size=64, patch_size=16, width=64, depth=1, num_heads=2) if tiny else
               dict(image_size=224, patch_size=14, width=1024, depth=24, num_heads=16,
                    layerscale=True, num_registers=0, pos_grid=37))   # dinov2_vitl14 (convert-dinov2)
    c.repa = ml_collections.ConfigDict({
        "weight": 0.5, "decoder_weight": 0.0,
        "teacher": {"weights": "", "allow_random": tiny, "seed": 0, "model": teacher},
    })

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.logical_axis_rules = ()   # () = titok_jax.train.sharding.DEFAULT_RULES
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 500 if tiny else 5_000, "keep": 3,
                                              "keep_every_steps": 0 if tiny else 50_000,
                                              "async_save": True})
    c.log_every_steps = 50 if tiny else 100
    c.eval_every_steps = 500 if tiny else 50_000
    c.samples = ml_collections.ConfigDict({"num_images": 8})
    c.eval = _COMMON["eval_section"]()
    return c
