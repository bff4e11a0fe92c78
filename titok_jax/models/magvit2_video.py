"""MAGVIT-v2's causal video tokenizer (Yu et al. 2024, arXiv 2310.05737) as Open-MAGVIT2 builds it
(TencentARC/SEED-Voken ``modules/diffusionmodules/improved_video_model.py``,
``ucf101_lfqfan_128_L.yaml``), NTHWC: the video form of ``models.magvit2`` with its names.

Clips ``[B, T, H, W, 3]`` in **[0, 1]** are mapped to ``x = 2 clip - 1``, encoded to
``z [B, T', H/f, W/f, z_channels]`` with ``T' = (T - 1) / ft + 1`` (``T = 1 + ft k``; 17 frames ->
5 latent frames for ``ft = 4``), quantized by LFQ (``q = sign(z)``, OM2's entropy loss: the
``quantizer`` sub-config, default ``models.magvit2.DEFAULT_QUANTIZER``) and decoded to
``(y + 1) / 2`` ``[B, T, H, W, 3]`` (float32, unclamped). With ``c_i = ch * ch_mult[i]``, ``L``
levels, ``n = num_res_blocks`` and ``s_i = (2 if temporal_downsample[i] else 1, 2, 2)``::

    Encoder:  conv_in 3x3x3 (no bias): 3 -> ch
              down_i (i = 0..L-1): block_j = ResBlock3D(-> c_i), j < n; then unless i = L-1
                                   downsample = conv 3x3x3 stride s_i (bias)
              mid_block_j = ResBlock3D(c_{L-1}), j < n
              norm_out -> swish -> conv_out 1x1x1 (bias) -> z_channels
    Decoder:  conv_in 3x3x3 (bias): z_channels -> c_{L-1};  mid_block_j, j < n
              for i = L-1 .. 0:  adaptive_i = AdaGN(x, q);  up_i block_j = ResBlock3D(-> c_i);
                                 then unless i = 0 up_i upsample: conv 3x3x3 C -> 4 C or 8 C
                                 (bias), depth_to_space_3d s_{i-1} (DCR), and when it doubles
                                 time, frame 1 dropped (2T -> 2T - 1 frames; 1 -> 1)
              norm_out -> swish -> conv_out 3x3x3 (bias) -> 3

**Causality.** Every conv is causal (``nn.conv3d.Conv3d``: ``kt - 1`` zero frames before the clip,
none after, or copies of frame 0 with ``temporal_padding="replicate"``; a stride-2 conv keeps
frames 0, 2, 4, ...), so latent frame ``t'`` sees input frames
``<= ft t'``: the first frame is encoded alone and an image is a 1-frame video (one vocabulary for
both). With ``causal_norm=True`` (the default) every GroupNorm normalises each frame on its own and
``adaptive_i`` takes the statistics of the latent frame that feature frame ``t`` comes from
(``ceil(t / u)``, ``u`` the temporal upsampling so far), so the encoder *and* the decoder are
strictly causal and a 1-frame clip runs exactly as ``models.magvit2`` on the image.
``causal_norm=False`` is Open-MAGVIT2's model: GroupNorm statistics and AdaGN's mean / std over the
whole clip ``(T, H, W)``, which lets frame 0 depend on later frames.

``temporal_downsample`` defaults to Open-MAGVIT2's rule, ``ch_mult[i] != 1`` for the down stages
(``(1, 2, 2, 4)``: space only at level 0, time too at levels 1 and 2: ``ft = 4``, ``f = 8``).

Inflation from the image model (Open-MAGVIT2's ``video_lfqgan.py``): :func:`inflate_from_image`
maps ``models.magvit2.Magvit2`` params (the same names) onto this model, each 2-D kernel in the
*last* time slice (the current frame of a causal conv), zeros elsewhere, the temporal upsamplers'
``C -> 4C`` weight and bias repeated twice along the output channels (``C -> 8C``); everything else
copied. Then a static clip gives the image model's output on every frame, and any 1-frame clip the
image model's output (tests/test_magvit2_video.py).

Param names are ``models.magvit2``'s (``encoder/down_{i}_block_{j}/conv1``, ``decoder/adaptive_{i}/
gamma``, ``decoder/up_{i}_upsample``...), the AdaGN layers are its ``AdaptiveGroupNorm`` applied to
folded clips; 3-D kernels ``[3, 3, 3, C_in, C_out]``.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.models.magvit2 import DEFAULT_QUANTIZER, AdaptiveGroupNorm
from titok_jax.models.video_tokenizer import VideoTokenizer
from titok_jax.nn import constrain
from titok_jax.nn.conv import GROUPS, check_channels
from titok_jax.nn.conv3d import (FMAP5, Conv3d, depth_to_space_3d, inflate_params, over_frames,
                                 res_block, reshape_batch_major, video_group_norm)
from titok_jax.quantizers import build_quantizer, freeze_spec
from titok_jax.quantizers.factory import input_dim

Dtype = Any
TEMPORAL_PADDINGS = {"zeros": "causal", "replicate": "causal_replicate"}   # -> Conv3d padding


def default_temporal_downsample(ch_mult: Sequence[int]) -> tuple[bool, ...]:
    """Open-MAGVIT2's rule: down stage ``i`` halves time too iff ``ch_mult[i] != 1``."""
    return tuple(int(m) != 1 for m in ch_mult[:-1])


def causal_frames(frames: int, stride: int) -> int:
    """Frames out of a causal stride-``stride`` conv: ``floor((T - 1) / stride) + 1``."""
    return (frames - 1) // stride + 1


def drop_repeated_frames(x: jax.Array, bt: int) -> jax.Array:
    """After a temporal depth-to-space by ``bt``: frames ``1 .. bt - 1`` dropped (``bt T -> bt (T -
    1) + 1``; frame 0 of a 1-frame clip alone), Open-MAGVIT2's ``Upsampler``."""
    return x if bt == 1 else jnp.concatenate([x[:, :1], x[:, bt:]], axis=1)


def adaptive_group_norm(module: AdaptiveGroupNorm, x: jax.Array, q: jax.Array, per_frame: bool,
                        upsampled: int) -> jax.Array:
    """``models.magvit2.AdaptiveGroupNorm`` on a clip ``x [B, T, H, W, C]`` with the style ``q [B,
    T', h, w, z]``. ``per_frame``: frame ``t`` is normalised alone and styled by latent frame
    ``min(ceil(t / upsampled), T' - 1)`` (its statistics over ``(h, w)``); else the clip is
    normalised over ``(T, H, W)`` and styled by ``q``'s statistics over ``(t, h, w)`` (Open-MAGVIT2;
    both by folding time into a 2-D axis, so the 2-D module's params serve)."""
    b, t, h, w, c = x.shape
    if not per_frame:
        y = module(reshape_batch_major(x, (b, t * h, w, c)),
                   reshape_batch_major(q, (b, -1, *q.shape[3:])))
        return reshape_batch_major(y, (b, t, h, w, c))
    src = np.minimum((np.arange(t) + upsampled - 1) // upsampled, q.shape[1] - 1)
    style = jnp.repeat(q, np.bincount(src, minlength=q.shape[1]), axis=1, total_repeat_length=t)
    return over_frames(lambda v: module(v, reshape_batch_major(style, (b * t, *q.shape[2:]))), x)


class Magvit2VideoEncoder(nn.Module):
    """``clips [B, T, H, W, 3]`` in [0, 1] -> ``z [B, T', H/f, W/f, out_channels]`` float32."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int
    temporal_downsample: Sequence[bool]
    causal_norm: bool = True
    padding: str = "causal"
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, clips: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(padding=self.padding, per_frame_norm=self.causal_norm, **kw)
        x = 2.0 * clips.astype(jnp.float32) - 1.0
        x = Conv3d(self.ch, (3, 3, 3), padding=self.padding, use_bias=False, name="conv_in", **kw)(
            constrain(x.astype(self.dtype or x.dtype), FMAP5))
        levels = len(self.ch_mult)
        for i, m in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                x = res_block(self.remat)(self.ch * int(m), name=f"down_{i}_block_{j}",
                                          **block)(x)
            if i != levels - 1:
                stride = (2 if self.temporal_downsample[i] else 1, 2, 2)
                x = Conv3d(x.shape[-1], (3, 3, 3), strides=stride, padding=self.padding,
                           name=f"down_{i}_downsample", **kw)(x)
        for j in range(self.num_res_blocks):
            x = res_block(self.remat)(x.shape[-1], name=f"mid_block_{j}", **block)(x)
        x = nn.silu(video_group_norm(x, "norm_out", self.causal_norm, **kw))
        x = Conv3d(self.out_channels, (1, 1, 1), padding=self.padding, name="conv_out", **kw)(x)
        return constrain(x.astype(jnp.float32), FMAP5)


class Magvit2VideoDecoder(nn.Module):
    """Codes ``q [B, T', h, w, z]`` -> pixels ``[B, (T' - 1) ft + 1, h f, w f, 3]`` in ~[0, 1]."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    temporal_downsample: Sequence[bool]
    causal_norm: bool = True
    padding: str = "causal"
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, q: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(padding=self.padding, per_frame_norm=self.causal_norm, **kw)
        style = q.astype(jnp.float32)
        x = Conv3d(self.ch * int(self.ch_mult[-1]), (3, 3, 3), padding=self.padding,
                   name="conv_in", **kw)(constrain(q.astype(self.dtype or q.dtype), FMAP5))
        for j in range(self.num_res_blocks):
            x = res_block(self.remat)(x.shape[-1], name=f"mid_block_{j}", **block)(x)
        upsampled = 1   # temporal upsampling so far: feature frame t <- latent ceil(t / upsampled)
        for i in reversed(range(len(self.ch_mult))):
            x = adaptive_group_norm(AdaptiveGroupNorm(name=f"adaptive_{i}", **kw), x, style,
                                    self.causal_norm, upsampled)
            for j in range(self.num_res_blocks):
                x = res_block(self.remat)(self.ch * int(self.ch_mult[i]), name=f"up_{i}_block_{j}",
                               **block)(x)
            if i != 0:
                bt = 2 if self.temporal_downsample[i - 1] else 1
                x = Conv3d(4 * bt * x.shape[-1], (3, 3, 3), padding=self.padding,
                           name=f"up_{i}_upsample", **kw)(x)
                x = constrain(drop_repeated_frames(depth_to_space_3d(x, (bt, 2, 2)), bt), FMAP5)
                upsampled *= bt
        x = nn.silu(video_group_norm(x, "norm_out", self.causal_norm, **kw))
        y = Conv3d(3, (3, 3, 3), padding=self.padding, name="conv_out", **kw)(x)
        y = y.astype(jnp.float32)
        return (y + 1.0) / 2.0


class Magvit2Video(VideoTokenizer):
    """MAGVIT-v2 / Open-MAGVIT2 causal video tokenizer with the video tokenizer interface
    (``models.video_tokenizer``).

    ``encode(clips [B, T, H, W, 3], train)`` -> ``(codes [B, T', H/f, W/f, z] f32,
    QuantizerOutput)`` with ``out.indices`` int32 ``[B, T', H/f, W/f]``, ``T' = (T - 1) / ft + 1``;
    ``decode(codes)`` / ``decode_tokens(indices)`` -> pixels ``[B, T, H, W, 3]`` f32 in ~[0, 1]
    (unclamped); ``__call__(clips, train)`` -> ``(reconstruction, QuantizerOutput)``;
    ``pre_quant(clips)`` -> what LFQ quantizes. ``T - 1`` must be a multiple of ``ft`` (the clips
    that decode back to ``T`` frames) and ``H, W`` multiples of ``f``.

    Attributes (defaults = Open-MAGVIT2's UCF-101 model, ``ucf101_lfqfan_128_L.yaml``: 17 x 128^2
    -> 5 x 16^2 tokens of 2^18 codes):
      num_frames, image_size: the nominal clip (``latent_shape``, ``num_latent_tokens``).
      ch, ch_mult, num_res_blocks, z_channels: as ``models.magvit2`` (z_channels = the LFQ bits).
      temporal_downsample: a flag per down stage (None: ``ch_mult[i] != 1``, Open-MAGVIT2's rule).
      causal_norm: per-frame norm statistics, strictly causal (module docstring); False:
        Open-MAGVIT2's clip-wide statistics.
      temporal_padding: what the causal convs put before the clip: ``"zeros"`` (``kt - 1`` zero
        frames, Open-MAGVIT2) or ``"replicate"`` (copies of frame 0).
      remat: recompute every ResBlock3D's activations in the backward pass (``nn.remat``;
        same params and gradients, less memory).
      quantizer: the bottleneck's sub-config (default OM2's LFQ, ``magvit2.DEFAULT_QUANTIZER``).
      dtype: compute dtype of the CNNs (the quantizer stays float32); param_dtype: float32.
    """

    num_frames: int = 17
    image_size: int = 128
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 18
    temporal_downsample: Sequence[bool] | None = None
    causal_norm: bool = True
    temporal_padding: str = "zeros"
    remat: bool = False
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    NAME = "MAGVIT-v2 video"

    def __post_init__(self) -> None:
        # hashable fields whatever the config gave (a JSON round trip turns tuples into lists)
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if self.temporal_downsample is not None:
            object.__setattr__(self, "temporal_downsample",
                               tuple(bool(f) for f in self.temporal_downsample))
        super().__post_init__()

    @property
    def _flags(self) -> tuple[bool, ...]:
        if self.temporal_downsample is None:
            return default_temporal_downsample(self.ch_mult)
        flags = tuple(bool(f) for f in self.temporal_downsample)
        if len(flags) != len(self.ch_mult) - 1:
            raise ValueError(f"{self.NAME}: temporal_downsample needs {len(self.ch_mult) - 1} "
                             f"flags (one per down stage), got {len(flags)}")
        return flags

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self._flags)

    def latent_frames(self, frames: int) -> int:
        for flag in self._flags:
            frames = causal_frames(frames, 2 if flag else 1)
        return frames

    def check_frames(self, frames: int) -> None:
        if frames < 1 or (frames - 1) % self.temporal_factor:
            ft = self.temporal_factor
            raise ValueError(f"{self.NAME}: {frames} frames is not 1 + a multiple of the temporal "
                             f"downsampling factor {ft} (1 + {ft} k frames <-> 1 + k latent "
                             f"frames)")

    def setup(self) -> None:
        check_channels(self.ch, self.ch_mult, self.NAME)
        if self.ch % GROUPS:
            raise ValueError(f"{self.NAME}: ch {self.ch} is not a multiple of {GROUPS}")
        if self.num_res_blocks < 1 or self.z_channels < 1:
            raise ValueError(f"{self.NAME}: num_res_blocks and z_channels must be >= 1")
        if self.temporal_padding not in TEMPORAL_PADDINGS:
            raise ValueError(f"{self.NAME}: temporal_padding must be one of "
                             f"{sorted(TEMPORAL_PADDINGS)}, got {self.temporal_padding!r}")
        self.check_nominal()
        trunk = dict(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                     temporal_downsample=self._flags, causal_norm=self.causal_norm,
                     padding=TEMPORAL_PADDINGS[self.temporal_padding], dtype=self.dtype,
                     param_dtype=self.param_dtype, remat=self.remat)
        self.encoder = Magvit2VideoEncoder(
            out_channels=input_dim(self.quantizer, self.z_channels), **trunk)
        self.quantize = build_quantizer(self.quantizer, self.z_channels, dtype=jnp.float32,
                                        param_dtype=self.param_dtype)
        self.decoder = Magvit2VideoDecoder(**trunk)

    def inflate_image_params(self, params_2d: Any, params_3d: Any) -> Any:
        """``models.magvit2.Magvit2`` params -> this model's: :func:`inflate_from_image`."""
        return inflate_from_image(params_2d, params_3d)


def inflate_from_image(params_2d: Any, params_3d: Any) -> Any:
    """``models.magvit2.Magvit2`` params -> params of the ``Magvit2Video`` whose params (or shapes)
    are ``params_3d``: kernels into the last time slice, the temporal upsamplers' weight and bias
    repeated twice along the output channels (Open-MAGVIT2's ``video_lfqgan.py``;
    ``nn.conv3d.inflate_params``)."""
    return inflate_params(params_2d, params_3d, mode="last")


# Open-MAGVIT2's UCF-101 video tokenizer (ucf101_lfqfan_128_L.yaml): 17 x 128^2 -> 5 x 16^2.
OPEN_MAGVIT2_VIDEO_UCF_128: dict[str, Any] = dict(num_frames=17, image_size=128, ch=128,
                                                  ch_mult=(1, 2, 2, 4), num_res_blocks=4,
                                                  z_channels=18, causal_norm=False,
                                                  quantizer=dict(DEFAULT_QUANTIZER))
