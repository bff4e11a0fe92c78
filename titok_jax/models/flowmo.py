"""FlowMo (Sargent et al. 2025, "Flow to the Mode"): a pixel MMDiT encoder, lookup-free binary
codes, and a rectified-flow MMDiT decoder conditioned on the codes.

Shapes (FlowMo-Lo / -Hi: 256x256 images, patch 4 -> 64x64 = 4096 image tokens of 48 values;
``code_length`` L = 256 latent tokens of ``token_bits`` b = 18 / 56 bits)::

    encode:  x in [0,1] -> u = 2x - 1 -> patchify (hwc) -> encoder MMDiT (no timestep; latent stream
             from a learned vector) -> z [B, L, b] -> sign -> codes in {-1, +1} (straight-through)
    decode:  velocity v(x_t, t | codes) = decoder MMDiT(patchify(x_t), [codes || 1] * keep, t)
             (keep = 0 is the null condition of CFG: the whole code *and* the mask channel zeroed);
             x_1 ~ N(0, I) in [-1, 1] pixel space, Euler on the power grid t_i = (i/n)^4, CFG 1.5 on
             t in [0.145, 0.505] (``titok_jax.flow``); pixels = (x_0 + 1) / 2

Integer token API (the bit order; FlowMo itself defines none). A latent token's b sign bits
``s_0 .. s_{b-1}`` (bit = ``[z_i > 0]``, z == 0 counts as 0) are cut into ``G = b / id_bits``
sub-tokens; sub-token ``h`` holds the bits ``h, h + G, h + 2G, ...`` (FlowMo's entropy sub-tokens,
``b t (fg fh) -> b fg (t fh)``), least significant first::

    id[l * G + h] = sum_k 2^k * s_{k G + h}(token l)          ids: int32 [B, L * G], in [0, 2^id_bits)

- FlowMo-Lo: ``id_bits = 18`` (G = 1): 256 ids of 18 bits per image, id = sum_i 2^i s_i.
- FlowMo-Hi: 56 bits do not fit an int32, so ``id_bits = 14`` (G = 4): 1024 ids of 14 bits per
  image, token ``l``'s four ids adjacent (the paper's "1024 tokens, vocabulary 2^14" reading).

``num_latent_tokens`` and ``codebook_size`` describe these ids (``L * G`` and ``2^id_bits``), so
``titok_jax.load_tokenizer`` works unchanged for both; ``code_length`` is the transformer's L.
:func:`ids_to_bits` / :func:`bits_to_ids` convert between ids and ``[B, L, b]`` bits.

The LFQ entropy loss is FlowMo's: T = 0.1, weights 0.0025 (entropy) and 0.000625 (commitment),
batch entropy over ``entropy_group_bits``-bit sub-tokens (9 for Lo, 14 for Hi) laid out as above.

Activations are constrained to "batch split, features whole" (``nn.activation_sharding``) at the
MMDiTs' boundaries (patch tokens, codes, velocities; the blocks constrain their own streams).

``remat`` / ``remat_policy`` / ``scan_layers`` go to both MMDiTs (``models.mmdit``: with
``scan_layers`` their blocks but the last are one ``nn.scan``, params ``layers/block/...``).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.flow import GuidanceConfig, match_batch, sample, start_noise, time_grid
from titok_jax.flow.interpolation import edm_sigma_to_t
from titok_jax.models.mmdit import MMDiT, flowmo_position_ids
from titok_jax.nn import check_images, constrain, patchify, unpatchify
from titok_jax.nn.activation_sharding import BTD
from titok_jax.quantizers.base import QuantizerOutput
from titok_jax.quantizers.lfq import LFQ

FLOWMO_GUIDANCE_INTERVAL = (edm_sigma_to_t(0.17), edm_sigma_to_t(1.02))   # t in [0.1453, 0.5050]
BHWC = ("batch", None, None, None)   # pixels [B, S, S, 3]: the batch split, the rest free


# ----------------------------------------------------------------------------- bit layout
def to_subtokens(z: jax.Array, id_bits: int) -> jax.Array:
    """``[..., b] -> [..., G, id_bits]`` with ``[..., h, k] = z[..., k G + h]`` (G = b / id_bits)."""
    g = z.shape[-1] // id_bits
    return jnp.swapaxes(z.reshape(z.shape[:-1] + (id_bits, g)), -1, -2)


def from_subtokens(z: jax.Array) -> jax.Array:
    """Inverse of :func:`to_subtokens`: ``[..., G, id_bits] -> [..., G * id_bits]``."""
    z = jnp.swapaxes(z, -1, -2)
    return z.reshape(z.shape[:-2] + (z.shape[-2] * z.shape[-1],))


def ids_to_bits(ids: Any, token_bits: int, id_bits: int) -> np.ndarray:
    """int ids ``[B, L * G]`` -> bool sign bits ``[B, L, token_bits]`` (numpy; module docstring)."""
    ids = np.asarray(ids, np.int64)
    g = token_bits // id_bits
    sub = (ids.reshape(ids.shape[0], -1, g)[..., None] >> np.arange(id_bits)) & 1   # [B, L, G, k]
    return np.swapaxes(sub, -1, -2).reshape(ids.shape[0], -1, token_bits).astype(bool)


def bits_to_ids(bits: Any, id_bits: int) -> np.ndarray:
    """bool/0-1 sign bits ``[B, L, token_bits]`` -> int32 ids ``[B, L * G]`` (numpy)."""
    bits = np.asarray(bits).astype(np.int64)
    b, n, tb = bits.shape
    sub = np.swapaxes(bits.reshape(b, n, id_bits, tb // id_bits), -1, -2)           # [B, L, G, k]
    return (sub << np.arange(id_bits)).sum(-1).reshape(b, -1).astype(np.int32)


class FlowMo(nn.Module):
    """The FlowMo tokenizer (module docstring). Flow-decoder contract of ``titok_jax.api``."""

    image_size: int = 256
    patch_size: int = 4
    code_length: int = 256
    token_bits: int = 18
    id_bits: int | None = None
    entropy_group_bits: int = 9
    encoder_width: int = 768
    encoder_depth: int = 8
    encoder_heads: int = 12
    decoder_width: int = 1152
    decoder_depth: int = 16
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    encoder_rope_axes: Sequence[int] | None = None
    decoder_rope_axes: Sequence[int] | None = None
    double_norm: bool = True
    entropy_weight: float = 0.0025
    commitment_weight: float = 0.000625
    entropy_temperature: float = 0.1
    track_usage: bool = True
    sampler_rho: float = 4.0
    guidance_interval: Sequence[float] | None = FLOWMO_GUIDANCE_INTERVAL
    remat: bool = False
    remat_policy: str = ""
    scan_layers: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    # titok_jax.api flow-decoder contract
    flow_decoder = True
    variable_length = False
    default_steps = 25
    default_guidance = 1.5
    quantizer_name = "lfq"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"FlowMo image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        ib = self._id_bits()
        if not 1 <= ib <= 31 or self.token_bits % ib:
            raise ValueError(f"FlowMo id_bits must be in [1, 31] and divide token_bits={self.token_bits}, "
                             f"got {ib} (56-bit tokens: id_bits=14)")
        if ib % self.entropy_group_bits:
            raise ValueError(f"FlowMo entropy_group_bits {self.entropy_group_bits} must divide id_bits {ib}")
        super().__post_init__()

    def _id_bits(self) -> int:
        return int(self.id_bits if self.id_bits is not None else self.token_bits)

    # ---- what the API reads --------------------------------------------------------------------
    @property
    def ids_per_token(self) -> int:
        return self.token_bits // self._id_bits()

    @property
    def num_latent_tokens(self) -> int:
        """Integer ids per image: ``code_length * token_bits / id_bits``."""
        return self.code_length * self.ids_per_token

    @property
    def codebook_size(self) -> int:
        return 2 ** self._id_bits()

    @property
    def token_size(self) -> int:
        return self.token_bits

    # ---- modules -------------------------------------------------------------------------------
    def setup(self) -> None:
        common = dict(mlp_ratio=self.mlp_ratio, rope_theta=self.rope_theta, double_norm=self.double_norm,
                      remat=self.remat, remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                      dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = MMDiT(self.encoder_width, self.encoder_depth, self.encoder_heads, self.token_bits,
                             readout="txt", time_conditioned=False,
                             rope_axes_dims=self.encoder_rope_axes, **common)
        self.decoder = MMDiT(self.decoder_width, self.decoder_depth, self.decoder_heads,
                             3 * self.patch_size ** 2, readout="img", time_conditioned=True,
                             rope_axes_dims=self.decoder_rope_axes, **common)
        ib, g = self._id_bits(), self.entropy_group_bits
        self.lfq = LFQ(bits=ib, entropy_weight=self.entropy_weight,
                       commitment_weight=self.commitment_weight, temperature=self.entropy_temperature,
                       batch_entropy_group_size=g,
                       entropy_grouping="subtokens" if g < ib else "separate",
                       track_usage=self.track_usage)

    def _ids(self) -> tuple[jax.Array, jax.Array]:
        grid = self.image_size // self.patch_size
        img, txt = flowmo_position_ids(grid, grid, self.code_length)
        return jnp.asarray(img), jnp.asarray(txt)

    # ---- encoder + quantizer -------------------------------------------------------------------
    def encode_continuous(self, images: jax.Array) -> jax.Array:
        """Images ``[B, S, S, 3]`` in [0, 1] -> pre-quantization codes ``[B, L, token_bits]``."""
        self._check_images(images)
        img_pos, txt_pos = self._ids()
        tokens = constrain(patchify(constrain(2.0 * images - 1.0, BHWC), self.patch_size, "hwc"), BTD)
        return constrain(self.encoder(tokens, None, img_pos, txt_pos, num_txt=self.code_length), BTD)

    def quantize(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """``z [B, L, b]`` -> (codes in {-1, +1} ``[B, L, b]`` (straight-through), output with int32
        ids ``[B, L * G]``)."""
        codes, out = self.lfq(to_subtokens(z.astype(jnp.float32), self._id_bits()), train=train)
        ids = out.indices.reshape(z.shape[0], -1)
        return from_subtokens(codes), out.replace(indices=ids)

    def encode(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Images in [0, 1] -> ``(codes [B, L, b], QuantizerOutput with .indices [B, L * G])``."""
        return self.quantize(self.encode_continuous(images), train=train)

    def tokens_to_codes(self, tokens: jax.Array) -> jax.Array:
        """int ids ``[B, L * G]`` -> codes ``[B, L, token_bits]`` in {-1, +1} (float32)."""
        sub = self.lfq.indices_to_codes(jnp.asarray(tokens, jnp.int32).reshape(
            tokens.shape[0], self.code_length, self.ids_per_token))
        return from_subtokens(sub)

    # ---- decoder -------------------------------------------------------------------------------
    def velocity(self, x_t: jax.Array, t: jax.Array, codes: jax.Array,
                 keep: jax.Array | None = None) -> jax.Array:
        """Decoder velocity ``[B, S, S, 3]`` at noisy pixels ``x_t`` (in the [-1, 1] data space), flow
        time ``t [B]``, codes ``[B, L, b]``; ``keep [B]`` (bool or 0/1) multiplies the conditioning
        ``[codes || 1]`` (0 = the null condition)."""
        cond = jnp.concatenate([codes.astype(jnp.float32),
                                jnp.ones(codes.shape[:-1] + (1,), jnp.float32)], axis=-1)
        if keep is not None:
            cond = cond * jnp.asarray(keep, jnp.float32)[:, None, None]
        img_pos, txt_pos = self._ids()
        s, p = self.image_size, self.patch_size
        tokens = constrain(patchify(constrain(x_t, BHWC), p, "hwc"), BTD)
        v = self.decoder(tokens, constrain(cond, BTD), img_pos, txt_pos, jnp.asarray(t, jnp.float32))
        return constrain(unpatchify(v, p, s, s, 3, "hwc"), BHWC)

    def decode_codes(self, codes: jax.Array, *, key: jax.Array | None = None,
                     noise: jax.Array | None = None, steps: int = 25,
                     guidance_scale: float | jax.Array = 1.5) -> jax.Array:
        """Codes ``[B, L, b]`` -> pixels ``[B, S, S, 3]`` (~[0, 1], unclipped): Euler from ``noise``
        (default ``N(0, I)`` drawn from ``key``) along the power-``sampler_rho`` grid with CFG
        ``guidance_scale`` inside ``guidance_interval``. A traced ``guidance_scale`` (e.g. a jit
        argument) runs the guided branch as CFG at scale 2 on ``(c, (2 - w) c + (w - 1) u)``, which
        is ``u + w (c - u)`` exactly."""
        b = codes.shape[0]
        noise = start_noise(self.noise_shape(b), key, noise, "pixels in [-1, 1] space")
        grid = time_grid(int(steps), "power", rho=float(self.sampler_rho))
        interval = tuple(self.guidance_interval) if self.guidance_interval is not None else None
        concrete = not isinstance(guidance_scale, jax.core.Tracer)
        w = float(guidance_scale) if concrete else guidance_scale
        guidance = None
        if not concrete or w != 1.0:
            guidance = GuidanceConfig(scale=w if concrete else 2.0, interval=interval)

        def velocity_fn(x, t, cond):
            v = self.velocity(x, t, match_batch(codes, x.shape[0]), keep=cond)
            if concrete or x.shape[0] == b:
                return v
            c, u = v[:b], v[b:]
            return jnp.concatenate([c, (2.0 - w) * c + (w - 1.0) * u])

        x0 = sample(velocity_fn, noise, grid, "euler", guidance)
        return (x0 + 1.0) / 2.0

    def noise_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The sampler's initial noise: pixels ``(B, S, S, 3)`` (t = 1 is noise)."""
        return (int(batch), self.image_size, self.image_size, 3)

    def decode_tokens(self, tokens: jax.Array, *, key: jax.Array | None = None,
                      noise: jax.Array | None = None, steps: int = 25,
                      guidance_scale: float | jax.Array = 1.5) -> jax.Array:
        """int ids ``[B, L * G]`` -> pixels ``[B, S, S, 3]`` (see :meth:`decode_codes`)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.num_latent_tokens:
            raise ValueError(f"FlowMo decode expects ids [B, {self.num_latent_tokens}], got {tokens.shape}")
        return self.decode_codes(self.tokens_to_codes(tokens), key=key, noise=noise, steps=steps,
                                 guidance_scale=guidance_scale)

    # ---- training forward (also what init runs) ------------------------------------------------
    def __call__(self, images: jax.Array, train: bool = False, *, t: jax.Array | None = None,
                 noise: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """One flow-matching forward: encode + quantize ``images`` (in [0, 1]), then the decoder's
        velocity at ``x_t = (1 - t) u + t noise`` (``u = 2 images - 1``). ``t``/``noise`` default to
        0.5 / zeros. Returns ``(v [B, S, S, 3], {"codes", "quantizer", "x", "x_t", "t"})``."""
        codes, qout = self.encode(images, train=train)
        x = 2.0 * images.astype(jnp.float32) - 1.0
        b = x.shape[0]
        t = jnp.full((b,), 0.5, jnp.float32) if t is None else jnp.asarray(t, jnp.float32)
        noise = jnp.zeros_like(x) if noise is None else noise
        x_t = (1.0 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
        v = self.velocity(x_t, t, codes)
        return v, {"codes": codes, "quantizer": qout, "x": x, "x_t": x_t, "t": t}

    def _check_images(self, images: jax.Array) -> None:
        check_images(images, self.image_size, "FlowMo")

