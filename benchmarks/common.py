"""Shared helpers for the benchmarks: timing of jitted functions, XLA memory figures, device name."""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax


def device_name() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{d.platform}:{kind} x{jax.device_count()}"


def compiled_memory_mb(compiled: Any) -> float | None:
    """Peak memory XLA's buffer assignment plans for one call (arguments + outputs + temporaries),
    in MiB. Deterministic and available on every backend, unlike allocator statistics."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - getattr(m, "alias_size_in_bytes", 0))
    return total / 2**20


def device_peak_mb() -> float | None:
    """Allocator peak on accelerators (None on CPU, where JAX keeps no statistics)."""
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def time_jitted(fn: Callable, *args: Any, steps: int, warmup: int = 1) -> tuple[float, float | None]:
    """Median wall time in seconds of ``fn(*args)`` over ``steps`` calls after compilation and
    ``warmup`` calls, and the compiled memory figure in MiB."""
    jitted = jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], compiled_memory_mb(compiled)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def print_json_last(obj: dict) -> None:
    print(json.dumps(obj), flush=True)
