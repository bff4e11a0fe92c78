"""The device mesh and the logical-axis rules that place params, optimizer state and batches on it.

The config gives the mesh as ``{data, fsdp, tensor}`` sizes (``MESH_AXES``) with one ``-1`` that takes
the remaining devices. The physical mesh (``DEVICE_AXES``) factors ``fsdp`` into two axes,
``fsdp`` x ``fsdp_sub`` (``fsdp_split``: ``fsdp_sub = fsdp / gcd(fsdp, FSDP_ALIGN)``, 1 up to 128
devices), so that a param whose width the whole group does not divide (1152 = 128 x 9 at fsdp 256)
still splits over every device: 128 ways on that width and 2 ways on another dimension. Rules that
name ``fsdp`` mean the whole group; a param dimension the group divides keeps it whole, which is the
same device layout as one ``fsdp`` axis of that size.

Params carry logical axis names (``embed``, ``mlp``, ``heads``, ...; see ``titok_jax.nn.LOGICAL_AXES``);
the rules table maps them to mesh axes, so FSDP is ``embed -> fsdp`` and tensor parallelism is
``mlp/heads -> tensor``. Batches are split over ``data`` x ``fsdp`` x ``fsdp_sub`` (``BATCH_AXES``).
A mesh axis never silently replicates a large param: one that does not divide its dimension moves to
other dimensions (``_fit``), and every leaf of at least ``MIN_SHARDED_ELEMENTS`` elements that its
names leave unsplit over ``fsdp`` is split over it too (ZeRO-3: all state is sharded); a leaf that the
mesh axes cannot fully split and whose per-device shard would exceed ``MAX_REPLICATED_ELEMENTS`` is a
``ValueError``. Frozen constants (LPIPS, ConvNeXt, a teacher; no logical names) are sharded like
params over the ``fsdp`` group, on their largest dimensions it divides (``constant_shardings``).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

# the one batch sharding of the package
from titok_jax.data.hosts import BATCH_AXES, batch_shards, batch_sharding  # noqa: F401
from titok_jax.nn.activation_sharding import axes_tuple

# The config's mesh spec: {data, fsdp, tensor} sizes (plus an optional ``fsdp_sub`` override).
MESH_AXES = ("data", "fsdp", "tensor")
# The physical mesh: the config's ``fsdp`` is ``fsdp`` x ``fsdp_sub`` (see ``fsdp_split``).
DEVICE_AXES = ("data", "fsdp", "fsdp_sub", "tensor")
# What a rule's ``fsdp`` stands for: the whole group (axes of size 1 drop out of every spec).
FSDP_AXES = ("fsdp", "fsdp_sub")
# The outer ``fsdp`` axis takes the largest divisor of the config's fsdp size that divides this:
# model widths are multiples of 128 (or 64: 640, 1152 and 1920 are 128 x 5, 9, 15), so up to 128
# devices there is one axis, and beyond it the rest goes to ``fsdp_sub``.
FSDP_ALIGN = 128

# (logical name, mesh axis or axes or None), first match wins (flax semantics). ``fsdp`` is the
# FSDP group ``FSDP_AXES`` on params (``_fit``).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("tokens", None),
    ("patch", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("codebook", None),
    ("layers", None),
)


def fsdp_split(fsdp: int, fsdp_sub: int | None = None) -> tuple[int, int]:
    """``(fsdp, fsdp_sub)`` sizes of the physical mesh for a config's ``fsdp`` size:
    ``fsdp_sub = fsdp / gcd(fsdp, FSDP_ALIGN)`` unless given (it must divide ``fsdp``). 8 -> (8, 1),
    64 -> (64, 1), 256 -> (128, 2), 512 -> (128, 4), 96 -> (32, 3)."""
    sub = fsdp // math.gcd(fsdp, FSDP_ALIGN) if fsdp_sub is None else int(fsdp_sub)
    if sub < 1 or fsdp % sub:
        raise ValueError(f"mesh fsdp_sub={fsdp_sub} does not divide fsdp={fsdp}")
    return fsdp // sub, sub


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of ``MESH_AXES`` from ``spec`` (missing axes are 1; one axis may be -1 = the rest).
    ``spec`` may also hold ``fsdp_sub`` (see ``device_mesh_shape``); it does not count here."""
    unknown = set(spec) - set(MESH_AXES) - {"fsdp_sub"}
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{num_devices} are present")
    return tuple(sizes)


def device_mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of ``DEVICE_AXES``: ``mesh_shape`` with ``fsdp`` factored by ``fsdp_split`` (the spec's
    ``fsdp_sub``, when given, overrides the automatic split)."""
    data, fsdp, tensor = mesh_shape(spec, num_devices)
    sub = spec.get("fsdp_sub")
    return (data, *fsdp_split(fsdp, None if sub in (None, -1) else int(sub)), tensor)


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with ``DEVICE_AXES`` over all (or the given) devices, Auto axis types (jit
    propagates shardings); ``fsdp_sub`` is minor to ``fsdp``, so ``P(('fsdp', 'fsdp_sub'))`` is the
    layout of a single ``fsdp`` axis of the config's size."""
    devices = list(jax.devices() if devices is None else devices)
    shape = device_mesh_shape(spec, len(devices))
    types = (AxisType.Auto,) * len(DEVICE_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, DEVICE_AXES, axis_types=types)
    return Mesh(np.asarray(devices).reshape(shape), DEVICE_AXES, axis_types=types)


def abstract_mesh(spec: Mapping[str, int], num_devices: int) -> AbstractMesh:
    """The ``make_mesh`` layout for ``num_devices`` devices as a ``jax.sharding.AbstractMesh``
    (no devices needed): shardings on it give a pod's sharding plan - ``shard_shape``, and so the
    per-device state bytes - on any host, without compiling."""
    shape = device_mesh_shape(spec, num_devices)
    return AbstractMesh(shape, DEVICE_AXES, axis_types=(AxisType.Auto,) * len(DEVICE_AXES))


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Rules from a config (a list of [name, axis-or-list-or-None] pairs) or the defaults."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


# A param whose dimensions none divide by the mesh axes meant to split it stays replicated over them
# only while one device's shard has at most this many elements (2**20: 4 MiB in float32 - biases,
# norm scales, small convs and embeddings, or the 1/128 shard of a (1001, 1920) table at fsdp 256);
# beyond it a ValueError, never a silent replication of a large tensor.
MAX_REPLICATED_ELEMENTS = 2 ** 20
# A leaf of at least this many elements that its logical names leave unsplit over ``fsdp`` (biases,
# norm scales, codebooks, unnamed state) is split over the fsdp group too, on its largest dimensions
# the group divides: at 256 devices the small leaves replicated on every device would otherwise
# outweigh the sharded state (TiTok-B: 1.7x of ideal).
MIN_SHARDED_ELEMENTS = 2 ** 9


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a (boxed, abstract) tree: logical names through ``rules`` (``fsdp`` = the
    FSDP group ``FSDP_AXES``), then placed by :func:`_fit` - a mesh axis that does not divide the
    dimension it would split moves to other dimensions of the leaf, a leaf its names leave unsplit
    over ``fsdp`` is split over it when it has ``MIN_SHARDED_ELEMENTS`` or more (leaves without
    names too), and a large leaf that the axes cannot fully split is a ``ValueError`` naming its
    path."""
    specs = nn.get_partition_spec(abstract_tree)

    def to_sharding(path, leaf, spec):
        shape = tuple(getattr(leaf, "shape", ()))
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if isinstance(spec, P) else P()
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return NamedSharding(mesh, _fit(mesh_spec, shape, mesh, name))

    return jax.tree_util.tree_map_with_path(to_sharding, nn.unbox(abstract_tree), specs,
                                            is_leaf=lambda x: isinstance(x, P))


def _group(axes: Any, sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes of a spec entry with ``fsdp`` expanded to ``FSDP_AXES`` (``fsdp_sub`` only
    where the mesh has it) and axes of size 1 dropped."""
    out: list[str] = []
    for a in axes_tuple(axes):
        for g in (FSDP_AXES if a == "fsdp" else (a,)):
            if g == "fsdp_sub" and g not in sizes:
                continue
            if sizes[g] > 1 and g not in out:
                out.append(g)
    return tuple(out)


def _entry(axes: Sequence[str]) -> Any:
    """A PartitionSpec entry: None, one axis name, or a tuple of names."""
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def _place(group: tuple[str, ...], shape: tuple[int, ...], out: list, sizes: Mapping[str, int],
           home: int | None = None, last_on_ties: bool = False) -> tuple[str, ...]:
    """Put the axes of ``group`` on free dimensions of ``shape`` (``out[k] is None``), several on one
    dimension only when their product divides it; writes ``out`` and returns the axes left over.

    Of all assignments: the most devices split, then the fewest dimensions (the whole group on one
    when it fits), then one that uses ``home`` (the dimension the rules named), then the largest
    dimensions (in the group's order), then the first (``last_on_ties``: the last) dimensions."""
    free = [k for k in range(len(shape)) if out[k] is None]
    best_key, best = None, None
    for choice in itertools.product([None] + free, repeat=len(group)):
        per_dim: dict[int, list[str]] = {}
        for axis, k in zip(group, choice):
            if k is not None:
                per_dim.setdefault(k, []).append(axis)
        if any(shape[k] % math.prod(sizes[a] for a in axes) for k, axes in per_dim.items()):
            continue
        placed = math.prod(sizes[a] for a, k in zip(group, choice) if k is not None)
        order = tuple((k if last_on_ties else -k) if k is not None else -len(shape) - 1 for k in choice)
        key = (placed, -len(per_dim), home in per_dim,
               tuple(shape[k] if k is not None else 0 for k in choice), order)
        if best_key is None or key > best_key:
            best_key, best = key, per_dim
    for k, axes in best.items():
        out[k] = _entry(axes)
    return tuple(a for a in group if not any(a in axes for axes in best.values()))


def _describe(axes: Sequence[str], sizes: Mapping[str, int]) -> str:
    return f"{' x '.join(axes)} (size {math.prod(sizes[a] for a in axes)})"


def _fit_sizes(spec: P, shape: tuple[int, ...], sizes: Mapping[str, int]
               ) -> tuple[P, list[tuple[int | None, tuple[str, ...]]]]:
    """``_fit`` on mesh axis ``sizes``: the spec, and the ``(dimension, axes)`` left unplaced."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out: list[Any] = [None] * len(shape)
    pending = []
    for d, (dim, axes) in enumerate(zip(shape, entries)):
        group = _group(axes, sizes)
        if not group:
            continue
        if dim % math.prod(sizes[a] for a in group) == 0:
            out[d] = _entry(group)
        else:
            pending.append((d, group))
    unplaced = []
    for d, group in pending:
        left = _place(group, shape, out, sizes, home=d)
        if left:
            unplaced.append((d, left))
    # ZeRO-3: a leaf its names leave unsplit over the fsdp group is split over it where it fits
    fsdp = _group("fsdp", sizes)
    named = {a for e in entries for a in _group(e, sizes)}
    if fsdp and not named & set(fsdp) and math.prod(shape) >= MIN_SHARDED_ELEMENTS:
        left = _place(fsdp, shape, out, sizes)
        if left:
            unplaced.append((None, left))
    return P(*out), unplaced


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str = "param") -> P:
    """Place every mesh axis (or axis group) of ``spec`` on dimensions of ``shape`` it divides.

    ``fsdp`` stands for the FSDP group ``FSDP_AXES``, and axes of size 1 split nothing and are
    dropped. A group of size ``n > 1`` stays on its dimension when ``n`` divides it; otherwise it
    moves to the largest free dimension ``n`` divides, or is split over several (``fsdp`` on one
    dimension, ``fsdp_sub`` on another; see ``_place``). A leaf of ``MIN_SHARDED_ELEMENTS`` or more
    whose spec does not name ``fsdp`` is split over the group the same way. The leaf is replicated
    over the axes no dimension fits as long as one device's shard has at most
    ``MAX_REPLICATED_ELEMENTS`` elements; beyond that ``_fit`` raises a one-line ``ValueError``
    naming ``name``, the shape, the axes, and a ``fsdp_sub`` split of the mesh's fsdp size that would
    fit the leaf (or that none does)."""
    sizes = dict(mesh.shape)
    out, unplaced = _fit_sizes(spec, shape, sizes)
    shard = _shard_elements(out, shape, sizes)
    if unplaced and shard > MAX_REPLICATED_ELEMENTS:
        d, axes = unplaced[0]
        where = f"dimension {d} is {shape[d]}" if d is not None else "its names leave fsdp out"
        raise ValueError(f"{name} {tuple(shape)}: mesh axes {_describe(axes, sizes)} divide none of its "
                         f"free dimensions ({where}), and each device would hold {shard} of its "
                         f"{math.prod(shape)} elements, over the limit of {MAX_REPLICATED_ELEMENTS} "
                         f"for a leaf the mesh cannot fully split; {_other_splits(spec, shape, sizes)}"
                         f"change the mesh or the logical-axis rules")
    return out


def _fits(spec: P, shape: tuple[int, ...], sizes: Mapping[str, int]) -> bool:
    out, unplaced = _fit_sizes(spec, shape, sizes)
    return not unplaced or _shard_elements(out, shape, sizes) <= MAX_REPLICATED_ELEMENTS


def _shard_elements(spec: P, shape: tuple[int, ...], sizes: Mapping[str, int]) -> int:
    """Elements of one device's shard of a ``shape`` leaf placed by ``spec``."""
    split = math.prod(sizes[a] for e in spec for a in axes_tuple(e))
    return math.prod(shape) // split


def _other_splits(spec: P, shape: tuple[int, ...], sizes: Mapping[str, int]) -> str:
    """Which ``fsdp_sub`` values (the mesh spec's override) would fit a leaf, as message text."""
    if "fsdp_sub" not in sizes:
        return ""
    total = sizes["fsdp"] * sizes["fsdp_sub"]
    fits = [s for s in range(1, total + 1) if total % s == 0 and s != sizes["fsdp_sub"]
            and _fits(spec, shape, {**sizes, "fsdp": total // s, "fsdp_sub": s})]
    if fits:
        return f"mesh fsdp_sub={fits[0]} would fit it (fsdp {total} = {total // fits[0]} x {fits[0]}), or "
    return f"no split of fsdp {total} into fsdp x fsdp_sub fits it; "


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# A frozen constant below this many elements (2**14: 64 KiB in float32 - biases, norm scales) stays
# replicated: splitting it saves nothing and costs an all-gather.
MIN_SHARDED_CONSTANT_ELEMENTS = 2 ** 14


def constant_shardings(tree: Any, mesh: Mesh, axis: str = "fsdp") -> Any:
    """NamedShardings for a task's frozen constants (arrays, ``ShapeDtypeStruct`` s or scalars):
    each leaf of at least ``MIN_SHARDED_CONSTANT_ELEMENTS`` elements is split over the mesh
    ``axis`` (``fsdp``: the FSDP group ``FSDP_AXES``, like params) on its largest dimension that the
    axis size divides (ties: the last, a kernel's output features), or over several dimensions when
    none takes the whole group (``_place``); smaller leaves, and every leaf when the axis has size 1,
    are replicated. A leaf the axes cannot fully split is replicated over the rest while one
    device's shard has at most ``MAX_REPLICATED_ELEMENTS`` elements, and is a one-line
    ``ValueError`` naming its path beyond that."""
    sizes = dict(mesh.shape)
    group = _group(axis, sizes) if axis in sizes else ()

    def one(path, leaf):
        shape = tuple(int(d) for d in np.shape(leaf))
        elements = math.prod(shape)
        if not group or elements < MIN_SHARDED_CONSTANT_ELEMENTS:
            return NamedSharding(mesh, P())
        out: list[Any] = [None] * len(shape)
        left = _place(group, shape, out, sizes, last_on_ties=True)
        shard = _shard_elements(P(*out), shape, sizes)
        if left and shard > MAX_REPLICATED_ELEMENTS:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise ValueError(f"constant {name} {shape}: mesh axis {_describe(left, sizes)} divides none "
                             f"of its free dimensions, and each device would hold {shard} of its "
                             f"{elements} elements, over the limit of {MAX_REPLICATED_ELEMENTS}; "
                             f"change the mesh")
        return NamedSharding(mesh, P(*out) if any(e is not None for e in out) else P())

    return jax.tree_util.tree_map_with_path(one, tree)


def place_constants(tree: Any, mesh: Mesh) -> Any:
    """``jax.device_put`` of a task's host constants into ``constant_shardings`` (what
    ``train.step.build_step(..., constants=tree)`` expects)."""
    return jax.device_put(tree, constant_shardings(tree, mesh))
