"""Simulated CPU devices for sizing a pod's mesh on one host (``titok-jax train --simulate_devices N``).

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts its CPU backend, so the
environment must be set before JAX is imported; this module imports nothing of JAX."""
from __future__ import annotations

import os
import re
import sys
from typing import Sequence

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def simulate_devices_arg(argv: Sequence[str]) -> int | None:
    """The value of ``--simulate_devices N`` / ``--simulate_devices=N`` (or ``--simulate-devices``)
    in ``argv``, read before the flags are parsed (parsing loads the config, which imports JAX);
    None when absent or 0. A value that is not a non-negative integer is a ``ValueError``."""
    for i, arg in enumerate(argv):
        for name in ("--simulate_devices", "--simulate-devices"):
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            try:
                n = int(value)
            except ValueError:
                n = -1
            if n < 0:
                raise ValueError(f"--simulate_devices must be a positive integer, got {value!r}")
            return n or None
    return None


def simulate_devices(n: int) -> None:
    """Make JAX start on ``n`` simulated CPU devices: ``XLA_FLAGS`` gets
    ``--xla_force_host_platform_device_count=n`` (replacing any other count) and ``JAX_PLATFORMS``
    becomes ``cpu``; ``compute_dtype: "auto"`` then resolves to bfloat16, as on the accelerators the
    simulated pod stands for (``TITOK_JAX_AUTO_DTYPE``, unless set). Once JAX is imported that is
    too late: a one-line ``RuntimeError``, unless the environment already says exactly this (e.g. a
    test session that set it first)."""
    if n < 1:
        raise ValueError(f"--simulate_devices must be a positive integer, got {n}")
    flag = f"{DEVICE_COUNT_FLAG}={n}"
    current = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules:
        if flag in current.split() and os.environ.get("JAX_PLATFORMS") == "cpu":
            return
        raise RuntimeError(f"--simulate_devices {n}: JAX is already imported in this process, so "
                           f"XLA_FLAGS can no longer take effect; run titok-jax in a fresh process")
    rest = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", current).split()
    os.environ["XLA_FLAGS"] = " ".join(rest + [flag])
    os.environ["JAX_PLATFORMS"] = "cpu"
    # compute_dtype "auto" resolves as on the accelerators the simulated pod stands for
    # (models.registry.AUTO_DTYPE_ENV; a value the user set wins)
    os.environ.setdefault("TITOK_JAX_AUTO_DTYPE", "bfloat16")
