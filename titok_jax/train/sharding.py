"""The device mesh and the logical-axis rules that place params, optimizer state and batches on it.

Mesh axes are ``('data', 'fsdp', 'tensor')``; the config gives their sizes with one ``-1`` that takes
the remaining devices. Params carry logical axis names (``embed``, ``mlp``, ``heads``, ...; see
``titok_jax.nn.LOGICAL_AXES``); the rules table maps them to mesh axes, so FSDP is ``embed -> fsdp`` and
tensor parallelism is ``mlp/heads -> tensor``. Batches are split over ``('data', 'fsdp')``.
A mesh axis never silently replicates a large param: one that does not divide its dimension moves to
another dimension it divides, or the param is a ``ValueError`` (``_fit``, ``MAX_REPLICATED_ELEMENTS``).
Frozen constants (LPIPS, ConvNeXt, a teacher; no logical names) are sharded like params over ``fsdp``,
on their largest dimension it divides (``constant_shardings``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from titok_jax.data.hosts import BATCH_AXES, batch_sharding  # noqa: F401  (the one batch sharding)

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None), first match wins (flax semantics).
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
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of ``MESH_AXES`` from ``spec`` (missing axes are 1; one axis may be -1 = the rest)."""
    unknown = set(spec) - set(MESH_AXES)
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


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices with Auto axis types (jit propagates shardings)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
# only up to this many elements (2**20: 4 MiB in float32 - biases, norm scales, small convs and
# embeddings); a bigger one is a ValueError, never a silent replication of a large tensor.
MAX_REPLICATED_ELEMENTS = 2 ** 20


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a (boxed, abstract) tree: logical names through ``rules``; leaves without
    names are replicated. A mesh axis that does not divide the dimension it would split moves to
    another dimension of the leaf (see :func:`_fit`); a large leaf that no dimension fits is a
    ``ValueError`` naming its path."""
    specs = nn.get_partition_spec(abstract_tree)

    def to_sharding(path, leaf, spec):
        if not isinstance(spec, P):
            return NamedSharding(mesh, P())
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return NamedSharding(mesh, _fit(mesh_spec, tuple(getattr(leaf, "shape", ())), mesh, name))

    return jax.tree_util.tree_map_with_path(to_sharding, nn.unbox(abstract_tree), specs,
                                            is_leaf=lambda x: isinstance(x, P))


def _axes_size(axes: Any, mesh: Mesh) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in names)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str = "param") -> P:
    """Place every mesh axis (or axis group) of ``spec`` on a dimension of ``shape`` it divides.

    Axes of total size 1 split nothing and are dropped. Axes of size ``n > 1`` whose dimension
    ``n`` does not divide move to the largest other dimension that ``n`` divides and no other axis
    splits; when there is none the leaf is replicated over them if it has at most
    ``MAX_REPLICATED_ELEMENTS`` elements, and otherwise ``_fit`` raises a one-line ``ValueError``
    naming ``name``, the shape and the axes."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out: list[Any] = [None] * len(shape)
    unplaced = []
    for d, (dim, axes) in enumerate(zip(shape, entries)):
        if axes is None or _axes_size(axes, mesh) == 1:
            continue
        if dim % _axes_size(axes, mesh) == 0:
            out[d] = axes
        else:
            unplaced.append((d, axes))
    for d, axes in unplaced:
        size = _axes_size(axes, mesh)
        free = [k for k in range(len(shape)) if out[k] is None and shape[k] % size == 0]
        if free:
            out[max(free, key=lambda k: (shape[k], -k))] = axes
        elif math.prod(shape) > MAX_REPLICATED_ELEMENTS:
            raise ValueError(f"{name} {tuple(shape)}: mesh axes {axes} (size {size}) divide none of its "
                             f"free dimensions (dimension {d} is {shape[d]}), and at {math.prod(shape)} "
                             f"elements it is too big to replicate (limit {MAX_REPLICATED_ELEMENTS}); "
                             f"change the mesh or the logical-axis rules")
    return P(*out)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# A frozen constant below this many elements (2**14: 64 KiB in float32 - biases, norm scales) stays
# replicated: splitting it saves nothing and costs an all-gather.
MIN_SHARDED_CONSTANT_ELEMENTS = 2 ** 14


def constant_shardings(tree: Any, mesh: Mesh, axis: str = "fsdp") -> Any:
    """NamedShardings for a task's frozen constants (arrays, ``ShapeDtypeStruct`` s or scalars):
    each leaf of at least ``MIN_SHARDED_CONSTANT_ELEMENTS`` elements is split over the mesh
    ``axis`` (FSDP, like params) on its largest dimension that the axis size divides (ties: the
    last, a kernel's output features); smaller leaves, and every leaf when the axis has size 1,
    are replicated. A leaf no dimension fits is replicated up to ``MAX_REPLICATED_ELEMENTS``
    elements and a one-line ``ValueError`` naming its path beyond that."""
    size = int(mesh.shape[axis]) if axis in mesh.axis_names else 1

    def one(path, leaf):
        shape = tuple(int(d) for d in np.shape(leaf))
        elements = math.prod(shape)
        if size == 1 or elements < MIN_SHARDED_CONSTANT_ELEMENTS:
            return NamedSharding(mesh, P())
        dims = [d for d, n in enumerate(shape) if n % size == 0]
        if not dims:
            if elements > MAX_REPLICATED_ELEMENTS:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                raise ValueError(f"constant {name} {shape}: mesh axis {axis!r} (size {size}) divides none "
                                 f"of its dimensions, and at {elements} elements it is too big to "
                                 f"replicate (limit {MAX_REPLICATED_ELEMENTS}); change the mesh")
            return NamedSharding(mesh, P())
        best = max(dims, key=lambda d: (shape[d], d))
        return NamedSharding(mesh, P(*[axis if d == best else None for d in range(len(shape))]))

    return jax.tree_util.tree_map_with_path(one, tree)


def place_constants(tree: Any, mesh: Mesh) -> Any:
    """``jax.device_put`` of a task's host constants into ``constant_shardings`` (what
    ``train.step.build_step(..., constants=tree)`` expects)."""
    return jax.device_put(tree, constant_shardings(tree, mesh))
