"""FlexTok model: masks by hand, nested-dropout distributions, mask-token replacement, prefix
decoding, determinism, and the published parameter counts."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.models.flextok import FLEXTOK_VARIANTS, FlexTok
from titok_jax.models.flextok_blocks import (encoder_mask, keep_lengths, keep_mask,
                                             patch_embed_with_posemb, swiglu_hidden)

MICRO = dict(image_size=32, vae_latent_channels=4, vae_base_channels=32, vae_channel_mult=(1, 1, 2, 2),
             vae_num_res_blocks=1, encoder_width=32, encoder_depth=2, decoder_width=32,
             decoder_depth=2, head_dim=16, num_registers=4, repa_layer=0, repa_dim=16,
             repa_hidden_dim=32)


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def micro():
    """The micro model with every param perturbed (zero-init heads / adaLN would hide the
    conditioning)."""
    from titok_jax.tasks.titok_stages import random_params
    model = FlexTok(**MICRO)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    # host-drawn random params (no init compile): kernels N(0, 1/fan_in), so the zero-init head
    # and adaLN of a fresh model do not hide the conditioning
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(1), x))
    v = {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), c) for k, c in abstract.items()}
    v["params"] = jax.tree.map(jnp.asarray, random_params(model, 32, seed=0))

    def encode(v, x):
        lat = model.apply(v, x, method="vae_latents")
        codes, out = model.apply(v, lat, method="encode_latents")
        return lat, codes, out.indices

    return model, v, x, jax.jit(encode)(v, x)


def test_encoder_mask_by_hand():
    m = np.asarray(encoder_mask(3, 2))[0, 0].astype(int)
    want = np.array([[1, 1, 1, 0, 0],     # patches: all patches, no registers
                     [1, 1, 1, 0, 0],
                     [1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 0],     # register 0: patches + itself
                     [1, 1, 1, 1, 1]])    # register 1: patches + registers 0, 1
    np.testing.assert_array_equal(m, want)


def test_registers_are_causal(micro):
    """Encoder output register i depends on register params j <= i only."""
    model, v, x, (lat, _, _) = micro
    enc = jax.jit(lambda p: model.apply({"params": p}, lat, method=lambda m, z: m.encoder(z)))
    base = enc(v["params"])
    p2 = jax.tree.map(lambda a: a, v["params"])
    bump = jax.random.normal(jax.random.key(9), p2["encoder"]["registers"][2].shape)
    p2["encoder"]["registers"] = p2["encoder"]["registers"].at[2].add(bump)
    out = enc(p2)
    np.testing.assert_array_equal(np.asarray(out[:, :2]), np.asarray(base[:, :2]))
    assert np.all(np.abs(np.asarray(out[:, 2:] - base[:, 2:])).max(axis=(0, 2)) > 1e-4)


@pytest.mark.parametrize("mode,support,probs", [
    ("uniform", list(range(1, 17)), [1 / 16] * 16),
    ("pow2", [1, 2, 4, 8, 16], [1 / 5] * 5),
    ("uniform_pow2", [1, 2, 4, 8, 16], [1 / 16, 1 / 16, 2 / 16, 4 / 16, 8 / 16]),
])
def test_keep_lengths_distribution(mode, support, probs):
    n = 40_000
    k = np.asarray(keep_lengths(jax.random.key(7), n, 16, mode))
    values, counts = np.unique(k, return_counts=True)
    assert values.tolist() == support
    freq = counts / n
    sd = np.sqrt(np.asarray(probs) * (1 - np.asarray(probs)) / n)
    assert np.all(np.abs(freq - probs) < 5 * sd), (freq, probs)
    assert np.all(np.asarray(keep_lengths(jax.random.key(1), 8, 16, "none")) == 16)
    with pytest.raises(ValueError, match="power-of-two"):
        keep_lengths(jax.random.key(0), 4, 12, "pow2")


def test_keep_mask():
    np.testing.assert_array_equal(np.asarray(keep_mask(jnp.array([1, 3]), 4)),
                                  [[True, False, False, False], [True, True, True, False]])


def test_dropped_registers_become_the_mask_token(micro):
    """Codes in dropped slots (j >= k) do not reach the decoder; a kept slot does."""
    model, v, x, (lat, codes, _) = micro
    b, r = codes.shape[:2]
    t = jnp.full((b,), 0.5)
    keep = keep_mask(jnp.full((b,), 2), r)
    cond = jnp.ones((b,), bool)
    run = jax.jit(lambda c, kp: model.apply(v, lat, t, c, kp, cond,
                                            method=lambda m, *a: m.decoder(*a)[0]))
    dec = lambda c, kp=keep: run(c, kp)  # noqa: E731
    base = dec(codes)
    np.testing.assert_array_equal(np.asarray(dec(codes.at[:, 2:].set(0.7))), np.asarray(base))
    assert float(jnp.abs(dec(codes.at[:, 1].set(0.7)) - base).max()) > 1e-4
    # all slots dropped == every register is the mask token, whatever the codes
    none = keep_mask(jnp.zeros((b,), jnp.int32), r)
    np.testing.assert_array_equal(np.asarray(dec(codes, none)), np.asarray(dec(-codes, none)))


def _decoder_input(model, v, lat, t, codes, keep, cond):
    """The decoder's token sequence ``[B, P + R, W]`` as it enters block 0."""
    seen = []

    def grab(next_fun, args, kwargs, context):
        m = context.module
        if (context.method_name == "__call__" and m.name == "block_0"
                and m.parent is not None and m.parent.name == "decoder"):
            seen.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        model.apply(v, lat, t, codes, keep, cond, method=lambda m, *a: m.decoder(*a))
    assert len(seen) == 1
    return np.asarray(seen[0])


def test_decoder_input_follows_the_official_order(micro):
    """apple/ml-flextok's decoder sums the register posemb, THEN ``MaskedNestedDropout`` overwrites
    slots >= k with the mask token: dropped slots carry the bare mask token (no posemb); kept slots
    are ``Dense(codes) + posemb``. The official order is the reference."""
    model, v, x, (lat, codes, _) = micro
    b, r = codes.shape[:2]
    t = jnp.full((b,), 0.5)
    k = 2
    keep = keep_mask(jnp.full((b,), k), r)
    seq = _decoder_input(model, v, lat, t, codes, keep, jnp.ones((b,), bool))
    p = seq.shape[1] - r
    dp = v["params"]["decoder"]
    mask_token = np.asarray(dp["mask_token"])
    np.testing.assert_array_equal(seq[:, p + k:],
                                  np.broadcast_to(mask_token, (b, r - k, mask_token.size)))
    fc = dp["from_codes"]
    kept = np.asarray(codes)[:, :k] @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"])
    np.testing.assert_allclose(seq[:, p:p + k], kept + np.asarray(dp["register_posemb"])[:k],
                               rtol=1e-5, atol=1e-5)
    # unconditional rows: every register slot is the null token
    seq_u = _decoder_input(model, v, lat, t, codes, keep, jnp.zeros((b,), bool))
    np.testing.assert_array_equal(seq_u[:, p:], np.broadcast_to(np.asarray(dp["null_token"]),
                                                                seq_u[:, p:].shape))


def test_patch_posemb_is_the_official_table():
    """FlexTok's patch tokens get apple/ml-flextok's 2D sin-cos table (row half first; vectors made
    by running the official ``build_2d_sincos_posemb``: tests/data/flextok/make_posemb_vectors.py).
    The official order is the reference. Zero patch-embedding weights leave only the table."""
    class Embed(nn.Module):
        @nn.compact
        def __call__(self, z):
            return patch_embed_with_posemb(z, 2, 16, "patch_embed", dtype=None,
                                           param_dtype=jnp.float32)

    z = jnp.zeros((1, 8, 8, 4))      # 4x4 patch grid
    params = jax.tree.map(jnp.zeros_like, nn.unbox(Embed().init(jax.random.key(0), z)))
    got = np.asarray(Embed().apply(params, z))[0]
    ref = np.load(os.path.join(os.path.dirname(__file__), "data", "flextok", "posemb_vectors.npz"))
    np.testing.assert_allclose(got, ref["square_4x4_d16"], rtol=0, atol=1e-6)


def test_prefix_decoding_and_determinism(micro):
    model, v, x, (_, _, ids) = micro
    assert ids.shape == (2, 4) and ids.dtype == jnp.int32
    decode = jax.jit(lambda p, t, key, g: model.apply(p, t, key=key, steps=3, guidance_scale=g,
                                                      method="decode_tokens"))
    key = jax.random.key(5)
    one = np.asarray(decode(v, ids[:, :1], key, 1.0))
    full = np.asarray(decode(v, ids, key, 1.0))
    assert one.shape == full.shape == (2, 32, 32, 3)
    assert np.all(np.isfinite(one)) and np.all(np.isfinite(full))
    assert np.abs(one - full).max() > 1e-4            # the later tokens matter
    np.testing.assert_array_equal(np.asarray(decode(v, ids[:, :1], key, 1.0)), one)   # same seed
    assert np.abs(np.asarray(decode(v, ids[:, :1], jax.random.key(6), 1.0)) - one).max() > 1e-4
    # a traced guidance scale (as Tokenizer.decode passes it) == the same Python number
    concrete = jax.jit(lambda p, t: model.apply(p, t, key=key, steps=3, guidance_scale=3.0,
                                                method="decode_tokens"))(v, ids[:, :1])
    np.testing.assert_allclose(np.asarray(decode(v, ids[:, :1], key, 3.0)), np.asarray(concrete),
                               atol=1e-5)
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        model.apply(v, ids[:, :0], key=key, steps=2, guidance_scale=1.0, method="decode_tokens")


# Reference (reference/flextok_flowmo.md A2, "parameter count from the code formulas"): encoder
# ~85M / 287M, decoder ~170M / 573M / 2.16B, VAE ~84M; totals = their sums.
REFERENCE = {"d12_d12": (85e6, 170e6), "d18_d18": (287e6, 573e6), "d18_d28": (287e6, 2.16e9)}


@pytest.mark.parametrize("variant", sorted(REFERENCE))
def test_published_parameter_counts(variant):
    model = FlexTok(**FLEXTOK_VARIANTS[variant])
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    p = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
    enc_ref, dec_ref = REFERENCE[variant]
    d_dec = model.decoder_width
    dec_blocks = _count({k: v for k, v in p["decoder"].items() if k.startswith("block_")})
    h = swiglu_hidden(d_dec)   # adaLN expansion 2: 12 d^2 + 12 d beside attention and MLP
    assert dec_blocks == model.decoder_depth * (4 * d_dec ** 2 + 3 * d_dec * h + 12 * d_dec ** 2 + 12 * d_dec)
    assert abs(_count(p["encoder"]) / enc_ref - 1) < 0.01
    assert abs(dec_blocks / dec_ref - 1) < 0.01
    assert abs(_count(p["vae"]) / 84e6 - 1) < 0.01
    inference = _count(p) - _count(p["repa_projector"])
    assert abs(inference / (enc_ref + dec_ref + 84e6) - 1) < 0.01
    assert model.codebook_size == 64_000 and model.num_latent_tokens == 256 and model.token_size == 6


def test_bad_settings_are_one_line_errors():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    for bad, match in [(dict(nested_dropout="pow2", num_registers=6), "power-of-two"),
                       (dict(nested_dropout="nope"), "unknown nested_dropout"),
                       (dict(image_size=36), "not a multiple"),
                       (dict(repa_layer=5), "repa_layer")]:
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(FlexTok(**{**MICRO, **bad}).init, jax.random.key(0), x)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
