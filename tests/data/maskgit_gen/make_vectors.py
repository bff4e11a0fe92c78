"""Generate the TiTok MaskGIT-generator import vectors with the OFFICIAL PyTorch code
(bytedance/1d-tokenizer ``modeling/maskgit.py``: ``ImageBert`` and ``UViTBert``).

Official commit: 942a96fbdd873780179d1b78d5462911528bf8c8 (2025-03-20). Nothing of that code is
copied here or into titok_jax: this script imports it from a checkout and runs it.

How to rerun (torch, transformers, einops, numpy, safetensors, omegaconf needed; no GPU, no
network; the generators were released with transformers 4.4x, these vectors use 4.46.3)::

    mkdir -p /tmp/official && cd /tmp/official && G="git -C <mirror of bytedance/1d-tokenizer>"
    for f in $($G ls-tree -r --name-only HEAD | grep -E '\\.py$'); do
        mkdir -p $(dirname $f); $G show HEAD:$f > $f; done
    pip install --no-deps --target /tmp/offpkgs transformers==4.46.3 "huggingface_hub<1.0" \\
        "tokenizers<0.21" regex omegaconf antlr4-python3-runtime==4.9.3
    PYTHONPATH=/tmp/offpkgs python tests/data/maskgit_gen/make_vectors.py --official /tmp/official
    # add --bin to also write each state dict as generator.bin (torch.save, the release format
    # of generator_titok_{l32,b64,s128}.bin); the suite makes its own .bin from the safetensors

What is adapted at run time: nothing in the generator code. ``modeling/__init__.py`` and
``modeling/modules/__init__.py`` import the training losses (torchvision, diffusion); the packages
are created empty and only ``modeling/modules/base_model.py``, ``modeling/modules/blocks.py`` and
``modeling/maskgit.py`` are executed, unchanged. The official classes are built with a small
config in the layout of ``configs/training/generator/maskgit.yaml`` (``image_seq_len`` kept as the
OmegaConf interpolation ``${model.vq_model.num_latent_tokens}``, as in the released config.json).

Weights are the official init re-drawn bigger so that layout errors show: every matrix
``N(0, 1/fan_in)``; LayerNorm scales ``1 + 0.1 N``; biases ``0.1 N``; embedding and position tables
``0.5 N``. Cases under ``tests/data/maskgit_gen/<case>/`` (release files written by the official
``_save_pretrained``: ``config.json`` + ``model.safetensors``):

- ``imagebert``: ``ImageBert`` (HF ``BertModel``, post-LN), codebook 64, 10 classes, 8 tokens,
  hidden 48, 2 layers, 4 heads (head dim 12), intermediate 96, dropout 0.1 (eval mode).
- ``uvitbert``: ``UViTBert``, codebook 64, 10 classes, 16 tokens, hidden 48, num_hidden_layers 4
  (2 in-blocks, mid, 2 out-blocks with skip linears), 4 heads, intermediate 144.

``vectors.npz``: ``tokens`` int32 [4, N] (random codes, about 40% replaced by the mask id
``codebook_size``, the last row all masks), ``labels`` int32 [4], ``logits`` float32 [4, N, K] of
the official ``forward(tokens, labels, cond_drop_prob=0.0)`` and ``logits_null`` of
``cond_drop_prob=1.0`` (every row the null class ``codebook_size + 1 + num_classes``).
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {
    "imagebert": dict(cls="ImageBert", codebook=64, classes=10, tokens=8, hidden=48, layers=2,
                      heads=4, intermediate=96, dropout=0.1, seed=0),
    "uvitbert": dict(cls="UViTBert", codebook=64, classes=10, tokens=16, hidden=48, layers=4,
                     heads=4, intermediate=144, dropout=0.0, seed=1),
}


def _load(name: str, path: str):
    mod = types.ModuleType(name)
    mod.__file__ = path
    sys.modules[name] = mod
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), mod.__dict__)
    return mod


def import_official(root: str):
    import torch
    for pkg in ("modeling", "modeling.modules"):
        m = types.ModuleType(pkg)
        m.__path__ = [os.path.join(root, *pkg.split("."))]
        sys.modules[pkg] = m
    _load("modeling.modules.base_model", os.path.join(root, "modeling/modules/base_model.py"))
    blocks = _load("modeling.modules.blocks", os.path.join(root, "modeling/modules/blocks.py"))
    sys.modules["modeling.modules"].UViTBlock = blocks.UViTBlock
    maskgit = _load("modeling.maskgit", os.path.join(root, "modeling/maskgit.py"))
    return torch, maskgit


def generator_config(c: dict) -> dict:
    """A config in the layout of the released generator config.json (small sizes)."""
    return {
        "experiment": {"project": "titok_generation", "name": "test",
                       "tokenizer_checkpoint": "tokenizer_test.bin"},
        "model": {
            "vq_model": {"codebook_size": c["codebook"], "token_size": 12, "use_l2_norm": True,
                         "commitment_cost": 0.25, "vit_enc_model_size": "base",
                         "vit_dec_model_size": "base", "vit_enc_patch_size": 16,
                         "vit_dec_patch_size": 16, "num_latent_tokens": c["tokens"],
                         "finetune_decoder": True},
            "generator": {"model_type": "ViT" if c["cls"] == "ImageBert" else "UViT",
                          "hidden_size": c["hidden"], "num_hidden_layers": c["layers"],
                          "num_attention_heads": c["heads"],
                          "intermediate_size": c["intermediate"], "dropout": c["dropout"],
                          "attn_drop": c["dropout"], "num_steps": 8, "class_label_dropout": 0.1,
                          "image_seq_len": "${model.vq_model.num_latent_tokens}",
                          "condition_num_classes": c["classes"], "randomize_temperature": 1.0,
                          "guidance_scale": 4.5, "guidance_decay": "constant"}},
        "losses": {"label_smoothing": 0.1, "loss_weight_unmasked_token": 0.1},
        "dataset": {"preprocessing": {"resize_shorter_edge": 256, "crop_size": 256}},
    }


def randomize(torch, model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            parts = name.split(".")
            is_norm = name.endswith(".weight") and parts[-2] in ("LayerNorm", "norm", "norm1", "norm2")
            if is_norm:
                p.copy_(1.0 + 0.1 * n)
            elif name.endswith(".bias"):
                p.copy_(0.1 * n)
            elif "embed" in name:
                p.copy_(0.5 * n)
            else:
                p.copy_(n / np.sqrt(int(np.prod(p.shape[1:]))))


def make_case(torch, maskgit, name: str, c: dict, write_bin: bool) -> None:
    from omegaconf import OmegaConf
    out = os.path.join(HERE, name)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(c["seed"])
    model = getattr(maskgit, c["cls"])(OmegaConf.create(generator_config(c)))
    randomize(torch, model, c["seed"])
    model.eval()
    model._save_pretrained(Path(out))   # config.json (interpolation kept) + model.safetensors
    if write_bin:
        torch.save(model.state_dict(), os.path.join(out, "generator.bin"))
    n, k, classes = c["tokens"], c["codebook"], c["classes"]
    rng = np.random.default_rng(c["seed"] + 10)
    tokens = rng.integers(0, k, size=(4, n))
    tokens[rng.random((4, n)) < 0.4] = k
    tokens[-1] = k
    labels = rng.integers(0, classes, size=4)
    labels[1] = classes - 1
    t, lab = torch.from_numpy(tokens), torch.from_numpy(labels)
    with torch.no_grad():
        logits = model(t, lab.clone(), cond_drop_prob=0.0)
        null = model(t, lab.clone(), cond_drop_prob=1.0)
    arrays = {"tokens": tokens.astype(np.int32), "labels": labels.astype(np.int32),
              "logits": logits.numpy().astype(np.float32), "logits_null": null.numpy().astype(np.float32)}
    assert model.mask_token_id == k and arrays["logits"].shape == (4, n, k)
    np.savez_compressed(os.path.join(out, "vectors.npz"), **arrays)
    print(name, {a: v.shape for a, v in arrays.items()}, "logit std", float(arrays["logits"].std()),
          f"{sum(p.numel() for p in model.parameters())} params")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="checkout of bytedance/1d-tokenizer (.py files)")
    ap.add_argument("--bin", action="store_true", help="also write generator.bin (torch.save)")
    args = ap.parse_args()
    torch, maskgit = import_official(os.path.abspath(args.official))
    for name, c in CASES.items():
        make_case(torch, maskgit, name, c, args.bin)


if __name__ == "__main__":
    main()
