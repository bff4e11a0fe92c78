"""Throughput of one full training step (forward, losses, backward, optimizer, EMA) exactly as
`titok_jax/train/loop.py` builds it: mesh, task, sharded state, jit with shardings and donation.

    python benchmarks/train_step.py --config configs/titok.py:tiny --batch 16 --steps 10 [--config.KEY=VALUE ...]

Random images; the step time is the median of ``--steps`` calls after compilation and ``--warmup``
calls. Last line: {"images_per_s", "step_time_s", "peak_memory_mb", "mfu", "device", "gflops_step",
"compile_s", "batch"}."""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<variant>", lock_config=True)
flags.DEFINE_integer("batch", 16, "global batch size (overrides config.batch_size)")
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity), by device_kind substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                   "TPU v5": 459e12}


def peak_flops_per_device(device) -> float | None:
    if device.platform not in ("gpu", "cuda", "rocm", "tpu"):
        return None
    kind = device.device_kind
    for name, flops in PEAK_BF16_FLOPS.items():  # insertion order: specific names before "TPU v5"
        if name.lower() in kind.lower():
            return flops
    return None


def step_flops(compiled) -> float | None:
    """FLOPs of one step from XLA's cost analysis (whole program, all devices), if available."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def main(argv):
    del argv
    import jax

    from common import StepBench, compiled_memory_mb, device_name, print_json_last, print_table

    cfg = flags.FLAGS.config
    batch, steps = int(flags.FLAGS.batch), int(flags.FLAGS.steps)
    bench = StepBench(cfg, batch)
    bench.time(int(flags.FLAGS.warmup))
    times = bench.time(steps)
    step_s = sorted(times)[len(times) // 2]
    compiled = bench.compiled
    flops = step_flops(compiled)
    peak = peak_flops_per_device(jax.devices()[0])
    # cost_analysis counts the partitioned (per-device) SPMD program: per-device FLOPs / per-device peak
    mfu = flops / (step_s * peak) if flops and peak else None
    row = {"config": f"{cfg.family}:{cfg.variant}", "batch": batch, "image": bench.image_size,
           "params_M": bench.params_millions(),
           "compile_s": bench.compile_s, "step_time_s": step_s, "images_per_s": batch / step_s,
           "gflops_step": flops / 1e9 if flops else None,
           "peak_memory_mb": compiled_memory_mb(compiled), "mfu": mfu,
           "loss": float(jax.device_get(bench.metrics["loss"]))}
    print_table([row], list(row))
    print_json_last({"images_per_s": row["images_per_s"], "step_time_s": step_s,
                     "peak_memory_mb": row["peak_memory_mb"], "mfu": mfu, "device": device_name(),
                     "gflops_step": row["gflops_step"], "compile_s": bench.compile_s, "batch": batch})


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
