"""Name-table rows shared by the importers of the CompVis-lineage CNN tokenizers (taming VQGAN,
Open-MAGVIT2, FQGAN): one row per tensor, ``(torch key, flax key, torch shape, transform)``, for the
torch convs, norms and linears and the CompVis ResnetBlock / AttnBlock built from them, and the
abstract param tree a converted model section must match."""
from __future__ import annotations

from typing import Any, Mapping

from titok_jax.convert.common import conv_kernel, linear_kernel

# (torch key, flax key, torch shape, transform)
Entry = tuple[str, str, tuple[int, ...], Any]


def conv_rows(t: str, f: str, c_out: int, c_in: int, k: int, bias: bool = True) -> list[Entry]:
    rows = [(f"{t}.weight", f"{f}/kernel", (c_out, c_in, k, k), conv_kernel)]
    return rows + ([(f"{t}.bias", f"{f}/bias", (c_out,), None)] if bias else [])


def norm_rows(t: str, f: str, c: int) -> list[Entry]:
    return [(f"{t}.weight", f"{f}/scale", (c,), None), (f"{t}.bias", f"{f}/bias", (c,), None)]


def linear_rows(t: str, f: str, c_out: int, c_in: int) -> list[Entry]:
    return [(f"{t}.weight", f"{f}/kernel", (c_out, c_in), linear_kernel),
            (f"{t}.bias", f"{f}/bias", (c_out,), None)]


def resnet_rows(t: str, f: str, c_in: int, c_out: int, bias: bool = True) -> list[Entry]:
    """CompVis ResnetBlock (``nn.conv.CompVisResnet``): norm1, conv1, norm2, conv2 and a 1x1
    ``nin_shortcut`` when the width changes; ``bias=False``: Open-MAGVIT2's bias-free convs."""
    rows = (norm_rows(f"{t}.norm1", f"{f}/norm1", c_in)
            + conv_rows(f"{t}.conv1", f"{f}/conv1", c_out, c_in, 3, bias)
            + norm_rows(f"{t}.norm2", f"{f}/norm2", c_out)
            + conv_rows(f"{t}.conv2", f"{f}/conv2", c_out, c_out, 3, bias))
    if c_in != c_out:
        rows += conv_rows(f"{t}.nin_shortcut", f"{f}/nin_shortcut", c_out, c_in, 1, bias)
    return rows


def attn_rows(t: str, f: str, c: int) -> list[Entry]:
    """CompVis AttnBlock: a norm and the 1x1 convs q, k, v, proj_out."""
    rows = norm_rows(f"{t}.norm", f"{f}/norm", c)
    for name in ("q", "k", "v", "proj_out"):
        rows += conv_rows(f"{t}.{name}", f"{f}/{name}", c, c, 1)
    return rows


def abstract_params(model_section: Mapping[str, Any]) -> Any:
    """The unboxed param shapes of the model a ``model`` section (with its ``name``) builds, by
    ``jax.eval_shape`` of its init on one image (no weights allocated)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from titok_jax.models.registry import build_model

    model = build_model(dict(model_section))
    s = model.image_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3), jnp.float32))
    return nn.unbox(shapes["params"])
