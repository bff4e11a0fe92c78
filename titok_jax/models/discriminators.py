"""Discriminators by name: ``build_discriminator(config)`` over the 2-D ones of
``models.discriminator`` (``patchgan``, ``maskbit``) and the 3-D ones of ``models.discriminator3d``
(``stylegan3d``, ``patchgan3d``: clips). Its own module so that neither of those imports the other
back."""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from titok_jax.models.discriminator import DISCRIMINATORS
from titok_jax.models.discriminator3d import VIDEO_DISCRIMINATORS


def build_discriminator(config: Any) -> nn.Module:
    """``config["name"]`` (``"patchgan"`` by default, or ``"maskbit"``; for clips ``"stylegan3d"`` /
    ``"patchgan3d"``) + that class's kwargs; an unknown name or option is a ValueError."""
    kwargs = dict(config or {})
    name = kwargs.pop("name", "patchgan")
    known = {**DISCRIMINATORS, **VIDEO_DISCRIMINATORS}
    if name not in known:
        raise ValueError(f"unknown discriminator {name!r}; expected one of {sorted(known)}")
    cls = known[name]
    unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__) - {"parent", "name"})
    if unknown:
        raise ValueError(f"discriminator {name!r}: unknown option(s) {unknown}")
    return cls(**kwargs)
