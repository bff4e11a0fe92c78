"""Regenerate tests/data/flowmo/ from the OFFICIAL FlowMo code (kylesargent/FlowMo, flowmo/models.py
+ flowmo/lookup_free_quantize.py), on CPU:

    FLOWMO_REPO=/path/to/FlowMo .venv/bin/python tests/data/flowmo/make_vectors.py

In-process patches (none changes the math):
- ``torch.compiler.set_stance("force_eager")``: the official ``encode`` / ``decode`` / ``_quantize``
  are ``@torch.compile``d; eager runs the same code.
- ``mup`` is stubbed: ``MuReadout`` = ``nn.Linear``. The official ``build_model`` calls
  ``set_base_shapes`` with the model itself as base, so every readout's width_mult is 1 and
  ``output_mult`` 1: a plain linear layer. ``MUP_ENABLED`` stays True (the 8/d attention scale).
- ``models.DIT_ZOO["dit_b_4"]`` (the zoo entry FlowMo always uses) is replaced by a tiny one: hidden
  128 (-> width * 32), 1 head, axes [16, 56, 56] (-> (4, 14, 14) * width = FlowMo's
  (h/8, 7h/16, 7h/16) split), so the converter's defaults apply.
- No ``.cuda()`` is reached: we call ``encode`` / ``_quantize`` / ``rf_sample`` directly with our
  own stored noise instead of ``reconstruct`` (which draws ``torch.randn(...).cuda()``).

Every tensor gets N(0, 0.05) added (norm scales, biases, zero-initialised gates all move off their
defaults). Writes flowmo_tiny.pth (release format: ``{"model_ema_state_dict": ...}``),
flowmo_tiny.safetensors (the same state dict), flowmo_tiny.yaml, vectors.npz.
"""
import os
import sys
import types

import numpy as np
import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("FLOWMO_REPO", "/tmp/flowmo_src"))

mup = types.ModuleType("mup")


class MuReadout(torch.nn.Linear):
    def __init__(self, *args, readout_zero_init=False, output_mult=1.0, **kw):
        super().__init__(*args, **kw)


mup.MuReadout = MuReadout
mup.set_base_shapes = lambda *a, **k: None
sys.modules["mup"] = mup

from omegaconf import OmegaConf  # noqa: E402
from flowmo import models  # noqa: E402

torch.compiler.set_stance("force_eager")
models.DIT_ZOO["dit_b_4"] = dict(hidden_size=128, mlp_ratio=4.0, num_heads=1, axes_dim=[16, 56, 56],
                                 theta=10_000, qkv_bias=True)

CFG = {
    "data": {"image_size": 16},
    "model": {"enable_mup": True, "patch_size": 4, "mup_width": 1, "enc_mup_width": 1,
              "quantization_type": "lfq", "code_length": 8, "context_dim": 6,
              "codebook_size_for_entropy": 3, "entropy_loss_weight": 0.0025,
              "commit_loss_weight": 0.000625, "enc_depth": 1, "dec_depth": 2, "enable_cfg": True,
              "posttrain_sample": False},
    "eval": {"state_dict_key": "model_ema_state_dict",
             "sampling": {"sample_steps": 25, "schedule": "pow_0.25", "cfg": 1.5, "mode": "rf",
                          "cfg_interval": "(.17,1.02)"}},
}
STEPS = (1, 2, 3)
GUIDANCE = (1.0, 1.5)


def main():
    torch.manual_seed(0)
    config = OmegaConf.create(CFG)
    model = models.FlowMo(width=config.model.mup_width, config=config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save({"model_ema_state_dict": sd, "step": 0}, os.path.join(HERE, "flowmo_tiny.pth"))
    from safetensors.torch import save_file
    save_file(sd, os.path.join(HERE, "flowmo_tiny.safetensors"))
    with open(os.path.join(HERE, "flowmo_tiny.yaml"), "w") as f:
        yaml.safe_dump(CFG, f, sort_keys=False)

    b, s = 2, config.data.image_size
    x = torch.rand((b, 3, s, s), generator=g) * 2 - 1          # official: NCHW in [-1, 1]
    out = {"images": x.permute(0, 2, 3, 1).numpy()}             # ours: NHWC
    with torch.no_grad():
        code_pre, _ = model.encode(x)
        code, indices, _ = model._quantize(code_pre)
        out["code_pre"] = code_pre.numpy()                      # [B, L, bits]
        out["code"] = code.numpy()                              # in {-1, +1}
        out["official_indices"] = indices.numpy()
        z = torch.randn((b, 3, s, s), generator=g)              # t = 1 noise, NCHW
        out["noise"] = z.permute(0, 2, 3, 1).numpy()
        cond = torch.cat([code, torch.ones_like(code[..., :1])], dim=-1)
        for k in STEPS:
            for w in GUIDANCE:
                null = cond * 0.0 if w != 1.0 else None
                x0 = models.rf_sample(model, z.clone(), cond, null_code=null, sample_steps=k, cfg=w,
                                      schedule=config.eval.sampling.schedule)[-1]
                out[f"decode_s{k}_g{w}"] = x0.permute(0, 2, 3, 1).numpy()   # raw, [-1, 1] space
    np.savez_compressed(os.path.join(HERE, "vectors.npz"), **{k: np.asarray(v, np.float32) if
                        v.dtype != np.int64 else v for k, v in out.items()})
    print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
