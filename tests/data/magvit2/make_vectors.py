"""Regenerate the Open-MAGVIT2 test vectors with the OFFICIAL PyTorch code.

Source: github.com/TencentARC/SEED-Voken at commit b9a17ea8 (files
src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py, .../vqvae/lookup_free_quantize.py and
.../modules/ema.py, imported unchanged by path from a work tree given on the command line; they need
only torch and einops; nothing of them is copied into titok_jax). ``VQModel`` itself
(src/Open_MAGVIT2/models/lfqgan.py) imports ``lightning`` and the repo's ``main.py``, so the script
assembles its parts under the same attribute names, in the same order (``encoder``, ``decoder``,
``loss``, ``quantize`` = ``LFQ(dim=z, codebook_size=2**z, sample_minimization_weight=1,
batch_maximization_weight=1)``, then ``model_ema = LitEma(self)``, so the EMA also shadows the
loss's discriminator as in the releases) and calls them in ``VQModel.encode`` / ``decode`` order.
The official code runs on CPU as it is: no patch.

Rerun (needs torch, numpy, einops, safetensors; a work tree of the official repo, e.g.
``git --git-dir=MIRROR worktree add /tmp/seedvoken b9a17ea8``):

    .venv/bin/python tests/data/magvit2/make_vectors.py --seedvoken /tmp/seedvoken

Writes, next to this script:
- ``om2_tiny.ckpt``: a Lightning-2-style checkpoint (``epoch``, ``global_step``,
  ``pytorch-lightning_version``, ``state_dict``, ``loops``, ``callbacks``, ``optimizer_states``,
  ``lr_schedulers``) of a small model (``ddconfig`` ch 32, ch_mult (1, 1), 1 res block, z 18 =
  LFQ bits, so 2^18 codes as the releases) whose ``state_dict`` holds the raw weights, a shrunk
  ``loss.discriminator`` (conv + BatchNorm with its buffers) and the EMA copies ``model_ema.*``
  (dots removed, ``model_ema.decay`` / ``num_updates``). The EMA weights differ from the raw ones
  in ``EMA_CHANGED`` (so picking the wrong set changes the indices and the pixels); the EMA
  copies equal to their raw tensor are saved as that same tensor (torch.save writes a shared
  storage once), which keeps the file small. Tensors are float16; every weight is rounded to
  float16 *before* the official forward passes, so the stored values are exact. Every GroupNorm
  weight / bias and every conv / Linear bias is drawn away from its default.
- ``om2_tiny_ema.safetensors``: the EMA weights (``encoder.*`` / ``decoder.*``, raw names) as a
  bare state dict, for the tests that run without torch.
- ``io.npz``: ``images`` [2, 16, 16, 3] (NHWC in [0, 1]; the official model reads ``2 images -
  1``), with the EMA weights (OM2 evaluates with them): ``h`` [2, 8, 8, 18] (``encoder(x)``, what
  LFQ quantizes), ``ids`` [2, 64] (official LFQ indices, row-major), ``decoded`` [2, 16, 16, 3]
  (``decode(quant)``, [-1, 1] units, unclamped), ``decoded_ids`` [1, 64] (random ids) and
  ``decoded_from_ids`` (``decode`` of ``get_codebook_entry`` of them), and the LFQ loss terms of
  ``quantize(h)`` in training mode: ``per_sample_entropy``, ``codebook_entropy``,
  ``entropy_aux_loss`` (sample - codebook) and ``commitment`` (MSE(h, sg(q))).
- ``official_keys.json``: names and shapes of the encoder / decoder state dict of the published
  ImageNet models (imagenet_lfqgan_128_L.yaml, imagenet_lfqgan_256_L.yaml), built on the meta
  device, so the name table is checked at full size without the tensors.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import types

import numpy as np
import torch

COMMIT = "b9a17ea8"
HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"model": "src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py",
         "lfq": "src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py",
         "ema": "src/Open_MAGVIT2/modules/ema.py"}
Z = 18
# EMA copies that differ from the raw weights (dots removed, as LitEma names them)
EMA_CHANGED = ("encoderconv_outweight", "encoderconv_outbias", "decoderconv_outbias",
               "decoderadaptive1gammabias", "decodernorm_outweight")


def load_official(root: str) -> dict[str, types.ModuleType]:
    """Import the three official files by path (no package, no lightning)."""
    out = {}
    for name, rel in FILES.items():
        spec = importlib.util.spec_from_file_location(f"om2_official_{name}", os.path.join(root, rel))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out[name] = module
    return out


def ddconfig(**kw) -> dict:
    """imagenet_lfqgan_128_L.yaml's ddconfig, updated with ``kw``."""
    base = dict(double_z=False, z_channels=18, resolution=128, in_channels=3, out_ch=3, ch=128,
                ch_mult=[1, 2, 2, 4], num_res_blocks=4)
    base.update(kw)
    return base


class ShrunkLoss(torch.nn.Module):
    """Stands in for ``VQLPIPSWithDiscriminator`` in the state dict: ``loss.discriminator.main``
    with a conv and a BatchNorm (running stats, ``num_batches_tracked``), shrunk."""

    def __init__(self):
        super().__init__()
        self.discriminator = torch.nn.Module()
        self.discriminator.main = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 4, 2, 1),
                                                      torch.nn.LeakyReLU(0.2),
                                                      torch.nn.Conv2d(4, 4, 4, 2, 1, bias=False),
                                                      torch.nn.BatchNorm2d(4))


class VQParts(torch.nn.Module):
    """``VQModel``'s modules under its attribute names, in its order (lfqgan.py:43-58)."""

    def __init__(self, mods, dd: dict):
        super().__init__()
        self.encoder = mods["model"].Encoder(**dd)
        self.decoder = mods["model"].Decoder(**dd)
        self.loss = ShrunkLoss()
        z = dd["z_channels"]
        self.quantize = mods["lfq"].LFQ(dim=z, codebook_size=2 ** z, sample_minimization_weight=1.0,
                                        batch_maximization_weight=1.0)

    def encode(self, x):                      # VQModel.encode
        h = self.encoder(x)
        (quant, emb_loss, info), loss_breakdown = self.quantize(h, return_loss_breakdown=True)
        return quant, emb_loss, info, loss_breakdown

    def decode(self, quant):                  # VQModel.decode
        return self.decoder(quant)


def perturb_and_round(module: torch.nn.Module, gen: torch.Generator) -> None:
    """GroupNorm / BatchNorm affines ~ 1 + 0.2 N / 0.2 N, conv and Linear biases ~ 0.1 N; every
    tensor rounded to fp16."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(4, generator=gen))
                m.num_batches_tracked.fill_(1234)
        for p in module.parameters():
            p.copy_(p.half().float())


def nhwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().permute(0, 2, 3, 1).numpy().astype(np.float32))


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def checkpoint_state_dict(parts: VQParts, raw: dict, ema) -> collections.OrderedDict:
    """``VQModel.state_dict()``'s layout: raw tensors, then ``model_ema.*``; float16, an EMA copy
    equal to its raw tensor being that very tensor (one storage in the file)."""
    sd = collections.OrderedDict((k, v.half()) for k, v in raw.items())
    sd["model_ema.decay"] = ema.decay.detach().clone()
    sd["model_ema.num_updates"] = ema.num_updates.detach().clone()
    for name, s_name in ema.m_name2s_name.items():
        shadow = getattr(ema, s_name)
        sd["model_ema." + s_name] = (sd[name] if torch.equal(shadow, raw[name])
                                     else shadow.detach().half())
    changed = [s for n, s in ema.m_name2s_name.items() if not torch.equal(getattr(ema, s), raw[n])]
    assert sorted(changed) == sorted(EMA_CHANGED), changed
    return sd


def save_ckpt(sd: dict, path: str) -> None:
    ckpt = {"epoch": 2, "global_step": 1234, "pytorch-lightning_version": "2.2.1",
            "state_dict": sd,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 2}}}},
            "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, "
                          "'every_n_epochs': 1, 'train_time_interval': None}":
                          {"best_model_score": None, "best_model_path": ""}},
            "optimizer_states": [{"state": {}, "param_groups": [
                {"lr": 1e-4, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0,
                 "amsgrad": False, "params": [0, 1]}]} for _ in range(2)],
            "lr_schedulers": []}
    torch.save(ckpt, path)


def make_model(mods) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    dd = ddconfig(ch=32, ch_mult=[1, 1], num_res_blocks=1, resolution=16)
    parts = VQParts(mods, dd).eval()
    perturb_and_round(parts, gen)
    raw = {k: v.detach().clone() for k, v in parts.state_dict().items()}
    ema = mods["ema"].LitEma(parts)                     # after ``loss``, as VQModel builds it
    with torch.no_grad():
        for s_name in EMA_CHANGED:
            buf = getattr(ema, s_name)
            buf.copy_((buf + 0.05 * torch.randn(buf.shape, generator=gen)).half().float())
    sd = checkpoint_state_dict(parts, raw, ema)
    ema.copy_to(parts)                                  # VQModel.ema_scope: evaluate with EMA
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    x = 2.0 * nchw(images) - 1.0
    with torch.no_grad():
        h = parts.encoder(x)
        quant, _, ids, _ = parts.encode(x)
        ids = ids.reshape(2, 64)
        decoded = parts.decode(quant)
        parts.quantize.train()                          # the loss terms exist in training only
        (q_train, aux, ids_train), brk = parts.quantize(h, return_loss_breakdown=True)
        parts.quantize.eval()
        assert torch.equal(q_train, quant) and torch.equal(ids_train.reshape(2, 64), ids)
        dec_ids = torch.from_numpy(rng.integers(0, 2 ** Z, size=(1, 64)))
        entry = parts.quantize.get_codebook_entry(dec_ids.reshape(1, 64), (1, 8, 8, Z), None)
        from_ids = parts.decode(entry)
    margin = float(h.abs().min())
    n = sum(p.numel() for n_, p in parts.named_parameters() if not n_.startswith("loss."))
    print(f"open-magvit2 tiny: {n:,} params, {len(torch.unique(ids))} codes used, min |h| "
          f"{margin:.3g} (scale {float(h.abs().max()):.3g}), entropy aux {float(aux):.6f}, "
          f"commitment {float(brk.commitment):.6f}")
    save_ckpt(sd, os.path.join(HERE, "om2_tiny.ckpt"))
    from safetensors.torch import save_file
    bare = {k: v.detach().half().contiguous() for k, v in parts.state_dict().items()
            if k.startswith(("encoder.", "decoder."))}
    save_file(bare, os.path.join(HERE, "om2_tiny_ema.safetensors"))
    np.savez(os.path.join(HERE, "io.npz"), images=images, h=nhwc(h),
             ids=ids.numpy().astype(np.int32), decoded=nhwc(decoded),
             decoded_ids=dec_ids.numpy().astype(np.int32), decoded_from_ids=nhwc(from_ids),
             per_sample_entropy=np.float32(brk.per_sample_entropy),
             codebook_entropy=np.float32(brk.codebook_entropy),
             entropy_aux_loss=np.float32(aux), commitment=np.float32(brk.commitment))


def make_keys(mods) -> None:
    keys = {"commit": COMMIT}
    for name, mult in (("imagenet_128_L", [1, 2, 2, 4]), ("imagenet_256_L", [1, 1, 2, 2, 4])):
        dd = ddconfig(ch_mult=mult)
        with torch.device("meta"):
            enc, dec = mods["model"].Encoder(**dd), mods["model"].Decoder(**dd)
        keys[name] = {**{f"encoder.{k}": list(v.shape) for k, v in enc.state_dict().items()},
                      **{f"decoder.{k}": list(v.shape) for k, v in dec.state_dict().items()}}
        print(f"{name}: {sum(int(np.prod(s)) for s in keys[name].values()):,} params in "
              f"{len(keys[name])} tensors")
    with open(os.path.join(HERE, "official_keys.json"), "w") as f:
        json.dump(keys, f, indent=0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seedvoken", required=True, help="work tree of TencentARC/SEED-Voken")
    args = p.parse_args()
    mods = load_official(args.seedvoken)
    make_model(mods)
    make_keys(mods)


if __name__ == "__main__":
    main()
