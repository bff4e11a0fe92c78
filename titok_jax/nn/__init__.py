"""Shared layers: attention (qk-norm, RoPE, masks), MLP/SwiGLU, pre-LN / adaLN-zero transformer
block, patch embedding, position and timestep embeddings. Every param carries logical axis names.
All of them run under ``jax.jit`` with the batch sharded over an Auto or an Explicit mesh.
"""
from titok_jax.nn.activation_sharding import ACTIVATION_AXES, activation_rules, constrain
from titok_jax.nn.adaln import AdaLNModulation, gate, modulate
from titok_jax.nn.attention import (HeadsDense, HeadsOutDense, MultiHeadAttention, causal_mask,
                                    combine_masks, dot_product_attention, padding_mask,
                                    prefix_causal_mask, segment_mask)
from titok_jax.nn.block import TransformerBlock
from titok_jax.nn.dropout import Dropout
from titok_jax.nn.initializers import (LOGICAL_AXES, boxed, flat_kernel_init,
                                       width_scaled_normal)
from titok_jax.nn.mlp import MLP
from titok_jax.nn.norm import make_norm
from titok_jax.nn.patch import PatchEmbed, check_images, patchify, unpatchify
from titok_jax.nn.posemb import (LearnedPositionEmbedding, TimestepEmbedder, apply_rope,
                                 grid_positions, rope_angles, sincos_1d, sincos_2d,
                                 timestep_embedding)
from titok_jax.nn.scan import LayerContext, layer_stack, match_layers, resolve_remat

__all__ = [
    "ACTIVATION_AXES", "activation_rules", "constrain",
    "AdaLNModulation", "Dropout", "HeadsDense", "HeadsOutDense", "LOGICAL_AXES", "LearnedPositionEmbedding",
    "MLP", "MultiHeadAttention", "PatchEmbed", "TimestepEmbedder", "TransformerBlock",
    "apply_rope", "boxed", "causal_mask", "combine_masks", "dot_product_attention",
    "flat_kernel_init", "gate", "grid_positions", "make_norm", "modulate", "padding_mask",
    "patchify", "prefix_causal_mask", "rope_angles", "segment_mask", "sincos_1d", "sincos_2d",
    "timestep_embedding", "unpatchify", "width_scaled_normal",
    "LayerContext", "layer_stack", "match_layers", "resolve_remat",
]
