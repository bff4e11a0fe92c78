"""Side by side on one CPU: our quantizers (titok_jax.quantizers) against lucidrains'
vector-quantize-pytorch (``VectorQuantize``, ``FSQ``, ``LFQ``), same inputs, A B A B.

    python benchmarks/vs_quantizers.py --reference_repo PATH/TO/vector-quantize-pytorch \\
        [--pairs 3 --steps 3] [--only vq fsq lfq] [--small]

The checkout is imported from ``--reference_repo`` (put on ``sys.path``; nothing of it is copied
here); it needs torch, einops and einx (the ``reference`` extra). Without it only ours is timed.

Cases (float32, tokens ``[N, d]`` from ``numpy.random.default_rng(seed)``, sent to both sides):
- ``vq``: nearest code for every codebook size x token count x metric (``l2``: cosine on
  l2-normalised tokens and codes, TiTok's; ``euclid``: squared L2), ``d = --vq_dim``, one codebook
  (l2-normalised for ``l2``) loaded into both. Ours: ``VectorQuantizer(use_ema=True, train=False,
  commitment_weight=0.25)``, i.e. a codebook without gradient and no EMA step, loss = commitment.
  Theirs: ``VectorQuantize(ema_update=False, learnable_codebook=False, rotation_trick=False,
  commitment_weight=0.25)`` in training mode (for the straight-through output and the commitment
  loss) called with ``freeze_codebook=True``; no projections on either side.
- ``fsq``: each level set (no projection, no loss): ours ``FSQ(levels)``, theirs ``FSQ(levels)``.
- ``lfq``: ``bits`` bits, entropy weight 0.1 (T = 0.01, diversity 1), commitment 0.25. Theirs
  ``LFQ(dim=bits)`` in training mode builds the ``[N, 2^bits]`` code probabilities (about 7 such
  float32 tensors live in fwd+bwd: 2.1 GB at 256 tokens and 18 bits, so 16384 tokens cannot run in
  less than ~120 GB); ours factorises them (exact: ``batch_entropy_group_size=bits``; our default
  for 18 bits would be two 9-bit groups), so the gap is algorithmic.

Known differences (what ``compare`` tolerates): theirs' LFQ index is MSB-first (ours LSB-first) and
its entropies clamp p at 1e-5 inside the log (ours is exact): ~2e-5 relative on the loss and
0.5-3% on the input gradient, which vanish with their eps set to 1e-30. Their straight-through is
``z + sg(q - z)`` (off by rounding), ours exact. FSQ and VQ otherwise agree to float32 rounding.

Modes: ``fwd`` (theirs under ``torch.no_grad()``) and ``fwd+bwd``: loss = the quantizer's loss +
``mean(z_q^2)``, gradient w.r.t. the input only. Ours is ``jax.jit``-compiled once per case and
mode; compilation and ``--warmup`` calls are excluded. Each side runs in its own process (ours one for
all cases, theirs a fresh one per case, so a case that runs out of memory is reported and the next
goes on); both have ``RLIMIT_DATA = --memory_gb`` (default 85% of MemAvailable), so an allocation
too large fails cleanly instead of waking the OOM killer. Each pair times ``--steps`` calls of ours,
then of theirs; ratio = ours/theirs in tokens/s = theirs' median time / ours', per pair and the
median over pairs.

Numerics, once per case on the warm-up call (``agree`` column): indices (LFQ: theirs' are MSB-first,
compared bit-reversed), codes, loss and the input gradient; VQ index mismatches are re-checked in
float64 and counted as near-ties when the two codes' distances differ by < 1e-5 of ``|x|^2+|e|^2``.
Last line: JSON with every row and every check.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

MODES = ("fwd", "fwd+bwd")
COMMITMENT, ENTROPY, TEMPERATURE = 0.25, 0.1, 0.01


# ---- cases ------------------------------------------------------------------------------------
def make_cases(args) -> list[dict]:
    cases = []
    if "vq" in args.only:
        for metric in args.vq_metric:
            for k in args.vq_codes:
                for n in args.vq_tokens:
                    cases.append({"name": f"vq{k}x{args.vq_dim}_{metric}", "kind": "vq", "tokens": n,
                                  "codes": k, "dim": args.vq_dim, "l2": metric == "l2"})
    if "fsq" in args.only:
        for levels in args.fsq_levels:
            lv = [int(v) for v in levels.split(",")]
            for n in args.fsq_tokens:
                cases.append({"name": "fsq_" + ".".join(map(str, lv)), "kind": "fsq", "tokens": n,
                              "levels": lv, "dim": len(lv)})
    if "lfq" in args.only:
        for n in args.lfq_tokens:
            cases.append({"name": f"lfq{args.lfq_bits}_entropy", "kind": "lfq", "tokens": n,
                          "bits": args.lfq_bits, "dim": args.lfq_bits})
    return cases


def case_arrays(case: dict, seed: int) -> dict[str, np.ndarray]:
    """The inputs both sides get: tokens ``z`` (and the VQ codebook)."""
    rng = np.random.default_rng(seed)
    out = {"z": rng.standard_normal((case["tokens"], case["dim"]), dtype=np.float32)}
    if case["kind"] == "vq":
        e = rng.standard_normal((case["codes"], case["dim"]), dtype=np.float32)
        if case["l2"]:
            e = e / np.linalg.norm(e, axis=-1, keepdims=True)
        out["codebook"] = e.astype(np.float32)
    return out


# ---- the two sides (each in its own process) ---------------------------------------------------
def _ours(case: dict, arrays: dict):
    """Jitted fwd and fwd+bwd of our quantizer -> (runner, first outputs as numpy, info)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from common import compiled_memory_mb
    from titok_jax.quantizers import FSQ, LFQ, STATS, VectorQuantizer

    kind, z = case["kind"], jnp.asarray(arrays["z"])
    if kind == "vq":
        q = VectorQuantizer(codebook_size=case["codes"], dim=case["dim"], l2_normalize=case["l2"],
                            commitment_weight=COMMITMENT, use_ema=True, track_usage=False)
    elif kind == "fsq":
        q = FSQ(levels=tuple(case["levels"]), track_usage=False)
    else:
        q = LFQ(bits=case["bits"], entropy_weight=ENTROPY, commitment_weight=COMMITMENT,
                temperature=TEMPERATURE, diversity_gamma=1.0,
                batch_entropy_group_size=case["bits"], track_usage=False)
    variables = {k: dict(v) for k, v in nn.meta.unbox(q.init(jax.random.key(0), z[:8])).items()}
    if kind == "vq":
        variables[STATS]["codebook"] = jnp.asarray(arrays["codebook"])

    def forward(v, z):
        z_q, out = q.apply(v, z, train=False)
        extra = {k: out.metrics[k] for k in ("per_sample_entropy", "batch_entropy") if k in out.metrics}
        return z_q, out.indices, out.total_loss(), extra

    def loss_fn(z, v):
        z_q, idx, loss, _ = forward(v, z)
        return loss + jnp.mean(jnp.square(z_q)), idx

    def forward_backward(v, z):
        (loss, idx), grad = jax.value_and_grad(loss_fn, has_aux=True)(z, v)
        return loss, idx, grad

    fns, info = {}, {"compile_s": 0.0}
    for mode, fn in zip(MODES, (forward, forward_backward)):
        t0 = time.perf_counter()
        fns[mode] = jax.jit(fn).lower(variables, z).compile()
        info["compile_s"] += time.perf_counter() - t0
        info[f"xla_mb_{mode}"] = compiled_memory_mb(fns[mode])
    z_q, idx, loss, extra = jax.device_get(fns["fwd"](variables, z))
    _, _, grad = jax.device_get(fns["fwd+bwd"](variables, z))
    outputs = {"z_q": np.asarray(z_q), "indices": np.asarray(idx), "loss": float(loss),
               "grad": np.asarray(grad), **{k: float(v) for k, v in extra.items()}}
    return (lambda mode: jax.block_until_ready(fns[mode](variables, z))), outputs, info


def _theirs(case: dict, arrays: dict, repo: str):
    """Their module in training mode -> (runner, first outputs as numpy, info)."""
    sys.path.insert(0, os.path.abspath(repo))
    import torch
    from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

    torch.set_num_threads(os.cpu_count() or 1)
    kind, z = case["kind"], torch.from_numpy(arrays["z"])[None]    # [1, N, d]
    if kind == "vq":
        m = VectorQuantize(dim=case["dim"], codebook_size=case["codes"], use_cosine_sim=case["l2"],
                           commitment_weight=COMMITMENT, rotation_trick=False, ema_update=False,
                           learnable_codebook=False, threshold_ema_dead_code=0, kmeans_init=False)
        with torch.no_grad():
            m.codebook = torch.from_numpy(arrays["codebook"])

        def call(x):
            z_q, idx, loss = m(x, freeze_codebook=True)
            return z_q, idx, loss, {}
    elif kind == "fsq":
        m = FSQ(levels=list(case["levels"]))

        def call(x):
            z_q, idx = m(x)
            return z_q, idx, torch.zeros(()), {}
    else:
        m = LFQ(dim=case["bits"], entropy_loss_weight=ENTROPY, commitment_loss_weight=COMMITMENT,
                diversity_gamma=1.0)

        def call(x):
            (z_q, idx, loss), parts = m(x, inv_temperature=1.0 / TEMPERATURE,
                                        return_loss_breakdown=True)
            return z_q, idx, loss, {"per_sample_entropy": parts.per_sample_entropy,
                                    "batch_entropy": parts.batch_entropy}
    m.train()

    def forward():
        with torch.no_grad():
            return call(z)

    def forward_backward():
        x = z.detach().clone().requires_grad_(True)
        z_q, idx, loss, _ = call(x)
        total = loss + z_q.square().mean()
        total.backward()
        return total.detach(), idx, x.grad

    z_q, idx, loss, extra = forward()
    _, _, grad = forward_backward()
    outputs = {"z_q": z_q[0].numpy(), "indices": idx[0].numpy().astype(np.int64),
               "loss": float(loss), "grad": grad[0].numpy(),
               **{k: float(v) for k, v in extra.items()}}
    runs = {"fwd": forward, "fwd+bwd": forward_backward}
    return (lambda mode: runs[mode]()), outputs, {}


def _worker(side: str, conn, memory_bytes: int, repo: str) -> None:
    """Serve ``("case", case, arrays)`` (build + first outputs + warm-up), ``("time", mode, n)`` and
    ``None`` (exit). Errors go back as one line, the process stays usable."""
    import resource
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    if side == "ours":
        from common import device_name
        conn.send(("hello", {"device": device_name()}))
    else:
        conn.send(("hello", {}))
    run = None
    while (msg := conn.recv()) is not None:
        try:
            if msg[0] == "case":
                run = None
                _, case, arrays, warmup = msg
                run, outputs, info = (_ours(case, arrays) if side == "ours"
                                      else _theirs(case, arrays, repo))
                for mode in MODES:
                    for _ in range(warmup):
                        run(mode)
                info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                conn.send(("ready", (outputs, info)))
            else:
                _, mode, n = msg
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    run(mode)
                    times.append(time.perf_counter() - t0)
                conn.send(("times", times))
        except Exception as e:  # noqa: BLE001 - reported by the parent as one line
            run = None
            conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))


class Side:
    """One side's worker process (multiprocessing spawn) and its pipe."""

    def __init__(self, side: str, memory_bytes: int, repo: str = ""):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.side = side
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(side, child, memory_bytes, repo), daemon=True)
        self.proc.start()
        self.hello = self._recv()

    def ask(self, msg) -> tuple[str, object]:
        """Send ``msg`` and wait for the answer ``(tag, value)``."""
        self.conn.send(msg)
        return self._recv()

    def _recv(self) -> tuple[str, object]:
        """The next answer; a dead worker (killed, crashed) is an error, not a hang."""
        died = ("error", f"the {self.side} process died (exit code {{}})")
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                return died[0], died[1].format(self.proc.exitcode)
        try:
            return self.conn.recv()
        except EOFError:
            return died[0], died[1].format(self.proc.exitcode)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.kill()


# ---- numerics -----------------------------------------------------------------------------------
def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _grad_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def compare(case: dict, arrays: dict, ours: dict, theirs: dict) -> dict:
    """Agreement of the first outputs (see the module docstring); ``ok`` summarises it."""
    kind, a, b = case["kind"], ours["indices"].astype(np.int64), theirs["indices"].astype(np.int64)
    if kind == "lfq":   # theirs: dimension 0 is the most significant bit
        bits = case["bits"]
        b = sum(((b >> (bits - 1 - i)) & 1) << i for i in range(bits))
    same = a == b
    out = {"index_agreement": float(same.mean()), "index_mismatches": int((~same).sum())}
    if same.any():
        out["code_max_abs_diff"] = float(np.max(np.abs(ours["z_q"][same] - theirs["z_q"][same])))
        out["grad_rel_err"] = _grad_rel(ours["grad"][same], theirs["grad"][same])
    out["loss_rel_diff"] = _rel(ours["loss"], theirs["loss"]) if kind != "fsq" else 0.0
    for k in ("per_sample_entropy", "batch_entropy"):
        if k in ours and k in theirs:
            out[f"{k}_ours"], out[f"{k}_theirs"] = ours[k], theirs[k]
    if kind == "vq":
        ok_ties = True
        if not same.all():   # are the mismatches ties at float32 precision?
            x = arrays["z"][~same].astype(np.float64)
            e = arrays["codebook"].astype(np.float64)
            if case["l2"]:
                x = x / np.linalg.norm(x, axis=-1, keepdims=True)
            da = np.sum((x - e[a[~same]]) ** 2, -1)
            db = np.sum((x - e[b[~same]]) ** 2, -1)
            scale = np.sum(x * x, -1) + np.maximum(np.sum(e[a[~same]] ** 2, -1), np.sum(e[b[~same]] ** 2, -1))
            gap = np.abs(da - db) / scale
            out["mismatch_max_rel_gap"] = float(gap.max())
            ok_ties = bool(np.all(gap < 1e-5))
        out["mismatches_are_ties"] = ok_ties
        out["ok"] = ok_ties and out["index_agreement"] > 0.999 and out["loss_rel_diff"] < 1e-3 \
            and out.get("code_max_abs_diff", 0) < 1e-5 and out.get("grad_rel_err", 0) < 1e-4
    elif kind == "fsq":
        out["ok"] = bool(same.all()) and out["code_max_abs_diff"] < 1e-6 and out["grad_rel_err"] < 1e-5
    else:
        # theirs clamps p at 1e-5 inside its entropy logs: the entropies (loss, gradient) differ a little
        out["ok"] = bool(same.all()) and out["code_max_abs_diff"] < 1e-6 and out["loss_rel_diff"] < 0.05
    return out


def _agree_label(repo: str, check: dict | None, failed: bool) -> str | None:
    """The table's one-word summary of ``compare``."""
    if not repo:
        return None
    if failed or check is None:
        return "theirs failed"
    return f"{'ok' if check['ok'] else 'DIFF'} idx {check['index_agreement']:.4%}"


# ---- the run ------------------------------------------------------------------------------------
def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reference_version(repo: str) -> dict:
    info = {"path": os.path.abspath(repo)}
    try:
        info["commit"] = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    try:
        with open(os.path.join(repo, "pyproject.toml")) as f:
            info["version"] = next((l.split("=")[1].strip().strip('"') for l in f
                                    if l.startswith("version")), None)
    except OSError:
        info["version"] = None
    return info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference_repo", default="", help="vector-quantize-pytorch checkout (empty: ours only)")
    ap.add_argument("--only", nargs="+", default=["vq", "fsq", "lfq"], choices=["vq", "fsq", "lfq"])
    ap.add_argument("--vq_codes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--vq_tokens", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--vq_dim", type=int, default=12)
    ap.add_argument("--vq_metric", nargs="+", default=["l2", "euclid"], choices=["l2", "euclid"])
    ap.add_argument("--fsq_levels", nargs="+", default=["8,8,8,5,5,5", "8,5,5,5"])
    ap.add_argument("--fsq_tokens", type=int, nargs="+", default=[65536])
    ap.add_argument("--lfq_bits", type=int, default=18)
    ap.add_argument("--lfq_tokens", type=int, nargs="+", default=[16384])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed calls per side, pair and mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per mode after the first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory_gb", type=float, default=0.0,
                    help="RLIMIT_DATA of each side (0: 85%% of MemAvailable)")
    ap.add_argument("--small", action="store_true",
                    help="smallest sizes (a smoke test): 256 codes, 512 tokens, 10-bit LFQ, 1 step")
    args = ap.parse_args(argv)
    if args.small:
        args.vq_codes, args.vq_tokens, args.vq_dim = [256], [512], 8
        args.fsq_tokens, args.lfq_bits, args.lfq_tokens = [1024], 10, [512]
        args.pairs, args.steps, args.warmup = 2, 1, 0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    repo = args.reference_repo
    if repo and not os.path.isfile(os.path.join(repo, "vector_quantize_pytorch", "__init__.py")):
        raise SystemExit(f"vs_quantizers: {repo!r} is not a vector-quantize-pytorch checkout "
                         "(no vector_quantize_pytorch/__init__.py)")
    memory = int(args.memory_gb * 2**30) if args.memory_gb > 0 else int(0.85 * _mem_available())
    ours = Side("ours", memory)
    if ours.hello[0] != "hello":
        raise SystemExit(f"vs_quantizers: the ours side failed: {ours.hello[1]}")
    rows, checks, errors = [], {}, {}
    try:
        for case in make_cases(args):
            key = f"{case['name']}@{case['tokens']}"
            arrays = case_arrays(case, args.seed)
            tag, value = ours.ask(("case", case, arrays, args.warmup))
            if tag == "error":
                raise SystemExit(f"vs_quantizers: ours failed on {key}: {value}")
            ours_out, ours_info = value
            theirs, theirs_info = None, {}
            if repo:
                theirs = Side("theirs", memory, repo)
                tag, value = theirs.ask(("case", case, arrays, args.warmup))
                if tag == "error":
                    errors[key] = value + (f" (memory limit {memory / 2**30:.1f} GiB, --memory_gb)"
                                           if "allocat" in value else "")
                    theirs.close()
                    theirs = None
                else:
                    theirs_out, theirs_info = value
                    checks[key] = compare(case, arrays, ours_out, theirs_out)
            for mode in MODES:
                row = {"case": case["name"], "tokens": case["tokens"], "mode": mode,
                       "ours_s": [], "theirs_s": [], "ratios": []}
                for _ in range(args.pairs):
                    tag, t = ours.ask(("time", mode, args.steps))
                    if tag == "error":
                        raise SystemExit(f"vs_quantizers: ours failed on {key}: {t}")
                    row["ours_s"].append(statistics.median(t))
                    if theirs is not None:
                        tag, t = theirs.ask(("time", mode, args.steps))
                        if tag == "error":
                            errors[key] = t
                            theirs.close()
                            theirs = None
                            continue
                        row["theirs_s"].append(statistics.median(t))
                        row["ratios"].append(row["theirs_s"][-1] / row["ours_s"][-1])
                n = case["tokens"]
                row["ours_tokens_per_s"] = n / statistics.median(row["ours_s"])
                row["theirs_tokens_per_s"] = (n / statistics.median(row["theirs_s"])
                                              if row["theirs_s"] else None)
                row["ratio"] = statistics.median(row["ratios"]) if row["ratios"] else None
                row["ours_xla_mb"] = ours_info.get(f"xla_mb_{mode}")
                row["theirs_peak_rss_mb"] = theirs_info.get("peak_rss_mb")
                row["agree"] = _agree_label(repo, checks.get(key), key in errors)
                rows.append(row)
                print(f"[vs_quantizers] {key} {mode}: ours {row['ours_tokens_per_s']:.4g} tok/s"
                      + (f", theirs {row['theirs_tokens_per_s']:.4g} tok/s, ratio {row['ratio']:.3g}"
                         if row["ratio"] is not None else ""), file=sys.stderr, flush=True)
            if theirs is not None:
                theirs.close()
    finally:
        ours.close()
    from common import print_json_last, print_table
    print(f"device: {ours.hello[1]['device']}  threads: {os.cpu_count()}  "
          f"reference: {repo or 'none (ours only)'}")
    print_table(rows, ["case", "tokens", "mode", "ours_tokens_per_s", "theirs_tokens_per_s", "ratio",
                       "agree"])
    for key, msg in errors.items():
        print(f"theirs failed on {key}: {msg}")
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    result = {"device": ours.hello[1]["device"], "cpu_count": os.cpu_count(),
              "reference": _reference_version(repo) if repo else None,
              "settings": {k: v for k, v in vars(args).items() if k != "reference_repo"},
              "memory_limit_gb": memory / 2**30, "rows": rows, "numerics": checks,
              "theirs_errors": errors,
              "median_ratio": statistics.median(ratios) if ratios else None}
    print_json_last(result)
    return result


if __name__ == "__main__":
    main()
