"""Generate the DINOv2 import vectors with the OFFICIAL PyTorch code (facebookresearch/dinov2
``dinov2/models/vision_transformer.py``: ``DinoVisionTransformer``, built as ``dinov2/hub/
backbones.py`` builds the released ``dinov2_vit{s,b,l}14[_reg4]``: LayerScale ``init_values=1.0``,
``block_chunks=0``, ``MemEffAttention`` blocks, ``interpolate_offset=0.1``, no antialias).

Official commit: b8931f7bf91576930313be2c6d6af376033b35f0 (2025-08-14). Nothing of that code is
copied here or into titok_jax: this script imports it from a checkout and runs it, unchanged (with
``XFORMERS_DISABLED=1`` the official attention falls back to its own PyTorch SDPA path on CPU).

How to rerun (torch, numpy, safetensors; no GPU, no network)::

    mkdir -p /tmp/official_dinov2 && cd /tmp/official_dinov2 && G="git -C <mirror of dinov2>"
    for f in $($G ls-tree -r --name-only HEAD | grep -E '^dinov2/.*\\.py$'); do
        mkdir -p $(dirname $f); $G show HEAD:$f > $f; done
    python tests/data/dinov2/make_vectors.py --official /tmp/official_dinov2

Cases (patch 14, embed 48, depth 2, 4 heads of 12, MLP 192, LayerScale on), each under
``tests/data/dinov2/<case>/``: ``model.safetensors`` (the official ``state_dict()``, release key
names, ``mask_token`` included) and ``vectors.npz``:

- ``ls``: no registers, ``img_size=28`` (a 2 x 2 position table): the 28 px input uses the table
  as is; 42 px (3 x 3) upsamples it.
- ``reg4``: 4 register tokens, ``img_size=56`` (4 x 4 table): both inputs downsample it.

Weights are re-drawn so that layout errors show: every matrix ``N(0, 1/fan_in)``; LayerNorm scales
``1 + 0.1 N``; biases ``0.1 N``; LayerScale gammas ``0.5 + 0.2 N``; ``pos_embed``, ``cls_token``,
``register_tokens``, ``mask_token`` ``0.5 N``. ``vectors.npz``: ``x28`` / ``x42`` float32 NCHW
inputs (already normalised: the official model takes normalised images) and, for each, the
official ``forward_features(x)`` entries ``patch28`` / ``patch42`` (``x_norm_patchtokens``),
``cls28`` / ``cls42`` (``x_norm_clstoken``) and ``reg28`` / ``reg42`` (``x_norm_regtokens``).
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {"ls": dict(registers=0, img_size=28, seed=0), "reg4": dict(registers=4, img_size=56, seed=1)}
DIMS = dict(patch_size=14, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True, help="a checkout of facebookresearch/dinov2")
    args = ap.parse_args()
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    sys.path.insert(0, os.path.abspath(args.official))
    import torch
    from safetensors.torch import save_file
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.set_default_dtype(torch.float32)
    for case, c in CASES.items():
        torch.manual_seed(c["seed"])
        model = DinoVisionTransformer(
            img_size=c["img_size"], init_values=1.0, block_chunks=0, ffn_layer="mlp",
            block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
            num_register_tokens=c["registers"], interpolate_antialias=False, interpolate_offset=0.1,
            **DIMS).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if name in ("pos_embed", "cls_token", "register_tokens", "mask_token"):
                    p.copy_(0.5 * torch.randn_like(p))
                elif leaf == "gamma":
                    p.copy_(0.5 + 0.2 * torch.randn_like(p))
                elif leaf == "bias":
                    p.copy_(0.1 * torch.randn_like(p))
                elif p.ndim == 1:   # LayerNorm weight
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn_like(p) / fan_in ** 0.5)
        out = {}
        for s in (28, 42):
            x = torch.randn(2, 3, s, s)
            with torch.no_grad():
                f = model.forward_features(x)
            out[f"x{s}"] = x.numpy()
            out[f"patch{s}"] = f["x_norm_patchtokens"].numpy()
            out[f"cls{s}"] = f["x_norm_clstoken"].numpy()
            out[f"reg{s}"] = f["x_norm_regtokens"].numpy()
        d = os.path.join(HERE, case)
        os.makedirs(d, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(d, "model.safetensors"))
        np.savez(os.path.join(d, "vectors.npz"), **out)
        print(case, {k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
