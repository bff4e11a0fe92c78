"""Regenerate the taming VQGAN test vectors with the OFFICIAL PyTorch code.

Source: github.com/CompVis/taming-transformers at commit 3ba01b241669f5ade541ce990f7650a3b8f65318
(files taming/modules/diffusionmodules/model.py and taming/modules/vqvae/quantize.py, imported
unchanged from a work tree given on the command line; they need only torch, numpy and einops;
nothing of them is copied into titok_jax). ``VQModel`` itself (taming/models/vqgan.py) imports
pytorch_lightning, so the script assembles the same five parts (``encoder``, ``decoder``,
``quantize`` = ``VectorQuantizer2(n_embed, embed_dim, beta=0.25)`` with the default
``legacy=True``, ``quant_conv`` and ``post_quant_conv`` 1x1) under the same attribute names, and
calls them in ``VQModel.encode`` / ``decode`` / ``forward`` order.

Rerun (needs torch, numpy, einops; a work tree of the official repo, e.g.
``git --git-dir=MIRROR archive 3ba01b2 taming | tar -x -C /tmp/taming``):

    .venv/bin/python tests/data/taming/make_vectors.py --taming /tmp/taming

Writes, next to this script:
- ``last.ckpt``: a Lightning-style checkpoint of a small model (ch 32, ch_mult (2, 1) - so ``ch``
  is not the first level's width and both the encoder and the decoder have a ``nin_shortcut`` -,
  1 res block, attention at resolution 16, resolution 32, z 16, 64 codes of dim 8):
  ``{"epoch", "global_step", "pytorch-lightning_version", "state_dict", "callbacks",
  "optimizer_states", "lr_schedulers"}`` where ``callbacks`` is keyed by a class pickled as
  ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (as Lightning 1.x writes it: a
  reader without pytorch_lightning must cope) and ``state_dict`` also holds a few ``loss.*``
  tensors (discriminator / LPIPS / BatchNorm buffers) that an importer drops. Tensors are float16
  to keep the file small; every weight is rounded to float16 *before* the official forward passes,
  so the stored values are exact. Every GroupNorm weight / bias and every conv bias is drawn away
  from its default (1 / 0); the codebook is drawn around the encoder latents so that many codes
  are used.
- ``last_state.safetensors``: ``last.ckpt``'s ``state_dict`` (the same tensors, ``loss.*`` included),
  for the tests that run without torch.
- ``io.npz``: ``images`` [2, 32, 32, 3] (NHWC, in [0, 1]; the official model reads
  ``2 images - 1``), ``h`` [2, 16, 16, 8] (``quant_conv(encoder(x))``, before quantization),
  ``ids`` [2, 256] (official nearest codes, row-major), ``id_margin`` [2, 256] (float16: gap
  between the second-best and the best squared distance; ``quant`` is ``codebook[ids]``),
  ``qloss`` (legacy VQ loss), ``decoded`` [2, 32, 32, 3] (``decode(quant)``, in [-1, 1] units,
  unclamped), ``forward`` (``forward(x)[0]``), ``decoded_ids`` [1, 256] (random ids) and
  ``decoded_from_ids`` (``decode`` of ``get_codebook_entry`` of them).
- ``official_keys.json``: names and shapes of the state dict of the published ImageNet f16 model
  (configs/imagenet_vqgan.yaml: ch 128, ch_mult (1,1,2,2,4), 2 res blocks, attn at 16, z 256,
  1024 codes of dim 256), built on the meta device, so the name table is checked at full size
  without the tensors.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch

COMMIT = "3ba01b241669f5ade541ce990f7650a3b8f65318"
HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"model": "taming/modules/diffusionmodules/model.py",
         "quantize": "taming/modules/vqvae/quantize.py"}


def load_official(root: str) -> tuple[types.ModuleType, types.ModuleType]:
    """Import the two official files by path (no taming package, no pytorch_lightning)."""
    out = []
    for name, rel in FILES.items():
        spec = importlib.util.spec_from_file_location(f"taming_official_{name}",
                                                      os.path.join(root, rel))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out.append(module)
    return out[0], out[1]


def ddconfig(**kw) -> dict:
    """configs/imagenet_vqgan.yaml's ddconfig, updated with ``kw``."""
    base = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
    base.update(kw)
    return base


class VQParts(torch.nn.Module):
    """``VQModel``'s modules under its attribute names (taming/models/vqgan.py:25-34)."""

    def __init__(self, mm, mq, dd: dict, n_embed: int, embed_dim: int):
        super().__init__()
        self.encoder = mm.Encoder(**dd)
        self.decoder = mm.Decoder(**dd)
        self.quantize = mq.VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, dd["z_channels"], 1)

    def encode(self, x):                      # VQModel.encode
        h = self.quant_conv(self.encoder(x))
        quant, emb_loss, info = self.quantize(h)
        return quant, emb_loss, info

    def decode(self, quant):                  # VQModel.decode
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x):                     # VQModel.forward
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff


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


def lightning_callback_class() -> type:
    """A class pickled by reference as Lightning 1.x's ModelCheckpoint (the key of
    ``checkpoint["callbacks"]``), registered under a fake module only while saving."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)
    cls = type("ModelCheckpoint", (), {"__module__": name})
    module.ModelCheckpoint = cls
    for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        sys.modules.setdefault(part, types.ModuleType(part))
    sys.modules[name] = module
    return cls


def save_ckpt(model: torch.nn.Module, path: str) -> None:
    gen = torch.Generator().manual_seed(5)
    sd = collections.OrderedDict((k, v.detach().half()) for k, v in model.state_dict().items())
    # what VQLPIPSWithDiscriminator adds under loss. (shapes shrunk; an importer drops them)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3, generator=gen).half()
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 4, 1, 1, generator=gen).half()
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4, generator=gen).half()
    sd["loss.discriminator.main.3.running_mean"] = torch.zeros(4).half()
    sd["loss.discriminator.main.3.num_batches_tracked"] = torch.tensor(1234, dtype=torch.long)
    cls = lightning_callback_class()
    ckpt = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
            "callbacks": {cls: {"best_model_score": None, "best_model_path": ""}},
            "optimizer_states": [{"state": {}, "param_groups": [
                {"lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0,
                 "amsgrad": False, "params": [0, 1]}]}],
            "lr_schedulers": [], "state_dict": sd}
    torch.save(ckpt, path)
    # the same state dict as safetensors: the tests that need no torch read it
    from safetensors.torch import save_file
    save_file(dict(sd), os.path.join(os.path.dirname(path), "last_state.safetensors"))
    for part in ("pytorch_lightning.callbacks.model_checkpoint", "pytorch_lightning.callbacks",
                 "pytorch_lightning"):
        sys.modules.pop(part, None)


def make_model(mm, mq) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    dd = ddconfig(ch=32, ch_mult=[2, 1], num_res_blocks=1, attn_resolutions=[16], resolution=32,
                  z_channels=16)
    model = VQParts(mm, mq, dd, n_embed=64, embed_dim=8).eval()
    perturb_and_round(model, gen)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    x = 2.0 * nchw(images) - 1.0
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))
        flat = h.permute(0, 2, 3, 1).reshape(-1, 8)
        pick = torch.randperm(flat.shape[0], generator=gen)[:64]
        book = flat[pick] + 0.3 * flat.std() * torch.randn(64, 8, generator=gen)
        model.quantize.embedding.weight.copy_(book.half().float())
        quant, qloss, (_, _, ids) = model.encode(x)
        ids = ids.reshape(2, 256)
        e = model.quantize.embedding.weight.double()
        d = ((flat.double()[:, None, :] - e[None]) ** 2).sum(-1)
        top2 = torch.topk(d, 2, dim=1, largest=False).values
        margins = (top2[:, 1] - top2[:, 0]).reshape(2, 256).float()
        decoded = model.decode(quant)
        forward, diff = model(x)
        dec_ids = torch.from_numpy(rng.integers(0, 64, size=(1, 256)))
        entry = model.quantize.get_codebook_entry(dec_ids.reshape(-1), (1, 16, 16, 8))
        from_ids = model.decode(entry)
    assert float(diff) == float(qloss)
    n = sum(p.numel() for p in model.parameters())
    print(f"taming: {n:,} params, {len(torch.unique(ids))} codes used, id margin min "
          f"{float(margins.min()):.4g}, median {float(margins.median()):.4g}, qloss {float(qloss):.6f}")
    save_ckpt(model, os.path.join(HERE, "last.ckpt"))
    np.savez(os.path.join(HERE, "io.npz"), images=images, h=nhwc(h),
             ids=ids.numpy().astype(np.int32), id_margin=margins.numpy().astype(np.float16),
             qloss=np.float32(qloss), decoded=nhwc(decoded), forward=nhwc(forward),
             decoded_ids=dec_ids.numpy().astype(np.int32), decoded_from_ids=nhwc(from_ids))


def make_keys(mm, mq) -> None:
    with torch.device("meta"):
        published = VQParts(mm, mq, ddconfig(), n_embed=1024, embed_dim=256)
    keys = {"commit": COMMIT,
            "imagenet_f16_1024": {k: list(v.shape) for k, v in published.state_dict().items()}}
    with open(os.path.join(HERE, "official_keys.json"), "w") as f:
        json.dump(keys, f, indent=0)
    print(f"published: {sum(int(np.prod(s)) for s in keys['imagenet_f16_1024'].values()):,} "
          f"params in {len(keys['imagenet_f16_1024'])} tensors")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--taming", required=True, help="work tree of CompVis/taming-transformers")
    args = p.parse_args()
    mm, mq = load_official(args.taming)
    make_model(mm, mq)
    make_keys(mm, mq)


if __name__ == "__main__":
    main()
