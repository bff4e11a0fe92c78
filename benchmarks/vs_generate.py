"""Side by side on one machine: our MaskGIT generator sampling against the official
bytedance/1d-tokenizer MaskGIT ``generate``, same size, steps, guidance and batch, A B A B.

    python benchmarks/vs_generate.py --config configs/maskgit.py:titok_b64 --batch 2 \\
        --reference_repo PATH/TO/1d-tokenizer --reference_path DIR_WITH_transformers \\
        [--pairs 3 --calls 2] [--steps N] [--config.KEY=VALUE ...]

What is timed, per call (random weights: speed does not depend on values; class labels
``arange(B) % num_classes``):

- ours: ``titok_jax.generation.Generator.sample(labels, seed=)`` - what ``load_generator(DIR)``
  gives a user: the task's ``sample``, i.e. the jitted ``generate_tokens`` (the whole sampler in
  one ``lax.fori_loop``/scan: each step one batched conditional + unconditional forward, Gumbel
  sampling, arccos re-masking) and the copy of the ids to host numpy. Model built by the task from
  the config (``task.init``, random). Compilation is the first, untimed call.
- official: ``ImageBert.generate`` / ``UViTBert.generate`` (``modeling/maskgit.py``, under its own
  ``@torch.no_grad``) with ``guidance_scale``, ``guidance_decay``, ``guidance_scale_pow``,
  ``randomize_temperature``, ``num_sample_steps`` set from our sampler settings (each step a
  conditional and a separate unconditional forward when guidance is on), ids to numpy. The model
  is built by ``tests/data/maskgit_gen/make_vectors.py``'s loader of the checkout (``import_official``
  + ``generator_config``: the released config layout) at our size, in ``eval()`` mode (no
  dropout). The official ImageBert is a Hugging Face ``BertModel``: it needs ``transformers``
  (released with 4.4x), given to the official process only by ``--reference_path``.

Sizes and sampler: the config's ``generator.sampler`` (the published ``configs/infer/TiTok``
settings for ``titok_l32`` / ``titok_b64`` / ``titok_s128``); ``--steps`` / ``--guidance_scale``
override both sides. Used in BENCHMARKS.md (2-core CPU): ``titok_b64`` (ImageBert 768 x 24, 64
tokens of 4096 codes, 8 steps, guidance 3.0 linear, temperature 11) and ``titok_s128`` (UViT 1024 x
20+1, 128 tokens, power-cosine guidance 6.9, temperature 2.8) at 8 steps instead of its published 64.

Each side runs in its own process (benchmarks/side_by_side.py), built one after the other; each
pair times ``--calls`` calls of ours then of theirs (median per block); ratio = ours / official in
images/s, per pair and the median over pairs. Float32 on both sides. Without ``--reference_repo``
only ours is timed. Last line: JSON.
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

# our sampler setting -> the official generate's argument
OFFICIAL_ARGS = {"steps": "num_sample_steps", "guidance_scale": "guidance_scale",
                 "guidance_schedule": "guidance_decay", "guidance_power": "guidance_scale_pow",
                 "randomize_temperature": "randomize_temperature",
                 "softmax_temperature_annealing": "softmax_temperature_annealing"}
# settings the official sampler has fixed: arccos re-masking on the logit confidence
FIXED = {"mask_schedule": "arccos", "confidence": "logits"}


def ours(p: dict):
    """``Generator.sample`` of a randomly initialised generator of ``p["config"]``."""
    import flax.linen as nn
    import jax
    import ml_collections
    import numpy as np

    from titok_jax.generation import Generator
    from titok_jax.tasks import get_task

    cfg = ml_collections.ConfigDict(p["config"])
    task = get_task(cfg, inference=True)
    params = nn.unbox(jax.jit(task.init)(jax.random.key(0))[0])["model"]
    gen = Generator(task, params, cfg, step=0)
    labels = np.arange(p["batch"]) % max(gen.num_classes, 1)
    seed = iter(range(1 << 30))

    def call():
        return gen.sample(labels, seed=next(seed), batch_size=p["batch"], **p["sampler"])

    t0 = time.perf_counter()
    ids = call()                                      # compiles
    compile_s = time.perf_counter() - t0
    assert ids.shape == (p["batch"], gen.num_tokens), ids.shape
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    from common import device_name
    return call, {"params_M": n / 1e6, "compile_s": compile_s, "device": device_name(),
                  "sampler": {**gen.sampler, **p["sampler"]}}


def official(p: dict):
    sys.path[:0] = list(p["reference_path"])
    sys.path.insert(0, os.path.join(ROOT, "tests", "data", "maskgit_gen"))
    import make_vectors as mg   # the fidelity script's loader of the official modules
    from omegaconf import OmegaConf
    torch, maskgit = mg.import_official(os.path.abspath(p["repo"]))
    torch.set_num_threads(int(p.get("torch_threads") or os.cpu_count() or 1))
    m, sampler = p["model"], p["sampler"]
    for key, want in FIXED.items():
        if sampler.get(key, want) != want:
            raise ValueError(f"the official sampler has {key}={want!r}, ours {sampler[key]!r}")
    arch = {"vit": "ImageBert", "uvit": "UViTBert"}[m.get("arch", "vit")]
    c = dict(cls=arch, codebook=int(m["codebook_size"]), classes=int(m["num_classes"]),
             tokens=int(m["num_tokens"]), hidden=int(m["width"]), layers=int(m["depth"]),
             heads=int(m["num_heads"]), intermediate=int(round(m["width"] * m.get("mlp_ratio", 4.0))),
             dropout=float(m.get("dropout", 0.0)))
    torch.manual_seed(0)
    model = getattr(maskgit, arch)(OmegaConf.create(mg.generator_config(c))).eval()
    kwargs = {OFFICIAL_ARGS[k]: v for k, v in sampler.items() if k in OFFICIAL_ARGS}
    labels = torch.arange(p["batch"]) % max(c["classes"], 1)
    torch.manual_seed(1)

    def call():
        return model.generate(labels.clone(), **kwargs).numpy()

    ids = call()
    assert ids.shape == (p["batch"], c["tokens"]), ids.shape
    return call, {"params_M": sum(q.numel() for q in model.parameters()) / 1e6,
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "generate_kwargs": kwargs}


def main(argv):
    del argv
    from absl import flags

    from side_by_side import load_avg, run_pairs, summary

    F = flags.FLAGS
    cfg = F.config
    if cfg.task.name != "maskgit":
        raise SystemExit(f"vs_generate times MaskGIT generators, not {cfg.family}:{cfg.variant}")
    sampler = dict(cfg.generator.sampler)
    if F.steps is not None:
        sampler["steps"] = int(F.steps)
    if F.guidance_scale is not None:
        sampler["guidance_scale"] = float(F.guidance_scale)
    unknown = set(sampler) - set(OFFICIAL_ARGS) - set(FIXED)
    if unknown:
        raise SystemExit(f"no official counterpart for sampler settings {sorted(unknown)}")
    common = {"batch": int(F.batch), "sampler": sampler}
    sides = {"ours": ("vs_generate:ours", dict(common, config=cfg.to_dict()))}
    if F.reference_repo:
        if not os.path.isfile(os.path.join(F.reference_repo, "modeling", "maskgit.py")):
            raise SystemExit(f"--reference_repo {F.reference_repo} is not a 1d-tokenizer checkout "
                             "(no modeling/maskgit.py)")
        sides["official"] = ("vs_generate:official",
                             dict(common, repo=F.reference_repo, model=cfg.model.to_dict(),
                                  reference_path=[x for x in F.reference_path if x],
                                  torch_threads=int(F.torch_threads)))
    load_before = load_avg()
    info, rows = run_pairs(sides, pairs=int(F.pairs), calls=int(F.calls), warmup=int(F.warmup),
                           batch=int(F.batch), build_together=bool(F.build_together), tag="vs_generate")
    b = int(F.batch)
    out = {"config": f"{cfg.family}:{cfg.variant}", "batch": b, "sampler": sampler,
           "calls": int(F.calls), "device": info["ours"]["device"], "cpu_count": os.cpu_count(),
           "ours": info["ours"], "official": info.get("official"), "pairs": rows,
           "ours_images_per_s": b / statistics.median(r["ours_s"] for r in rows),
           "official_images_per_s": (b / statistics.median(r["official_s"] for r in rows)
                                     if "official" in info else None),
           "median_ratio": summary(rows), "load_before": load_before, "load_after": load_avg()}
    print(json.dumps(out), flush=True)


def _define_flags():
    from absl import flags
    from side_by_side import define_pair_flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/maskgit.py:<variant>", lock_config=False)
    flags.DEFINE_integer("batch", 2, "images (label rows) per sampling call")
    flags.DEFINE_integer("steps", None, "sampler steps (default: the config's)")
    flags.DEFINE_float("guidance_scale", None, "guidance scale (default: the config's; 0 = off)")
    define_pair_flags(2, "sampling", "bytedance/1d-tokenizer", "transformers")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
