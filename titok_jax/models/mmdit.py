"""MMDiT: the Flux "double-stream" transformer that FlowMo's encoder and decoder are built from.

Two token streams, an image stream ``img [B, Ni, D]`` and a latent ("txt") stream ``txt [B, Nt, D]``,
with **separate weights** but **one joint attention** over the concatenation ``[txt || img]``
(latent tokens first). One block, per stream ``s`` with its own parameters and
``(a_s, b_s, g_s, a'_s, b'_s, g'_s) = Dense_s(SiLU(vec))`` (shift, scale, gate for attention and MLP;
all 0 / 0 / 1 when the model has no timestep, i.e. the encoder)::

    h_s        = (1 + b_s) LN(x_s) + a_s                       LN: no affine, eps 1e-6
    q_s,k_s,v_s = split(h_s W_qkv_s + c_qkv_s)                  per head (d = D / heads)
    q_s, k_s   = RMSNorm_s(q_s), RMSNorm_s(k_s)                 over d, learned scale, eps 1e-6
    q, k, v    = [q_txt || q_img], ...                          along tokens
    o          = softmax(8/d * rope(q) rope(k)^T) v             muP scale 8/d, 3-axis RoPE
    x_s        = x_s + g_s  * (o_s W_o_s + c_o_s)
    x_s        = x_s + g'_s * MLP_s((1 + b'_s) LN(x_s) + a'_s)    GELU(tanh), ratio 4

RoPE (``titok_jax.nn.posemb``): 3 position axes, interleaved channel pairs, per-axis dims
``rope_axes_dims`` (FlowMo: ``[8, 28, 28] * width/4``, i.e. ``(d/8, 7d/16, 7d/16)`` of the head
dim ``d``); image token ``(r, c)`` has ids ``(0, r, c)``, latent token ``i`` has ``(i, i, i)``
(:func:`flowmo_position_ids`).

Both streams are constrained to ``("batch", "tokens", "act_embed")`` (``nn.activation_sharding``)
on entry to and exit from every block and at the stack's boundaries (input embeddings, read-out),
so XLA keeps the FSDP pattern at one image per device.

With identical weights in both streams a block is exactly one single-stream pre-LN adaLN block
(``titok_jax.nn.TransformerBlock``) over the concatenated sequence (tested).

Differences from the reference code, all exact simplifications: the last block computes only the
stream that the model reads out (``update="img"`` in the decoder, ``"txt"`` in the encoder), and a
model without a timestep has no modulation, time-embedding or unused output-head parameters (FlowMo
carries ~60M such dead parameters in its encoder). The adaLN gates start at zero (FlowMo zeroes only
the gate rows), every other linear layer starts like PyTorch's ``nn.Linear`` weight
``U(+-1/sqrt(fan_in))``, with zero biases. FlowMo's muP is at width multiplier 1 (its base shapes are
the model's own), so its readouts are plain linear layers and only the ``8/d`` scale remains.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.nn import (AdaLNModulation, HeadsDense, HeadsOutDense, LayerContext, MLP,
                          TimestepEmbedder, apply_rope, boxed, constrain, dot_product_attention,
                          layer_stack, make_norm, modulate, resolve_remat, rope_angles)
from titok_jax.nn.activation_sharding import BTD
from titok_jax.nn.adaln import gate
from titok_jax.nn.attention import module_path, split_heads
from titok_jax.nn.initializers import Initializer, zeros_init

# PyTorch nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
UPDATES = ("both", "img", "txt")
BD = ("batch", "act_embed")   # one vector per example [B, D]: the time embedding, its adaLN chunks


def gates_zero_init(base: Initializer, num_chunks: int, gate_chunks: Sequence[int]) -> Initializer:
    """Init of a flat adaLN kernel ``[Dc, num_chunks * D]``: ``base`` with the columns of the gate
    chunks (``chunk j`` = columns ``j*D .. (j+1)*D``) set to zero."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        w = base(key, shape, dtype).reshape(shape[0], num_chunks, -1)
        for j in gate_chunks:
            w = w.at[:, j].set(0.0)
        return w.reshape(shape)

    return init


def default_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FlowMo's per-axis RoPE dims ``(d/8, 7d/16, 7d/16)`` for head dim ``d`` (64 -> (8, 28, 28))."""
    dims = (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16)
    if sum(dims) != head_dim or any(x % 2 for x in dims):
        raise ValueError(f"head dim {head_dim} has no FlowMo RoPE split (d/8, 7d/16, 7d/16 must be even "
                         "and sum to d: use a multiple of 32) ; pass rope_axes_dims explicitly")
    return dims


def flowmo_position_ids(grid_h: int, grid_w: int, num_latent: int) -> tuple[np.ndarray, np.ndarray]:
    """``(img_ids [grid_h*grid_w, 3], txt_ids [num_latent, 3])`` float32: image token ``r*W + c``
    gets ``(0, r, c)`` (row-major), latent token ``i`` gets ``(i, i, i)``."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    img = np.stack([np.zeros(grid_h * grid_w), rows.ravel(), cols.ravel()], axis=-1)
    txt = np.repeat(np.arange(num_latent)[:, None], 3, axis=1)
    return img.astype(np.float32), txt.astype(np.float32)


class DoubleStreamBlock(nn.Module):
    """One Flux double-stream block (module docstring). ``update`` picks which streams' outputs are
    computed after the joint attention (the other is returned unchanged); ``vec=None`` means no
    modulation (and no modulation parameters)."""

    num_heads: int
    mlp_ratio: float = 4.0
    rope_axes_dims: Sequence[int] | None = None
    rope_theta: float = 10000.0
    attn_scale: float | None = None
    update: str = "both"
    kernel_init: Initializer = torch_linear_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def _mod(self, name: str, vec: jax.Array | None, full: bool, width: int) -> list:
        """``[shift, scale, gate, shift2, scale2, gate2]`` (or ``[shift, scale]`` when the stream is
        not updated); zeros/ones-equivalent ``None`` entries without ``vec``."""
        if vec is None:
            return [None] * (6 if full else 2)
        k = 6 if full else 2
        chunks = AdaLNModulation(k, width, zero_init=False,
                                 kernel_init=gates_zero_init(self.kernel_init, k, (2, 5) if full else ()),
                                 dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                                 name=f"{name}_mod")(constrain(vec, BD))
        return [constrain(c, BD) for c in chunks]

    @nn.compact
    def __call__(self, img: jax.Array, txt: jax.Array, vec: jax.Array | None, img_pos: jax.Array,
                 txt_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.update not in UPDATES:
            raise ValueError(f"DoubleStreamBlock update must be one of {UPDATES}, got {self.update!r}")
        width = img.shape[-1]
        head_dim = split_heads(width, self.num_heads, module_path(self))
        scale = self.attn_scale if self.attn_scale is not None else 8.0 / head_dim
        axes = tuple(self.rope_axes_dims or default_rope_axes(head_dim))
        ln = dict(epsilon=1e-6, use_scale=False, use_bias=False, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        qk = dict(epsilon=1e-6, use_scale=True, dtype=self.dtype, param_dtype=self.param_dtype)
        streams = {"txt": constrain(txt, BTD), "img": constrain(img, BTD)}
        updated = {"txt": self.update in ("both", "txt"), "img": self.update in ("both", "img")}
        mods, qs, ks, vs = {}, [], [], []
        for s, x in streams.items():   # txt first: the joint sequence is [txt || img]
            mods[s] = self._mod(s, vec, updated[s], width)
            h = make_norm("layernorm", name=f"{s}_norm1", **ln)(x)
            if vec is not None:
                h = modulate(h, mods[s][0], mods[s][1])
            qkv = HeadsDense(self.num_heads, head_dim, lead=(3,), kernel_init=self.kernel_init,
                             dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                             name=f"{s}_qkv")(h)
            qs.append(make_norm("rmsnorm", name=f"{s}_q_norm", **qk)(qkv[..., 0, :, :]))
            ks.append(make_norm("rmsnorm", name=f"{s}_k_norm", **qk)(qkv[..., 1, :, :]))
            vs.append(qkv[..., 2, :, :])
        pos = jnp.concatenate([jnp.broadcast_to(txt_pos, (txt.shape[0],) + txt_pos.shape[-2:]),
                               jnp.broadcast_to(img_pos, (img.shape[0],) + img_pos.shape[-2:])], axis=1)
        angles = rope_angles(pos, axes, self.rope_theta)
        q = apply_rope(jnp.concatenate(qs, axis=1), angles)
        k = apply_rope(jnp.concatenate(ks, axis=1), angles)
        o = dot_product_attention(q, k, jnp.concatenate(vs, axis=1), scale=scale,
                                  precision=self.precision)
        n_txt = txt.shape[1]
        outs = {"txt": o[:, :n_txt], "img": o[:, n_txt:]}
        for s, x in streams.items():
            if not updated[s]:
                continue
            m = mods[s]
            a = HeadsOutDense(width, kernel_init=self.kernel_init, dtype=self.dtype,
                              param_dtype=self.param_dtype, precision=self.precision,
                              name=f"{s}_out")(outs[s])
            x = constrain(x + (gate(a, m[2]) if vec is not None else a), BTD)
            h = make_norm("layernorm", name=f"{s}_norm2", **ln)(x)
            if vec is not None:
                h = modulate(h, m[3], m[4])
            h = MLP(int(width * self.mlp_ratio), activation="gelu_tanh", kernel_init=self.kernel_init,
                    dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    name=f"{s}_mlp")(h)
            streams[s] = constrain(x + (gate(h, m[5]) if vec is not None else h), BTD)
        return streams["img"], streams["txt"]


class OutputHead(nn.Module):
    """FlowMo's ``LastLayer``: ``Dense(LN(x))``; with ``vec``: ``(1 + scale) LN(x) + shift`` first
    (``shift, scale = Dense(SiLU(vec))``) and, when ``double_norm`` (the reference code's quirk),
    ``LN`` applied once more before the readout."""

    features: int
    double_norm: bool = True
    kernel_init: Initializer = torch_linear_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, vec: jax.Array | None) -> jax.Array:
        norm = make_norm("layernorm", epsilon=1e-6, use_scale=False, use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")
        if vec is not None:
            shift, scale = (constrain(m, BD) for m in AdaLNModulation(
                2, x.shape[-1], zero_init=False, kernel_init=self.kernel_init, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="mod")(constrain(vec, BD)))
            x = modulate(norm(x), shift, scale)
            if self.double_norm:
                x = norm(x)
        else:
            x = norm(x)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, kernel_init=boxed(self.kernel_init, ("embed", None)),
                        bias_init=boxed(zeros_init, (None,)), name="proj")(x)


def _double_stream_layer(ctx: LayerContext, carry: tuple, vec: jax.Array | None, img_pos: jax.Array,
                         txt_pos: jax.Array, *, num_heads: int, block: dict) -> tuple:
    """One both-streams ``DoubleStreamBlock`` named ``block`` (``titok_jax.nn.scan`` contract)."""
    x_img, x_txt = carry
    return ctx.module(DoubleStreamBlock)(num_heads, name=ctx.name("block"), **block)(
        x_img, x_txt, vec, img_pos, txt_pos)


class MMDiT(nn.Module):
    """A stack of double-stream blocks with input embeddings and one output head.

    ``__call__(img [B, Ni, Pin], txt [B, Nt, Cin] or None, img_pos [Ni, 3], txt_pos [Nt, 3], t [B]
    or None)`` -> ``[B, Ni, out_features]`` (``readout="img"``) or ``[B, Nt, out_features]``
    (``readout="txt"``). ``txt=None`` starts the latent stream from one learned vector
    (``latent_init``, FlowMo's encoder: its ``txt_in`` sees zeros, so only its bias matters) and
    needs ``num_txt``. ``t`` (flow time in [0, 1]) gives ``vec = MLP(timestep_embedding(1000 t,
    256))`` and turns modulation on; ``time_conditioned`` must match.

    Blocks ``block_{i}``; with ``scan_layers`` blocks ``0..depth-2`` (which update both streams) are
    one ``nn.scan``, params ``layers/block/... [depth-1, ...]``, and the last (readout-only) block
    stays ``block_{depth-1}``. ``remat`` / ``remat_policy``: ``titok_jax.nn.scan.resolve_remat``.
    """

    width: int
    depth: int
    num_heads: int
    out_features: int
    readout: str = "img"
    time_conditioned: bool = False
    mlp_ratio: float = 4.0
    rope_axes_dims: Sequence[int] | None = None
    rope_theta: float = 10000.0
    double_norm: bool = True
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    kernel_init: Initializer = torch_linear_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, img: jax.Array, txt: jax.Array | None, img_pos: jax.Array, txt_pos: jax.Array,
                 t: jax.Array | None = None, *, num_txt: int | None = None) -> jax.Array:
        if self.readout not in ("img", "txt"):
            raise ValueError(f"MMDiT readout must be 'img' or 'txt', got {self.readout!r}")
        if (t is not None) != self.time_conditioned:
            raise ValueError(f"MMDiT(time_conditioned={self.time_conditioned}) called with t="
                             f"{'None' if t is None else 'an array'}")
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x_img = nn.Dense(self.width, kernel_init=boxed(self.kernel_init, ("patch", "embed")),
                         bias_init=boxed(zeros_init, ("embed",)), name="img_in", **dense)(img)
        x_img = constrain(x_img, BTD)
        b = img.shape[0]
        if txt is None:
            if num_txt is None:
                raise ValueError("MMDiT with txt=None needs num_txt (the number of latent tokens)")
            init = self.param("latent_init", boxed(nn.initializers.normal(self.width ** -0.5), ("embed",)),
                              (self.width,), self.param_dtype)
            x_txt = jnp.broadcast_to(jnp.asarray(init, self.dtype or jnp.float32), (b, num_txt, self.width))
        else:
            x_txt = nn.Dense(self.width, kernel_init=boxed(self.kernel_init, (None, "embed")),
                             bias_init=boxed(zeros_init, ("embed",)), name="txt_in", **dense)(txt)
        x_txt = constrain(x_txt, BTD)
        vec = None
        if t is not None:
            vec = TimestepEmbedder(self.width, frequency_dim=256, time_scale=1000.0,
                                   kernel_init=self.kernel_init, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="time_in")(jnp.asarray(t, jnp.float32))
            vec = constrain(vec, BD)
        block = dict(mlp_ratio=self.mlp_ratio, rope_axes_dims=self.rope_axes_dims,
                     rope_theta=self.rope_theta, kernel_init=self.kernel_init, **dense)
        policy = resolve_remat(self.remat, self.remat_policy)
        # blocks 0..depth-2 update both streams (a stack, scanned or not); the last only the readout
        layer = functools.partial(_double_stream_layer, num_heads=self.num_heads, block=block)
        x_img, x_txt = layer_stack(layer, (x_img, x_txt), vec, img_pos, txt_pos, depth=self.depth - 1,
                                   scan=self.scan_layers, remat_policy=policy)
        last = LayerContext(self.depth - 1, False, policy)
        x_img, x_txt = last.module(DoubleStreamBlock)(
            self.num_heads, update=self.readout, name=last.name("block"), **block)(
            x_img, x_txt, vec, img_pos, txt_pos)
        x = x_img if self.readout == "img" else x_txt
        return constrain(OutputHead(self.out_features, double_norm=self.double_norm,
                                    kernel_init=self.kernel_init, name="final", **dense)(x, vec), BTD)
