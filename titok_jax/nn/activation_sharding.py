"""Sharding constraints on activations by logical name: ``constrain(x, ("batch", "tokens", "act_embed"))``.

Without constraints XLA's sharding propagation is free to split an activation any way it likes, and
at one example per device it stops doing FSDP: it splits the features of the residual stream over
``fsdp`` (as the weights are) and pays for it with activation all-reduces and all-to-alls in every
block. Pinning the block boundaries to "batch split, features whole" keeps the pure FSDP pattern
(weights all-gathered, gradients reduce-scattered, activations never moved).

Activation names (``ACTIVATION_AXES``) are their own vocabulary, apart from the params' ones::

    batch       examples                       the rules' ``batch`` rule (``data`` x ``fsdp``)
    tokens      sequence positions             the rules' ``tokens`` rule (None by default)
    act_embed   features of the residual stream
    act_heads   attention heads                 (``[B, T, H, D]`` activations)
    act_kv      per-head channels
    act_mlp     MLP hidden features

``embed``/``heads``/``mlp`` name the dimensions of *params*: FSDP maps ``embed -> fsdp``, which is
right for a weight and wrong for an activation (the batch already takes ``fsdp``). The ``act_*``
names have no rule in the default table, so those dimensions stay whole; a rules table may map
them (``("act_heads", "tensor")``, ``("act_mlp", "tensor")`` for Megatron-style tensor
parallelism, ``("tokens", "tensor")`` for sequence parallelism). A ``None`` entry in ``names``
leaves that dimension to XLA (``PartitionSpec.UNCONSTRAINED``).

The rules and the mesh are the ambient ones: flax's ``nn.logical_axis_rules(rules)`` context and
JAX's mesh context (``jax.set_mesh``, or ``jax.sharding.use_abstract_mesh`` inside a traced
function; :func:`activation_rules` enters both, and ``train.step.build_step`` traces the step
under the trainer's mesh and rules). Outside either context (one device, un-jitted, tests)
``constrain`` is the identity. Mesh axes the mesh lacks are ignored; a dimension that the mesh
axes of its name do not divide (a micro-batch smaller than the device count, an odd batch) is
left to XLA instead of raising. On a mesh whose axes are all ``Explicit`` the constraint is a
``jax.sharding.reshard`` (dimensions left to XLA keep the sharding of ``x``'s type); inside
``shard_map`` (``Manual`` axes) it is the identity.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Logical names of activation dimensions (see the module docstring); anything else is a bug.
ACTIVATION_AXES = frozenset({"batch", "tokens", "act_embed", "act_heads", "act_kv", "act_mlp"})

# The residual stream [B, T, D] at a block boundary.
BTD = ("batch", "tokens", "act_embed")


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Within: ``constrain`` maps names through ``rules`` onto ``mesh``. Usable inside a traced
    function (it sets the abstract mesh, not ``jax.set_mesh``, which ``jax.jit`` forbids)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def axes_tuple(axes: Any) -> tuple[str, ...]:
    """A spec entry's mesh axis names as a tuple (None -> (), a name -> (name,))."""
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def activation_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Any,
                    rules: Sequence[tuple[str, Any]]) -> P:
    """The ``PartitionSpec`` ``constrain`` applies to an array of ``shape`` named ``names``: each
    name through ``rules`` (flax semantics: first match wins, a mesh axis is used once, a name with
    no rule is not split), keeping only the mesh's axes of size > 1; ``None`` names and dimensions
    those axes do not divide are ``UNCONSTRAINED``."""
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"constrain: {len(names)} names {names} for an array of shape "
                         f"{tuple(shape)}")
    unknown = [n for n in names if n is not None and n not in ACTIVATION_AXES]
    if unknown:
        raise ValueError(f"unknown activation axis names {unknown}; use {sorted(ACTIVATION_AXES)}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    entries = []
    for name, dim, axes in zip(names, shape, nn.logical_to_mesh_axes(names, rules)):
        if name is None:
            entries.append(P.UNCONSTRAINED)
            continue
        axes = tuple(a for a in axes_tuple(axes) if sizes.get(a, 1) > 1)
        size = math.prod(sizes[a] for a in axes)
        if not axes:
            entries.append(None)
        elif dim % size:
            entries.append(P.UNCONSTRAINED)
        else:
            entries.append(axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def _active_mesh() -> Any:
    """The abstract mesh ``constrain`` / ``gathered`` place onto: set, with logical rules active, and
    not inside ``shard_map`` (Manual axes); None otherwise (both are then the identity)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not nn.get_logical_axis_rules() or mesh.empty or AxisType.Manual in tuple(mesh.axis_types):
        return None
    return mesh


def _place(x: jax.Array, spec: P, mesh: Any) -> jax.Array:
    """``x`` resharded to ``spec`` on an Explicit mesh (``UNCONSTRAINED`` entries keep ``x``'s
    current ones), constrained to it on an Auto mesh."""
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        current = tuple(jax.typeof(x).sharding.spec)
        current += (None,) * (x.ndim - len(current))
        spec = P(*(c if e is P.UNCONSTRAINED else e for e, c in zip(spec, current)))
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to the sharding its logical ``names`` (one per dimension, see
    ``ACTIVATION_AXES``) have under the active rules and mesh; the identity outside them."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    return _place(x, activation_spec(names, x.shape, mesh, nn.get_logical_axis_rules()), mesh)


def gathered(table: jax.Array) -> jax.Array:
    """A weight (an embedding table before a row lookup) gathered whole onto every device under the
    active rules and mesh, as FSDP gathers weights; the identity outside them. Without it XLA may
    gather rows from the ``embed``-sharded table and move the ``[B, T, D]`` result by all-to-all."""
    mesh = _active_mesh()
    return table if mesh is None else _place(table, P(), mesh)
