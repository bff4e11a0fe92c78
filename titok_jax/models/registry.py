"""Model factories by name: ``build_model(config.model)`` -> a Linen module built from explicit
keyword arguments (the config's ``model`` section minus ``name``).

Tokenizers take their bottleneck as one sub-config, ``model.quantizer = {"name": ..., **args}``
(``quantizers.factory``), which the model freezes into a hashable tuple of pairs. Workdirs
written before that hold the VQ knobs flat in ``model`` (``quantizer: "vq"``, ``codebook_size``,
``use_l2_norm``...): :func:`translate_legacy_quantizer` rewrites them into the sub-config, so old
runs still load.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

MODELS: dict[str, Callable[..., Any]] = {}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# ``compute_dtype: "auto"`` (the published configs' default): bfloat16 where the backend computes it
# natively, float32 on CPU (where bfloat16 is emulated: about 20% slower at bl64_vq's size).
# ``TITOK_JAX_AUTO_DTYPE`` forces the choice (``--simulate_devices`` sets bfloat16: a simulated pod
# stands for accelerators).
ACCELERATOR_BACKENDS = ("gpu", "tpu", "cuda", "rocm")
AUTO_DTYPE_ENV = "TITOK_JAX_AUTO_DTYPE"


def resolve_compute_dtype(name: Any) -> str:
    """A config's ``compute_dtype`` as a name of ``DTYPES``: ``"auto"`` is ``$TITOK_JAX_AUTO_DTYPE``
    when set, else bfloat16 on GPU/TPU and float32 on CPU; an unknown name is a ``ValueError``."""
    if name == "auto":
        forced = os.environ.get(AUTO_DTYPE_ENV, "")
        if forced:
            if forced not in DTYPES:
                raise ValueError(f"${AUTO_DTYPE_ENV} must be one of {sorted(DTYPES)}, got {forced!r}")
            return forced
        return "bfloat16" if jax.default_backend() in ACCELERATOR_BACKENDS else "float32"
    if name not in DTYPES:
        raise ValueError(f"compute_dtype must be one of {['auto'] + sorted(DTYPES)}, got {name!r}")
    return str(name)


def register_model(name: str) -> Callable:
    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        MODELS[name] = factory
        return factory
    return deco


def _titok(**kwargs: Any) -> Any:
    from titok_jax.models.titok import TiTok
    return TiTok(**kwargs)


MODELS["titok"] = _titok


def _titok_two_stage(**kwargs: Any) -> Any:
    from titok_jax.models.titok_two_stage import TiTokTwoStage
    if "pixel_channel_mult" in kwargs:  # a JSON round trip turns the tuple into a list
        kwargs["pixel_channel_mult"] = tuple(int(m) for m in kwargs["pixel_channel_mult"])
    return TiTokTwoStage(**kwargs)


MODELS["titok_two_stage"] = _titok_two_stage


def _maskgit_vqgan(**kwargs: Any) -> Any:
    from titok_jax.models.vqgan import MaskGITVQGAN
    if "channel_mult" in kwargs:  # a JSON round trip turns the tuple into a list
        kwargs["channel_mult"] = tuple(int(m) for m in kwargs["channel_mult"])
    return MaskGITVQGAN(**kwargs)


MODELS["maskgit_vqgan"] = _maskgit_vqgan


def _flowmo(**kwargs: Any) -> Any:
    from titok_jax.models.flowmo import FlowMo
    for key in ("guidance_interval", "encoder_rope_axes", "decoder_rope_axes"):  # JSON lists -> tuples
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return FlowMo(**kwargs)


MODELS["flowmo"] = _flowmo


def _flextok(**kwargs: Any) -> Any:
    from titok_jax.models.flextok import FlexTok
    for key in ("vae_channel_mult", "fsq_levels"):  # a JSON round trip turns tuples into lists
        if key in kwargs:
            kwargs[key] = tuple(int(m) for m in kwargs[key])
    return FlexTok(**kwargs)


MODELS["flextok"] = _flextok


def _extractor(**kwargs: Any) -> Any:
    from titok_jax.models.extractor import Extractor
    return Extractor(**kwargs)


MODELS["extractor"] = _extractor


def _kl_vae(**kwargs: Any) -> Any:
    from titok_jax.models.kl_vae import KLVAE
    if "channel_mult" in kwargs:
        kwargs["channel_mult"] = tuple(int(m) for m in kwargs["channel_mult"])
    return KLVAE(**kwargs)


MODELS["kl_vae"] = _kl_vae


def _taming_vqgan(**kwargs: Any) -> Any:
    from titok_jax.models.taming import TamingVQGAN
    for key in ("ch_mult", "attn_resolutions"):  # a JSON round trip turns tuples into lists
        if key in kwargs:
            kwargs[key] = tuple(int(m) for m in kwargs[key])
    return TamingVQGAN(**kwargs)


MODELS["taming_vqgan"] = _taming_vqgan


def _vqvae(**kwargs: Any) -> Any:
    from titok_jax.models.vqvae import VQVAE
    return VQVAE(**kwargs)


MODELS["vqvae"] = _vqvae


def _magvit2(**kwargs: Any) -> Any:
    from titok_jax.models.magvit2 import Magvit2
    if "ch_mult" in kwargs:  # a JSON round trip turns the tuple into a list
        kwargs["ch_mult"] = tuple(int(m) for m in kwargs["ch_mult"])
    return Magvit2(**kwargs)


MODELS["magvit2"] = _magvit2


def _fqgan(**kwargs: Any) -> Any:
    from titok_jax.models.fqgan import FQGAN
    for key in ("ch_mult", "head_widths"):  # a JSON round trip turns tuples into lists
        if key in kwargs:
            kwargs[key] = tuple(int(m) for m in kwargs[key])
    if "factors" in kwargs:
        kwargs["factors"] = tuple(str(f) for f in kwargs["factors"])
    return FQGAN(**kwargs)


MODELS["fqgan"] = _fqgan


def _magvit3d(**kwargs: Any) -> Any:
    from titok_jax.models.magvit3d import Magvit3D
    return Magvit3D(**kwargs)   # lists from a JSON round trip become tuples in the model


MODELS["magvit3d"] = _magvit3d


def _magvit2_video(**kwargs: Any) -> Any:
    from titok_jax.models.magvit2_video import Magvit2Video
    return Magvit2Video(**kwargs)   # lists from a JSON round trip become tuples in the model


MODELS["magvit2_video"] = _magvit2_video


# Flat keys of workdirs written before ``model.quantizer`` was a sub-config -> the sub-config's
# argument names (``"vq"``: VectorQuantizer's; ``"vae"``: GaussianPosterior's).
LEGACY_QUANTIZER_KEYS = {
    "vq": {"codebook_size": "codebook_size", "use_l2_norm": "l2_normalize",
           "commitment_cost": "commitment_weight", "codebook_weight": "codebook_weight",
           "ema_codebook": "use_ema", "ema_decay": "ema_decay", "kmeans_init": "kmeans_init",
           "dead_code_threshold": "dead_code_threshold"},
    "vae": {"kl_weight": "kl_weight"},
}
# The models whose ``quantizer`` was flat (module path, class): their defaults fill missing keys.
LEGACY_QUANTIZER_MODELS = {"titok": ("titok_jax.models.titok", "TiTok"),
                           "titok_two_stage": ("titok_jax.models.titok_two_stage", "TiTokTwoStage"),
                           "maskgit_vqgan": ("titok_jax.models.vqgan", "MaskGITVQGAN")}


def _model_default_quantizer(name: str) -> dict[str, Any]:
    import importlib
    module, cls = LEGACY_QUANTIZER_MODELS[name]
    return dict(getattr(importlib.import_module(module), cls).__dataclass_fields__["quantizer"].default)


def translate_legacy_quantizer(model_config: Any) -> dict[str, Any]:
    """A ``model`` section with flat quantizer knobs (``quantizer: "vq" | "vae"`` or absent,
    ``codebook_size``, ``use_l2_norm``, ``commitment_cost``, ``codebook_weight``, ``ema_codebook``,
    ``ema_decay``, ``kmeans_init``, ``dead_code_threshold``, ``kl_weight``) -> the same section with
    one ``quantizer`` sub-config (missing knobs take the model's old defaults; the other name's
    knobs are dropped). A section already in the new form comes back unchanged (as a dict)."""
    kwargs = dict(model_config)
    name = kwargs.get("name")
    flat = {k for keys in LEGACY_QUANTIZER_KEYS.values() for k in keys}
    quantizer = kwargs.get("quantizer")
    if name not in LEGACY_QUANTIZER_MODELS or not (
            isinstance(quantizer, str) or (quantizer is None and flat & set(kwargs))):
        return kwargs
    qname = quantizer or "vq"
    if qname not in LEGACY_QUANTIZER_KEYS:
        raise ValueError(f"model.quantizer {qname!r}: known: {sorted(LEGACY_QUANTIZER_KEYS)}")
    default = _model_default_quantizer(name)
    spec = dict(default) if default["name"] == qname else {"name": qname}
    for old, new in LEGACY_QUANTIZER_KEYS[qname].items():
        if old in kwargs:
            spec[new] = kwargs[old]
    for key in flat:
        kwargs.pop(key, None)
    kwargs["quantizer"] = spec
    return kwargs


def resolved_quantizer(model_config: Any) -> dict[str, Any] | None:
    """The ``quantizer`` sub-config a ``model`` section (new or legacy form) builds, every argument
    filled in (``quantizers.factory.resolve_spec``); None for models without one."""
    from titok_jax.quantizers.factory import resolve_spec
    kwargs = translate_legacy_quantizer(model_config)
    spec = kwargs.get("quantizer")
    if spec is None and kwargs.get("name") in LEGACY_QUANTIZER_MODELS:
        spec = _model_default_quantizer(kwargs["name"])
    return None if spec is None else resolve_spec(spec)


def build_model(model_config: Any, dtype: str = "float32") -> Any:
    """``MODELS[name](**kwargs, dtype=compute dtype)`` (``"auto"`` resolved by
    :func:`resolve_compute_dtype`); unknown names or fields give a clear error.
    A legacy flat quantizer is translated first (:func:`translate_legacy_quantizer`); the model
    freezes its ``quantizer`` sub-config (ConfigDict, dict, JSON lists) into a hashable tuple of
    pairs (``quantizers.QuantizedModel``), and an unknown quantizer name or argument is an error."""
    kwargs = translate_legacy_quantizer(model_config)
    name = kwargs.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    dtype = resolve_compute_dtype(dtype)
    try:
        return MODELS[name](**kwargs, dtype=DTYPES[dtype])
    except TypeError as e:
        raise ValueError(f"model {name!r}: {e}") from e
