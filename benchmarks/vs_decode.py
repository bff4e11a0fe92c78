"""Side by side on one machine: our FlowMo / FlexTok rectified-flow *decode* (token ids -> images)
against the official PyTorch decode, same size, steps, guidance and batch, A B A B.

    python benchmarks/vs_decode.py --config configs/flowmo.py:lo --batch 1 --steps 4 \\
        --reference_repo PATH/TO/FlowMo [--pairs 3 --calls 1] [--config.KEY=VALUE ...]
    python benchmarks/vs_decode.py --config configs/flextok.py:d18_d18 --batch 1 --steps 4 \\
        --reference_repo PATH/TO/ml-flextok --reference_path DIR_WITH_hydra_diffusers \\
        [--pairs 3 --calls 1]

What is timed, per call (random weights, random token ids: speed does not depend on values):

- ours: ``titok_jax.api.Tokenizer.decode(ids, steps=, guidance=, seed=)`` - what a user calls:
  the task's jitted ``decode`` (token lookup, ``steps`` network calls in one ``lax.scan`` with the
  guided / unguided branch picked by ``lax.cond``, FlexTok's VAE decoder, clip to [0, 1]) and the
  copy of the images to host numpy; the model built by the task from the config (``task.init``,
  randomly initialised; FlexTok's frozen VAE random too). Compilation is the first, untimed call.
- FlowMo, official (kylesargent/FlowMo ``flowmo/models.py``): ``rf_sample(model, z, code,
  null_code, sample_steps, cfg, schedule="pow_0.25")[-1]`` with ``z ~ N(0, I)`` and the code built
  as ``FlowMo.reconstruct`` builds it (``reconstruct`` itself calls ``.cuda()``), the published
  CFG interval ``(.17, 1.02)``; mapped to [0, 1] and to numpy. CFG outside that interval is the
  conditional pass only, on both sides. The model comes from ``tests/data/flowmo/make_vectors.py``
  (its ``mup`` stub = plain linear readouts at width multiplier 1, ``torch.compiler.set_stance(
  "force_eager")``: the official ``decode`` is ``@torch.compile``d, which on CPU would need a C++
  toolchain; eager runs the same maths), with the ``dit_b_4`` zoo entry rescaled so that its width
  multipliers give our widths (published ``lo``: encoder 768 = 4 x 192, decoder 1152 = 6 x 192,
  12 heads, RoPE axes 8/28/28 x width / 4 - the released config's shapes).
- FlexTok, official (apple/ml-flextok): ``FlexTok.detokenize(ids, timesteps=, guidance_scale=,
  perform_norm_guidance=True)`` (the pipeline's Euler steps with APG, conditional and
  unconditional passes, then the SD-VAE decoder), mapped to [0, 1] and to numpy. The model is
  ``hydra.utils.instantiate`` of ``tests/data/flextok/make_vectors.py``'s release-shaped config
  with our sizes (widths, depths, head dim 64, 256 registers, FSQ [8,8,8,5,5,5], 2x2 patches of
  the 16-channel f8 VAE latent, the VAE's blocks 128/256/512/512 x 2 - the released d18-d18's
  shapes), SDPA attention with a materialised mask instead of flex attention (the official
  fallback; flex attention needs a GPU or a compile). It needs hydra-core, diffusers and einops:
  ``--reference_path`` puts directories on ``sys.path`` in the official process only.

Each side runs in its own process (benchmarks/side_by_side.py), built one after the other; each
pair times ``--calls`` calls of ours then of theirs (median per block); ratio = ours / official in
images/s, per pair and the median over pairs. Float32 on both sides (our ``compute_dtype`` auto is
float32 on CPU; torch's default). Without ``--reference_repo`` only ours is timed. Last line: JSON.

Published sizes used in BENCHMARKS.md (2-core CPU): FlowMo-Lo (``flowmo.py:lo``: 256 px, patch 4,
256 x 18-bit tokens, encoder 768 x 8, decoder 1152 x 16) and FlexTok d18-d18 (256 px, 256
registers), batch 1, 4 Euler steps, published guidance (FlowMo CFG 1.5 on its interval: 1 of the 4
steps guided; FlexTok APG 7.5 on every step).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

DEFAULT_GUIDANCE = {"flowmo": 1.5, "flextok": 7.5}   # the models' published sampler settings


# ---- ours (its own process) -------------------------------------------------------------------
def ours(p: dict):
    """``Tokenizer.decode`` of a randomly initialised tokenizer of ``p["config"]``."""
    import flax.linen as nn
    import jax
    import ml_collections
    import numpy as np

    from titok_jax.api import Tokenizer
    from titok_jax.tasks import get_task

    cfg = ml_collections.ConfigDict(p["config"])
    task = get_task(cfg, inference=True)
    params, state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    tok = Tokenizer(task, params["model"], state.get("model", {}), config=cfg,
                    batch_size=p["batch"])
    ids = np.random.default_rng(0).integers(0, tok.codebook_size, (p["batch"], tok.num_tokens))
    seed = iter(range(1 << 30))

    def call():
        return tok.decode(ids, steps=p["steps"], guidance=p["guidance"], seed=next(seed))

    t0 = time.perf_counter()
    out = call()                                      # compiles
    compile_s = time.perf_counter() - t0
    assert out.shape == (p["batch"], tok.image_size, tok.image_size, 3), out.shape
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["model"]))
    from common import device_name
    return call, {"params_M": n / 1e6, "compile_s": compile_s, "device": device_name(),
                  "num_tokens": tok.num_tokens, "image_size": tok.image_size}


# ---- official FlowMo --------------------------------------------------------------------------
def official_flowmo(p: dict):
    sys.path[:0] = list(p["reference_path"])
    os.environ["FLOWMO_REPO"] = os.path.abspath(p["repo"])
    sys.path.insert(0, os.path.join(ROOT, "tests", "data", "flowmo"))
    import make_vectors as mv   # the fidelity script's loader: mup stub, eager mode
    from omegaconf import OmegaConf
    torch, models = mv.torch, mv.models
    torch.set_num_threads(int(p.get("torch_threads") or os.cpu_count() or 1))
    m = p["model"]
    heads = int(m["decoder_heads"])
    if int(m["encoder_heads"]) != heads:
        raise ValueError("the official FlowMo has one head count for encoder and decoder")
    unit = math.gcd(int(m["encoder_width"]), int(m["decoder_width"]))
    if unit % (16 * heads):
        raise ValueError(f"widths {m['encoder_width']}/{m['decoder_width']} with {heads} heads have "
                         "no FlowMo RoPE split (head dim / 8, 7/16, 7/16)")
    # width multiplier w -> hidden w * unit, RoPE axes (d // 4) * w = (2, 7, 7) * k * w
    k = unit // heads // 16
    models.DIT_ZOO["dit_b_4"] = dict(hidden_size=4 * unit, mlp_ratio=float(m.get("mlp_ratio", 4.0)),
                                     num_heads=heads, axes_dim=[8 * k, 28 * k, 28 * k],
                                     theta=10_000, qkv_bias=True)
    conf = {"data": {"image_size": int(m["image_size"])},
            "model": dict(mv.CFG["model"], patch_size=int(m["patch_size"]),
                          mup_width=int(m["decoder_width"]) // unit,
                          enc_mup_width=int(m["encoder_width"]) // unit,
                          code_length=int(m["code_length"]), context_dim=int(m["token_bits"]),
                          codebook_size_for_entropy=int(m["entropy_group_bits"]),
                          enc_depth=int(m["encoder_depth"]), dec_depth=int(m["decoder_depth"])),
            "eval": mv.CFG["eval"]}                   # the published sampler: pow_0.25, (.17, 1.02)
    config = OmegaConf.create(conf)
    lo, hi = (models._edm_to_flow_convention(x) for x in (0.17, 1.02))
    if float(m["sampler_rho"]) != 4.0 or not (m["guidance_interval"] and np_close(
            m["guidance_interval"], (lo, hi))):
        raise ValueError("the official sampler is pow_0.25 with CFG on (.17, 1.02); ours has rho "
                         f"{m['sampler_rho']}, interval {m['guidance_interval']}")
    torch.manual_seed(0)
    model = models.FlowMo(width=config.model.mup_width, config=config).eval()
    b, s, w, steps = p["batch"], int(m["image_size"]), float(p["guidance"]), int(p["steps"])
    code = torch.randint(0, 2, (b, int(m["code_length"]), int(m["token_bits"]))).float() * 2 - 1
    mask = torch.ones_like(code[..., :1])              # as FlowMo.reconstruct builds it
    code = torch.cat([code * mask, mask], dim=-1)
    null = code * 0.0 if w != 1.0 else None
    gen = torch.Generator().manual_seed(0)

    def call():
        with torch.no_grad():
            z = torch.randn((b, 3, s, s), generator=gen)
            x = models.rf_sample(model, z, code, null_code=null, sample_steps=steps, cfg=w,
                                 schedule=config.eval.sampling.schedule)[-1]
            return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    out = call()
    assert out.shape == (b, s, s, 3), out.shape
    return call, {"params_M": sum(q.numel() for q in model.parameters()) / 1e6,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}


def np_close(a, b, tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b))


# ---- official FlexTok -------------------------------------------------------------------------
def official_flextok(p: dict):
    sys.path[:0] = list(p["reference_path"])
    os.environ["FLEXTOK_REPO"] = os.path.abspath(p["repo"])
    sys.path.insert(0, os.path.join(ROOT, "tests", "data", "flextok"))
    import make_vectors as fv   # the fidelity script's release-shaped config and builder
    torch = fv.torch
    torch.set_num_threads(int(p.get("torch_threads") or os.cpu_count() or 1))
    m = p["model"]
    mult = list(m["vae_channel_mult"])
    f = 2 ** (len(mult) - 1)
    fv.IMAGE, fv.C, fv.PATCH, fv.R = (int(m["image_size"]), int(m["vae_latent_channels"]),
                                      int(m["patch_size"]), int(m["num_registers"]))
    fv.LEVELS = [int(x) for x in m["fsq_levels"]]
    fv.ENC_D, fv.DEC_D, fv.HEAD_DIM = (int(m["encoder_width"]), int(m["decoder_width"]),
                                       int(m["head_dim"]))
    fv.GRID = fv.IMAGE // f // fv.PATCH
    base = int(m["vae_base_channels"])
    fv.vae_wrapper.VAE_BASE_CFG = {**fv.vae_wrapper.VAE_BASE_CFG,
                                   "block_out_channels": [base * c for c in mult],
                                   "down_block_types": ["DownEncoderBlock2D"] * len(mult),
                                   "up_block_types": ["UpDecoderBlock2D"] * len(mult),
                                   "layers_per_block": int(m["vae_num_res_blocks"])}
    null = {"learned": "learned", "zeros": "zeros", "single_token": "single"}[m.get("null_cond", "learned")]
    cfg = fv.config(null=null, max_timestep=float(m.get("max_timestep", 1.0)),
                    head_adaln=bool(m.get("head_adaln", True)),
                    scaling=float(m.get("vae_scaling_factor", 1.0)), sample=False)
    cfg["encoder"]["module_dict"]["enc_transformer"]["depth"] = int(m["encoder_depth"])
    cfg["decoder"]["module_dict"]["dec_transformer"]["depth"] = int(m["decoder_depth"])
    model = fv.build(cfg, seed=0)
    b, w, steps, r = p["batch"], float(p["guidance"]), int(p["steps"]), fv.R
    codes = math.prod(fv.LEVELS)
    ids = [torch.randint(0, codes, (1, r), generator=torch.Generator().manual_seed(i))
           for i in range(b)]
    gen = torch.Generator().manual_seed(7)

    def call():
        with torch.no_grad():
            x = model.detokenize(ids, vae_image_sizes=fv.IMAGE // f, timesteps=steps,
                                 generator=gen, verbose=False, guidance_scale=w,
                                 perform_norm_guidance=w != 1.0)
            return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    out = call()
    assert out.shape == (b, fv.IMAGE, fv.IMAGE, 3), out.shape
    return call, {"params_M": sum(q.numel() for q in model.parameters()) / 1e6,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}


# ---- main -------------------------------------------------------------------------------------
def main(argv):
    del argv
    from absl import flags

    from side_by_side import load_avg, run_pairs, summary

    F = flags.FLAGS
    cfg = F.config
    family = cfg.get("family")
    if family not in DEFAULT_GUIDANCE or cfg.task.name != family:
        raise SystemExit(f"vs_decode times FlowMo or FlexTok tokenizers, not {family}:{cfg.variant}")
    with cfg.unlocked():
        if "vae" in cfg:
            cfg.vae.allow_random = True               # random frozen VAE / teacher: speed only
        if "repa" in cfg:
            cfg.repa.teacher.allow_random = True
        if "init_from" in cfg:
            cfg.init_from = ""                        # post-training variants: random init too
    guidance = DEFAULT_GUIDANCE[family] if F.guidance is None else float(F.guidance)
    common = {"batch": int(F.batch), "steps": int(F.steps), "guidance": guidance}
    sides = {"ours": ("vs_decode:ours", dict(common, config=cfg.to_dict()))}
    if F.reference_repo:
        if not os.path.isdir(F.reference_repo):
            raise SystemExit(f"--reference_repo {F.reference_repo} is not a directory")
        sides["official"] = (f"vs_decode:official_{family}",
                             dict(common, repo=F.reference_repo, model=model_fields(cfg),
                                  reference_path=[x for x in F.reference_path if x],
                                  torch_threads=int(F.torch_threads)))
    load_before = load_avg()
    info, rows = run_pairs(sides, pairs=int(F.pairs), calls=int(F.calls), warmup=int(F.warmup),
                           batch=int(F.batch), build_together=bool(F.build_together), tag="vs_decode")
    out = {"config": f"{family}:{cfg.variant}", "family": family, "batch": int(F.batch),
           "steps": int(F.steps), "guidance": guidance, "calls": int(F.calls),
           "device": info["ours"]["device"], "cpu_count": os.cpu_count(),
           "ours": info["ours"], "official": info.get("official"), "pairs": rows,
           "ours_images_per_s": int(F.batch) / _median([r["ours_s"] for r in rows]),
           "official_images_per_s": (int(F.batch) / _median([r["official_s"] for r in rows])
                                     if "official" in info else None),
           "median_ratio": summary(rows), "load_before": load_before, "load_after": load_avg()}
    print(json.dumps(out), flush=True)


def model_fields(cfg) -> dict:
    """Every field of our model as the task builds it (the config's keys over the class defaults),
    plain JSON values only, for the official side (which never imports JAX)."""
    import dataclasses

    from titok_jax.models.registry import build_model
    model = build_model(cfg.model, "float32")
    out = {}
    for f in dataclasses.fields(model):
        try:
            value = json.loads(json.dumps(getattr(model, f.name)))
        except (TypeError, ValueError):
            continue
        out[f.name] = value
    return out


def _median(xs):
    import statistics
    return statistics.median(xs)


def _define_flags():
    from absl import flags
    from side_by_side import define_pair_flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "configs/<flowmo|flextok>.py:<variant>",
                                    lock_config=False)
    flags.DEFINE_integer("batch", 1, "images per decode call")
    flags.DEFINE_integer("steps", 4, "Euler steps (network calls, plus the guided ones)")
    flags.DEFINE_float("guidance", None, "guidance scale (default: the published one; 1 = off)")
    define_pair_flags(1, "decode", "the official repository", "hydra-core / diffusers")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
