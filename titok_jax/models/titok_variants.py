"""Named TiTok configurations: ``TiTok(**titok_variant("bl64_vq"))`` or, for the legacy two-stage
models, ``TiTokTwoStage(**titok_variant("l32"))`` (:func:`titok_model_name` says which class).

Published sizes ``S / B / L`` (width, depth, heads; MLP 4x) as in the official configs, and tiny
CPU test models. This table sits above both model files so neither imports the other for it.
"""
from __future__ import annotations

from typing import Any

from titok_jax.models.titok import TiTok
from titok_jax.models.titok_two_stage import TiTokTwoStage

SIZES = {  # width, depth, heads (MLP 4x)
    "S": (512, 8, 8),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


def _published(enc: str, dec: str, num_tokens: int, quantizer: str) -> dict[str, Any]:
    (ew, ed, eh), (dw, dd, dh) = SIZES[enc], SIZES[dec]
    kw = dict(image_size=256, patch_size=16, encoder_width=ew, encoder_depth=ed,
              encoder_heads=eh, decoder_width=dw, decoder_depth=dd, decoder_heads=dh,
              num_latent_tokens=num_tokens, is_legacy=False)
    if quantizer == "vq":
        kw.update(token_size=64, quantizer=_vq(8192, commitment_weight=0.25))
    else:
        kw.update(token_size=16, quantizer={"name": "vae", "kl_weight": 1e-6})
    return kw


def _vq(codebook_size: int, l2_normalize: bool = False, **args: Any) -> dict[str, Any]:
    """A ``"vq"`` quantizer sub-config (``quantizers.factory``)."""
    return {"name": "vq", "codebook_size": codebook_size, "l2_normalize": l2_normalize, **args}


_TINY = dict(image_size=32, patch_size=8, encoder_width=64, encoder_depth=2, encoder_heads=4,
             decoder_width=64, decoder_depth=2, decoder_heads=4, num_latent_tokens=32,
             is_legacy=False)

def _two_stage(size: str, num_tokens: int) -> dict[str, Any]:
    """Legacy two-stage TiTok (``models.titok_two_stage.TiTokTwoStage``) of the 06/2024 weights."""
    w, d, h = SIZES[size]
    return dict(image_size=256, patch_size=16, encoder_width=w, encoder_depth=d, encoder_heads=h,
                decoder_width=w, decoder_depth=d, decoder_heads=h, num_latent_tokens=num_tokens,
                token_size=12, quantizer=_vq(4096, True, commitment_weight=0.25),
                is_legacy=True, proxy_codebook_size=1024, finetune_decoder=True)


# name -> TiTok kwargs. Published single-stage sizes (HF yucornetto/tokenizer_titok_*), plus tiny
# CPU test models. Reference parameter counts: bl64_vq 390.02M, bl128_vq 390.18M, sl256_vq 330.26M,
# ll32_vae 606.88M, bl64_vae 389.42M, bl128_vae 389.58M.
TITOK_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(_TINY, token_size=8, quantizer=_vq(64)),
    "tiny_l2": dict(_TINY, token_size=8, quantizer=_vq(64, True)),
    "tiny_vae": dict(_TINY, token_size=8, quantizer={"name": "vae"}),
    "bl64_vq": _published("B", "L", 64, "vq"),
    "bl128_vq": _published("B", "L", 128, "vq"),
    "sl256_vq": _published("S", "L", 256, "vq"),
    "ll32_vae": _published("L", "L", 32, "vae"),
    "bl64_vae": _published("B", "L", 64, "vae"),
    "bl128_vae": _published("B", "L", 128, "vae"),
}


# Two-stage variants: kwargs of TiTokTwoStage (model name "titok_two_stage"), not of TiTok.
# Reference parameter counts (stage 2, incl. the 30.74M MaskGIT pixel decoder): l32 641.05M,
# b64 204.81M, s128 83.67M. tiny_two_stage: 32x32 images, a 4x4 proxy grid of a 64-code teacher.
TWO_STAGE_VARIANTS: dict[str, dict[str, Any]] = {
    "l32": _two_stage("L", 32),
    "b64": _two_stage("B", 64),
    "s128": _two_stage("S", 128),
    "tiny_two_stage": dict(_TINY, encoder_depth=1, decoder_depth=1, num_latent_tokens=8,
                           token_size=8, quantizer=_vq(64, True), is_legacy=True,
                           proxy_codebook_size=64,
                           finetune_decoder=True, pixel_hidden_channels=32,
                           pixel_channel_mult=(1, 1, 2, 2), pixel_num_res_blocks=1,
                           pixel_z_channels=32),
}


def titok_model_name(variant: str) -> str:
    """The registry name of a variant's model: ``"titok_two_stage"`` or ``"titok"``."""
    return "titok_two_stage" if variant in TWO_STAGE_VARIANTS else "titok"


def titok_variant(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of ``TITOK_VARIANTS[name]`` (or ``TWO_STAGE_VARIANTS[name]``) updated with
    ``overrides`` (``dtype=jnp.bfloat16``...); the ``quantizer`` sub-config is a fresh dict."""
    if name not in TITOK_VARIANTS and name not in TWO_STAGE_VARIANTS:
        raise KeyError(f"unknown TiTok variant {name!r}; known: "
                       f"{sorted(TITOK_VARIANTS) + sorted(TWO_STAGE_VARIANTS)}")
    fields = (TiTokTwoStage if name in TWO_STAGE_VARIANTS else TiTok).__dataclass_fields__
    unknown = set(overrides) - set(fields)
    if unknown:
        raise TypeError(f"unknown TiTok fields {sorted(unknown)}")
    out = {**(TWO_STAGE_VARIANTS.get(name) or TITOK_VARIANTS[name]), **overrides}
    return {**out, "quantizer": dict(out["quantizer"])}
