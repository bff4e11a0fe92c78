"""MAGVIT v1's 3D-VQ tokenizer (Yu et al. 2023, arXiv 2212.05199; google-research/magvit
``videogvt/models/enc_dec_3dcnn.py`` + ``vqvae.py``), NTHWC.

Clips ``[B, T, H, W, 3]`` in **[0, 1]** (no centering, as MAGVIT v1) are encoded to
``z [B, T/ft, H/f, W/f, z_channels]`` (``f = 2**(L - 1)`` with ``L = len(channel_mult)``, ``ft =
2**sum(temporal_downsample)``), vector-quantised (the ``quantizer`` sub-config, default MAGVIT v1's
VQ: 1024 codes, commitment 0.25, codebook 1.0, entropy 0.1 at T 0.01) and decoded to pixels
(float32, unclamped, on the [0, 1] scale). With ``c_i = hidden_channels * channel_mult[i]``,
``n = num_res_blocks`` and ``k = (temporal_kernel_size, 3, 3)``::

    Encoder:  conv_in k (no bias): 3 -> c_0
              down_i (i = 0..L-1): block_j = ResBlock3D(-> c_i), j < n; then unless i = L-1
                                   avg-pool (2 if temporal_downsample[i] else 1, 2, 2)
              mid_j = ResBlock3D(c_{L-1}), j < n
              norm_out -> swish -> conv_out 1x1x1 (bias) -> z_channels
    Decoder:  conv_in k (bias): z_channels -> c_{L-1};  mid_j = ResBlock3D(c_{L-1}), j < n
              for i = L-1 .. 0:  up_i block_j = ResBlock3D(-> c_i), j < n; then unless i = 0
                                 nearest upsample (2 if temporal_downsample[i-1] else 1, 2, 2)
                                 and up_i upsample_conv k (bias)
              norm_out -> swish -> conv_out k (bias) -> 3
    ResBlock3D(x -> c): conv2(swish(norm2(conv1(swish(norm1(x)))))) + (nin_shortcut(x) | x)
                        (k convs and a 1x1x1 shortcut on the block input, all without bias)

Every conv is zero-padded ``k // 2`` on both sides of every axis (Flax ``'SAME'``): **not
causal**. Every GroupNorm has 32 groups and eps 1e-6 with statistics over ``(T, H, W)`` of the clip
(Flax's GroupNorm of a 5-D tensor). Average pooling is TF-style (``nn.conv3d.avg_pool_3d``), the
nearest upsampling a repetition. Kernels start from Flax's default ``lecun_normal`` (MAGVIT v1's).

2-D -> 3-D inflation (MAGVIT v1's ``init_from.inflation = '2d->3d'``, central mode): MAGVIT v1
inflates its 2-D VQGAN of the same layout. Its 2-D twin here is this class with
``temporal_kernel_size=1`` and no temporal downsampling (:func:`image_twin`): every conv then has
a ``[1, kh, kw, I, O]`` kernel, and on a 1-frame clip (an image) it *is* the 2-D VQGAN.
:func:`inflate_from_2d` writes each 2-D kernel into the centre time slice of the 3-D one (zeros
elsewhere) and copies the rest, so on a static clip (one frame repeated) the 3-D model gives the
2-D model's output on every frame. (Our MaskGIT-VQGAN, ``models.vqgan``, has the same layout but
applies its shortcut to the processed features, MaskGIT's quirk, and is not inflatable onto this
block.)

Param names: ``encoder/conv_in``, ``encoder/down_{i}_block_{j}/{norm1,conv1,norm2,conv2,
nin_shortcut}``, ``encoder/mid_{j}``, ``encoder/norm_out``, ``encoder/conv_out``,
``decoder/conv_in``, ``decoder/mid_{j}``, ``decoder/up_{i}_block_{j}``,
``decoder/up_{i}_upsample_conv``, ``decoder/norm_out``, ``decoder/conv_out``, ``quantize/...``.
No MAGVIT v1 weights were released.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.models.video_tokenizer import VideoTokenizer
from titok_jax.nn import constrain
from titok_jax.nn.conv import check_channels
from titok_jax.nn.conv3d import (FMAP5, Conv3d, avg_pool_3d, inflate_params, res_block,
                                 upsample_nearest_3d, video_group_norm)
from titok_jax.quantizers import build_quantizer, freeze_spec
from titok_jax.quantizers.factory import input_dim

Dtype = Any
# MAGVIT v1's VQ (vqgan2d_ucf101_config.py: beta 0.25, codebook 1.0, entropy 0.1 at T 0.01).
DEFAULT_QUANTIZER = {"name": "vq", "codebook_size": 1024, "commitment_weight": 0.25,
                     "codebook_weight": 1.0, "entropy_weight": 0.1, "entropy_temperature": 0.01}
LECUN = nn.initializers.lecun_normal()


def _stage_factors(temporal_downsample: Sequence[bool], i: int) -> tuple[int, int, int]:
    return (2 if temporal_downsample[i] else 1, 2, 2)


class Magvit3DEncoder(nn.Module):
    """``clips [B, T, H, W, 3]`` in [0, 1] -> ``z [B, T/ft, H/f, W/f, out_channels]`` float32."""

    hidden_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int
    temporal_downsample: Sequence[bool]
    temporal_kernel_size: int = 3
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, clips: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        k = (self.temporal_kernel_size, 3, 3)
        block = dict(kernel_size=k, kernel_init=LECUN, **kw)
        x = Conv3d(self.hidden_channels, k, use_bias=False, kernel_init=LECUN, name="conv_in",
                   **kw)(constrain(clips.astype(self.dtype or clips.dtype), FMAP5))
        levels = len(self.channel_mult)
        for i, m in enumerate(self.channel_mult):
            for j in range(self.num_res_blocks):
                x = res_block(self.remat)(self.hidden_channels * int(m),
                                          name=f"down_{i}_block_{j}", **block)(x)
            if i != levels - 1:
                x = avg_pool_3d(x, _stage_factors(self.temporal_downsample, i))
        for j in range(self.num_res_blocks):
            x = res_block(self.remat)(x.shape[-1], name=f"mid_{j}", **block)(x)
        x = nn.silu(video_group_norm(x, "norm_out", False, **kw))
        x = Conv3d(self.out_channels, (1, 1, 1), kernel_init=LECUN, name="conv_out", **kw)(x)
        return constrain(x.astype(jnp.float32), FMAP5)


class Magvit3DDecoder(nn.Module):
    """Codes ``[B, t, h, w, z]`` -> pixels ``[B, t ft, h f, w f, 3]`` float32 (unclamped)."""

    hidden_channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    temporal_downsample: Sequence[bool]
    temporal_kernel_size: int = 3
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        k = (self.temporal_kernel_size, 3, 3)
        block = dict(kernel_size=k, kernel_init=LECUN, **kw)
        x = Conv3d(self.hidden_channels * int(self.channel_mult[-1]), k, kernel_init=LECUN,
                   name="conv_in", **kw)(constrain(codes.astype(self.dtype or codes.dtype), FMAP5))
        for j in range(self.num_res_blocks):
            x = res_block(self.remat)(x.shape[-1], name=f"mid_{j}", **block)(x)
        for i in reversed(range(len(self.channel_mult))):
            c = self.hidden_channels * int(self.channel_mult[i])
            for j in range(self.num_res_blocks):
                x = res_block(self.remat)(c, name=f"up_{i}_block_{j}", **block)(x)
            if i != 0:
                x = upsample_nearest_3d(x, _stage_factors(self.temporal_downsample, i - 1))
                x = Conv3d(c, k, kernel_init=LECUN, name=f"up_{i}_upsample_conv", **kw)(x)
        x = nn.silu(video_group_norm(x, "norm_out", False, **kw))
        x = Conv3d(3, k, kernel_init=LECUN, name="conv_out", **kw)(x)
        return constrain(x.astype(jnp.float32), FMAP5)


class Magvit3D(VideoTokenizer):
    """MAGVIT v1's 3D-VQ with the video tokenizer interface (``models.video_tokenizer``).

    ``encode(clips [B, T, H, W, 3], train)`` -> ``(codes [B, T/ft, H/f, W/f, z] f32,
    QuantizerOutput)`` with ``out.indices`` int32 ``[B, T/ft, H/f, W/f]``; ``decode(codes)`` and
    ``decode_tokens(indices)`` -> pixels ``[B, T, H, W, 3]`` f32 (unclamped); ``__call__(clips,
    train)`` -> ``(reconstruction, QuantizerOutput)``; ``pre_quant(clips)`` -> the encoder's output.
    ``T`` must be a multiple of ``ft`` and ``H, W`` multiples of ``f``.

    Attributes (defaults = the UCF-101 B model, ``vqgan3d_ucf101_config.py``, 16 x 128^2 ->
    4 x 16^2):
      num_frames, image_size: the nominal clip (``latent_shape``, ``num_latent_tokens``).
      hidden_channels, channel_mult, num_res_blocks: MAGVIT v1's ``filters``,
        ``channel_multipliers``, ``num_{enc,dec}_res_blocks`` (every width a multiple of 32).
      temporal_downsample: one flag per down stage (``len(channel_mult) - 1``; extra flags are
        ignored as in MAGVIT v1): stage ``i`` halves T too.
      z_channels: the code dim (MAGVIT v1's ``embedding_dim``).
      temporal_kernel_size: time extent of every 3x3 conv (3; 1 with no temporal downsampling
        gives the 2-D twin, :func:`image_twin`).
      remat: recompute every ResBlock3D's activations in the backward pass (``nn.remat``;
        same params and gradients, less memory).
      quantizer: the bottleneck's sub-config (default ``DEFAULT_QUANTIZER``).
      dtype: compute dtype of the CNNs (the quantizer stays float32); param_dtype: float32.
    """

    num_frames: int = 16
    image_size: int = 128
    hidden_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    temporal_downsample: Sequence[bool] = (True, True, False)
    z_channels: int = 256
    temporal_kernel_size: int = 3
    remat: bool = False
    quantizer: Any = freeze_spec(DEFAULT_QUANTIZER)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    NAME = "MAGVIT-3D"

    def __post_init__(self) -> None:
        # hashable fields whatever the config gave (a JSON round trip turns tuples into lists)
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "temporal_downsample",
                           tuple(bool(f) for f in self.temporal_downsample))
        super().__post_init__()

    @property
    def _flags(self) -> tuple[bool, ...]:
        flags = tuple(bool(f) for f in self.temporal_downsample)
        if len(flags) < len(self.channel_mult) - 1:
            raise ValueError(f"{self.NAME}: temporal_downsample needs {len(self.channel_mult) - 1} "
                             f"flags (one per down stage), got {len(flags)}")
        return flags[:len(self.channel_mult) - 1]

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self._flags)

    def latent_frames(self, frames: int) -> int:
        return frames // self.temporal_factor

    def check_frames(self, frames: int) -> None:
        if frames < 1 or frames % self.temporal_factor:
            raise ValueError(f"{self.NAME}: {frames} frames is not a positive multiple of the "
                             f"temporal downsampling factor {self.temporal_factor}")

    def setup(self) -> None:
        check_channels(self.hidden_channels, self.channel_mult, self.NAME)
        if self.num_res_blocks < 1 or self.z_channels < 1 or self.temporal_kernel_size < 1:
            raise ValueError(f"{self.NAME}: num_res_blocks, z_channels and temporal_kernel_size "
                             f"must be >= 1")
        self.check_nominal()
        trunk = dict(hidden_channels=self.hidden_channels,
                     channel_mult=self.channel_mult,
                     num_res_blocks=self.num_res_blocks, temporal_downsample=self._flags,
                     temporal_kernel_size=self.temporal_kernel_size, dtype=self.dtype,
                     param_dtype=self.param_dtype, remat=self.remat)
        self.encoder = Magvit3DEncoder(out_channels=input_dim(self.quantizer, self.z_channels),
                                       **trunk)
        self.quantize = build_quantizer(self.quantizer, self.z_channels, dtype=jnp.float32,
                                        param_dtype=self.param_dtype)
        self.decoder = Magvit3DDecoder(**trunk)

    def inflate_image_params(self, params_2d: Any, params_3d: Any) -> Any:
        """The image twin's params (:func:`image_twin`) -> this model's: :func:`inflate_from_2d`
        (central)."""
        return inflate_from_2d(params_2d, params_3d)


def image_twin(model: Magvit3D) -> Magvit3D:
    """The 2-D model ``model`` inflates from: the same widths and quantizer with
    ``temporal_kernel_size=1`` and no temporal downsampling (it tokenizes every frame alone;
    ``num_frames=1``: an image is a 1-frame clip)."""
    return model.clone(parent=None, temporal_kernel_size=1, num_frames=1,
                       temporal_downsample=(False,) * (len(model.channel_mult) - 1))


def inflate_from_2d(params_2d: Any, params_3d: Any, mode: str = "central") -> Any:
    """The 2-D twin's params (``[1, kh, kw, I, O]`` kernels, or ``[kh, kw, I, O]`` ones of any
    2-D model with these param names) -> params of the 3-D model whose params (or shapes) are
    ``params_3d`` (MAGVIT v1's central inflation; ``nn.conv3d.inflate_params``)."""
    squeezed = jax.tree_util.tree_map(
        lambda v: v[0] if getattr(v, "ndim", 0) == 5 and v.shape[0] == 1 else v,
        nn.meta.unbox(params_2d))
    return inflate_params(squeezed, params_3d, mode)


# MAGVIT v1 UCF-101 (vqgan3d_ucf101_config.py) B and L; BAIR B: 16 x 64^2 -> 4 x 16^2.
MAGVIT3D_UCF_B: dict[str, Any] = dict(num_frames=16, image_size=128, hidden_channels=64,
                                      channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                                      temporal_downsample=(True, True, False), z_channels=256,
                                      quantizer=dict(DEFAULT_QUANTIZER))
MAGVIT3D_UCF_L: dict[str, Any] = dict(MAGVIT3D_UCF_B, hidden_channels=128)
MAGVIT3D_BAIR_B: dict[str, Any] = dict(MAGVIT3D_UCF_B, image_size=64, channel_mult=(1, 2, 4),
                                       temporal_downsample=(True, True))
