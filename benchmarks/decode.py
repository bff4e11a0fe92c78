"""Decoding speed of the flow-decoder tokenizers (FlexTok, FlowMo): images/s against sampler steps
and batch size, with and without guidance.

    python benchmarks/decode.py --config configs/flowmo.py:tiny --batch 1,8 --steps 1,4,8,25
    python benchmarks/decode.py --config configs/flextok.py:tiny --batch 1,8 --steps 1,4,8,25

The whole sampler (``decode_tokens``: token lookup, ``steps`` network calls in one ``lax.scan``,
and FlexTok's VAE decoder) is one jitted call, so there is no host round-trip between steps; the
time is the median of ``--repeats`` calls after compilation. Params are randomly initialised
(speed does not depend on them). "guided" runs the model's published guidance (FlowMo: CFG 1.5 on
its t interval; FlexTok: APG 7.5 at every step), with the conditional and unconditional predictions
in one batched forward; "unguided" uses scale 1, which skips the unconditional pass. Columns:
``ms_per_step`` = time / steps; ``guided_over_unguided`` = guided / unguided time at equal steps.
Last line: JSON with every row."""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<flowmo|flextok>.py:<variant>", lock_config=True)
flags.DEFINE_list("batch", ["1", "8"], "batch sizes")
flags.DEFINE_list("steps", ["1", "4", "8", "25"], "sampler steps")
flags.DEFINE_integer("repeats", 3, "timed calls per setting")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from common import device_name, print_table
    from titok_jax.tasks import get_task

    cfg = flags.FLAGS.config
    task = get_task(cfg)
    model = task.model
    if not getattr(model, "flow_decoder", False):
        raise SystemExit(f"{cfg.family}:{cfg.variant} is not a flow-decoder tokenizer")
    params, state = jax.jit(task.init)(jax.random.key(0))
    import flax.linen as nn
    variables = {"params": nn.unbox(params)["model"], **nn.unbox(state).get("model", {})}
    guided_scale = float(getattr(model, "default_guidance", 1.0))
    rows = []
    for b in (int(x) for x in flags.FLAGS.batch):
        tokens = jnp.asarray(np.random.default_rng(0).integers(
            0, int(model.codebook_size), (b, int(model.num_latent_tokens))), jnp.int32)
        for steps in (int(x) for x in flags.FLAGS.steps):
            times = {}
            for name, scale in (("unguided", 1.0), ("guided", guided_scale)):
                fn = jax.jit(lambda v, t, k, s=steps, g=scale: model.apply(
                    v, t, key=k, steps=s, guidance_scale=g, method="decode_tokens"))
                t0 = time.perf_counter()
                compiled = fn.lower(variables, tokens, jax.random.key(1)).compile()
                compile_s = time.perf_counter() - t0
                jax.block_until_ready(compiled(variables, tokens, jax.random.key(1)))
                ts = []
                for r in range(int(flags.FLAGS.repeats)):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(variables, tokens, jax.random.key(2 + r)))
                    ts.append(time.perf_counter() - t0)
                times[name] = sorted(ts)[len(ts) // 2]
                rows.append({"config": f"{cfg.family}:{cfg.variant}", "batch": b, "steps": steps,
                             "guidance": name if name == "unguided" else f"{scale:g}",
                             "images_per_s": b / times[name], "ms_per_step": 1e3 * times[name] / steps,
                             "compile_s": compile_s})
            rows[-1]["guided_over_unguided"] = times["guided"] / times["unguided"]
    print(f"device: {device_name()}")
    print_table(rows, ["config", "batch", "steps", "guidance", "images_per_s", "ms_per_step",
                       "guided_over_unguided", "compile_s"])
    print(json.dumps({"device": device_name(), "rows": rows}))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
