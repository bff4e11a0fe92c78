"""The A B A B machinery of the side-by-side benchmarks (vs_decode.py, vs_generate.py): each side
in its own spawned process (so torch's OpenMP threads and XLA's thread pool never compete), built
one after the other, then ``pairs`` rounds of ``calls`` timed calls of ours followed by ``calls``
of theirs. Standard library only: the official side never imports JAX.

A side is ``"module:function"``; the function (imported in the worker) takes the side's payload
dict and returns ``(call, info)``: ``call()`` runs one complete call and returns once its result is
on the host; ``info`` is a JSON-able dict (params, compile time, ...). The worker adds ``build_s``
(build + compilation), ``warmup_s`` (the untimed calls) and ``peak_rss_mb``.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any


def _worker(target: str, payload: dict, warmup: int, conn) -> None:
    import resource
    try:
        module, name = target.split(":")
        t0 = time.perf_counter()
        call, info = getattr(importlib.import_module(module), name)(payload)
        info = dict(info, build_s=time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(warmup):
            call()
        info["warmup_s"] = time.perf_counter() - t0
        info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send(("ready", info))
        while (n := conn.recv()) is not None:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            conn.send(("times", times))
    except Exception as e:  # noqa: BLE001 - reported by the parent as one line
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
        conn.send(("error", f"{type(e).__name__}: {first}"))


class Side:
    """One side's worker process and its pipe; a dead worker is an error, not a hang."""

    def __init__(self, name: str, target: str, payload: dict, warmup: int):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(target, payload, warmup, child), daemon=True)
        self.proc.start()
        self.info: dict | None = None

    def wait_ready(self) -> dict:
        if self.info is None:
            self.info = self._expect("ready")
        return self.info

    def time(self, n: int) -> list[float]:
        self.conn.send(n)
        return self._expect("times")

    def _expect(self, tag: str) -> Any:
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise SystemExit(f"the {self.name} side died (exit code {self.proc.exitcode})")
        try:
            got, value = self.conn.recv()
        except EOFError:
            raise SystemExit(f"the {self.name} side died (exit code {self.proc.exitcode})") from None
        if got == "error":
            raise SystemExit(f"the {self.name} side failed: {value}")
        assert got == tag, (got, tag)
        return value

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=60)
            if self.proc.is_alive():
                self.proc.kill()


def run_pairs(sides: dict[str, tuple[str, dict]], *, pairs: int, calls: int, warmup: int,
              batch: int, tag: str, build_together: bool = False) -> tuple[dict, list[dict]]:
    """Build every side (``{"ours": (target, payload), "official": ...}``, in that order, one
    after the other - or all at once with ``build_together``, which only shortens the wall time:
    nothing is timed until every side is ready - its ``build_s`` / ``compile_s`` then overlap), then
    ``pairs`` A B rounds. Returns ``(info per side, rows)``; a row has ``{side}_s`` (median of its
    ``calls`` times, s/call), ``{side}_times`` and, with both sides, ``ratio`` = ours / official in
    images/s = official s/call / ours s/call."""
    built: dict[str, Side] = {}
    try:
        for name, (target, payload) in sides.items():
            built[name] = Side(name, target, payload, warmup)
            if not build_together:
                built[name].wait_ready()
        for name, side in built.items():
            print(f"[{tag}] {name} ready: {side.wait_ready()}", file=sys.stderr, flush=True)
        rows = []
        for i in range(pairs):
            row: dict[str, Any] = {"pair": i}
            for name, side in built.items():
                times = side.time(calls)
                row[f"{name}_times"] = times
                row[f"{name}_s"] = statistics.median(times)
            if "official_s" in row:
                row["ratio"] = row["official_s"] / row["ours_s"]
            rows.append(row)
            print(f"[{tag}] pair {i}: " + ", ".join(
                f"{n} {row[f'{n}_s']:.3f} s/call ({batch / row[f'{n}_s']:.4g} images/s)" for n in built)
                + (f", ours/official images/s {row['ratio']:.3f}" if "ratio" in row else ""),
                file=sys.stderr, flush=True)
        return {n: s.info for n, s in built.items()}, rows
    finally:
        for side in built.values():
            side.close()


def summary(rows: list[dict]) -> float | None:
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    return statistics.median(ratios) if ratios else None


def load_avg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def define_pair_flags(calls: int, what: str, repo: str, packages: str) -> None:
    """The flags every side-by-side benchmark shares (absl): pairs, timed ``calls`` per side and
    pair, warm-up, the official checkout (``repo`` names it), the official process's extra
    ``sys.path`` (``packages``: what it needs there), its torch threads, building both at once."""
    from absl import flags
    flags.DEFINE_integer("pairs", 3, "A B pairs")
    flags.DEFINE_integer("calls", calls, f"timed {what} calls per side and pair")
    flags.DEFINE_integer("warmup", 1, "untimed calls per side after the compiling / first call")
    flags.DEFINE_string("reference_repo", "", f"checkout of {repo} (empty: ours only)")
    flags.DEFINE_list("reference_path", [], "directories put on sys.path of the official process "
                      f"only (e.g. where {packages} is installed)")
    flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads of the official side (0: "
                         "os.cpu_count()); with other jobs on the cores, torch's OpenMP threads "
                         "slow down far more than XLA's, so use the free cores there")
    flags.DEFINE_bool("build_together", False, "build both sides at once (shorter wall time; "
                      "their build / compile times then overlap; the timed pairs do not)")
