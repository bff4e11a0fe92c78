"""Generation throughput: images/s of MaskGIT (parallel decoding, per number of steps) and of the
AR generator (KV-cached, one position per step), per batch size.

    python benchmarks/generate.py --generator maskgit --config configs/maskgit.py:tiny --batch 1,8,32 --steps 8,64
    python benchmarks/generate.py --generator ar --config configs/ar.py:tiny --batch 1,8,32
    ... --tokenizer DIR      also time sampling + decoding the ids to pixels with that tokenizer

Randomly initialised generator params (the cost does not depend on the values); the sampler
settings are the config's ``generator.sampler`` (guidance on => the batched cond + uncond call)
unless ``--guidance_scale`` is given. Each figure is the median of ``--reps`` calls after
compilation and one warm-up call, with ``jax.block_until_ready`` (``min_time_s``: the fastest call,
the better estimate on a shared machine); compile time is reported apart.
``--steps`` applies to MaskGIT only (the AR sampler runs one step per token, ``--max_len`` of them).
Last line: {"generator", "config", "device", "images_per_s" (best row), "results": [rows]}."""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<maskgit|ar>.py:<variant>", lock_config=True)
flags.DEFINE_enum("generator", None, ["maskgit", "ar"], "generator kind (default: the config's task)")
flags.DEFINE_list("batch", ["1", "8", "32"], "batch sizes (comma-separated)")
flags.DEFINE_list("steps", ["8", "64"], "MaskGIT decoding steps (comma-separated)")
flags.DEFINE_integer("max_len", 0, "AR: positions to generate (0 = all of the model's tokens)")
flags.DEFINE_float("guidance_scale", None, "override the config's guidance scale")
flags.DEFINE_integer("reps", 5, "timed calls per row")
flags.DEFINE_string("tokenizer", None, "tokenizer workdir: also time decoding the ids to images")


def _times(fn, reps: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn()`` over ``reps`` calls, each waited for."""
    import jax
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], times[0]


def main(argv):
    del argv
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from common import device_name, print_json_last, print_table
    from titok_jax.tasks import get_task

    cfg = flags.FLAGS.config
    kind = flags.FLAGS.generator or cfg.task.name
    if kind != cfg.task.name:
        raise app.UsageError(f"--generator {kind} but the config trains task {cfg.task.name!r}")
    if kind not in ("maskgit", "ar"):
        raise app.UsageError(f"{cfg.family}:{cfg.variant} is not a generator config (task {kind!r})")
    task = get_task(cfg)
    model = task.model
    params = nn.unbox(jax.jit(task.init)(jax.random.key(0))[0])["model"]
    variables = {"params": params}
    sampler = dict(task.sampler)
    if flags.FLAGS.guidance_scale is not None:
        sampler["guidance_scale"] = float(flags.FLAGS.guidance_scale)
    if kind == "ar":
        from titok_jax.generators.ar import generate_tokens
        sampler["max_len"] = flags.FLAGS.max_len or None
        settings = [("-", dict(sampler))]
        tokens = flags.FLAGS.max_len or model.num_tokens
    else:
        from titok_jax.generators.maskgit import generate_tokens
        settings = [(int(s), dict(sampler, steps=int(s))) for s in flags.FLAGS.steps]
        tokens = model.num_tokens

    decode = None
    if flags.FLAGS.tokenizer:
        from titok_jax.api import load_tokenizer
        tok = load_tokenizer(flags.FLAGS.tokenizer)
        if tok.codebook_size != model.codebook_size or tok.num_tokens != model.num_tokens:
            raise app.UsageError(f"the generator makes {model.num_tokens} ids from {model.codebook_size} "
                                 f"codes; the tokenizer takes {tok.num_tokens} from {tok.codebook_size}")
        decode = tok.decode

    rows = []
    for batch in (int(b) for b in flags.FLAGS.batch):
        labels = jnp.asarray(np.arange(batch) % max(model.num_classes, 1), jnp.int32)
        key = jax.random.key(1)
        for steps, kw in settings:
            fn = jax.jit(lambda v, y, k, kw=kw: generate_tokens(model, v, y, k, **kw))
            t0 = time.perf_counter()
            compiled = fn.lower(variables, labels, key).compile()
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(compiled(variables, labels, key))  # warm-up
            t, t_min = _times(lambda: compiled(variables, labels, key), flags.FLAGS.reps)
            row = {"generator": kind, "batch": batch, "steps": steps, "tokens": tokens,
                   "guidance": sampler.get("guidance_scale"), "compile_s": compile_s,
                   "time_s": t, "min_time_s": t_min, "images_per_s": batch / t}
            if decode is not None:
                ids = np.asarray(compiled(variables, labels, key))
                decode(ids)  # warm-up (compiles the tokenizer's decoder)
                td, _ = _times(lambda: decode(np.asarray(compiled(variables, labels, key))),
                               flags.FLAGS.reps)
                row["with_decode_s"], row["images_per_s_with_decode"] = td, batch / td
            rows.append(row)
            print(f"[generate] {kind} batch {batch} steps {steps}: {row['images_per_s']:.4g} images/s",
                  file=sys.stderr, flush=True)

    print(f"{cfg.family}:{cfg.variant} on {device_name()}; sampler {sampler}")
    print_table(rows, list(rows[-1]))
    print_json_last({"generator": kind, "config": f"{cfg.family}:{cfg.variant}", "device": device_name(),
                     "images_per_s": max(r["images_per_s"] for r in rows),
                     "results": [{k: v for k, v in r.items() if k != "generator"} for r in rows]})


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
