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


class StepBench:
    """One training step exactly as the trainer builds it, compiled once; ``time(n)`` runs ``n``
    more steps and returns their wall times (so a side-by-side benchmark can alternate blocks)."""

    def __init__(self, cfg, batch: int):
        import jax
        import numpy as np

        from titok_jax import data as data_lib
        from titok_jax.tasks import get_task
        from titok_jax.train import sharding as sharding_lib
        from titok_jax.train.optimizer import make_optimizer
        from titok_jax.train.state import abstract_and_shardings, create_state
        from titok_jax.train.step import build_step, step_options

        with cfg.unlocked():
            cfg.batch_size = batch
        self.cfg, self.batch = cfg, batch
        mesh = sharding_lib.make_mesh(dict(cfg.mesh))
        rules = sharding_lib.rules_from_config(cfg.get("logical_axis_rules"))
        task = get_task(cfg)
        use_ema = float(cfg.optimizer.get("ema_decay", 0.0)) > 0
        self.abstract, shardings, optimizer = abstract_and_shardings(
            task.init, lambda p: make_optimizer(cfg, p), use_ema, mesh, rules)
        self.state = create_state(task.init, optimizer, use_ema, shardings, int(cfg.seed))
        jitted = build_step(task, optimizer, shardings, mesh, **step_options(cfg, self.abstract.params))
        self.constants = jax.device_put(task.constants(), sharding_lib.replicated(mesh))
        size = self.image_size = int(cfg.data.image_size)
        rng = np.random.default_rng(0)
        local = batch // jax.process_count()
        frames = int(cfg.data.get("num_frames", 0) or 0)   # video tokenizers: clips [B, T, ...]
        self.images = data_lib.to_global_array(
            {"image": rng.uniform(0, 1, (local, *((frames,) if frames else ()), size, size, 3)
                                  ).astype(np.float32)}, mesh)
        t0 = time.perf_counter()
        self.compiled = jitted.lower(self.state, self.images, self.constants).compile()
        self.compile_s = time.perf_counter() - t0
        self.metrics = None

    def time(self, n: int) -> list[float]:
        import jax
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, self.images, self.constants)
            jax.block_until_ready((self.state, self.metrics))
            times.append(time.perf_counter() - t0)
        return times

    def params_millions(self) -> float:
        import jax
        import numpy as np
        return sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract.params)) / 1e6
