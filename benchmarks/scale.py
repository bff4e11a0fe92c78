"""Pod scale of every published config: the train state each device holds against the ideal
(total / devices), the compiled step's per-device temporaries and FLOPs, and the collective bytes of
one step, at fsdp 8, 64 and 256 on simulated CPU devices, with and without gradient accumulation.

COMMAND (resumable: every finished cell is kept in --cache, a rerun only does what is missing):
  python benchmarks/scale.py                                    # all published configs, 8/64/256
  python benchmarks/scale.py --configs titok:bl64_vq,flowmo:lo --devices 8,64
  python benchmarks/scale.py --table                            # the markdown table of the cache
  python benchmarks/scale.py --configs flowmo --force           # redo those cells

A cell (config, devices, accumulation) with devices <= --compile_max (default: all) is the trainer's
own dry run in a subprocess, ``titok-jax train --dry_run --simulate_devices N`` (AOT compile of
``build_step`` on N simulated CPU devices; its last stdout line is the JSON report of
``titok_jax.train.memory``). Above it - or where that compile fails or times out, the failure kept in
the cache as ``compile_error`` - the cell is the sharding plan only (``memory.plan_report``: the
state's shardings on an ``AbstractMesh``, no compile): state per device and its ideal, no
temporaries or collectives. One compile of a published config takes 1.5-2 minutes on a 2-core host
at 8, 64 or 256 devices alike.

Every cell uses the mesh ``{data: 1, fsdp: N, tensor: 1}`` and the published global batch, raised to a
multiple of 2N where it is smaller (one example per device and micro-step at least), so the runs
with accumulation 1 and 2 see the same batch. The configs' weight files are stood in for: a random
LPIPS file (shapes only matter), ``allow_random`` frozen networks (FlexTok's VAE and REPA teacher),
and a token data set of the generator's vocabulary with no shards (the dry run reads its meta.json).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("titok", "flextok", "flowmo", "maskgit", "ar", "vqgan", "extractor", "magvit",
            "magvit2_video")
DEVICES = (8, 64, 256)
ACCUMULATION = (1, 2)
DEFAULT_CACHE = os.path.join("/tmp", "titok_jax_scale", "results.json")


def load_config_module(family: str) -> Any:
    path = os.path.join(ROOT, "configs", f"{family}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{family}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def published() -> list[str]:
    """``family:variant`` of every published config (each config file's ``PUBLISHED``)."""
    return [f"{f}:{v}" for f in FAMILIES for v in load_config_module(f).PUBLISHED]


def select(names: list[str], filters: str | None) -> list[str]:
    """The configs a ``--configs`` filter keeps: comma-separated ``family`` or ``family:variant``."""
    if not filters:
        return names
    keep = [f.strip() for f in filters.split(",") if f.strip()]
    out = [n for n in names if any(n == k or n.split(":")[0] == k for k in keep)]
    unknown = [k for k in keep if not any(n == k or n.split(":")[0] == k for n in names)]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; published: {', '.join(names)}")
    return out


def batch_for(config: Any, devices: int) -> int:
    """The published batch, raised to a multiple of ``2 * devices`` (both accumulations split)."""
    step = 2 * devices
    return -(-int(config.batch_size) // step) * step


def _stand_ins(name: str, config: Any, work: str) -> dict[str, Any]:
    """Overrides standing in for the weight files and data a published config needs."""
    out: dict[str, Any] = {}
    losses = config.get("losses") or {}
    if float(losses.get("perceptual_weight", 0.0) or 0.0) > 0:
        out["losses.perceptual_weights"] = _random_lpips(work)
    if float(losses.get("convnext_weight", 0.0) or 0.0) > 0:
        raise SystemExit(f"{name}: a ConvNeXt stand-in is not implemented (no published config needs one)")
    if "vae" in config:
        out["vae.allow_random"] = True
    if "repa" in config:
        out["repa.teacher.allow_random"] = True
    if "teacher" in config:
        out["teacher.allow_random"] = True
    if str(config.data.source).startswith("tokens:"):
        out["data.source"] = f"tokens:{_token_meta(work, config.model)}"
    return out


def _random_lpips(work: str) -> str:
    """A random LPIPS param file of the right shapes (written once)."""
    path = os.path.join(work, "lpips_random.npz")
    if not os.path.exists(path):
        import numpy as np

        from titok_jax.losses.perceptual import lpips_param_shapes
        rng = np.random.default_rng(0)
        arrays = {k: (0.01 * rng.standard_normal(s)).astype(np.float32)
                  for k, s in lpips_param_shapes().items()}
        np.savez(path + ".tmp.npz", **arrays)
        os.replace(path + ".tmp.npz", path)
    return path


def _token_meta(work: str, model: Any) -> str:
    """A token data set with no shards, of the generator's vocabulary (only its meta.json is read)."""
    from titok_jax.data.tokens import FORMAT, META
    path = os.path.join(work, f"tokens_{model.num_tokens}x{model.codebook_size}c{model.num_classes}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, META), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "count": 0, "num_tokens": int(model.num_tokens),
                   "codebook_size": int(model.codebook_size), "num_classes": int(model.num_classes),
                   "shards": []}, f)
    return path


def config_of(name: str, devices: int, accumulation: int) -> tuple[Any, list[str]]:
    """The config of a cell (mesh, batch, accumulation and stand-ins applied) and the
    ``--config.KEY=VALUE`` flags that make the same config from ``configs/<family>.py:<variant>``."""
    family, variant = name.split(":")
    config = load_config_module(family).get_config(variant)
    work = os.path.dirname(os.path.abspath(ARGS.cache))
    os.makedirs(work, exist_ok=True)
    overrides = {"mesh.data": 1, "mesh.fsdp": devices, "mesh.tensor": 1,
                 "batch_size": batch_for(config, devices), "optimizer.accumulation_steps": accumulation,
                 **_stand_ins(name, config, work)}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value
    flags = [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]
    return config, flags


def compile_cell(name: str, devices: int, accumulation: int, timeout: float) -> dict:
    """The trainer's dry run of one cell in a fresh process with ``devices`` simulated devices."""
    family, variant = name.split(":")
    _, overrides = config_of(name, devices, accumulation)
    cmd = [sys.executable, "-m", "titok_jax", "train", "--config",
           os.path.join(ROOT, "configs", f"{family}.py") + f":{variant}", "--workdir",
           os.path.join(os.path.dirname(os.path.abspath(ARGS.cache)), "never_written"),
           "--dry_run", "--simulate_devices", str(devices), *overrides]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": time.time() - t0}
    seconds = time.time() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"exit {proc.returncode}: {err[:500]}", "seconds": seconds}
    return {**json.loads(lines[-1]), "mode": "compile", "seconds": seconds}


_TRACES: dict[str, tuple[Any, Any]] = {}


def plan_cell(name: str, devices: int, accumulation: int) -> dict:
    """The sharding plan of one cell (no devices, no compile); one trace of the model per config."""
    from titok_jax.tasks import get_task
    from titok_jax.train import memory
    config, _ = config_of(name, devices, accumulation)
    t0 = time.time()
    if name not in _TRACES:
        task = get_task(config)
        _TRACES[name] = (task, memory.abstract_variables(task))
    task, variables = _TRACES[name]
    report = memory.plan_report(config, devices, task, variables)
    return {**report, "mode": "plan", "seconds": time.time() - t0}


def _key(name: str, devices: int, accumulation: int) -> str:
    return f"{name}|{devices}|{accumulation}"


def load_cache(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_cache(path: str, cache: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def _gib(n: Any) -> str:
    return f"{n / 2**30:.3f}" if n < 10 * 2**30 else f"{n / 2**30:.1f}"


def table(cache: dict, names: list[str], devices: list[int], accumulations: list[int]) -> str:
    """The markdown table of the cached cells: GiB per device, collectives in GiB per step, and
    ``how`` the cell was measured (``compile`` or ``plan``; notes below the table)."""
    rows = ["| config | devices | accum | batch | how | state / device | ideal | state / ideal | "
            "temporaries / device | collectives / step | TFLOP / device | seconds |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for name in names:
        for n in devices:
            for a in accumulations:
                r = cache.get(_key(name, n, a))
                if r is None:
                    continue
                head = f"| {name} | {n} | {a} | {r.get('batch', '')} |"
                if "error" in r:
                    notes.append(f"{name} at {n} devices, accumulation {a}: {r['error']}")
                    rows.append(f"{head} error [{len(notes)}] | | | | | | | {r.get('seconds', 0):.0f} |")
                    continue
                how = r["mode"]
                if "compile_error" in r:
                    notes.append(f"{name} at {n} devices, accumulation {a}: compile failed "
                                 f"({r['compile_error'][:300]}); the sharding plan is shown")
                    how += f" [{len(notes)}]"
                state, ideal = r["state_bytes_per_device"], r["ideal_state_bytes_per_device"]
                compiled = [_gib(r["temp_bytes_per_device"]), _gib(r["collective_bytes_per_step"]),
                            f"{r['flops_per_device'] / 1e12:.2f}"] if r["mode"] == "compile" else ["-"] * 3
                rows.append(f"{head} {how} | {_gib(state)} | {_gib(ideal)} | {state / ideal:.3f} | "
                            f"{' | '.join(compiled)} | {r['seconds']:.0f} |")
    return "\n".join(rows + [""] + [f"[{i + 1}] {note}" for i, note in enumerate(notes)])


@functools.lru_cache(maxsize=None)
def _commit() -> str:
    """The checkout's commit (``+`` when the tree has changes), recorded with each cell."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+" if dirty else "")


def run_cell(name: str, devices: int, accumulation: int) -> dict:
    """One cell: the compiled dry run up to ``--compile_max`` devices, else (or when the compile
    fails) the sharding plan; with the batch, the mesh size and the host it ran on."""
    config, _ = config_of(name, devices, accumulation)
    result = compile_cell(name, devices, accumulation, ARGS.timeout) if devices <= ARGS.compile_max else None
    if result is None or "error" in result:
        failed = result
        try:
            result = plan_cell(name, devices, accumulation)
        except Exception as e:  # noqa: BLE001 - a refused plan is a result
            result = {"error": f"{type(e).__name__}: {str(e)[:500]}", "seconds": 0.0}
        if failed is not None:   # the compile's failure stays on record
            result["compile_error"] = failed["error"]
    result.update(batch=batch_for(config, devices), accumulation=accumulation, devices=devices,
                  machine=f"{platform.node()} ({os.cpu_count()} CPUs)",
                  when=time.strftime("%Y-%m-%d %H:%M:%S"), commit=_commit())
    return result


def main(argv: list[str] | None = None) -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=None, help="comma-separated family or family:variant")
    parser.add_argument("--devices", default=",".join(map(str, DEVICES)), help="fsdp sizes")
    parser.add_argument("--accumulation", default=",".join(map(str, ACCUMULATION)), help="micro-steps")
    parser.add_argument("--compile_max", type=int, default=256,
                        help="compile cells up to this many devices; the sharding plan above it")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="results JSON (kept between runs)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per compiled cell")
    parser.add_argument("--force", action="store_true", help="redo the selected cells")
    parser.add_argument("--retry_errors", action="store_true", help="redo the selected cells that failed")
    parser.add_argument("--table", action="store_true", help="only print the table of the cache")
    ARGS = parser.parse_args(argv)
    names = select(published(), ARGS.configs)
    devices = [int(d) for d in ARGS.devices.split(",")]
    accumulations = [int(a) for a in ARGS.accumulation.split(",")]
    cache = load_cache(ARGS.cache)
    if not ARGS.table:
        for name in names:
            for n in devices:
                for a in accumulations:
                    key = _key(name, n, a)
                    old = cache.get(key)
                    if old is not None and not ARGS.force and not (ARGS.retry_errors and "error" in old):
                        continue
                    cache[key] = result = run_cell(name, n, a)
                    save_cache(ARGS.cache, cache)
                    status = result.get("error") or "state/ideal {:.3f}".format(
                        result["state_bytes_per_device"] / result["ideal_state_bytes_per_device"])
                    print(f"{key}: {result.get('mode', 'error')} in {result['seconds']:.0f} s, {status}",
                          file=sys.stderr, flush=True)
    print(table(cache, names, devices, accumulations))
    return 0


ARGS: Any = None

if __name__ == "__main__":
    sys.exit(main())
