"""Model factories by name: ``build_model(config.model)`` -> a Linen module built from explicit
keyword arguments (the config's ``model`` section minus ``name``)."""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

MODELS: dict[str, Callable[..., Any]] = {}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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


def _kl_vae(**kwargs: Any) -> Any:
    from titok_jax.models.kl_vae import KLVAE
    if "channel_mult" in kwargs:
        kwargs["channel_mult"] = tuple(int(m) for m in kwargs["channel_mult"])
    return KLVAE(**kwargs)


MODELS["kl_vae"] = _kl_vae


def build_model(model_config: Any, dtype: str = "float32") -> Any:
    """``MODELS[name](**kwargs, dtype=compute dtype)``; unknown names or fields give a clear error."""
    kwargs = dict(model_config)
    name = kwargs.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    if dtype not in DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        return MODELS[name](**kwargs, dtype=DTYPES[dtype])
    except TypeError as e:
        raise ValueError(f"model {name!r}: {e}") from e
