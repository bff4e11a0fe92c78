"""Quantizer throughput (tokens/s) and peak memory, forward and forward+backward, in training mode.

  python benchmarks/quantizers.py [--steps 5] [--tokens 8192 65536] [--vq-codes 4096 16384 65536]
                                  [--only vq|fsq|lfq ...]

Cases: VectorQuantizer with TiTok's l2-normalised 12-dim codes for each codebook size, FSQ with the
2^16 level set [8,8,8,5,5,5] (FlexTok), LFQ with 18 bits; each against each token count. "memory" is
the peak XLA plans for one call (arguments + outputs + temporaries), "device_peak" the allocator
peak where the backend reports one. Prints a table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import device_name, device_peak_mb, print_json_last, print_table, time_jitted  # noqa: E402
from titok_jax.quantizers import FSQ, LFQ, STATS, VectorQuantizer  # noqa: E402


def make_cases(kinds: list[str], vq_codes: list[int]) -> list[tuple[str, object, int]]:
    cases = []
    if "vq" in kinds:
        for k in vq_codes:
            cases.append((f"vq{k}x12_l2", VectorQuantizer(codebook_size=k, dim=12, l2_normalize=True), 12))
    if "fsq" in kinds:
        cases.append(("fsq_8.8.8.5.5.5", FSQ(levels=(8, 8, 8, 5, 5, 5)), 6))
    if "lfq" in kinds:
        cases.append(("lfq18", LFQ(bits=18), 18))
    return cases


def bench(name: str, q, dim: int, tokens: int, steps: int) -> list[dict]:
    z = jax.random.normal(jax.random.key(0), (tokens, dim), jnp.float32)
    variables = q.init(jax.random.key(1), z)
    params = variables.get("params", {})
    rest = {k: v for k, v in variables.items() if k != "params"}
    rngs = {"quantizer": jax.random.key(2)}

    def forward(params, rest, z):
        (z_q, out), upd = q.apply({"params": params, **rest}, z, train=True, rngs=rngs, mutable=[STATS])
        return z_q, out.indices, out.total_loss(), upd

    def loss_fn(params, rest, z):
        (z_q, out), upd = q.apply({"params": params, **rest}, z, train=True, rngs=rngs, mutable=[STATS])
        return out.total_loss() + jnp.mean(jnp.square(z_q.astype(jnp.float32))), upd

    def forward_backward(params, rest, z):
        (loss, upd), grads = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)(params, rest, z)
        return loss, grads, upd

    rows = []
    for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        t, mem = time_jitted(fn, params, rest, z, steps=steps)
        rows.append({"case": name, "tokens": tokens, "mode": mode, "tokens_per_s": tokens / t,
                     "step_time_s": t, "peak_memory_mb": mem, "device_peak_mb": device_peak_mb()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--vq-codes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--only", nargs="+", default=["vq", "fsq", "lfq"], choices=["vq", "fsq", "lfq"])
    args = ap.parse_args()
    rows = []
    for name, q, dim in make_cases(args.only, args.vq_codes):
        for tokens in args.tokens:
            rows.extend(bench(name, q, dim, tokens, args.steps))
            r = rows[-1]
            print(f"  done {name} tokens={tokens} ({r['step_time_s']:.3f} s fwd+bwd)", file=sys.stderr, flush=True)
    print(f"device: {device_name()}")
    print_table(rows, ["case", "tokens", "mode", "tokens_per_s", "step_time_s", "peak_memory_mb"])
    print_json_last({"device": device_name(), "results": rows})


if __name__ == "__main__":
    main()
