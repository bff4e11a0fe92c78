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
