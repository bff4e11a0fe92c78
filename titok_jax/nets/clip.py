"""CLIP's visual tower (Radford et al. 2021) as OpenAI's ``VisionTransformer`` (openai/CLIP
``clip/model.py``) and Hugging Face's ``CLIPVisionModel`` run it, frozen: FQGAN's semantic teachers
(CLIP ViT-L/14 for Dual's ``sem``, ViT-B/16 for Triple's ``sem_high``).

Images ``[B, S, S, 3]`` in [0, 1] (resized to ``image_size`` when they differ, as
``nets.dinov2.prepare_images`` does: bilinear, or PyTorch's legacy ``nearest`` as FQGAN feeds its
teachers) -> ``(x - mean) / std`` (CLIP's mean / std) -> patch embed (conv ``p x p`` stride ``p``,
no bias) -> ``[class_embedding || patches] + pos_embed`` -> ``ln_pre`` -> ``depth`` pre-LN blocks
(LayerNorm eps 1e-5, attention scale ``head_dim ** -0.5``)::

    x = x + out(attn(qkv(ln_1(x))));  x = x + fc_out(quick_gelu(fc_in(ln_2(x))))
    quick_gelu(u) = u * sigmoid(1.702 u)

-> the patch tokens ``[B, (S/p)^2, width]`` of the last block (no ``ln_post``: what REPA's CLIP
teacher uses). ``all_tokens=True`` gives ``{"cls": [B, W], "patch": [B, N, W], "registers": [B, 0,
W], "pooled": [B, W]}``: ``cls`` is the class token after the last block and BEFORE ``ln_post``
(HF ``hidden_states[-1][:, 0]``, FQGAN's target), ``pooled`` = ``ln_post(cls)`` (HF
``pooler_output``). The projection to the joint embedding space (``visual.proj`` /
``visual_projection``) is not part of the module. The block is ``nets.dinov2.DinoBlock`` without
LayerScale; the token stream is constrained to ``("batch", "tokens", "act_embed")`` like DINOv2's.
The position table is for the ``image_size / patch_size`` grid (no interpolation).

Param names and the keys they come from (``convert/clip.py``; OpenAI ``visual.*`` | HF
``vision_model.*``, the prefix optional)::

    patch_embed/proj/kernel [p*p*3, W]        conv1.weight | embeddings.patch_embedding.weight [W,3,p,p]
    class_embedding [W]                       class_embedding | embeddings.class_embedding [W]
    pos_embed [N + 1, W]                      positional_embedding | embeddings.position_embedding.weight
    ln_pre/{scale, bias}                      ln_pre | pre_layrnorm (sic)
    block_{i}/ln_1, ln_2/{scale, bias}        transformer.resblocks.{i}.ln_1, ln_2 |
                                              encoder.layers.{i}.layer_norm1, layer_norm2
    block_{i}/attn/qkv/{kernel [W,3,H,W/H], bias}  .attn.in_proj_weight [3W, W], in_proj_bias |
                                              .self_attn.{q,k,v}_proj.{weight, bias} (stacked q, k, v)
    block_{i}/attn/out/{kernel [H,W/H,W], bias}    .attn.out_proj | .self_attn.out_proj
    block_{i}/mlp/fc_in, fc_out/{kernel, bias}     .mlp.c_fc, c_proj | .mlp.fc1, fc2
    ln_post/{scale, bias}                     ln_post | post_layernorm
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nets.dinov2 import DinoBlock, prepare_images
from titok_jax.nn import PatchEmbed, boxed, constrain, make_norm
from titok_jax.nn.activation_sharding import BTD

Dtype = Any
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LN_EPS = 1e-5
HEAD_DIM = 64   # every released OpenAI CLIP ViT (B: 12 x 64, L: 16 x 64)
# The released towers (OpenAI ``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14``; 224 px).
CLIP_VARIANTS = {
    "vitb32": dict(image_size=224, patch_size=32, width=768, depth=12, num_heads=12),
    "vitb16": dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12),
    "vitl14": dict(image_size=224, patch_size=14, width=1024, depth=24, num_heads=16),
}


class CLIPVisionTower(nn.Module):
    """CLIP's frozen visual tower (module docstring). Params come from a file
    (``titok-jax convert-clip``, read by ``nets.files``)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    activation: str = "quick_gelu"
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    resize: str = "bilinear"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, all_tokens: bool = False):
        s, p, w = self.image_size, self.patch_size, self.width
        if s % p:
            raise ValueError(f"image_size {s} is not a multiple of patch_size {p}")
        x = prepare_images(images, s, self.mean, self.std, self.resize)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(p, w, use_bias=False, name="patch_embed", **kw)(x)
        b, n, _ = x.shape
        cls = self.param("class_embedding", boxed(nn.initializers.normal(w ** -0.5), ("embed",)),
                         (w,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w)), x], 1)
        pos = self.param("pos_embed", boxed(nn.initializers.normal(w ** -0.5), ("tokens", "embed")),
                         (n + 1, w), self.param_dtype)
        x = constrain(x + pos.astype(x.dtype)[None], BTD)
        x = constrain(make_norm("layernorm", epsilon=LN_EPS, name="ln_pre", **kw)(x), BTD)
        for i in range(self.depth):
            x = DinoBlock(self.num_heads, layerscale=False, epsilon=LN_EPS,
                          activation=self.activation, name=f"block_{i}", **kw)(x)
        x = constrain(x.astype(jnp.float32), BTD)
        pooled = make_norm("layernorm", epsilon=LN_EPS, name="ln_post", **kw)(x[:, 0])
        if all_tokens:
            return {"cls": x[:, 0], "patch": x[:, 1:], "registers": x[:, 1:1],
                    "pooled": pooled.astype(jnp.float32)}
        return x[:, 1:]
