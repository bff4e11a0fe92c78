"""Quantizers by name: a model's ``quantizer`` sub-config -> a Linen module.

A sub-config is a mapping ``{"name": NAME, **that quantizer's own arguments}``, e.g.
``{"name": "vq", "codebook_size": 4096, "l2_normalize": True}``, ``{"name": "fsq", "levels":
[8, 5, 5, 5]}``, ``{"name": "lfq", "bits": 12}`` (``bsq``: the spherical LFQ), ``{"name": "vae",
"kl_weight": 1e-6}``, or one of the two multi-index quantizers, whose ``quantizer`` argument is the
sub-config of each factor / level (default ``{"name": "vq"}``; vq, fsq, lfq or bsq) and whose
``codebook_size`` is the codes of *each* factor / level (a VQ sub-quantizer's; fsq / lfq / bsq
imply theirs)::

    {"name": "fq", "factors": 2, "codebook_size": 64, "disentanglement_weight": 0.1}   # FQGAN
    {"name": "rq", "num_levels": 2, "codebook_size": 64}                                # SoundStream

``fq`` (``FactorizedQuantizer``): each factor quantizes its own Dense projection of the token
(``factor_dim`` channels; default the token's dim for VQ, ``len(levels)`` / ``bits`` for the
others), the codes are concatenated and projected back (``split_input=True``: factor i quantizes
its own ``dim / factors`` channels of the token and the codes are concatenated unprojected, the
official FQGAN whose factors come from separate encoder branches, ``models.fqgan``); ``disentanglement_weight`` is FQGAN's
lambda_1 (0.1). ``rq`` (``ResidualQuantizer``): level l quantizes the residual left by the levels
before it (optional ``scales`` s_l, ``quantize_dropout_min_levels``). Both emit ``k`` ids per token
(``indices [..., k]``, each in ``[0, codebook_size)``; :func:`spec_num_codebooks`). Models keep it as a hashable tuple of ``(key, value)`` pairs
(:func:`freeze_spec`) and build their bottleneck with :func:`build_quantizer`::

    quantize = build_quantizer(spec, dim, dtype=jnp.float32, param_dtype=jnp.float32)
    z_q, out = quantize(z, train=train)              # z [..., input_dim(spec, dim)]

:data:`QUANTIZERS` is the table: one :class:`QuantizerEntry` per name, saying how to build the
module, which arguments it takes, its codebook size (None for continuous tokens; per id for the
multi-index ones), how many ids it emits per token and how many channels its input has per output
channel (2 for the Gaussian: mean and logvar). Unknown names and unknown arguments are one-line
``ValueError``s naming the known ones.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn

from titok_jax.quantizers.factorized import FactorizedQuantizer
from titok_jax.quantizers.fsq import FSQ
from titok_jax.quantizers.gaussian import GaussianPosterior
from titok_jax.quantizers.lfq import LFQ
from titok_jax.quantizers.residual import ResidualQuantizer
from titok_jax.quantizers.vq import VectorQuantizer, default_codebook_init, uniform_codebook_init

Spec = tuple[tuple[str, Any], ...]   # the frozen form a Linen module field holds

# ``codebook_init`` by name (the sub-config holds JSON, not functions). "uniform" is TiTok's
# ``U(+-1/K)``, the default of every model here; "variance_scaling" is maskgit's.
CODEBOOK_INITS = {"uniform": uniform_codebook_init, "variance_scaling": default_codebook_init}


@dataclasses.dataclass(frozen=True)
class QuantizerEntry:
    """How to build one quantizer: ``build(dim, dtype=, param_dtype=, **args)`` -> module.

    defaults: the optional arguments a sub-config may set, with their values when unset;
    required: the arguments it must set. codebook_size: ``args -> int`` (discrete tokens: the
    codes of each id) or None (continuous). num_codebooks: ``args -> int`` (k ids per token, each
    in ``[0, codebook_size)``: the multi-index quantizers), None for one. check: ``args -> None``,
    raising a one-line ``ValueError`` for arguments that cannot work together. input_factor: the
    module reads ``input_factor * dim`` channels, emits ``dim``.
    """

    build: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    required: tuple[str, ...] = ()
    codebook_size: Callable[[Mapping[str, Any]], int] | None = None
    input_factor: int = 1
    num_codebooks: Callable[[Mapping[str, Any]], int] | None = None
    check: Callable[[Mapping[str, Any]], None] | None = None

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


# ---- the multi-index quantizers: k ids per token, one sub-quantizer per factor / level ----------
SUB_QUANTIZERS = ("vq", "fsq", "lfq", "bsq")   # what a factor / level may be
_UNIT = {"fq": "factor", "rq": "level"}


def sub_spec(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The sub-config every factor (``fq``) / level (``rq``) builds: ``args["quantizer"]`` (default
    ``{"name": "vq"}``) with the outer ``codebook_size`` as a VQ's ``codebook_size``; one-line
    ``ValueError``s for a sub-quantizer that is not one of :data:`SUB_QUANTIZERS`, a VQ without a
    size, or a ``codebook_size`` that contradicts the sub-quantizer's own."""
    unit = _UNIT[name]
    raw = args.get("quantizer")
    sub = {"name": "vq"} if raw is None else _thaw(raw)
    if isinstance(sub, str):
        sub = {"name": sub}
    elif isinstance(sub, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in sub):
        sub = dict(sub)
    if not isinstance(sub, dict):
        raise ValueError(f"quantizer {name!r}: 'quantizer' (each {unit}'s sub-config) must be a "
                         f"mapping with a 'name', got {raw!r}")
    sub = dict(sub)
    sname = sub.get("name")
    if sname not in SUB_QUANTIZERS:
        raise ValueError(f"quantizer {name!r}: each {unit} must be one of {list(SUB_QUANTIZERS)}, "
                         f"got {sname!r}")
    k = args.get("codebook_size")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"quantizer {name!r}: codebook_size (codes per {unit}) must be an "
                         f"integer >= 1, got {k!r}")
    if sname == "vq":
        if k is None and "codebook_size" not in sub:
            raise ValueError(f"quantizer {name!r}: set codebook_size (the codes of each {unit}'s "
                             f"VQ codebook)")
        if k is not None and sub.get("codebook_size", k) != k:
            raise ValueError(f"quantizer {name!r}: codebook_size {k} but its VQ sub-config says "
                             f"{sub['codebook_size']}; set one of them")
        if k is not None:
            sub["codebook_size"] = k
    try:
        sub = spec_dict(sub)
    except ValueError as e:
        raise ValueError(f"quantizer {name!r}, each {unit}: {e}") from None
    own = QUANTIZERS[sname].codebook_size(sub)
    if k is not None and own != k:
        raise ValueError(f"quantizer {name!r}: codebook_size {k} but each {unit}'s {sname} has "
                         f"{own} codes; leave codebook_size unset")
    return sub


def _natural_dim(sub: Mapping[str, Any], dim: int) -> int:
    """The channels a sub-quantizer quantizes: len(levels) (fsq), bits (lfq / bsq), else ``dim``."""
    if sub["name"] == "fsq":
        return len(sub["levels"])
    if sub["name"] in ("lfq", "bsq"):
        return int(sub["bits"])
    return dim


def _count(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"quantizer {name!r}: {key} must be an integer >= 1, got {value!r}")
    return value


def _check_fq(args: Mapping[str, Any]) -> None:
    _count("fq", "factors", args.get("factors", 2))
    if args.get("factor_dim") is not None:
        _count("fq", "factor_dim", args["factor_dim"])
        if args.get("split_input"):
            raise ValueError("quantizer 'fq': split_input gives each factor dim / factors "
                             "channels; leave factor_dim unset")
    if float(args.get("disentanglement_weight", 0.0)) < 0:
        raise ValueError(f"quantizer 'fq': disentanglement_weight must be >= 0, got "
                         f"{args['disentanglement_weight']}")
    sub_spec("fq", args)


def _check_rq(args: Mapping[str, Any]) -> None:
    n = _count("rq", "num_levels", args.get("num_levels", 2))
    scales = args.get("scales")
    if scales is not None and (not isinstance(scales, (list, tuple)) or len(scales) != n):
        raise ValueError(f"quantizer 'rq': scales must list one scale per level ({n}), got {scales!r}")
    m = args.get("quantize_dropout_min_levels")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n):
        raise ValueError(f"quantizer 'rq': quantize_dropout_min_levels must be None or 1..{n}, "
                         f"got {m!r}")
    sub_spec("rq", args)


def _build_fq(dim: int, *, dtype: Any, param_dtype: Any, **args: Any) -> FactorizedQuantizer:
    a = {**QUANTIZERS["fq"].defaults, **args}
    sub = sub_spec("fq", a)
    k = int(a["factors"])
    split = bool(a["split_input"])
    if split and dim % k:
        raise ValueError(f"quantizer 'fq': split_input needs the token dim {dim} to be a multiple "
                         f"of factors {k}")
    factor_dim = dim // k if split else int(a["factor_dim"] or _natural_dim(sub, dim))
    # parent=None: the factors are adopted (and named quantizers_{i}) by the factorized module
    subs = tuple(build_quantizer(sub, factor_dim, dtype=dtype, param_dtype=param_dtype)
                 .clone(parent=None) for _ in range(k))
    return FactorizedQuantizer(quantizers=subs, factor_dims=(factor_dim,) * k, dim=dim,
                               split_input=split, project_out=not split,
                               disentanglement_weight=float(a["disentanglement_weight"]),
                               dtype=dtype, param_dtype=param_dtype)


def _build_rq(dim: int, *, dtype: Any, param_dtype: Any, **args: Any) -> ResidualQuantizer:
    a = {**QUANTIZERS["rq"].defaults, **args}
    sub = sub_spec("rq", a)
    level = build_quantizer(sub, dim, dtype=dtype, param_dtype=param_dtype)
    scales = None if a["scales"] is None else tuple(float(s) for s in a["scales"])
    return ResidualQuantizer(tuple(level.clone(parent=None) for _ in range(int(a["num_levels"]))),
                             scales=scales,
                             quantize_dropout_min_levels=a["quantize_dropout_min_levels"])


def _sub_codebook_size(name: str) -> Callable[[Mapping[str, Any]], int]:
    def size(args: Mapping[str, Any]) -> int:
        sub = sub_spec(name, args)
        return QUANTIZERS[sub["name"]].codebook_size(sub)
    return size


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
    # multi-index: ids [..., k]; codebook_size = the codes of each factor / level
    "fq": QuantizerEntry(
        _build_fq, defaults={"factors": 2, "codebook_size": None, "quantizer": None,
                             "factor_dim": None, "disentanglement_weight": 0.1,
                             "split_input": False},
        codebook_size=_sub_codebook_size("fq"), num_codebooks=lambda a: int(a.get("factors", 2)),
        check=_check_fq),
    "rq": QuantizerEntry(
        _build_rq, defaults={"num_levels": 2, "codebook_size": None, "quantizer": None,
                             "scales": None, "quantize_dropout_min_levels": None},
        codebook_size=_sub_codebook_size("rq"),
        num_codebooks=lambda a: int(a.get("num_levels", 2)), check=_check_rq),
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
    if entry.check is not None:
        entry.check(out)
    return out


def _freeze(value: Any) -> Any:
    """Mappings (a nested sub-config) -> ``(("name", NAME), *sorted pairs)``, recursively."""
    if isinstance(value, dict):
        head = (("name", value["name"]),) if "name" in value else ()
        return head + tuple(sorted((k, _freeze(v)) for k, v in value.items() if k != "name"))
    return value


def freeze_spec(spec: Any) -> Spec:
    """The hashable form of a sub-config: ``(("name", NAME), *sorted (key, value) pairs)`` (a
    nested sub-config, the ``quantizer`` of ``fq`` / ``rq``, frozen the same way)."""
    return _freeze(spec_dict(spec))


def resolve_spec(spec: Any) -> dict[str, Any]:
    """The sub-config with every unset argument at its default (to compare two sub-configs); the
    sub-config of a multi-index quantizer's factors / levels resolved too."""
    d = spec_dict(spec)
    out = {"name": d["name"], **QUANTIZERS[d["name"]].defaults, **d}
    if d["name"] in _UNIT:
        out["quantizer"] = resolve_spec(sub_spec(d["name"], d))
        out["codebook_size"] = QUANTIZERS[d["name"]].codebook_size(d)
    return out


def quantizer_entry(spec: Any) -> QuantizerEntry:
    return QUANTIZERS[spec_dict(spec)["name"]]


def spec_codebook_size(spec: Any) -> int | None:
    """The number of codes of a discrete quantizer; None for continuous tokens."""
    d = spec_dict(spec)
    entry = QUANTIZERS[d["name"]]
    return None if entry.codebook_size is None else entry.codebook_size(d)


def spec_num_codebooks(spec: Any) -> int:
    """Ids per token: ``k`` for the multi-index quantizers (``fq`` factors, ``rq`` levels: indices
    ``[..., k]``), 1 for the others (indices ``[...]``; continuous tokens have none)."""
    d = spec_dict(spec)
    entry = QUANTIZERS[d["name"]]
    return 1 if entry.num_codebooks is None else int(entry.num_codebooks(d))


def token_ids_shape(num_codebooks: int, lead: str = "B, N") -> str:
    """``"[B, N]"`` or ``"[B, N, k]"``: the id array's shape, for messages."""
    return f"[{lead}]" if num_codebooks == 1 else f"[{lead}, {num_codebooks}]"


def split_token_ids(tokens: Any, num_codebooks: int, what: str = "decode_tokens") -> int:
    """The number of leading (batch / token) axes of an id array, after checking its trailing
    axis: ``num_codebooks`` ids per token need ``tokens[..., num_codebooks]`` (one id: no trailing
    axis). A one-line ``ValueError`` (naming ``what``) otherwise."""
    k = int(num_codebooks)
    if k > 1 and (tokens.ndim < 3 or tokens.shape[-1] != k):
        raise ValueError(f"{what} expects indices {token_ids_shape(k)} ({k} ids per token: a "
                         f"multi-index quantizer), got shape {tuple(tokens.shape)}")
    return tokens.ndim - (1 if k > 1 else 0)


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
    into its hashable form at construction and derives ``quantizer_name`` / ``codebook_size`` (per
    id) / ``num_codebooks``.
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

    @property
    def num_codebooks(self) -> int:
        """k ids per token (``indices [B, N, k]``) for ``fq`` / ``rq``; 1 for the others."""
        return spec_num_codebooks(self.quantizer)
