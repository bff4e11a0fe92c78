"""Config sections shared by the family configs: the one place for the defaults of the keys the
tasks read (``config.losses`` of the tokenizer task, ``config.eval``). A family file loads it by
path (``runpy.run_path`` next to itself: config files are loaded by path, not as a package) and
overrides only its recipe's values."""
from __future__ import annotations

from typing import Any

import ml_collections

# The tokenizer task (titok_jax/tasks/tokenizer.py) reads exactly these keys of config.losses.
TOKENIZER_LOSSES = {
    "reconstruction": "l2",          # l2 | l1
    "reconstruction_weight": 1.0,
    "perceptual_weight": 0.0,        # LPIPS; > 0 needs perceptual_weights (titok-jax convert-lpips)
    "perceptual_weights": "",
    "convnext_weight": 0.0,          # ConvNeXt-S logit MSE; > 0 needs convnext_weights
    "convnext_weights": "",
    "gan_weight": 0.0,               # 0 = no discriminator
    "gan_start_step": 0,             # D and the generator term start here (the disc optimizer too)
    "gan_loss": "hinge",
    "lecam_weight": 0.0,
    "lecam_decay": 0.999,
    "discriminator": {},             # name: patchgan (default) | maskbit, and its arguments
}


def tokenizer_losses(**recipe: Any) -> ml_collections.ConfigDict:
    """``config.losses`` of a tokenizer run: ``TOKENIZER_LOSSES`` with the recipe's values."""
    unknown = set(recipe) - set(TOKENIZER_LOSSES)
    if unknown:
        raise KeyError(f"unknown tokenizer loss keys {sorted(unknown)}; known: {sorted(TOKENIZER_LOSSES)}")
    return ml_collections.ConfigDict({**TOKENIZER_LOSSES, **recipe})


def eval_section() -> ml_collections.ConfigDict:
    """rFID / IS in evaluation: ``inception_weights`` from ``titok-jax convert-inception``
    ("" = off); ``fid_reference`` an .npz of mu/sigma ("" = the eval split's own originals);
    ``fid_method`` sqrtm (pytorch-fid) or eigh."""
    return ml_collections.ConfigDict({"inception_weights": "", "fid_reference": "", "fid_method": "sqrtm"})
