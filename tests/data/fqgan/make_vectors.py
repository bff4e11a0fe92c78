"""Regenerate the FQGAN test vectors with the OFFICIAL PyTorch code.

Source: github.com/showlab/FQGAN at commit dc34256 (``tokenizer/vq_model_dual.py`` and
``tokenizer/vq_model_triple.py``, imported unchanged by path from a work tree given on the command
line; they need only torch and einops; nothing of them is copied into titok_jax).

Monkeypatch (the smallest that makes a model small enough for a < 1 MB test directory; the
official code runs on CPU as it is): the official modules hard-code their sizes - ``Encoder`` /
``Decoder`` are built with ``ch`` 128 and 2 res blocks (``VQModel`` passes neither),
``Normalize`` is ``GroupNorm(32)``, ``FactorizedAdapter`` is 6 layers of width 512 / 8 heads with a
``(256 / f)**2`` position table and ``FeatPredHead`` 3 layers / 8 heads of width 1024 (Dual) or
``out_dim`` (Triple) with the same 256-px table. The script rebinds, in the imported module only,
``Encoder`` / ``Decoder`` to ``functools.partial(cls, ch=CH, num_res_blocks=1)``, ``Normalize`` to
``GroupNorm(GROUPS, c, eps=1e-6)`` and ``FactorizedAdapter`` / ``FeatPredHead`` to subclasses whose
``grid_size`` / ``width`` / ``num_layers`` / ``num_heads`` are read-only properties (the official
``__init__`` runs unchanged; its assignments to those names are ignored). Every forward is the
official one.

Rerun (needs torch, numpy, einops, safetensors; a work tree of the official repo, e.g.
``git --git-dir=MIRROR archive HEAD tokenizer | tar -x -C /tmp/fqgan_ref``):

    .venv/bin/python tests/data/fqgan/make_vectors.py --fqgan /tmp/fqgan_ref

Writes, next to this script, for ``dual`` and ``triple``:
- ``dual_tiny.pt`` (Dual only: the directory stays under 1 MB): ``{"model": state_dict}`` (the released files' layout, ``reconstruction_vq_ddp_
  {dual,triple}.py`` reads ``ema`` / ``model`` / ``state_dict``), ``codebook_show_usage=False``
  (so without the 65536-long ``codebook_used`` buffers, which the importer drops), float32, with
  ``with_clip_supervision=True`` (the representation heads). Every GroupNorm / LayerNorm weight
  and bias and every conv / Linear bias is drawn away from its default.
- ``{v}_tiny.safetensors``: the same state dict, for the tests that run without torch.
The tiny model: ``VQModel(ModelArgs(encoder_ch_mult=decoder_ch_mult=[1, 1, 1, 1], ...))`` (f 8),
``ch`` 8, 4 groups, 1 res block, z 8, 32 codes of dim 4 per factor, adapters and heads of 1 layer /
2 heads (adapter width 8; head widths 16 / 8 / 12 for the official 1024 / 384 / 768), 32-px
inputs (a 4 x 4 grid).
- ``{v}_io.npz``: ``images`` [2, 32, 32, 3] (NHWC in [0, 1]; the model reads ``2 images - 1``),
  per factor ``h_{f}`` (``quant_conv_{f}(encoder(x))``, NHWC), ``ids_{f}`` [2, 16], ``quant_{f}``
  (the normalised codes, NHWC), ``decoded`` (``decode(cat(quant))`` in [-1, 1] units),
  ``feat_{f}`` (the FeatPredHead's CLS prediction ``[2, W]`` for the factors with a head),
  ``disentangle`` (``compute_disentangle_loss`` at ratio 1 of the official forward).
- ``official_keys.json``: names and shapes of the released Dual / Triple VQ-16 and VQ-8 state dicts
  (``with_clip_supervision=True``), built on the meta device before any patch.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os

import numpy as np
import torch

COMMIT = "dc34256"
HERE = os.path.dirname(os.path.abspath(__file__))
CH, GROUPS, CH_MULT, Z, EMBED, K = 8, 4, [1, 1, 1, 1], 8, 4, 32
SIZE = 32                      # 32 px at f = 8: a 4 x 4 grid
ADAPTER = dict(width=8, num_layers=1, num_heads=2)
HEAD_WIDTH = {1024: 16, 384: 8, 768: 12}   # official width -> tiny width
FACTORS = {"dual": ("vis", "sem"), "triple": ("vis", "sem_mid", "sem_high")}
HEADS = {"dual": {"sem": "feat_pred_head"},
         "triple": {"sem_mid": "mid_sem_feat_pred", "sem_high": "high_sem_feat_pred"}}


def load_official(root: str, variant: str):
    path = os.path.join(root, "tokenizer", f"vq_model_{variant}.py")
    spec = importlib.util.spec_from_file_location(f"fqgan_official_{variant}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fixed(value):
    return property(lambda self: value, lambda self, v: None)


def patch(mod) -> None:
    """The documented monkeypatch (module docstring)."""
    grid = SIZE // 2 ** (len(CH_MULT) - 1)
    mod.Encoder = functools.partial(mod.Encoder, ch=CH, num_res_blocks=1)
    mod.Decoder = functools.partial(mod.Decoder, ch=CH, num_res_blocks=1)
    mod.Normalize = lambda c, norm_type="group": torch.nn.GroupNorm(GROUPS, c, eps=1e-6, affine=True)
    mod.FactorizedAdapter = type("TinyAdapter", (mod.FactorizedAdapter,), {
        "grid_size": _fixed(grid), **{k: _fixed(v) for k, v in ADAPTER.items()}})

    def width_get(self):
        return HEAD_WIDTH[self.__dict__["_official_width"]]

    def width_set(self, v):
        self.__dict__["_official_width"] = v
    mod.FeatPredHead = type("TinyHead", (mod.FeatPredHead,), {
        "grid_size": _fixed(grid), "num_layers": _fixed(1), "num_heads": _fixed(2),
        "width": property(width_get, width_set)})


def perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, torch.nn.MultiheadAttention):
                m.in_proj_bias.copy_(0.1 * torch.randn(m.in_proj_bias.shape, generator=gen))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().permute(0, 2, 3, 1).numpy().astype(np.float32))


def make_model(mod, variant: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    patch(mod)
    # VQ_8 with ch_mult [1, 1, 1, 1] (the official constructor, its own ModelArgs)
    model = mod.VQModel(mod.ModelArgs(
        encoder_ch_mult=CH_MULT, decoder_ch_mult=CH_MULT, codebook_size=K,
        codebook_embed_dim=EMBED, z_channels=Z, codebook_show_usage=False,
        with_clip_supervision=True, with_disentanglement=True, disentanglement_ratio=1.0)).eval()
    perturb(model, gen)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    x = 2.0 * torch.from_numpy(images.transpose(0, 3, 1, 2)) - 1.0
    factors = FACTORS[variant]
    out = {"images": images}
    with torch.no_grad():
        hs = model.encoder(x)
        if variant == "dual":   # the encoder returns (sem, vis)
            hs = {"sem": hs[0], "vis": hs[1]}
        else:
            hs = dict(zip(factors, hs))
        quants = {}
        for f in factors:
            h = getattr(model, f"quant_conv_{f}")(hs[f])
            q, _, (_, _, ids) = getattr(model, f"quantize_{f}")(h)
            quants[f] = q
            out[f"h_{f}"] = nhwc(h)
            out[f"quant_{f}"] = nhwc(q)
            out[f"ids_{f}"] = ids.reshape(2, -1).numpy().astype(np.int32)
        out["decoded"] = nhwc(model.decode(torch.cat([quants[f] for f in factors], dim=1)))
        for f, name in HEADS[variant].items():
            out[f"feat_{f}"] = getattr(model, name)(quants[f])[:, 0].numpy().astype(np.float32)
        fwd = model(x)              # the official forward: its reconstruction and disentanglement
        assert torch.allclose(fwd[0], torch.from_numpy(out["decoded"]).permute(0, 3, 1, 2),
                              atol=1e-5)
        out["disentangle"] = np.float32(fwd[3] if variant == "dual" else fwd[4])
    for f in factors:
        print(f"{variant} {f}: {len(np.unique(out[f'ids_{f}']))} codes used")
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    print(f"{variant}: {sum(v.numel() for v in sd.values()):,} params")
    if variant == "dual":   # one .pt is enough for the torch path (and the size budget)
        torch.save({"model": sd}, os.path.join(HERE, f"{variant}_tiny.pt"))
    from safetensors.torch import save_file
    save_file(sd, os.path.join(HERE, f"{variant}_tiny.safetensors"))
    np.savez_compressed(os.path.join(HERE, f"{variant}_io.npz"), **out)


def make_keys(root: str) -> None:
    keys = {"commit": COMMIT}
    for variant in ("dual", "triple"):
        mod = load_official(root, variant)
        for ds, ctor in (("ds16", mod.VQ_16), ("ds8", mod.VQ_8)):
            with torch.device("meta"):
                model = ctor(codebook_size=16384, codebook_embed_dim=8, with_clip_supervision=True)
            keys[f"fqgan_{variant}_{ds}"] = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(HERE, "official_keys.json"), "w") as f:
        json.dump(keys, f, separators=(',', ':'))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fqgan", required=True, help="work tree of showlab/FQGAN")
    args = p.parse_args()
    make_keys(args.fqgan)          # before any patch (fresh module objects)
    for variant in ("dual", "triple"):
        make_model(load_official(args.fqgan, variant), variant)


if __name__ == "__main__":
    main()
