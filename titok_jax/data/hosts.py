"""Processes and devices: each process's share of a global batch, and host NumPy batches ->
global ``jax.Array`` s sharded over the mesh's batch axes (the one ``batch_sharding`` of the package).

The batch is split over every device of ``data`` x ``fsdp`` (``fsdp_sub`` is the second factor of the
config's ``fsdp``, see ``train.sharding.fsdp_split``); ``tensor`` devices share their examples."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from jax.sharding import Mesh, NamedSharding

BATCH_AXES = ("data", "fsdp", "fsdp_sub")


def process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """``(process_index, process_count)``, each defaulting to JAX's; a ValueError if inconsistent."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
    return int(process_index), int(process_count)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """``global_batch_size // process_count``; a ValueError unless it divides evenly."""
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, (int, np.integer)) \
            or global_batch_size <= 0:
        raise ValueError(f"global batch size must be a positive integer, got {global_batch_size!r}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count {process_count}"
        )
    return int(global_batch_size) // process_count


def batch_shards(mesh: Mesh, data_axes: Sequence[str] = BATCH_AXES) -> int:
    """How many ways ``batch_sharding`` splits the batch: the product of the mesh's ``data_axes``
    (a global batch must be a multiple of it)."""
    return math.prod(mesh.shape[a] for a in data_axes if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """``NamedSharding(mesh, P(axes))``: the batch dimension split over the mesh's ``data_axes``
    (axes the mesh lacks are ignored), every other dimension replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    axes = tuple(a for a in data_axes if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes if axes else None))


def to_global_array(local_batch: Any, mesh: Mesh, data_axes: Sequence[str] = BATCH_AXES) -> Any:
    """Each process's NumPy batch (a pytree of ``[B_local, ...]``) -> global ``jax.Array`` s of
    ``[B_local * process_count, ...]`` sharded over ``data_axes``, via
    ``jax.make_array_from_process_local_data``."""
    import jax

    sharding = batch_sharding(mesh, data_axes)
    shards = batch_shards(mesh, data_axes)
    count = jax.process_count()

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.dtype.kind not in "biuf":
            raise ValueError(
                f"batch leaves must be numeric arrays with a batch dimension, got {x.dtype} {x.shape}"
            )
        if (x.shape[0] * count) % shards:
            raise ValueError(
                f"global batch {x.shape[0] * count} is not divisible by the {shards} shards of "
                f"mesh axes {tuple(data_axes)}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, local_batch)


make_global_batch = to_global_array
