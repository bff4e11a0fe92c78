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
    "lecam_per_sample": False,       # True: mean(relu(r - a_F)^2) + mean(relu(a_R - f)^2) over
                                     # the logits (LeCam's code, Open-MAGVIT2); False: of their means
    "r1_weight": 0.0,                # > 0: + r1_weight x R1 penalty on real inputs in D's loss
                                     # (MAGVIT v1: 10 with its 3D StyleGAN discriminator)
    "entropy_anneal_ratio": 0.0,     # > 0: the quantizer's entropy term x (1 + ratio max(0, 1 -
    "entropy_anneal_steps": 2000,    # step / steps)) (Open-MAGVIT2's codebook_enlarge_{ratio,steps})
    "discriminator": {},             # name: patchgan (default) | maskbit (images), stylegan3d |
                                     # patchgan3d (clips), and its arguments
    "adaptive_weight_layer": "",     # "" = fixed gan_weight; a model param path (taming:
                                     # "decoder/conv_out/kernel") = taming's adaptive GAN weight
}


def tokenizer_losses(**recipe: Any) -> ml_collections.ConfigDict:
    """``config.losses`` of a tokenizer run: ``TOKENIZER_LOSSES`` with the recipe's values."""
    unknown = set(recipe) - set(TOKENIZER_LOSSES)
    if unknown:
        raise KeyError(f"unknown tokenizer loss keys {sorted(unknown)}; known: {sorted(TOKENIZER_LOSSES)}")
    return ml_collections.ConfigDict({**TOKENIZER_LOSSES, **recipe})


def eval_section(video: bool = False) -> ml_collections.ConfigDict:
    """rFID / IS in evaluation: ``inception_weights`` from ``titok-jax convert-inception``
    ("" = off); ``fid_reference`` an .npz of mu/sigma ("" = the eval split's own originals);
    ``fid_method`` sqrtm (pytorch-fid) or eigh. ``video``: also rFVD (``titok_jax.tasks.eval_fvd``):
    ``fvd_weights`` from ``titok-jax convert-i3d`` ("" = off), ``fvd_features`` logits or pool,
    ``fvd_bn_eps`` (1e-5 for i3d_pretrained_400.pt, 1e-3 for piergiaj's rgb_imagenet.pt)."""
    c = ml_collections.ConfigDict({"inception_weights": "", "fid_reference": "", "fid_method": "sqrtm"})
    if video:
        c.update(fvd_weights="", fvd_features="logits", fvd_bn_eps=1e-5)
    return c


def split_variant(arg: str | None, default: str) -> tuple[str, dict[str, str]]:
    """``"tiny,quantizer=fsq,bits=10"`` -> ``("tiny", {"quantizer": "fsq", "bits": "10"})``
    (big_vision's ``get_config(arg)`` style; an empty name is ``default``)."""
    parts = [p.strip() for p in (arg or "").split(",")]
    name = parts[0] or default
    options: dict[str, str] = {}
    for part in parts[1:]:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config option {part!r} in {arg!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return name, options


QUANTIZER_NAMES = ("vq", "fsq", "lfq", "bsq", "fq", "rq", "vae")
# fq / rq: 2 factors / levels, each with 2**ceil(bits / 2) codes (the bits split evenly, rounded up)
MULTI_INDEX_PARTS = 2


def quantizer_option(model: dict, name: str, bits: int | None = None,
                     dim_key: str = "token_size") -> dict:
    """``model`` (a model section with a ``quantizer`` sub-config and its code dim under
    ``dim_key``: ``token_size`` for TiTok, ``z_channels`` for the CNN tokenizers) with its
    quantizer swapped for ``name`` at about the same bits per token (``bits``: override):
    vq keeps its sub-config (``codebook_size = 2**bits`` when ``bits`` is given); fsq takes the FSQ
    paper's recommended levels for ``2**bits`` codes and a code dim of ``len(levels)``; lfq / bsq
    take ``bits`` binary channels (code dim ``bits``); fq (FQGAN's factorized quantizer, 2
    factors, disentanglement weight 0.1) and rq (residual, 2 levels) split the bits evenly over
    their 2 factors / levels, each a VQ of ``2**ceil(bits / 2)`` codes (12 bits -> 2 x 64 codes,
    9 -> 2 x 32: the total rounded up to even), keep the code dim and reuse the current VQ's
    arguments (EMA, l2 lookup, ...) for each codebook; their tokens are ``k = 2`` ids each
    (``[B, N, 2]``); vae keeps the code dim's continuous channels."""
    import math
    from titok_jax.quantizers.fsq import fsq_levels
    if name not in QUANTIZER_NAMES:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {', '.join(QUANTIZER_NAMES)}")
    current = dict(model["quantizer"])
    explicit = bits is not None
    if bits is None:
        size = current.get("codebook_size")
        if size and current.get("name") in ("fq", "rq"):   # per factor / level
            size = size ** int(current.get("factors", current.get("num_levels", MULTI_INDEX_PARTS)))
        bits = int(round(math.log2(size))) if size else 12
    out = dict(model)
    if name == "vq":
        q = dict(current) if current.get("name") == "vq" else {"name": "vq", "codebook_size": 2 ** bits}
        if explicit:
            q["codebook_size"] = 2 ** bits
        out["quantizer"] = q
    elif name == "fsq":
        levels = list(fsq_levels(2 ** bits))
        out["quantizer"], out[dim_key] = {"name": "fsq", "levels": levels}, len(levels)
    elif name in ("lfq", "bsq"):
        out["quantizer"], out[dim_key] = {"name": name, "bits": bits}, bits
    elif name in ("fq", "rq"):
        # each codebook: the current VQ's arguments (a plain vq, or the VQ of a current fq / rq)
        vq = dict(current.get("quantizer") or {"name": "vq"}) \
            if current.get("name") in ("fq", "rq") else current
        sub = ({k: v for k, v in dict(vq).items() if k != "codebook_size"}
               if dict(vq).get("name") == "vq" else {"name": "vq"})
        per = 2 ** -(-bits // MULTI_INDEX_PARTS)
        count = "factors" if name == "fq" else "num_levels"
        out["quantizer"] = {"name": name, count: MULTI_INDEX_PARTS, "codebook_size": per,
                            "quantizer": sub}
        if name == "fq":
            out["quantizer"]["disentanglement_weight"] = 0.1
    else:
        out["quantizer"] = {"name": "vae"}
    return out


QUANTIZER_OPTIONS = ("quantizer", "bits")


def quantizer_options(model: dict, options: dict[str, str], family: str,
                      dim_key: str = "token_size") -> dict:
    """The variant string's options (:func:`split_variant`) applied to ``model``: ``quantizer=NAME``
    and / or ``bits=N`` -> :func:`quantizer_option` (the current quantizer's name when only
    ``bits`` is given); no options -> ``model`` unchanged; any other option is a ``ValueError``
    naming ``family``'s known ones."""
    unknown = set(options) - set(QUANTIZER_OPTIONS)
    if unknown:
        raise ValueError(f"unknown {family} config option(s) {sorted(unknown)}; known: "
                         f"{', '.join(QUANTIZER_OPTIONS)}")
    if not options:
        return model
    bits = int(options["bits"]) if "bits" in options else None
    return quantizer_option(model, options.get("quantizer", model["quantizer"]["name"]), bits,
                            dim_key)
