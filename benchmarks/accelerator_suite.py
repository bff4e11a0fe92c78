"""The accelerator suite: the training step of TiTok-L-32 stage 1, TiTok bl64_vq, FlexTok d18_d18
and FlowMo lo at their published batch per device, MaskGIT and AR generation, FlexTok and FlowMo
decoding; one table of images/s, step time, MFU (XLA's cost analysis over the device's bf16 peak)
and XLA's planned peak memory.

    bash benchmarks/accelerator_suite.sh [--out DIR] [--batch_per_device N] [--smoke]

Each benchmark is its own process (``train_step.py``, ``generate.py``, ``decode.py``), so one that
fails (out of memory, a missing kernel) is a row with its error and the others still run; the exit
status is 1 when any row failed. Weight files are stood in for as in ``scale.py`` (random LPIPS
arrays, ``allow_random`` frozen networks: speed does not depend on the values). The batch per
device is the published global batch over 8 devices (one 8-GPU host; ``--batch_per_device``
overrides it) times this host's device count. ``compute_dtype`` stays the configs' ``auto``
(bfloat16 on GPU/TPU). ``--smoke``: the tiny configs, small batches and few steps, so the whole
suite runs on a CPU in about a minute (``tests/test_accelerator_suite.py``).

Writes ``DIR/accelerator_suite.md`` (the table, with the device and the command) and
``DIR/accelerator_suite.json`` (every row); the table is also printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from scale import _stand_ins, load_config_module  # noqa: E402  (benchmarks/scale.py)

# (family:variant) per kind; the smoke suite mirrors the real one with the tiny configs.
SUITES = {
    "full": {"train": ("titok:l32_stage1", "titok:bl64_vq", "flextok:d18_d18", "flowmo:lo"),
             "generate": ("maskgit:titok_l32", "ar:flextok_d10"),
             "decode": ("flextok:d18_d18", "flowmo:lo")},
    "smoke": {"train": ("titok:tiny", "titok:tiny_stage1", "flextok:tiny", "flowmo:tiny"),
              "generate": ("maskgit:tiny", "ar:tiny"),
              "decode": ("flextok:tiny", "flowmo:tiny")},
}
SETTINGS = {  # steps / repetitions / batch sizes of the non-training benchmarks
    "full": {"train_steps": 10, "warmup": 2, "gen_batch": "32", "gen_steps": "8,64",
             "dec_batch": "8", "dec_steps": "1,4,25", "reps": 3},
    "smoke": {"train_steps": 2, "warmup": 1, "gen_batch": "2", "gen_steps": "2",
              "dec_batch": "2", "dec_steps": "1", "reps": 1},
}
HOSTS_PER_PUBLISHED_BATCH = 8


def _run(cmd: list[str], timeout: float) -> dict:
    """One benchmark process: its last stdout line as JSON, or ``{"error": ...}``."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [l for l in proc.stderr.strip().splitlines() if l.strip()] or ["(no stderr)"]
        return {"error": f"exit {proc.returncode}: {err[-1][:300]}"}
    try:
        out = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"no JSON result line: {lines[-1][:200]}"}
    out["wall_s"] = time.time() - t0
    return out


def _overrides(name: str, work: str) -> list[str]:
    """``--config.KEY=VALUE`` stand-ins for the weight files a config needs (``scale._stand_ins``)."""
    family, variant = name.split(":")
    config = load_config_module(family).get_config(variant)
    return [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in _stand_ins(name, config, work).items()]


def _device() -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; "
                          "print(jax.device_count(), d.platform, getattr(d, 'device_kind', ''))"],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"accelerator_suite: JAX does not start here: {out.stderr.strip()[-300:]}")
    count, rest = out.stdout.split(maxsplit=1)
    return int(count), rest.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmark_results"),
                        help="directory for accelerator_suite.md / .json")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on any backend (CPU)")
    parser.add_argument("--batch_per_device", type=int, default=0,
                        help="training batch per device (0 = the published batch / 8)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    args = parser.parse_args()
    kind = "smoke" if args.smoke else "full"
    suite, s = SUITES[kind], SETTINGS[kind]
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "stand_ins")
    count, device = _device()
    print(f"[accelerator_suite] {kind} suite on {count} x {device}", file=sys.stderr)
    py, rows = sys.executable, []
    for name in suite["train"]:
        family, variant = name.split(":")
        published = int(load_config_module(family).get_config(variant).batch_size)
        per_device = args.batch_per_device or (
            1 if args.smoke else max(1, published // HOSTS_PER_PUBLISHED_BATCH))
        cmd = [py, os.path.join(HERE, "train_step.py"), "--config",
               os.path.join(ROOT, "configs", f"{family}.py") + f":{variant}",
               "--batch", str(per_device * count), "--steps", str(s["train_steps"]),
               "--warmup", str(s["warmup"]), *_overrides(name, work)]
        r = _run(cmd, args.timeout)
        rows.append({"benchmark": "train step", "config": name, "batch": per_device * count, **r})
        print(f"[accelerator_suite] train {name}: {r.get('error') or _fmt(r.get('images_per_s'))}",
              file=sys.stderr)
    for name in suite["generate"]:
        family, variant = name.split(":")
        cmd = [py, os.path.join(HERE, "generate.py"), "--config",
               os.path.join(ROOT, "configs", f"{family}.py") + f":{variant}",
               "--batch", s["gen_batch"], "--steps", s["gen_steps"], "--reps", str(s["reps"])]
        r = _run(cmd, args.timeout)
        for row in r.get("results", []) or [r]:
            what = (f"{row['steps']} steps" if str(row.get("steps", "-")) != "-"
                    else f"{row.get('tokens', '-')} tokens")
            rows.append({"benchmark": f"generate ({what})", "config": name,
                         **{k: v for k, v in row.items() if k != "results"},
                         **({"error": r["error"]} if "error" in r else {})})
        print(f"[accelerator_suite] generate {name}: {r.get('error') or 'ok'}", file=sys.stderr)
    for name in suite["decode"]:
        family, variant = name.split(":")
        cmd = [py, os.path.join(HERE, "decode.py"), "--config",
               os.path.join(ROOT, "configs", f"{family}.py") + f":{variant}",
               "--batch", s["dec_batch"], "--steps", s["dec_steps"], "--repeats", str(s["reps"]),
               *_overrides(name, work)]
        r = _run(cmd, args.timeout)
        for row in r.get("rows", []) or [r]:
            rows.append({"benchmark": f"decode ({row.get('steps', '-')} steps, "
                                      f"{row.get('guidance', '-')})", "config": name,
                         **{k: v for k, v in row.items() if k not in ("rows", "config")},
                         **({"error": r["error"]} if "error" in r else {})})
        print(f"[accelerator_suite] decode {name}: {r.get('error') or 'ok'}", file=sys.stderr)
    table = _table(rows, f"{count} x {device}", " ".join(sys.argv[1:]))
    with open(os.path.join(args.out, "accelerator_suite.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(args.out, "accelerator_suite.json"), "w", encoding="utf-8") as f:
        json.dump({"device": device, "device_count": count, "suite": kind, "rows": rows}, f, indent=1)
    print(table)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"[accelerator_suite] {len(failed)} of {len(rows)} rows failed", file=sys.stderr)
    print(f"[accelerator_suite] wrote {os.path.join(args.out, 'accelerator_suite.md')}",
          file=sys.stderr)
    return 1 if failed else 0


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(rows: list[dict], device: str, argv: str) -> str:
    head = (f"Device: {device}; {time.strftime('%Y-%m-%d %H:%M')}; command: "
            f"`bash benchmarks/accelerator_suite.sh {argv}`.\n\n"
            "| benchmark | config | batch | images/s | step or call (s) | MFU | GFLOP/step | "
            "peak MiB | error |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        seconds = r.get("step_time_s", r.get("time_s"))
        if seconds is None and r.get("images_per_s") and r.get("batch"):
            seconds = float(r["batch"]) / float(r["images_per_s"])
        mfu = r.get("mfu")
        lines.append(f"| {r['benchmark']} | {r['config']} | {_fmt(r.get('batch'))} | "
                     f"{_fmt(r.get('images_per_s'))} | {_fmt(seconds)} | "
                     f"{'-' if mfu is None else f'{100 * mfu:.1f}%'} | {_fmt(r.get('gflops_step'))} | "
                     f"{_fmt(r.get('peak_memory_mb'), 5)} | {r.get('error', '')} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
