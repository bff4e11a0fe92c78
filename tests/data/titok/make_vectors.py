"""Generate the TiTok import test vectors with the OFFICIAL PyTorch code (bytedance/1d-tokenizer).

Official commit: 942a96fbdd873780179d1b78d5462911528bf8c8 (2025-03-20). Nothing of that code is
copied here or into titok_jax: this script imports it from a checkout and runs it.

How to rerun (torch, einops, numpy, safetensors, omegaconf needed; no GPU, no network)::

    mkdir -p /tmp/official && cd /tmp/official && G="git -C <mirror of bytedance/1d-tokenizer>"
    for f in $($G ls-tree -r --name-only HEAD | grep -E '\\.py$'); do
        mkdir -p $(dirname $f); $G show HEAD:$f > $f; done
    pip install --target /tmp/offpkgs omegaconf antlr4-python3-runtime==4.9.3 pyyaml
    PYTHONPATH=/tmp/offpkgs python tests/data/titok/make_vectors.py --official /tmp/official

What is adapted at run time (documented, so the official classes can be built small):

- ``modeling/modules/blocks.py`` hard-codes the ViT sizes small/base/large; the source is loaded
  with extra entries ``tiny_a`` (width 48, depth 2, heads 4), ``tiny_b`` (64, 1, 2) and
  ``tiny_c`` (48, 1, 4) added to those three tables and nothing else changed. ``config.json`` then carries, next to
  ``vit_enc_model_size: "tiny_a"``, the titok_jax extension keys ``vit_enc_width`` /
  ``vit_enc_depth`` / ``vit_enc_num_heads`` (ignored by the official code) that tell
  ``import-torch`` the numbers behind a size name it does not know.
- ``modeling/titok.py`` hard-codes the published MaskGIT-VQGAN (30.7M params) as the stage-2
  ``pixel_decoder``; the names ``Pixel_Decoder`` / ``Pixel_Quantizer`` in that module are replaced by
  wrappers building the official classes with a small config (hidden 32, channel_mult (1,1,1),
  1 res block, z 16; the codebook keeps its 1024 rows).
- ``huggingface_hub.PyTorchModelHubMixin`` is replaced by a stub whose ``_save_pretrained`` writes
  ``model.safetensors`` with ``safetensors.torch.save_model`` (what the hub mixin does); TiTok's own
  ``_save_pretrained`` writes ``config.json`` exactly as for the released checkpoints.
  ``accelerate.utils.operations.gather`` (used only by clustering VQ training) is an identity stub.

Weights are the official init re-drawn bigger (every weight ``N(0, 1/fan_in)``; LayerNorm /
GroupNorm scales ``1 + 0.1 N``; biases, tokens and position tables ``0.1 N``; codebooks ``N(0, 1)``)
so that layout errors show. Cases under ``tests/data/titok/<case>/``:

- ``vq``: single-stage VQ, encoder tiny_a / decoder tiny_b, 32x32, patch 8, 8 tokens of 16 dims,
  codebook 64, ``is_legacy: False``.
- ``vae``: single-stage VAE, tiny_a / tiny_a, patch 8, 8 tokens of 8 dims (encoder emits 16).
- ``legacy``: two-stage, ``finetune_decoder: True``, legacy encoder reshape (``is_legacy`` absent:
  the official default True), tiny_c / tiny_c, patch 4, l2-normalised 64-code codebook, logits
  head over 1024 proxy codes, small MaskGIT pixel decoder (f4: 8x8 -> 32x32).
- ``maskgit``: a small MaskGIT-VQGAN (``PretrainedTokenizer`` of ``modeling/titok.py``) as a bare
  ``maskgit-vqgan.safetensors`` with no config.json (the small pixel config above, 1024 codes).

Each case holds the release files (``config.json`` + ``model.safetensors``; ``maskgit``: only the
weights) and ``vectors.npz``: ``images`` float32 [B, 32, 32, 3] in [0, 1] (NHWC), ``ids`` int32
[B, N] from the official ``encode`` (VAE: ``mean`` [B, N, C], the posterior mode), ``pixels``
float32 [B, 32, 32, 3] from the official ``decode_tokens`` (unclamped, NCHW -> NHWC); ``legacy``
also ``logits`` [1, 8, 8, 1024] of the ViT decoder for the first image.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"tiny_a": (48, 2, 4), "tiny_b": (64, 1, 2), "tiny_c": (48, 1, 4)}
PIXEL_CONF = {"hidden_channels": 32, "channel_mult": [1, 1, 1], "num_resolutions": 3,
              "num_res_blocks": 1, "z_channels": 16}


def _load(name: str, path: str, patch=None):
    src = open(path, encoding="utf-8").read()
    if patch:
        src = patch(src)
    mod = types.ModuleType(name)
    mod.__file__ = path
    sys.modules[name] = mod
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def _blocks_patch(src: str) -> str:
    for attr, idx in (("width", 0), ("num_layers", 1), ("num_heads", 2)):
        extra = "".join(f'"{k}": {v[idx]}, ' for k, v in SIZES.items())
        src, n = re.subn(rf"self\.{attr} = \{{", f"self.{attr} = {{{extra}", src)
        assert n >= 2, attr
    return src


def import_official(root: str):
    import torch
    from safetensors.torch import save_model

    hub = types.ModuleType("huggingface_hub")

    class PyTorchModelHubMixin:
        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__()

        def _save_pretrained(self, save_directory):
            save_model(self, os.path.join(str(save_directory), "model.safetensors"))

    hub.PyTorchModelHubMixin = PyTorchModelHubMixin
    sys.modules["huggingface_hub"] = hub
    for name in ("accelerate", "accelerate.utils", "accelerate.utils.operations"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["accelerate.utils.operations"].gather = lambda x: x
    for pkg in ("modeling", "modeling.modules", "modeling.quantizer"):
        m = types.ModuleType(pkg)
        m.__path__ = [os.path.join(root, *pkg.split(".")[1:])] if "." in pkg else [
            os.path.join(root, "modeling")]
        sys.modules[pkg] = m
    _load("modeling.modules.base_model", os.path.join(root, "modeling/modules/base_model.py"))
    _load("modeling.modules.blocks", os.path.join(root, "modeling/modules/blocks.py"), _blocks_patch)
    vqgan = _load("modeling.modules.maskgit_vqgan",
                  os.path.join(root, "modeling/modules/maskgit_vqgan.py"))
    _load("modeling.quantizer.quantizer", os.path.join(root, "modeling/quantizer/quantizer.py"))
    titok = _load("modeling.titok", os.path.join(root, "modeling/titok.py"))
    from omegaconf import OmegaConf

    def small_conf(conf):
        return OmegaConf.merge(conf, OmegaConf.create(PIXEL_CONF))

    titok.Pixel_Decoder = lambda conf: vqgan.Decoder(small_conf(conf))
    titok.Pixel_Eecoder = lambda conf: vqgan.Encoder(small_conf(conf))
    titok.Pixel_Quantizer = lambda num_embeddings, embedding_dim, commitment_cost: \
        vqgan.VectorQuantizer(num_embeddings, PIXEL_CONF["z_channels"], commitment_cost)
    return torch, titok


def randomize(torch, model, seed: int) -> None:
    """Bigger-than-init random weights (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            leaf = name.split(".")[-1]
            is_norm = re.search(r"(^|\.)(ln_\w+|norm\w*|norm_out)\.weight$", name) is not None
            if is_norm:
                p.copy_(1.0 + 0.1 * n)
            elif leaf == "bias" or p.ndim < 2 or "embedding" in name and "quantize" not in name \
                    or name == "latent_tokens" or "mask_token" in name:
                p.copy_(0.1 * n)
            elif "quantize" in name:
                p.copy_(n)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(n / np.sqrt(fan_in))


def titok_config(enc: str, dec: str, *, tokens: int, token_size: int, mode: str,
                 codebook: int = 64, l2: bool = False, legacy: bool | None = None,
                 finetune: bool = False, patch: int = 8) -> dict:
    vq = {"codebook_size": codebook, "token_size": token_size, "use_l2_norm": l2,
          "commitment_cost": 0.25, "vit_enc_model_size": enc, "vit_dec_model_size": dec,
          "vit_enc_patch_size": patch, "vit_dec_patch_size": patch, "num_latent_tokens": tokens,
          "finetune_decoder": finetune, "quantize_mode": mode}
    if legacy is not None:
        vq["is_legacy"] = legacy
    for side, size in (("enc", enc), ("dec", dec)):
        w, d, h = SIZES[size]
        vq.update({f"vit_{side}_width": w, f"vit_{side}_depth": d, f"vit_{side}_num_heads": h})
    return {"experiment": {"tokenizer_checkpoint": "test.bin", "output_dir": "test"},
            "model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": 32}}}


def nhwc(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1).astype(np.float32))


def make_titok_case(torch, titok, name: str, config: dict, seed: int) -> None:
    out = os.path.join(HERE, name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    model = titok.TiTok(config)
    randomize(torch, model, seed)
    model.eval()
    model._save_pretrained(out)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(3, 3, 32, 32, generator=g)
    arrays = {"images": nhwc(x)}
    with torch.no_grad():
        if model.quantize_mode == "vq":
            _, result = model.encode(x)
            ids = result["min_encoding_indices"]            # [B, 1, N]
            arrays["ids"] = ids[:, 0].numpy().astype(np.int32)
            pixels = model.decode_tokens(ids)
            if model.finetune_decoder:
                z = model.quantize.get_codebook_entry(ids[:, 0].reshape(-1))
                z = z.reshape(ids.shape[0], 1, ids.shape[2], -1).permute(0, 3, 1, 2)
                arrays["logits"] = nhwc(model.decoder(z))[:1]     # first image only (size)
        else:
            _, posterior = model.encode(x)
            mean = posterior.mode()                          # [B, C, 1, N]
            arrays["mean"] = np.ascontiguousarray(mean[:, :, 0].numpy().transpose(0, 2, 1))
            pixels = model.decode_tokens(mean)
    arrays["pixels"] = nhwc(pixels)
    np.savez(os.path.join(out, "vectors.npz"), **arrays)
    print(name, {k: v.shape for k, v in arrays.items()},
          f"{sum(p.numel() for p in model.parameters())} params")


def make_maskgit_case(torch, titok, seed: int) -> None:
    from safetensors.torch import save_file
    out = os.path.join(HERE, "maskgit")
    os.makedirs(out, exist_ok=True)

    class Holder(torch.nn.Module):   # the three parts PretrainedTokenizer loads, same names
        def __init__(self):
            super().__init__()
            self.encoder = titok.Pixel_Eecoder(titok.OmegaConf.create(
                {"num_channels": 3, "dropout": 0.0, "resolution": 32}))
            self.decoder = titok.Pixel_Decoder(titok.OmegaConf.create(
                {"num_channels": 3, "dropout": 0.0, "resolution": 32}))
            self.quantize = titok.Pixel_Quantizer(1024, 256, 0.25)

    torch.manual_seed(seed)
    holder = Holder()
    randomize(torch, holder, seed)
    sd = {k: v.contiguous() for k, v in holder.state_dict().items()}
    tmp = os.path.join(out, "_tmp.bin")
    torch.save(sd, tmp)
    tok = titok.PretrainedTokenizer(tmp)   # the official loader (strict), then its encode/decode
    os.remove(tmp)
    save_file(sd, os.path.join(out, "maskgit-vqgan.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        codes = tok.encode(x)                               # [B, h*w]
        pixels = tok.decoder(tok.quantize.get_codebook_entry(codes))   # unclamped
    np.savez(os.path.join(out, "vectors.npz"), images=nhwc(x),
             ids=codes.numpy().astype(np.int32), pixels=nhwc(pixels))
    print("maskgit", codes.shape, f"{sum(v.numel() for v in sd.values())} params")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", required=True, help="checkout of bytedance/1d-tokenizer")
    args = parser.parse_args()
    torch, titok = import_official(os.path.abspath(args.official))
    torch.set_num_threads(1)
    make_titok_case(torch, titok, "vq", titok_config(
        "tiny_a", "tiny_b", tokens=8, token_size=16, mode="vq", legacy=False), seed=1)
    make_titok_case(torch, titok, "vae", titok_config(
        "tiny_a", "tiny_a", tokens=8, token_size=8, mode="vae", legacy=False), seed=2)
    make_titok_case(torch, titok, "legacy", titok_config(
        "tiny_c", "tiny_c", tokens=8, token_size=8, mode="vq", l2=True, finetune=True, patch=4),
        seed=3)
    make_maskgit_case(torch, titok, seed=4)
    for case in ("vq", "vae", "legacy"):
        with open(os.path.join(HERE, case, "config.json"), encoding="utf-8") as f:
            json.load(f)   # written by the official _save_pretrained; must be valid JSON


if __name__ == "__main__":
    main()
