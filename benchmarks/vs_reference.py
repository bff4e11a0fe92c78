"""Side by side on one machine: our TiTok training step against the official PyTorch one
(bytedance/1d-tokenizer), same published size, same batch, same loss, A B A B.

    python benchmarks/vs_reference.py --config configs/titok.py:bl64_vq --batch 2 \\
        --reference_repo PATH/TO/1d-tokenizer [--pairs 3 --steps 2] [--config.KEY=VALUE ...]

The step on both sides: reconstruction MSE + the VQ loss (codebook + 0.25 commitment), AdamW
(lr 1e-4, betas (0.9, 0.999), weight decay 1e-4), gradient clipping at 1.0; no LPIPS, no GAN, no
EMA (``losses.perceptual_weight``, ``losses.gan_weight`` and ``optimizer.ema_decay`` are set to 0 on
our side), float32 on CPU (``compute_dtype`` auto). Random images in [0, 1] and random init on
both sides (speed does not depend on the values). The official model is built from the checkout
with ``tests/data/titok/make_vectors.py``'s loader (nothing of it is copied here); torch and
omegaconf come from the ``reference`` extra (``pip install -e .[reference]``). Each pair times ``--steps`` of ours then ``--steps`` of theirs after
compilation / warm-up, each side in its own process (so torch's and XLA's threads never compete);
the ratio is ours over theirs in images/s, per pair and its median.
Without ``--reference_repo`` only ours is timed. Last line: JSON with every pair.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/titok.py:<single-stage variant>",
                                lock_config=False)
flags.DEFINE_integer("batch", 2, "global batch")
flags.DEFINE_integer("pairs", 3, "A B pairs")
flags.DEFINE_integer("steps", 2, "timed steps per side and pair")
flags.DEFINE_integer("warmup", 1, "untimed steps per side before the first pair")
flags.DEFINE_string("reference_repo", "", "checkout of bytedance/1d-tokenizer (empty: ours only)")

SIZE_NAMES = {(512, 8, 8): "small", (768, 12, 12): "base", (1024, 24, 16): "large"}


def official_step(repo: str, model_cfg, batch: int):
    """The official TiTok of ``model_cfg``'s size and its training step as a closure."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "data", "titok"))
    import make_vectors  # the test-vector script's loader of the official modules
    torch, titok = make_vectors.import_official(os.path.abspath(repo))
    m = model_cfg
    q = dict(m.quantizer)
    if q.get("name") != "vq" or m.get("is_legacy", False):
        raise app.UsageError("vs_reference times the single-stage VQ TiTok (bl64_vq, bl128_vq, ...)")
    enc = SIZE_NAMES[(m.encoder_width, m.encoder_depth, m.encoder_heads)]
    dec = SIZE_NAMES[(m.decoder_width, m.decoder_depth, m.decoder_heads)]
    vq = {"codebook_size": q["codebook_size"], "token_size": m.token_size,
          "use_l2_norm": bool(q.get("l2_normalize", False)),
          "commitment_cost": float(q.get("commitment_weight", 0.25)),
          "vit_enc_model_size": enc, "vit_dec_model_size": dec,
          "vit_enc_patch_size": m.patch_size, "vit_dec_patch_size": m.patch_size,
          "num_latent_tokens": m.num_latent_tokens, "finetune_decoder": False,
          "quantize_mode": "vq", "is_legacy": False}
    conf = {"experiment": {"tokenizer_checkpoint": "none.bin", "output_dir": "none"},
            "model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": m.image_size}}}
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = titok.TiTok(conf)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    x = torch.rand(batch, 3, m.image_size, m.image_size)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        recon, result = model(x)
        loss = torch.nn.functional.mse_loss(recon, x) + result["quantizer_loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    params = sum(p.numel() for p in model.parameters()) / 1e6
    return step, params


def _worker(kind: str, payload: dict, conn) -> None:
    """One side in its own process: build, warm up, then time ``n`` steps per request (``None``
    ends). Separate processes keep torch's OpenMP threads and XLA's thread pool from competing
    (in one process ours measured 12.4 s/step against 10.1 s alone)."""
    try:
        import ml_collections
        if kind == "ours":
            from common import StepBench
            bench = StepBench(ml_collections.ConfigDict(payload["config"]), payload["batch"])
            step, info = (lambda: bench.time(1)[0]), {"params_M": bench.params_millions(),
                                                     "compile_s": bench.compile_s}
        else:
            theirs, params = official_step(payload["repo"],
                                           ml_collections.ConfigDict(payload["model"]),
                                           payload["batch"])

            def step() -> float:
                t0 = time.perf_counter()
                theirs()
                return time.perf_counter() - t0
            info = {"params_M": params}
        for _ in range(payload["warmup"]):
            step()
        conn.send(("ready", info))
        while (n := conn.recv()) is not None:
            conn.send(("times", [step() for _ in range(n)]))
    except Exception as e:  # noqa: BLE001 - reported by the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))


def main(argv):
    del argv
    import multiprocessing as mp

    from common import device_name

    cfg = flags.FLAGS.config
    with cfg.unlocked():
        cfg.losses.perceptual_weight = 0.0
        cfg.losses.gan_weight = 0.0
        cfg.optimizer.ema_decay = 0.0
    batch, steps, warmup = int(flags.FLAGS.batch), int(flags.FLAGS.steps), int(flags.FLAGS.warmup)
    ctx = mp.get_context("spawn")
    sides = {"ours": {"config": cfg.to_dict(), "batch": batch, "warmup": warmup}}
    if flags.FLAGS.reference_repo:
        sides["official"] = {"repo": flags.FLAGS.reference_repo, "model": cfg.model.to_dict(),
                             "batch": batch, "warmup": warmup}
    conns, procs, info = {}, [], {}
    for kind, payload in sides.items():   # built one after the other: no overlap in the timings
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(kind, payload, child), daemon=True)
        proc.start()
        tag, value = parent.recv()
        if tag == "error":
            raise SystemExit(f"vs_reference: the {kind} side failed: {value}")
        conns[kind], info[kind] = parent, value
        procs.append(proc)
    pairs = []
    for i in range(int(flags.FLAGS.pairs)):
        row = {"pair": i}
        for kind, conn in conns.items():
            conn.send(steps)
            tag, value = conn.recv()
            if tag == "error":
                raise SystemExit(f"vs_reference: the {kind} side failed: {value}")
            row[f"{kind}_s"] = statistics.median(value)
        if "official_s" in row:
            row["ratio"] = row["official_s"] / row["ours_s"]
        pairs.append(row)
        print(f"[vs_reference] pair {i}: ours {row['ours_s']:.3f} s/step"
              + (f", official {row['official_s']:.3f} s/step, ours/official images/s "
                 f"{row['ratio']:.3f}" if "ratio" in row else ""), file=sys.stderr)
    for conn in conns.values():
        conn.send(None)
    for proc in procs:
        proc.join(timeout=60)
    ratios = [p["ratio"] for p in pairs if "ratio" in p]
    out = {"config": f"{cfg.family}:{cfg.variant}", "batch": batch, "device": device_name(),
           "ours_params_M": info["ours"]["params_M"],
           "official_params_M": info.get("official", {}).get("params_M"),
           "compile_s": info["ours"]["compile_s"], "pairs": pairs,
           "median_ratio": statistics.median(ratios) if ratios else None}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
