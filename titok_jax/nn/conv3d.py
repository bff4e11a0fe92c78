"""3-D convolution helpers of the video tokenizers (MAGVIT v1's 3D-VQ, MAGVIT-v2's causal CNN).

Clips are ``[B, T, H, W, C]`` (NTHWC); kernels ``[kt, kh, kw, C_in, C_out]`` (DHWIO).

- :class:`Conv3d`: a 3-D conv with ``"same"`` padding (``k // 2`` zeros on both sides of every
  axis: Flax's ``'SAME'`` at stride 1 and odd kernels, MAGVIT v1) or ``"causal"`` padding
  (``kt - 1`` zero frames *before* the clip and none after, ``k // 2`` zeros on both sides in
  space: MAGVIT-v2 / Open-MAGVIT2's ``ConvBlock3D``; ``"causal_replicate"``: the ``kt - 1`` frames
  before are copies of frame 0). A causal conv's output frame ``t`` sees input frames
  ``s t - kt + 1 .. s t`` only (``s`` the temporal stride), so ``T' = floor((T - 1) / s) + 1``.
- :class:`ResBlock3D`: ``conv2(swish(norm2(conv1(swish(norm1(x)))))) + shortcut(x)`` (3x3x3 convs
  without bias; a 1x1x1 ``nin_shortcut`` without bias on the block *input* where the channels
  change: MAGVIT v1's ``ResBlock`` and Open-MAGVIT2's video ``ResBlock``).
- :func:`video_group_norm`: GroupNorm(32, eps 1e-6) of a clip, statistics over ``(T, H, W)`` of
  the clip (``per_frame=False``, Flax's / PyTorch's GroupNorm of a 5-D tensor) or over ``(H, W)``
  of each frame (``per_frame=True``: strictly causal, and a 1-frame clip is normalised as an image).
- :func:`avg_pool_3d` (TF-style SAME average pooling, padding cells excluded from the divisor:
  MAGVIT v1's ``downsample``), :func:`upsample_nearest_3d` (MAGVIT v1's ``upsample``),
  :func:`depth_to_space_3d` (DCR order ``(bt, bh, bw, C')``: Open-MAGVIT2's ``depth_to_space3d``).
- :func:`over_frames`: a per-image function applied to every frame (``T`` folded into the batch);
  :func:`reshape_batch_major`: a reshape that keeps the batch major in dim 0, naming its output
  sharding on meshes with Explicit axes (where jax cannot infer it for a depth-to-space).
- :func:`inflate_kernel` / :func:`inflate_params`: 2-D params -> 3-D params (MAGVIT v1's
  ``'2d->3d'`` inflation; ``"central"``: the 2-D kernel in time slice ``kt // 2``, zeros elsewhere;
  ``"last"``: in slice ``kt - 1``, the current frame of a causal conv, Open-MAGVIT2's
  ``video_lfqgan.py``; ``"average"``: ``kernel / kt`` in every slice), output channels tiled where
  the 3-D layer has ``r`` times as many (Open-MAGVIT2's temporal depth-to-space upsampler:
  ``C -> 4C`` in 2-D, ``C -> 8C`` in 3-D, weight and bias repeated twice).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from titok_jax.nn.activation_sharding import constrain
from titok_jax.nn.conv import GROUPS, torch_conv_init, zeros
from titok_jax.nn.initializers import boxed

Dtype = Any
Initializer = Callable[..., jax.Array]
PADDINGS = ("same", "causal", "causal_replicate")
INFLATIONS = ("central", "last", "average")
# A clip's feature map at a block boundary: the batch split, the channels whole.
FMAP5 = ("batch", None, None, None, "act_embed")


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v!r}")
    return t   # type: ignore[return-value]


def conv3d_padding(kernel_size: Sequence[int], padding: str) -> list[tuple[int, int]]:
    """``(lo, hi)`` padding of ``(T, H, W)``: ``k // 2`` each side (``"same"``) or, in time,
    ``(kt - 1, 0)`` (``"causal"``, ``"causal_replicate"``)."""
    kt, kh, kw = _triple(kernel_size)
    if padding == "same":
        return [(kt // 2, kt // 2), (kh // 2, kh // 2), (kw // 2, kw // 2)]
    if padding in ("causal", "causal_replicate"):
        return [(kt - 1, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)]
    raise ValueError(f"Conv3d padding must be one of {PADDINGS}, got {padding!r}")


class Conv3d(nn.Module):
    """``x [B, T, H, W, C_in]`` -> ``[B, T', H', W', features]`` (module docstring). Params
    ``kernel [kt, kh, kw, C_in, features]`` (logical ``(None, None, None, conv_in, conv_out)``,
    PyTorch's default init ``U(+-1/sqrt(kt kh kw C_in))`` unless ``kernel_init``) and ``bias
    [features]`` (zeros). With ``"same"`` padding and stride 1, ``T' = T``; with ``"causal"``
    padding, ``T' = floor((T - 1) / st) + 1``; in space ``H' = floor((H + 2 (kh // 2) - kh) / sh)
    + 1``."""

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    strides: Sequence[int] = (1, 1, 1)
    padding: str = "same"
    use_bias: bool = True
    kernel_init: Initializer = torch_conv_init
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 5:
            raise ValueError(f"Conv3d expects [B, T, H, W, C], got shape {x.shape}")
        k = _triple(self.kernel_size)
        kernel = self.param("kernel",
                            boxed(self.kernel_init, (None, None, None, "conv_in", "conv_out")),
                            (*k, x.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", boxed(zeros, ("conv_out",)), (self.features,),
                           self.param_dtype) if self.use_bias else None)
        dtype = self.dtype or x.dtype
        pads = conv3d_padding(k, self.padding)
        x = x.astype(dtype)
        if self.padding == "causal_replicate" and pads[0][0]:
            x = jnp.concatenate([jnp.repeat(x[:, :1], pads[0][0], axis=1), x], axis=1)
            pads[0] = (0, 0)
        y = lax.conv_general_dilated(x, kernel.astype(dtype),
                                     window_strides=_triple(self.strides), padding=pads,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                     precision=self.precision)
        return y if bias is None else y + bias.astype(dtype)


def reshape_batch_major(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``x.reshape(shape)`` for a reshape that keeps the batch the major part of dim 0 (``[B, ...]
    -> [B, ...]``, ``[B, T, ...] -> [B T, ...]`` or back). On a mesh with Explicit axes
    ("sharding in types") the output's dim 0 is sharded as ``x``'s (the other dims whole), which
    jax cannot infer for every reshape; elsewhere it is the plain reshape."""
    shape = tuple(int(d) for d in shape)
    if -1 in shape:   # lax.reshape takes no -1
        known = math.prod(d for d in shape if d != -1)
        shape = tuple(x.size // known if d == -1 else d for d in shape)
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return x.reshape(shape)
    lead = tuple(sharding.spec)[0] if len(sharding.spec) else None
    out = NamedSharding(mesh, PartitionSpec(lead, *(None,) * (len(shape) - 1)))
    return lax.reshape(x, shape, out_sharding=out)


def over_frames(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """``fn`` applied to every frame of ``x [B, T, ...]``: ``fn(x.reshape(B T, ...))`` reshaped
    back to ``[B, T, ...]`` (``fn`` maps a batch of images to a batch of images)."""
    b, t = x.shape[:2]
    y = fn(reshape_batch_major(x, (b * t, *x.shape[2:])))
    return reshape_batch_major(y, (b, t, *y.shape[1:]))


def video_group_norm(x: jax.Array, name: str, per_frame: bool, dtype: Dtype,
                     param_dtype: Dtype, use_scale_bias: bool = True) -> jax.Array:
    """GroupNorm(32, eps 1e-6, exact variance) of ``x [B, T, H, W, C]`` with ``("norm",)`` params
    ``scale`` / ``bias`` [C] (none when ``use_scale_bias=False``): statistics per (clip, group)
    over ``(T, H, W)``, or per (frame, group) over ``(H, W)`` when ``per_frame``. Call it inside a
    compact method: it creates the ``nn.GroupNorm`` submodule ``name``."""
    norm = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, use_scale=use_scale_bias,
                        use_bias=use_scale_bias, scale_init=boxed(nn.initializers.ones, ("norm",)),
                        bias_init=boxed(zeros, ("norm",)), name=name)
    return over_frames(norm, x) if per_frame else norm(x)


class ResBlock3D(nn.Module):
    """``[B, T, H, W, C_in] -> [B, T, H, W, out_channels]``:
    ``h = conv2(swish(norm2(conv1(swish(norm1(x))))))`` (``kernel_size`` convs, no bias), returned
    as ``h + x`` or ``h + nin_shortcut(x)`` (1x1x1, no bias) when the channels change. ``padding``:
    ``"same"`` (MAGVIT v1) or ``"causal"`` / ``"causal_replicate"`` (MAGVIT-v2);
    ``per_frame_norm``: see :func:`video_group_norm`. Params ``norm1``, ``conv1``, ``norm2``,
    ``conv2`` (+ ``nin_shortcut``): the names of the 2-D blocks (``nn.conv.CompVisResnet``), so 2-D
    params inflate onto it."""

    out_channels: int
    kernel_size: Sequence[int] = (3, 3, 3)
    padding: str = "same"
    per_frame_norm: bool = False
    kernel_init: Initializer = torch_conv_init
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = dict(padding=self.padding, use_bias=False, kernel_init=self.kernel_init, **kw)
        x = constrain(x, FMAP5)
        h = nn.silu(video_group_norm(x, "norm1", self.per_frame_norm, **kw))
        h = Conv3d(self.out_channels, self.kernel_size, name="conv1", **conv)(h)
        h = nn.silu(video_group_norm(h, "norm2", self.per_frame_norm, **kw))
        h = Conv3d(self.out_channels, self.kernel_size, name="conv2", **conv)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv3d(self.out_channels, (1, 1, 1), name="nin_shortcut", **conv)(x)
        return constrain(x + h, FMAP5)


RematResBlock3D = nn.remat(ResBlock3D)


def res_block(remat: bool = False) -> type:
    """``ResBlock3D``, or with ``remat`` its ``nn.remat`` (same params and outputs; the block's
    activations are recomputed in the backward pass instead of kept: the video tokenizers'
    ``remat`` option, for the memory of long, large clips)."""
    return RematResBlock3D if remat else ResBlock3D


def avg_pool_3d(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """Average pooling of ``x [B, T, H, W, C]`` with window = stride = ``window`` and TF-style SAME
    padding, the padding cells excluded from the divisor (MAGVIT v1's
    ``tensorflow_style_avg_pooling``): ``[B, ceil(T / wt), ceil(H / wh), ceil(W / ww), C]``."""
    window = _triple(window)
    return nn.avg_pool(x, window, strides=window, padding="SAME", count_include_pad=False)


def upsample_nearest_3d(x: jax.Array, factors: Sequence[int]) -> jax.Array:
    """Nearest-neighbour upsampling of ``[B, T, H, W, C]`` by integer ``(ft, fh, fw)`` (every frame
    and pixel repeated; ``jax.image.resize(..., 'nearest')`` for integer factors)."""
    for axis, f in zip((1, 2, 3), _triple(factors)):
        if f != 1:
            x = jnp.repeat(x, f, axis=axis)
    return x


def depth_to_space_3d(x: jax.Array, block: Sequence[int]) -> jax.Array:
    """``[B, T, H, W, bt bh bw C] -> [B, bt T, bh H, bw W, C]`` in DCR order (Open-MAGVIT2's
    ``depth_to_space3d``): output ``(bt t + i, bh h + j, bw w + k, c)`` is input channel
    ``((i bh + j) bw + k) C + c`` at ``(t, h, w)``. ``block = (1, 2, 2)`` is ``nn.conv.
    depth_to_space`` on every frame."""
    bt, bh, bw = _triple(block)
    b, t, h, w, c = x.shape
    if c % (bt * bh * bw):
        raise ValueError(f"depth_to_space_3d: {c} channels are not a multiple of {bt * bh * bw}")
    c_out = c // (bt * bh * bw)
    x = reshape_batch_major(x, (b, t, h, w, bt, bh, bw, c_out)).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return reshape_batch_major(x, (b, t * bt, h * bh, w * bw, c_out))


# ----------------------------------------------------------------------------- inflation
def inflate_kernel(kernel: Any, kt: int, mode: str = "central") -> np.ndarray:
    """A 2-D kernel ``[kh, kw, I, O]`` -> ``[kt, kh, kw, I, O]`` (module docstring): the kernel in
    slice ``kt // 2`` (``"central"``) or ``kt - 1`` (``"last"``) and zeros elsewhere, or
    ``kernel / kt`` in every slice (``"average"``). On a clip whose frames are all equal, a
    ``"same"``-padded conv with the central (or average) kernel, and a causal one with the last
    (or average) kernel, gives the 2-D conv's output on every frame (away from a zero-padded edge
    in time for ``"average"``)."""
    k = np.asarray(kernel)
    if k.ndim != 4:
        raise ValueError(f"inflate_kernel expects a 2-D kernel [kh, kw, I, O], got {k.shape}")
    if mode == "average":
        return np.repeat(k[None] / kt, kt, axis=0).astype(k.dtype)
    if mode not in INFLATIONS:
        raise ValueError(f"inflation mode must be one of {INFLATIONS}, got {mode!r}")
    out = np.zeros((kt, *k.shape), k.dtype)
    out[kt // 2 if mode == "central" else kt - 1] = k
    return out


def _unbox(v: Any) -> Any:
    return v.unbox() if isinstance(v, nn.meta.AxisMetadata) else v


def _inflate_leaf(path: str, src: Any, shape: tuple[int, ...], mode: str) -> np.ndarray:
    src = np.asarray(src)
    if src.ndim == 4 and len(shape) == 5:
        src = inflate_kernel(src, shape[0], mode)
    if src.shape[:-1] == shape[:-1] and src.shape[-1] and shape[-1] % src.shape[-1] == 0:
        src = np.concatenate([src] * (shape[-1] // src.shape[-1]), axis=-1)   # DCR upsampler
    if src.shape != tuple(shape):
        raise ValueError(f"inflate_params: {path}: cannot map 2-D shape {np.shape(src)} onto "
                         f"3-D shape {tuple(shape)}")
    return src


def inflate_params(params_2d: Any, params_3d: Any, mode: str = "central") -> Any:
    """Params of a 2-D model -> params for the 3-D model whose params (or their shapes, e.g. from
    ``jax.eval_shape(model.init, ...)``) are ``params_3d``, path for path: a 2-D kernel ``[kh, kw,
    I, O]`` whose 3-D counterpart is ``[kt, kh, kw, I, r O]`` is inflated (:func:`inflate_kernel`,
    then tiled ``r`` times along the output channels), a bias ``[O]`` whose counterpart is ``[r O]``
    tiled, anything of the same shape copied (norms, Dense layers, codebooks). A path present on
    one side only, or shapes that do not map, is a ``ValueError``. The result has ``params_3d``'s
    structure (boxed leaves stay boxed, ``flax.linen.LogicallyPartitioned``)."""
    src = {"/".join(k): _unbox(v) for k, v in flatten_dict(params_2d).items()}
    dst = flatten_dict(params_3d)   # boxes are leaves (not dicts)
    names = {"/".join(k) for k in dst}
    missing, extra = sorted(names - set(src)), sorted(set(src) - names)
    if missing or extra:
        raise ValueError(f"inflate_params: the 2-D and 3-D param trees differ: only in 3-D "
                         f"{missing[:8]}, only in 2-D {extra[:8]}")
    out = {}
    for key, leaf in dst.items():
        path = "/".join(key)
        target = _unbox(leaf)
        value = jnp.asarray(_inflate_leaf(path, src[path], tuple(target.shape), mode),
                            target.dtype)
        out[key] = leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
    return unflatten_dict(out)

