"""The extractor's measurements (issue 16; BENCHMARKS.md, "Extractor"), on this machine.

  python benchmarks/extractor.py speed       # training step at MAE ratio r vs r = 0, encoder FLOPs
  python benchmarks/extractor.py evaluate NAME=WORKDIR ... [--out results.json]

``speed``: the trainer's own step (``common.StepBench``) of ``configs/extractor.py:tiny`` with
``masking.encoder_ratios`` fixed to one ratio, timed in alternating blocks (ratios of medians: this
machine is noisy), and XLA's cost analysis of the encoder alone (``Extractor.latents`` on the kept
patches) at ``tiny`` and the published ``bl128`` for r = 0, 0.25, 0.5, 0.75, 1.

``evaluate``: for each trained workdir (``load_tokenizer``),
- held-out PSNR of decodes from the first k tokens, k = 1, 2, 4, ..., N (prefixes: variable-length
  tokenizers only; the others at k = N), on 15 crops of the three held-out sample photographs;
- linear-probe accuracy of ``tok.features`` (the N pre-quantisation tokens, flattened) on three
  labelled sets that ship with scikit-image, beside raw pixels at the same 64 px and an 8 x 8
  thumbnail: ``faces`` (its ``lfw_subset``: 100 faces / 100 non-faces, 25 px, 5-fold
  cross-validation), ``textures`` (brick / grass / gravel: crops of the top half train, the bottom
  half test) and ``heldout`` (which of chelsea / coffee / rocket a crop comes from: left half
  trains, right half tests). The probe is a ridge classifier (one-vs-rest least squares on
  standardised features, its penalty chosen by 5-fold cross-validation inside the training split).

``benchmarks/extractor_ablation.sh`` trains the workdirs of the ablation table and runs ``evaluate``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)

SIZE = 64
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
LAMBDAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


# ---- data ---------------------------------------------------------------------------------------
def _resize(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """uint8 / float [H, W(, 3)] -> float32 [size, size, 3] in [0, 1] (PIL bicubic)."""
    from PIL import Image
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    out = Image.fromarray(a[..., :3]).resize((size, size), Image.BICUBIC)
    return np.asarray(out, np.float32) / 255.0


def _crops(image: np.ndarray, rng: np.random.Generator, count: int, frac: float,
           rows: tuple[float, float] = (0, 1), cols: tuple[float, float] = (0, 1)) -> np.ndarray:
    """``count`` random squares of ``frac`` of the shorter side inside the given fraction of the
    rows / columns, resized to ``SIZE``."""
    h, w = image.shape[:2]
    side = int(frac * min(h, w))
    r0, r1 = int(rows[0] * h), int(rows[1] * h) - side
    c0, c1 = int(cols[0] * w), int(cols[1] * w) - side
    out = []
    for _ in range(count):
        y = int(rng.integers(r0, max(r0, r1) + 1))
        x = int(rng.integers(c0, max(c0, c1) + 1))
        out.append(_resize(image[y:y + side, x:x + side]))
    return np.stack(out)


def heldout_crops() -> np.ndarray:
    """15 crops of the held-out sample photographs: each one's centre square and four corner
    squares of 60% of the shorter side (float32 [15, 64, 64, 3])."""
    from titok_jax.data import EVAL_IMAGES, load_sample_image
    out = []
    for name in EVAL_IMAGES:
        im = load_sample_image(name)
        h, w = im.shape[:2]
        s = min(h, w)
        y, x = (h - s) // 2, (w - s) // 2
        out.append(_resize(im[y:y + s, x:x + s]))
        c = int(0.6 * s)
        for y, x in ((0, 0), (0, w - c), (h - c, 0), (h - c, w - c)):
            out.append(_resize(im[y:y + c, x:x + c]))
    return np.stack(out)


def probe_sets() -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
    """name -> folds of (train images, train labels, test images, test labels)."""
    import skimage.data as skd

    from titok_jax.data import EVAL_IMAGES, load_sample_image
    rng = np.random.default_rng(0)
    sets = {}
    faces = skd.lfw_subset()                     # 100 faces then 100 non-faces
    x = np.stack([_resize(f) for f in faces])
    y = np.repeat(np.arange(2), 100)
    order = rng.permutation(len(x))
    folds = np.array_split(order, 5)
    sets["faces"] = [(x[np.setdiff1d(order, f)], y[np.setdiff1d(order, f)], x[f], y[f]) for f in folds]

    def split_set(images, train_region, test_region, per_class=48):
        xtr, ytr, xte, yte = [], [], [], []
        for label, im in enumerate(images):
            xtr.append(_crops(im, rng, per_class, 0.3, **train_region))
            xte.append(_crops(im, rng, per_class, 0.3, **test_region))
            ytr += [label] * per_class
            yte += [label] * per_class
        return [(np.concatenate(xtr), np.array(ytr), np.concatenate(xte), np.array(yte))]

    textures = [skd.brick(), skd.grass(), skd.gravel()]
    sets["textures"] = split_set(textures, {"rows": (0, 0.5)}, {"rows": (0.5, 1)})
    photos = [load_sample_image(n) for n in EVAL_IMAGES]
    sets["heldout"] = split_set(photos, {"cols": (0, 0.5)}, {"cols": (0.5, 1)})
    return sets


# ---- the probe ------------------------------------------------------------------------------------
def _ridge_fit(x: np.ndarray, y: np.ndarray, lam: float, classes: int) -> tuple[np.ndarray, ...]:
    """Standardise, then the dual ridge solution (n << d here): returns (mean, std, alpha, x)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    targets = 2.0 * np.eye(classes)[y] - 1.0
    gram = z @ z.T / z.shape[1]
    alpha = np.linalg.solve(gram + lam * np.eye(len(z)) / len(z), targets)
    return mean, std, alpha, z


def _ridge_predict(model: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    mean, std, alpha, z = model
    return np.argmax(((x - mean) / std) @ z.T / z.shape[1] @ alpha, axis=1)


def probe_accuracy(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> float:
    """Test accuracy of the ridge classifier whose penalty won 5-fold CV on the training split."""
    xtr, xte = xtr.reshape(len(xtr), -1).astype(np.float64), xte.reshape(len(xte), -1).astype(np.float64)
    classes = int(max(ytr.max(), yte.max())) + 1
    folds = np.array_split(np.random.default_rng(1).permutation(len(xtr)), 5)
    best, best_lam = -1.0, LAMBDAS[0]
    for lam in LAMBDAS:
        acc = np.mean([np.mean(_ridge_predict(_ridge_fit(np.delete(xtr, f, 0), np.delete(ytr, f),
                                                         lam, classes), xtr[f]) == ytr[f])
                       for f in folds])
        if acc > best:
            best, best_lam = acc, lam
    return float(np.mean(_ridge_predict(_ridge_fit(xtr, ytr, best_lam, classes), xte) == yte))


def probe(featurize, sets) -> dict[str, float]:
    return {name: float(np.mean([probe_accuracy(featurize(a), b, featurize(c), d)
                                 for a, b, c, d in folds]))
            for name, folds in sets.items()}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.clip(a, 0, 1).astype(np.float64) - b) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def evaluate(runs: dict[str, str]) -> dict:
    from titok_jax.api import load_tokenizer
    images = heldout_crops()
    sets = probe_sets()
    results = {"pixels": {"probe": probe(lambda x: x, sets)},
               "pixels_8x8": {"probe": probe(lambda x: np.stack([_resize(i, 8) for i in x]), sets)}}
    for name, workdir in runs.items():
        t0 = time.perf_counter()
        tok = load_tokenizer(workdir)
        ids = tok.encode(images)
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < tok.num_tokens] + [tok.num_tokens]
        if not tok.variable_length:
            ks = [tok.num_tokens]
        prefix = {k: _psnr(tok.decode(ids[:, :k]), images) for k in ks}
        acc = probe(lambda x: tok.features(x)[0], sets)
        results[name] = {"workdir": workdir, "num_tokens": tok.num_tokens,
                         "prefix_psnr": prefix, "probe": acc, "seconds": time.perf_counter() - t0}
        print(f"{name}: PSNR by prefix {', '.join(f'{k}: {v:.2f}' for k, v in prefix.items())}; "
              f"probe {', '.join(f'{s} {v:.3f}' for s, v in acc.items())}", flush=True)
    for name in ("pixels", "pixels_8x8"):
        print(f"{name}: probe {', '.join(f'{s} {v:.3f}' for s, v in results[name]['probe'].items())}")
    return results


# ---- speed --------------------------------------------------------------------------------------
def _config(variant: str, ratio: float | None = None):
    import importlib.util
    spec = importlib.util.spec_from_file_location("configs_extractor", os.path.join(ROOT, "configs", "extractor.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(variant)
    if ratio is not None:
        cfg.masking.encoder_ratios = (float(ratio),)
        cfg.masking.encoder_probs = ()
    return cfg


def encoder_flops(variant: str, batch: int = 1) -> dict[float, float]:
    """GFLOP of ``Extractor.latents`` on ``batch`` images with each ratio's kept patches."""
    import jax
    import jax.numpy as jnp

    from titok_jax.models.extractor_masking import keep_counts
    from titok_jax.models.registry import build_model
    from train_step import step_flops
    model = build_model(_config(variant).model, dtype="float32")
    x = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x.shape, x.dtype))
    out = {}
    for ratio, n in zip(RATIOS, keep_counts(RATIOS, model.num_patches)):
        keep = jax.ShapeDtypeStruct((batch, n), jnp.int32)
        fn = jax.jit(lambda p, im, k: model.apply(p, im, k, method=model.latents))
        out[ratio] = step_flops(fn.lower(params, x, keep).compile()) / 1e9
    return out


def published_step_gflop(ratio: float, batch: int = 2) -> float:
    """GFLOP per image of the published ``bl128`` training step (XLA's cost analysis of the
    trainer's AOT-compiled step, ``train --dry_run``) with the MAE ratio fixed to ``ratio``; random
    stand-ins for the REPA teacher and the LPIPS weights (shapes are all the FLOPs need)."""
    from scale import _random_lpips

    from titok_jax.train.memory import dry_run
    cfg = _config("bl128", ratio)
    cfg.batch_size = batch
    cfg.repa.teacher.allow_random = True
    work = os.path.join("/tmp", "titok_jax_scale")
    os.makedirs(work, exist_ok=True)
    cfg.losses.perceptual_weights = _random_lpips(work)
    return float(dry_run(cfg)["flops_per_device"]) / 1e9 / batch


def speed(steps: int, rounds: int, batch: int) -> dict:
    from common import StepBench, device_name
    from train_step import step_flops
    benches = {r: StepBench(_config("tiny", r), batch) for r in (0.0, 0.75)}
    times = {r: [] for r in benches}
    for b in benches.values():
        b.time(1)
    for _ in range(rounds):
        for r, b in benches.items():
            times[r] += b.time(steps)
    med = {r: float(np.median(t)) for r, t in times.items()}
    result = {
        "device": device_name(), "batch": batch,
        "step_s": med, "step_ratio_075_over_0": med[0.75] / med[0.0],
        "step_gflop": {r: (step_flops(b.compiled) or 0) / 1e9 for r, b in benches.items()},
        "encoder_gflop": {v: encoder_flops(v) for v in ("tiny", "bl128")},
        "bl128_step_gflop_per_image": {r: published_step_gflop(r) for r in (0.0, 0.75)},
    }
    print(f"tiny training step, batch {batch}: r=0 {med[0.0] * 1e3:.1f} ms, r=0.75 "
          f"{med[0.75] * 1e3:.1f} ms -> {result['step_ratio_075_over_0']:.3f}x")
    for v, f in result["encoder_gflop"].items():
        print(f"encoder GFLOP per image, {v}: " + ", ".join(f"r={r}: {g:.3f}" for r, g in f.items())
              + f" (r=0.75 / r=0: {f[0.75] / f[0.0]:.3f})")
    f = result["bl128_step_gflop_per_image"]
    print(f"bl128 training step GFLOP per image: r=0 {f[0.0]:.1f}, r=0.75 {f[0.75]:.1f} "
          f"({f[0.75] / f[0.0]:.3f}x)")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--out", default="")
    e = sub.add_parser("evaluate")
    e.add_argument("runs", nargs="+", help="NAME=WORKDIR")
    e.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.command == "speed":
        result = speed(args.steps, args.rounds, args.batch)
    else:
        runs = {}
        for item in args.runs:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                parser.error(f"expected NAME=WORKDIR, got {item!r}")
            runs[name] = path
        result = evaluate(runs)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
