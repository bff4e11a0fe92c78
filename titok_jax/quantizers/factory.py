"""Quantizers by name: a model's ``quantizer`` sub-config -> a Linen module.

A sub-config is a mapping ``{"name": NAME, **that quantizer's own arguments}``, e.g.
``{"name": "vq", "codebook_size": 4096, "l2_normalize": True}``, ``{"name": "fsq", "levels":
[8, 5, 5, 5]}``, ``{"name": "lfq", "bits": 12}`` (``bsq``: the spherical LFQ) or ``{"name": "vae",
"kl_weight": 1e-6}``. Models keep it as a hashable tuple of ``(key, value)`` pairs
(:func:`freeze_spec`) and build their bottleneck with :func:`build_quantizer`::

    quantize = build_quantizer(spec, dim, dtype=jnp.float32, param_dtype=jnp.float32)
    z_q, out = quantize(z, train=train)              # z [..., input_dim(spec, dim)]

:data:`QUANTIZERS` is the table: one :class:`QuantizerEntry` per name, saying how to build the
module, which arguments it takes, its codebook size (None for continuous tokens) and how many
channels its input has per output channel (2 for the Gaussian: mean and logvar). Unknown names and
unknown arguments are one-line ``ValueError``s naming the known ones.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn

from titok_jax.quantizers.fsq import FSQ
from titok_jax.quantizers.gaussian import GaussianPosterior
from titok_jax.quantizers.lfq import LFQ
from titok_jax.quantizers.vq import VectorQuantizer, default_codebook_init, uniform_codebook_init

Spec = tuple[tuple[str, Any], ...]   # the frozen form a Linen module field holds

# ``codebook_init`` by name (the sub-config holds JSON, not functions). "uniform" is TiTok's
# ``U(+-1/K)``, the default of every model here; "variance_scaling" is maskgit's.
CODEBOOK_INITS = {"uniform": uniform_codebook_init, "variance_scaling": default_codebook_init}


@dataclasses.dataclass(frozen=True)
class QuantizerEntry:
    """How to build one quantizer: ``build(dim, dtype=, param_dtype=, **args)`` -> module.

    defaults: the optional arguments a sub-config may set, with their values when unset;
    required: the arguments it must set. codebook_size: ``args -> int`` (discrete tokens) or None
    (continuous). input_factor: the module reads ``input_factor * dim`` channels, emits ``dim``.
    """

    build: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    required: tuple[str, ...] = ()
    codebook_size: Callable[[Mapping[str, Any]], int] | None = None
    input_factor: int = 1

    @property
    def args(self) -> tuple[str, ...]:
        return self.required + tuple(self.defaults)


def _build_vq(dim: int, *, dtype: Any, param_dtype: Any, codebook_init: str = "uniform",
              **args: Any) -> VectorQuantizer:
    if codebook_init not in CODEBOOK_INITS:
        raise ValueError(f"quantizer 'vq': codebook_init must be one of {sorted(CODEBOOK_INITS)}, "
                         f"got {codebook_init!r}")
    return VectorQuantizer(dim=dim, codebook_init=CODEBOOK_INITS[codebook_init], dtype=dtype,
                           param_dtype=param_dtype, **args)


def _build_vae(dim: int, *, dtype: Any, param_dtype: Any, **args: Any) -> GaussianPosterior:
    del dim, dtype, param_dtype   # no params; the posterior is float32 maths
    return GaussianPosterior(**args)


def _build_fsq(dim: int, *, dtype: Any, param_dtype: Any, levels: Any, **args: Any) -> FSQ:
    del dtype, param_dtype   # no params; float32 maths
    levels = tuple(int(v) for v in levels)
    if len(levels) != dim:
        raise ValueError(f"quantizer 'fsq': levels {list(levels)} quantize {len(levels)} channels "
                         f"but the model's token_size is {dim}; set token_size={len(levels)}")
    return FSQ(levels=levels, **args)


def _build_lfq(spherical: bool):
    def build(dim: int, *, dtype: Any, param_dtype: Any, **args: Any) -> LFQ:
        del dtype, param_dtype   # no params; float32 maths
        bits = int(args.pop("bits", dim))
        name = "bsq" if spherical else "lfq"
        if bits != dim:
            raise ValueError(f"quantizer {name!r}: bits {bits} != the model's token_size {dim} "
                             f"(each token channel is one bit); set token_size={bits}")
        if not 1 <= bits <= 31:
            raise ValueError(f"quantizer {name!r}: bits must be 1..31 (one int32 id per token), "
                             f"got {bits}")
        return LFQ(bits=bits, spherical=spherical, **args)
    return build


def _module_defaults(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of a Linen module class with a default, minus ``exclude`` and the Linen ones."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
            and f.name not in exclude + ("parent", "name")}


QUANTIZERS: dict[str, QuantizerEntry] = {
    "vq": QuantizerEntry(
        _build_vq,
        defaults={**_module_defaults(VectorQuantizer, ("dtype", "param_dtype", "codebook_init")),
                  "codebook_init": "uniform"},
        required=("codebook_size",), codebook_size=lambda a: int(a["codebook_size"])),
    "vae": QuantizerEntry(_build_vae, defaults=_module_defaults(GaussianPosterior), input_factor=2),
    # FSQ: token_size must be len(levels); codes = prod(levels)
    "fsq": QuantizerEntry(
        _build_fsq, defaults=_module_defaults(FSQ, ("levels", "axis_name")), required=("levels",),
        codebook_size=lambda a: math.prod(int(v) for v in a["levels"])),
    # LFQ / BSQ (BSQ = spherical LFQ): token_size must be bits; codes = 2**bits
    "lfq": QuantizerEntry(
        _build_lfq(False), defaults=_module_defaults(LFQ, ("spherical", "axis_name")),
        required=("bits",), codebook_size=lambda a: 2 ** int(a["bits"])),
    "bsq": QuantizerEntry(
        _build_lfq(True), defaults=_module_defaults(LFQ, ("spherical", "axis_name")),
        required=("bits",), codebook_size=lambda a: 2 ** int(a["bits"])),
}


def _thaw(value: Any) -> Any:
    """ConfigDicts / FrozenDicts -> dicts, lists -> tuples (JSON round trips give lists)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_thaw(v) for v in value)
    return value


def spec_dict(spec: Any) -> dict[str, Any]:
    """A sub-config in any form (mapping, ConfigDict, tuple of pairs, or a bare name) -> a dict
    with ``name``; unknown names, unknown arguments and missing required ones raise ``ValueError``."""
    if isinstance(spec, str):
        spec = {"name": spec}
    elif isinstance(spec, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in spec):
        spec = dict(spec)
    out = _thaw(spec)
    if not isinstance(out, dict):
        raise ValueError(f"quantizer must be a mapping with a 'name', got {spec!r}")
    name = out.get("name")
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer name {name!r}; known: {sorted(QUANTIZERS)}")
    entry = QUANTIZERS[name]
    for key in out:
        if key != "name" and key not in entry.args:
            raise ValueError(f"quantizer {name!r}: unknown argument {key!r}; known: "
                             f"{sorted(entry.args)}")
    missing = [k for k in entry.required if k not in out]
    if missing:
        raise ValueError(f"quantizer {name!r}: missing argument(s) {missing}")
    return out


def freeze_spec(spec: Any) -> Spec:
    """The hashable form of a sub-config: ``(("name", NAME), *sorted (key, value) pairs)``."""
    d = spec_dict(spec)
    name = d.pop("name")
    return (("name", name),) + tuple(sorted(d.items()))


def resolve_spec(spec: Any) -> dict[str, Any]:
    """The sub-config with every unset argument at its default (to compare two sub-configs)."""
    d = spec_dict(spec)
    return {"name": d["name"], **QUANTIZERS[d["name"]].defaults, **d}


def quantizer_entry(spec: Any) -> QuantizerEntry:
    return QUANTIZERS[spec_dict(spec)["name"]]


def spec_codebook_size(spec: Any) -> int | None:
    """The number of codes of a discrete quantizer; None for continuous tokens."""
    d = spec_dict(spec)
    entry = QUANTIZERS[d["name"]]
    return None if entry.codebook_size is None else entry.codebook_size(d)


def input_dim(spec: Any, dim: int) -> int:
    """Channels the quantizer reads to emit ``dim`` (``2 dim`` for the Gaussian posterior)."""
    return quantizer_entry(spec).input_factor * dim


def build_quantizer(spec: Any, dim: int, *, dtype: Any, param_dtype: Any) -> nn.Module:
    """``QUANTIZERS[spec["name"]].build(dim, dtype=, param_dtype=, **arguments)``: a module called
    as ``q(z [..., input_dim(spec, dim)], train=...)`` -> ``(z_q [..., dim], QuantizerOutput)``."""
    d = spec_dict(spec)
    return QUANTIZERS[d.pop("name")].build(dim, dtype=dtype, param_dtype=param_dtype, **d)


class QuantizedModel:
    """Mixin for tokenizer modules with a ``quantizer`` field (a sub-config): freezes the field
    into its hashable form at construction and derives ``quantizer_name`` / ``codebook_size``.
    Put it before ``nn.Module`` in the bases."""

    quantizer: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantizer", freeze_spec(self.quantizer))
        super().__post_init__()  # type: ignore[misc]

    @property
    def quantizer_name(self) -> str:
        return dict(self.quantizer)["name"]

    @property
    def codebook_size(self) -> int | None:
        return spec_codebook_size(self.quantizer)

    @property
    def continuous(self) -> bool:
        return quantizer_entry(self.quantizer).codebook_size is None
