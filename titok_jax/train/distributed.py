"""Joining a multi-host JAX cluster, before any JAX op."""
from __future__ import annotations

import os


def maybe_init_distributed() -> bool:
    """Multi-host runs (launch/ sets TITOK_MULTIHOST=1): join the JAX cluster; True if it did.

    On TPU pods, Slurm and Open MPI jax detects everything itself. Elsewhere set
    JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID: jax 0.10 reads only
    the first from the environment, so the other two are passed explicitly. Cross-process
    collectives on CPU use gloo (jax's default, ``jax_cpu_collectives_implementation``)."""
    if os.environ.get("TITOK_MULTIHOST") != "1" and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    import jax
    kwargs: dict = {}
    for key, env in (("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
                     ("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = os.environ.get(env)
        if value:
            kwargs[key] = value if key == "coordinator_address" else int(value)
    jax.distributed.initialize(**kwargs)
    return True
