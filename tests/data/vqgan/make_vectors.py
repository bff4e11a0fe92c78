"""Regenerate the MaskGIT-VQGAN and MaskBit-discriminator test vectors with the OFFICIAL PyTorch code.

Source: github.com/bytedance/1d-tokenizer at commit 942a96fbdd873780179d1b78d5462911528bf8c8
(files modeling/modules/maskgit_vqgan.py and modeling/modules/discriminator.py, imported unchanged
from a temporary extraction; nothing of them is copied into titok_jax).

Rerun (needs torch, numpy, safetensors; a git mirror of the official repo):

    .venv/bin/python tests/data/vqgan/make_vectors.py \
        --mirror /work/.mirror/bytedance+1d-tokenizer/repo

Writes, next to this script:
- ``vqgan_state.safetensors``: state dict (float16; every weight is rounded to float16 *before* the
  official forward passes, so the stored values are exact) of a small MaskGIT-VQGAN: hidden 32,
  channel_mult (1, 2), 1 res block, z 32, codebook 64, with GroupNorm affines perturbed away from
  1 / 0 and a codebook drawn around the encoder latents so that many codes are used.
- ``vqgan_io.npz``: ``images`` [2, 32, 32, 3] (NHWC, [0, 1]), ``latents`` [2, 16, 16, 32] (encoder
  output, NHWC), ``ids`` [2, 256] (official nearest codes), ``id_margin`` [2, 256] (per token, the gap
  between the second-best and the best squared distance: near ties may flip in float32),
  ``loss`` (official VQ loss, beta 0.25),
  ``decoded_ids`` [2, 256] (random ids) and ``decoded`` [2, 32, 32, 3] (official decoder output of
  the codebook lookup of ``decoded_ids``, unclamped).
- ``disc_state.safetensors`` / ``disc_io.npz``: the MaskBit ``NLayerDiscriminator`` with hidden 32,
  3 stages, blur kernel (1, 3, 3, 1), GroupNorm perturbed; inputs ``x44`` [2, 44, 44, 3] (odd sizes
  and asymmetric blur padding inside; the 6x6 map is max-pooled *up* to 16x16) and ``x136``
  [1, 136, 136, 3] (17x17 pooled down to 16x16 with overlapping windows); logits ``y44``, ``y136``
  as [B, 16, 16, 1].
- ``official_keys.json``: names and shapes of the official state dicts of the published
  MaskGIT-VQGAN (``PretrainedTokenizer`` config) and of the default discriminator, and of a
  2-res-block config, so the converter's name tables are checked without big tensors.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch
from safetensors.numpy import save_file

COMMIT = "942a96fbdd873780179d1b78d5462911528bf8c8"
HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ("modeling/modules/maskgit_vqgan.py", "modeling/modules/discriminator.py")


def load_official(mirror: str, dest: str):
    """Extract the two official files at COMMIT and import them as ``modeling.modules.*``."""
    archive = subprocess.run(["git", "-C", mirror, "archive", COMMIT, *FILES], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    for pkg in ("modeling", "modeling/modules"):
        open(os.path.join(dest, pkg, "__init__.py"), "w").close()
    sys.path.insert(0, dest)
    return (importlib.import_module("modeling.modules.maskgit_vqgan"),
            importlib.import_module("modeling.modules.discriminator"))


def vq_config(**kw) -> types.SimpleNamespace:
    base = dict(channel_mult=[1, 1, 2, 2, 4], num_resolutions=5, dropout=0.0, hidden_channels=128,
                num_channels=3, num_res_blocks=2, resolution=256, z_channels=256)
    base.update(kw)
    base["num_resolutions"] = len(base["channel_mult"])
    return types.SimpleNamespace(**base)


def perturb_and_round(module: torch.nn.Module, gen: torch.Generator) -> None:
    """GroupNorm affines ~ 1 + 0.2 N / 0.2 N, conv biases ~ 0.1 N; every tensor rounded to fp16."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        for p in module.parameters():
            p.copy_(p.half().float())


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().permute(0, 2, 3, 1).numpy().astype(np.float32))


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def state_fp16(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float16) for k, v in module.state_dict().items()}


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


class Tokenizer(torch.nn.Module):
    """The official ``PretrainedTokenizer`` layout (encoder / decoder / quantize) without loading."""

    def __init__(self, mv, conf, codebook_size):
        super().__init__()
        self.encoder = mv.Encoder(conf)
        self.decoder = mv.Decoder(conf)
        self.quantize = mv.VectorQuantizer(num_embeddings=codebook_size,
                                           embedding_dim=conf.z_channels, commitment_cost=0.25)


def make_vqgan(mv) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    conf = vq_config(channel_mult=[1, 2], hidden_channels=32, num_res_blocks=1, resolution=32,
                     z_channels=32)
    model = Tokenizer(mv, conf, codebook_size=64).eval()
    perturb_and_round(model, gen)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        latents = model.encoder(nchw(images))
        flat = latents.permute(0, 2, 3, 1).reshape(-1, conf.z_channels)
        # Codebook around the latents: 64 random latents plus noise, rounded to fp16.
        pick = torch.randperm(flat.shape[0], generator=gen)[:64]
        book = flat[pick] + 0.3 * flat.std() * torch.randn(64, conf.z_channels, generator=gen)
        model.quantize.embedding.weight.copy_(book.half().float())
        z_q, ids, loss = model.quantize(latents, return_loss=True)
        d = model.quantize.compute_distances(latents.permute(0, 2, 3, 1)).double()
        top2 = torch.topk(d, 2, dim=1, largest=False).values
        margins = (top2[:, 1] - top2[:, 0]).reshape(ids.shape).float()
        margin = float(margins.min())
        dec_ids = torch.from_numpy(rng.integers(0, 64, size=(2, 256)))
        decoded = model.decoder(model.quantize.get_codebook_entry(dec_ids))
    used = len(torch.unique(ids))
    print(f"vqgan: {sum(p.numel() for p in model.parameters()):,} params, {used} codes used, "
          f"id margin min {margin:.4g}, median {float(margins.median()):.4g}, "
          f"distances ~{float(top2[:, 0].median()):.4g}, loss {float(loss):.6f}")
    save_file(state_fp16(model), os.path.join(HERE, "vqgan_state.safetensors"))
    np.savez(os.path.join(HERE, "vqgan_io.npz"), images=images, latents=nhwc(latents),
             ids=ids.numpy().astype(np.int32), id_margin=margins.numpy(),
             loss=np.float32(loss), decoded_ids=dec_ids.numpy().astype(np.int32),
             decoded=nhwc(decoded))


def make_disc(md) -> None:
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(3)
    disc = md.NLayerDiscriminator(num_channels=3, hidden_channels=32, num_stages=3).eval()
    perturb_and_round(disc, gen)
    rng = np.random.default_rng(1)
    x44 = rng.uniform(size=(2, 44, 44, 3)).astype(np.float32)
    x136 = rng.uniform(size=(1, 136, 136, 3)).astype(np.float32)
    with torch.no_grad():
        y44, y136 = disc(nchw(x44)), disc(nchw(x136))
    print(f"disc: {sum(p.numel() for p in disc.parameters()):,} params, logits {tuple(y44.shape)}")
    save_file(state_fp16(disc), os.path.join(HERE, "disc_state.safetensors"))
    np.savez(os.path.join(HERE, "disc_io.npz"), x44=x44, x136=x136, y44=nhwc(y44), y136=nhwc(y136))


def make_keys(mv, md) -> None:
    with torch.device("meta"):
        published = Tokenizer(mv, vq_config(), 1024)
        two_blocks = Tokenizer(mv, vq_config(channel_mult=[1, 2, 2], hidden_channels=32,
                                             resolution=32, z_channels=16), 64)
        disc = md.NLayerDiscriminator()
    keys = {"commit": COMMIT,
            "maskgit_f16_256": shapes(published),
            "h32_m122_r2_z16_k64": shapes(two_blocks),
            "discriminator_default": shapes(disc)}
    with open(os.path.join(HERE, "official_keys.json"), "w") as f:
        json.dump(keys, f, indent=0)
    n = sum(int(np.prod(s)) for k, s in keys["maskgit_f16_256"].items() if k.startswith("decoder."))
    print(f"published decoder: {n:,} params")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mirror", default="/work/.mirror/bytedance+1d-tokenizer/repo")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mv, md = load_official(args.mirror, tmp)
        make_vqgan(mv)
        make_disc(md)
        make_keys(mv, md)


if __name__ == "__main__":
    main()
