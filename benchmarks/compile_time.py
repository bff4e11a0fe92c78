"""Compile time of a transformer stack, unrolled against ``nn.scan`` (``scan_layers``), by depth.

    python benchmarks/compile_time.py --depths 6,12,24
    python benchmarks/compile_time.py --depths 6,12,24 --remat_policy dots --dtype bfloat16

The program is a training step's gradient through a TiTok-B encoder (``models.titok.TiTokEncoder``:
width 768, 12 heads, MLP 4x, 256 patches + class token + 64 latent tokens = 321 tokens) of each
depth: ``jax.jit(jax.value_and_grad(loss)).lower(...).compile()`` on abstract params and images
(``jax.ShapeDtypeStruct``; nothing is allocated or run). Unrolled, XLA sees ``depth`` copies of the
block and its compile time grows with depth; scanned, it sees one block inside a loop. Columns:
``unrolled_s`` / ``scanned_s`` = lower + compile wall seconds (best of ``--repeats``), ``*_cpu_s``
the process's CPU seconds for the same (on a machine shared with other jobs the wall time mostly
measures waiting), ``lower_*`` the tracing part alone (wall), ``speedup`` = unrolled / scanned
(wall). Last line: JSON with every row.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_list("depths", ["6", "12", "24"], "stack depths")
flags.DEFINE_integer("batch", 2, "images per step (compile time barely depends on it)")
flags.DEFINE_string("remat_policy", "none", "none | full | dots | dots_saveable (both layouts)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_integer("repeats", 1, "compiles per setting (the best is kept)")
FLAGS = flags.FLAGS


def compile_seconds(depth: int, scan: bool) -> tuple[float, float, float]:
    """``(lower + compile wall, lower wall, lower + compile CPU)`` seconds of the gradient step of
    a TiTok-B encoder."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from titok_jax.models.titok import TiTokEncoder

    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    model = TiTokEncoder(image_size=256, patch_size=16, width=768, depth=depth, num_heads=12,
                         num_latent_tokens=64, out_dim=12, remat_policy=FLAGS.remat_policy,
                         scan_layers=scan, dtype=dtype)
    images = jax.ShapeDtypeStruct((FLAGS.batch, 256, 256, 3), jnp.float32)
    latents = jax.ShapeDtypeStruct((64, 768), jnp.float32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, latents))["params"]

    def loss(p, x, lat):
        return jnp.mean(model.apply({"params": p}, x, lat) ** 2)

    jax.clear_caches()
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, images, latents)
    t1 = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - t0, t1 - t0, time.process_time() - c0


def main(argv):
    del argv
    from common import device_name, print_table

    rows = []
    for depth in (int(d) for d in FLAGS.depths):
        row = {"depth": depth}
        for name, scan in (("unrolled", False), ("scanned", True)):
            best = min((compile_seconds(depth, scan) for _ in range(FLAGS.repeats)), key=lambda r: r[0])
            row[f"{name}_s"], row[f"lower_{name}_s"], row[f"{name}_cpu_s"] = (round(v, 2) for v in best)
        row["speedup"] = round(row["unrolled_s"] / row["scanned_s"], 2)
        rows.append(row)
        print(f"depth {depth}: unrolled {row['unrolled_s']} s ({row['unrolled_cpu_s']} s CPU), scanned "
              f"{row['scanned_s']} s ({row['scanned_cpu_s']} s CPU)", flush=True)
    print(f"device {device_name()}, TiTok-B encoder gradient (width 768, 321 tokens), batch "
          f"{FLAGS.batch}, {FLAGS.dtype}, remat {FLAGS.remat_policy}")
    print_table(rows, ["depth", "unrolled_s", "scanned_s", "speedup", "unrolled_cpu_s", "scanned_cpu_s",
                       "lower_unrolled_s", "lower_scanned_s"])
    print(json.dumps({"benchmark": "compile_time", "device": device_name(), "batch": FLAGS.batch,
                      "dtype": FLAGS.dtype, "remat_policy": FLAGS.remat_policy, "rows": rows}))


if __name__ == "__main__":
    app.run(main)
