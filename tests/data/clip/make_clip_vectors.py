"""Generate the CLIP visual-tower vectors of ``tests/test_clip.py`` with Hugging Face transformers'
``CLIPVisionModel`` (the class FQGAN loads its CLIP teachers with; any transformers >= 4.30 with
``CLIPVisionModel``: measured with 5.25.0). Nothing of transformers is copied here or into
titok_jax: this script builds the model and runs it, unchanged.

How to rerun (torch, transformers, numpy, safetensors; no GPU, no network)::

    pip install transformers && python tests/data/clip/make_clip_vectors.py

A tiny random tower: image 16, patch 4 (a 4 x 4 grid, 17 tokens), width 32, 2 layers, 4 heads of
8, MLP 128, QuickGELU, LayerNorm eps 1e-5. Weights are re-drawn so that layout errors show: every
matrix ``N(0, 1/fan_in)``, LayerNorm scales ``1 + 0.1 N``, biases ``0.1 N``, ``class_embedding`` /
position table ``0.5 N``; all rounded to float16 values (so the float16 OpenAI-layout copy holds
exactly the same numbers). Files (about 185 KB in all):

- ``hf_tiny.safetensors``: ``CLIPVisionModel.state_dict()`` (float32; transformers 5 saves it
  without the ``vision_model.`` prefix a ``CLIPModel`` file has; the test adds that prefix and a
  text tower itself).
- ``openai_tiny.safetensors``: the same tensors renamed BY THIS SCRIPT to the OpenAI
  ``clip/model.py`` layout (openai/CLIP is not available here, so this is our own renaming,
  following the official <-> HF key map of transformers' ``convert_clip_original_pytorch_to_hf.py``:
  ``visual.conv1.weight``, ``visual.class_embedding``, ``visual.positional_embedding``,
  ``visual.ln_pre``, ``visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight = [q; k; v],
  attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``visual.ln_post``), plus a
  random ``visual.proj`` and text-side stand-ins (``token_embedding.weight``, ``logit_scale``,
  ``input_resolution``) that the converter must drop; float16, as the OpenAI releases store them.
- ``vectors.safetensors``: ``x16`` ``[2, 16, 16, 3]`` and ``x22`` ``[2, 22, 22, 3]`` uint8 images
  (NHWC; the model sees ``x / 255`` in [0, 1]); for each, the HF model's outputs on ``(F.interpolate(x, size=16) - mean) / std`` (CLIP
  mean / std; ``F.interpolate``'s default legacy ``nearest``, FQGAN's teacher resize; 16 px is not
  resized): ``cls*`` = ``hidden_states[-1][:, 0]`` (= ``last_hidden_state[:, 0]``, before
  ``post_layernorm``: FQGAN's target), ``patch16`` = ``last_hidden_state[:, 1:]``, ``pooled*`` =
  ``pooler_output`` (``post_layernorm`` of the CLS).
"""
from __future__ import annotations

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DIMS = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def openai_layout(sd: dict, depth: int, rng: np.random.Generator) -> dict:
    """HF ``CLIPVisionModel`` tensors -> OpenAI ``clip/model.py`` names (module docstring)."""
    out = {"visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["embeddings.class_embedding"],
           "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": sd["pre_layrnorm.weight"], "visual.ln_pre.bias": sd["pre_layrnorm.bias"],
           "visual.ln_post.weight": sd["post_layernorm.weight"],
           "visual.ln_post.bias": sd["post_layernorm.bias"]}
    for i in range(depth):
        a, b = f"encoder.layers.{i}", f"visual.transformer.resblocks.{i}"
        for part in ("weight", "bias"):
            out[f"{b}.attn.in_proj_{part}"] = np.concatenate(
                [sd[f"{a}.self_attn.{n}_proj.{part}"] for n in "qkv"])
            out[f"{b}.attn.out_proj.{part}"] = sd[f"{a}.self_attn.out_proj.{part}"]
            out[f"{b}.ln_1.{part}"] = sd[f"{a}.layer_norm1.{part}"]
            out[f"{b}.ln_2.{part}"] = sd[f"{a}.layer_norm2.{part}"]
            out[f"{b}.mlp.c_fc.{part}"] = sd[f"{a}.mlp.fc1.{part}"]
            out[f"{b}.mlp.c_proj.{part}"] = sd[f"{a}.mlp.fc2.{part}"]
    w = sd["pre_layrnorm.weight"].shape[0]
    out = {k: v.astype(np.float16) for k, v in out.items()}
    out["visual.proj"] = (rng.normal(size=(w, 16)) * w ** -0.5).astype(np.float16)
    out["token_embedding.weight"] = rng.normal(size=(4, 8)).astype(np.float16)
    out["logit_scale"] = np.asarray(4.6052, np.float16)
    out["input_resolution"] = np.asarray(DIMS["image_size"], np.int64)
    return out


def main() -> None:
    import torch
    import torch.nn.functional as F
    from safetensors.numpy import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = CLIPVisionConfig(**DIMS, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              attn_implementation="eager")
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                v = 1 + 0.1 * rng.normal(size=p.shape)
            elif name.endswith("bias"):
                v = 0.1 * rng.normal(size=p.shape)
            elif name.endswith(("class_embedding", "position_embedding.weight")):
                v = 0.5 * rng.normal(size=p.shape)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                v = rng.normal(size=p.shape) / np.sqrt(fan_in)
            p.copy_(torch.from_numpy(v.astype(np.float16).astype(np.float32)))
    sd = {k: np.ascontiguousarray(v.detach().numpy()) for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(HERE, "hf_tiny.safetensors"))
    save_file(openai_layout(sd, DIMS["num_hidden_layers"], rng),
              os.path.join(HERE, "openai_tiny.safetensors"))

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    vectors = {}
    for size in (16, 22):
        x = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
        t = torch.from_numpy(x.astype(np.float32) / 255).permute(0, 3, 1, 2)
        if size != DIMS["image_size"]:
            t = F.interpolate(t, size=(DIMS["image_size"], DIMS["image_size"]))   # legacy nearest
        with torch.no_grad():
            out = model(pixel_values=(t - mean) / std, output_hidden_states=True)
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
        vectors[f"x{size}"] = x
        vectors[f"cls{size}"] = out.hidden_states[-1][:, 0].numpy()
        if size == DIMS["image_size"]:
            vectors[f"patch{size}"] = out.last_hidden_state[:, 1:].numpy()
        vectors[f"pooled{size}"] = out.pooler_output.numpy()
    # views of torch tensors (``[:, 0]``) must be made contiguous: save_file writes the raw buffer
    vectors = {k: np.ascontiguousarray(v) for k, v in vectors.items()}
    save_file(vectors, os.path.join(HERE, "vectors.safetensors"),
              metadata={"transformers": __import__("transformers").__version__,
                        "torch": torch.__version__})
    for f in ("hf_tiny.safetensors", "openai_tiny.safetensors", "vectors.safetensors"):
        print(f, os.path.getsize(os.path.join(HERE, f)))


if __name__ == "__main__":
    main()
