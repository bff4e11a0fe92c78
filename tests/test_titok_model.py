"""Single-stage TiTok (titok_jax.models.titok): sizes, a float64 numpy reference of the whole tiny
model with PyTorch-layout semantics, read-out slots, the legacy reshape, the VAE bottleneck,
dtypes, logical names and a short overfitting run through the straight-through estimator."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from titok_jax.models import TITOK_VARIANTS, TiTok, titok_variant
from titok_jax.quantizers import gaussian_posterior
from titok_jax.nn import LOGICAL_AXES

# titok.md 2.7 (millions of parameters, rounded to 10k).
REFERENCE_MILLIONS = {"bl64_vq": 390.02, "bl128_vq": 390.18, "sl256_vq": 330.26,
                      "ll32_vae": 606.88, "bl64_vae": 389.42, "bl128_vae": 389.58}
B = 2


def _images(seed=0, batch=B, size=32):
    """Smooth random images in [0, 1]."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1, (batch, size // 8, size // 8, 3))
    return jnp.asarray(np.kron(small, np.ones((1, 8, 8, 1))), jnp.float32)


def _init(name, **overrides):
    model = TiTok(**titok_variant(name, **overrides))
    variables = model.init(jax.random.key(0), _images())
    return model, nn.unbox(variables)


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------- sizes and names


@pytest.mark.parametrize("name", sorted(REFERENCE_MILLIONS))
def test_published_parameter_counts(name):
    kw = titok_variant(name)
    s = kw["image_size"]
    shapes = nn.unbox(jax.eval_shape(TiTok(**kw).init, jax.random.key(0),
                                     jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)))
    params = shapes["params"]
    n = _count(params) / 1e6
    ref = REFERENCE_MILLIONS[name]
    assert round(n, 2) == ref, (n, ref)             # exact to the reference's rounding
    # State-dict shapes of titok.md 2.8 (non-legacy pixel head).
    ew, dw, nt = kw["encoder_width"], kw["decoder_width"], kw["num_latent_tokens"]
    enc, dec = params["encoder"], params["decoder"]
    vae = kw["quantizer"]["name"] == "vae"
    assert params["latent_tokens"].shape == (nt, ew)
    assert enc["patch_embed"]["proj"]["kernel"].shape == (3 * 16 * 16, ew)
    assert enc["positional_embedding"]["embedding"].shape == (257, ew)
    assert enc["conv_out"]["kernel"].shape == (ew, 32 if vae else 64)
    assert f"transformer_{kw['encoder_depth'] - 1}" in enc
    assert f"transformer_{kw['encoder_depth']}" not in enc
    assert dec["decoder_embed"]["kernel"].shape == (16 if vae else 64, dw)
    assert dec["mask_token"].shape == (1, 1, dw)
    assert dec["latent_token_positional_embedding"]["embedding"].shape == (nt, dw)
    assert dec["ffn"]["kernel"].shape == (dw, 768)
    assert dec["conv_out"]["kernel"].shape == (3, 3, 3, 3)
    assert ("quantize" in params) != vae
    if not vae:
        assert params["quantize"]["codebook"].shape == (8192, 64)


def test_variant_table():
    for name, kw in TITOK_VARIANTS.items():
        TiTok(**kw)                                   # every entry is a valid set of fields
    assert titok_variant("tiny", dtype=jnp.bfloat16)["dtype"] == jnp.bfloat16
    with pytest.raises(KeyError):
        titok_variant("huge")
    with pytest.raises(TypeError):
        titok_variant("tiny", widht=3)


@pytest.mark.parametrize("name", ["tiny", "tiny_vae"])
def test_every_param_has_logical_names(name):
    model = TiTok(**titok_variant(name))
    variables = jax.eval_shape(model.init, jax.random.key(0), _images())
    boxed = jax.tree_util.tree_leaves_with_path(
        variables, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert len(boxed) == len(jax.tree_util.tree_leaves(variables))
    for path, leaf in boxed:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), where
        assert len(leaf.names) == leaf.value.ndim, where
        named = [n for n in leaf.names if n is not None]
        assert set(named) <= LOGICAL_AXES and len(named) == len(set(named)), where
        assert leaf.value.dtype == jnp.float32, where


# --------------------------------------------------------------------------- numpy reference


def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _block(x, p):
    """open_clip ResidualAttentionBlock in float64."""
    h = _ln(x, p["ln_1"])
    qkv = np.einsum("btd,dshk->btshk", h, p["attn"]["qkv"]["kernel"]) + p["attn"]["qkv"]["bias"]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v)
    x = x + np.einsum("bqhd,hde->bqe", o, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
    h = _ln(x, p["ln_2"])
    h = h @ p["mlp"]["fc_in"]["kernel"] + p["mlp"]["fc_in"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))                      # exact GELU
    return x + h @ p["mlp"]["fc_out"]["kernel"] + p["mlp"]["fc_out"]["bias"]


def _reference(params, images, kw):
    """The TiTok forward written the PyTorch way (NCHW conv patch embed, Rearrange pixel head)."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)      # NCHW
    bsz, ps = x.shape[0], kw["patch_size"]
    g = kw["image_size"] // ps
    e, d = p["encoder"], p["decoder"]
    ew, dw = kw["encoder_width"], kw["decoder_width"]
    # Conv2d(3, W, p, stride p) with a torch weight [W, 3, p, p].
    wt = e["patch_embed"]["proj"]["kernel"].T.reshape(ew, 3, ps, ps)
    patches = np.einsum("dcij,bcgihj->bdgh", wt, x.reshape(bsz, 3, g, ps, g, ps))
    patches = patches.reshape(bsz, ew, g * g).transpose(0, 2, 1) + e["patch_embed"]["proj"]["bias"]
    seq = np.concatenate([np.broadcast_to(e["class_embedding"], (bsz, 1, ew)), patches], 1)
    seq = seq + e["positional_embedding"]["embedding"]
    lat = p["latent_tokens"] + e["latent_token_positional_embedding"]["embedding"]
    seq = _ln(np.concatenate([seq, np.broadcast_to(lat, (bsz,) + lat.shape)], 1), e["ln_pre"])
    for i in range(kw["encoder_depth"]):
        seq = _block(seq, e[f"transformer_{i}"])
    z = _ln(seq[:, 1 + g * g:], e["ln_post"]) @ e["conv_out"]["kernel"] + e["conv_out"]["bias"]
    cb = p["quantize"]["codebook"]
    idx = np.argmin(((z[:, :, None, :] - cb) ** 2).sum(-1), axis=-1)
    zq = cb[idx]
    t = zq @ d["decoder_embed"]["kernel"] + d["decoder_embed"]["bias"]
    t = t + d["latent_token_positional_embedding"]["embedding"][:t.shape[1]]
    m = np.concatenate([np.broadcast_to(d["class_embedding"], (bsz, 1, dw)),
                        np.broadcast_to(d["mask_token"], (bsz, g * g, dw))], 1)
    seq = _ln(np.concatenate([m + d["positional_embedding"]["embedding"], t], 1), d["ln_pre"])
    for i in range(kw["decoder_depth"]):
        seq = _block(seq, d[f"transformer_{i}"])
    h = _ln(seq[:, 1:1 + g * g], d["ln_post"]).transpose(0, 2, 1).reshape(bsz, dw, g, g)
    return _pixel_head(d, h, kw).transpose(0, 2, 3, 1), idx


def _conv3x3(y, p):
    ct = p["kernel"].transpose(3, 2, 0, 1)                        # torch [out, in, kh, kw]
    yp = np.pad(y, ((0, 0), (0, 0), (1, 1), (1, 1)))
    s = y.shape[-1]
    return sum(np.einsum("oi,biyx->boyx", ct[:, :, a, c], yp[:, :, a:a + s, c:c + s])
               for a in range(3) for c in range(3)) + p["bias"][:, None, None]


def _cells(h, p, k, ch):
    """Conv1x1 on the grid ``h [B, W, g, g]`` then Rearrange('b (p1 p2 c) h w -> b c (h p1) (w p2)')."""
    bsz, g = h.shape[0], h.shape[-1]
    y = np.einsum("ow,bwhv->bohv", p["kernel"].T, h) + p["bias"][:, None, None]
    return y.reshape(bsz, k, k, ch, g, g).transpose(0, 3, 4, 1, 5, 2).reshape(bsz, ch, g * k, g * k)


def _bilinear(y, size):
    """Bilinear resize of ``y [B, C, n, n]`` to ``size`` (half-pixel centres, edges repeated)."""
    n = y.shape[-1]
    pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = pos - lo
    rows = y[:, :, lo] * (1 - w)[:, None] + y[:, :, hi] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., hi] * w


def _pixel_head(d, h, kw):
    """The pixel head in NCHW float64, with the ``head_channels`` / ``lowres_head`` options."""
    ps, ch, k = kw["patch_size"], kw.get("head_channels", 0), kw.get("lowres_head", 0)
    y = _cells(h, d["ffn"], ps, ch or 3)
    if ch:
        y = _conv3x3(y, d["conv_mid"])
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))                  # exact GELU
    out = _conv3x3(y, d["conv_out"])
    if k:
        out = out + _bilinear(_cells(h, d["ffn_lowres"], k, 3), y.shape[-1])
    return out


def _perturbed(params, seed=0):
    """Params far from init, so that every detail shows: O(1) activations (GELU in its
    non-linear range), O(1) codes (clear argmin margins) and token / position tables scaled to
    ~0.01 (LayerNorm inputs with variance ~1e-4, where its eps matters)."""
    rng = np.random.default_rng(seed)

    def f(path, a):
        name = jax.tree_util.keystr(path)
        if "codebook" in name:
            return jnp.asarray(rng.normal(0, 1, a.shape), a.dtype)
        if any(k in name for k in ("embedding", "latent_tokens", "mask_token")):
            return a * 0.1
        return a + jnp.asarray(rng.normal(0, 0.1, a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(f, params)


def test_forward_matches_float64_reference():
    kw = titok_variant("tiny", encoder_depth=1, decoder_depth=1)
    model = TiTok(**kw)
    x = _images(1)
    params = _perturbed(nn.unbox(model.init(jax.random.key(3), x)["params"]))
    recon, out = model.apply({"params": params}, x)
    ref, idx = _reference(params, x, kw)
    np.testing.assert_array_equal(np.asarray(out.indices), idx)
    np.testing.assert_allclose(np.asarray(recon), ref, rtol=0, atol=5e-6)   # float32: 6e-7 measured


def test_head_options_match_float64_reference():
    """``head_channels`` (a conv3x3 + GELU layer at full resolution) and ``lowres_head`` (a
    bilinearly enlarged k x k-per-patch colour image added to the output) against numpy; off, the
    params are the official head's."""
    kw = titok_variant("tiny", encoder_depth=1, decoder_depth=1, head_channels=4, lowres_head=2)
    model = TiTok(**kw)
    x = _images(1)
    params = _perturbed(nn.unbox(model.init(jax.random.key(3), x)["params"]))
    assert params["decoder"]["ffn"]["kernel"].shape[-1] == 8 * 8 * 4
    assert params["decoder"]["ffn_lowres"]["kernel"].shape[-1] == 2 * 2 * 3
    recon, out = model.apply({"params": params}, x)
    ref, idx = _reference(params, x, kw)
    np.testing.assert_array_equal(np.asarray(out.indices), idx)
    np.testing.assert_allclose(np.asarray(recon), ref, rtol=0, atol=5e-6)
    # the lowres path is visible in the output: without it the reference differs
    assert np.abs(_reference(params, x, {**kw, "lowres_head": 0})[0] - ref).max() > 1e-2
    plain = jax.eval_shape(TiTok(**titok_variant("tiny", encoder_depth=1, decoder_depth=1)).init,
                           jax.random.key(0), x)
    assert sorted(plain["params"]["decoder"]) == sorted(
        k for k in params["decoder"] if k not in ("conv_mid", "ffn_lowres"))


# --------------------------------------------------------------------------- shapes and round trips


def test_vq_shapes_and_dtypes():
    model, variables = _init("tiny")
    recon, out = model.apply(variables, _images())
    assert recon.shape == (B, 32, 32, 3) and recon.dtype == jnp.float32
    assert out.indices.shape == (B, 32) and out.indices.dtype == jnp.int32
    assert set(out.losses) == {"commitment", "codebook"}
    # beta = 0.25: both terms are the mean of the same squared error in the forward pass.
    np.testing.assert_allclose(out.losses["commitment"], 0.25 * out.losses["codebook"], rtol=1e-6)
    codebook = np.asarray(variables["params"]["quantize"]["codebook"])     # U(+-1/K), K = 64
    assert np.abs(codebook).max() <= 1 / 64 and np.abs(codebook).max() > 0.9 / 64
    codes, out2 = model.apply(variables, _images(), method="encode")
    assert codes.shape == (B, 32, 8) and codes.dtype == jnp.float32
    np.testing.assert_array_equal(out.indices, out2.indices)
    with pytest.raises(ValueError):
        model.apply(variables, jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError):
        model.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.uint8))


@pytest.mark.parametrize("name", ["tiny", "tiny_l2"])
def test_decode_tokens_equals_forward(name):
    model, variables = _init(name)
    recon, out = model.apply(variables, _images(2))
    codes, _ = model.apply(variables, _images(2), method="encode")
    if name == "tiny_l2":                    # l2-normalised codes reach the decoder
        np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, rtol=1e-6)
    from_tokens = model.apply(variables, out.indices, method="decode_tokens")
    np.testing.assert_allclose(from_tokens, recon, rtol=0, atol=1e-6)
    from_b1n = model.apply(variables, out.indices[:, None], method="decode_tokens")
    np.testing.assert_allclose(from_b1n, recon, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, codes, method="decode"), recon, atol=1e-6)


def test_vae_shapes_and_eval_is_mean():
    model, variables = _init("tiny_vae")
    assert "quantize" not in variables["params"]
    recon, out = model.apply(variables, _images())
    assert recon.shape == (B, 32, 32, 3) and recon.dtype == jnp.float32
    assert out.indices is None and set(out.losses) == {"kl"}
    np.testing.assert_allclose(out.losses["kl"], 1e-6 * out.metrics["kl"], rtol=1e-6)
    codes, out2 = model.apply(variables, _images(), method="encode")
    assert codes.shape == (B, 32, 8) and codes.dtype == jnp.float32
    np.testing.assert_array_equal(codes, out2.aux["mean"])
    np.testing.assert_allclose(model.apply(variables, codes, method="decode_tokens"), recon,
                               atol=1e-6)


def test_vae_train_samples_with_the_sample_stream():
    model, variables = _init("tiny_vae")
    x = _images()
    enc = lambda key: model.apply(variables, x, train=True, method="encode",
                                  rngs={"sample": key})
    z1, out = enc(jax.random.key(1))
    z1b, _ = enc(jax.random.key(1))
    z2, _ = enc(jax.random.key(2))
    np.testing.assert_array_equal(z1, z1b)
    assert not np.allclose(z1, z2)
    mean, std = out.aux["mean"], np.exp(0.5 * np.asarray(out.aux["logvar"]))
    eps = (np.asarray(z1) - np.asarray(mean)) / std
    assert abs(eps.mean()) < 0.2 and 0.8 < eps.std() < 1.2      # 512 standard normal draws
    with pytest.raises(Exception):
        model.apply(variables, x, train=True)                   # no "sample" rng


def test_gaussian_posterior_kl_matches_numpy():
    rng = np.random.default_rng(0)
    moments = rng.normal(0, 2, (3, 5, 8)).astype(np.float32)
    moments[0, 0, 4] = 50.0                                     # logvar above the clamp
    moments[1, 2, 5] = -80.0                                    # logvar below the clamp
    z, out = gaussian_posterior(jnp.asarray(moments), sample_key=None, kl_weight=1e-6)
    m = moments.astype(np.float64)
    mean, logvar = m[..., :4], np.clip(m[..., 4:], -30, 20)
    kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2))   # per image
    np.testing.assert_allclose(out.metrics["kl"], kl.mean(), rtol=1e-6)          # measured 7e-10
    np.testing.assert_allclose(out.losses["kl"], 1e-6 * kl.sum() / 3, rtol=1e-6)  # measured 3e-8
    np.testing.assert_array_equal(z, moments[..., :4])
    np.testing.assert_allclose(out.aux["logvar"], logvar, rtol=1e-6)


# --------------------------------------------------------------------------- read-outs


def test_encoder_reads_the_latent_slots():
    """Without blocks, slot n of the read-out is ln_post(ln_pre(latent_tokens[n] + pos[n])):
    the image cannot reach it. With blocks it does, and the latent tokens matter too."""
    model, variables = _init("tiny", encoder_depth=0)
    e = lambda v, x: _encoder_io(model, v, x)[1]
    z_a, z_b = e(variables, _images(0)), e(variables, _images(5))
    np.testing.assert_array_equal(z_a, z_b)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    enc = p["encoder"]
    lat = p["latent_tokens"] + enc["latent_token_positional_embedding"]["embedding"]
    ref = _ln(_ln(lat, enc["ln_pre"]), enc["ln_post"]) @ enc["conv_out"]["kernel"] \
        + enc["conv_out"]["bias"]
    np.testing.assert_allclose(z_a[0], ref, rtol=0, atol=1e-6)         # float32: 6e-8 measured

    model, variables = _init("tiny")
    variables = {**variables, "params": _perturbed(variables["params"])}
    e = lambda v, x: _encoder_io(model, v, x)[1]
    z0 = e(variables, _images(0))
    assert np.abs(z0 - e(variables, _images(5))).max() > 1e-2 * np.abs(z0).max()
    bumped = jax.tree_util.tree_map(lambda a: a, variables)
    noise = jax.random.normal(jax.random.key(9), (64,))          # not constant: LN removes that
    bumped["params"]["latent_tokens"] = variables["params"]["latent_tokens"].at[3].add(noise)
    assert np.abs(z0 - e(bumped, _images(0))).max() > 1e-2 * np.abs(z0).max()


def test_decoder_paints_from_mask_tokens():
    """Without blocks the pixels come from the (shared) mask token alone; with blocks the
    tokens steer them through self-attention."""
    model, variables = _init("tiny", decoder_depth=0)
    codes = jax.random.normal(jax.random.key(1), (B, 32, 8))
    out_a = model.apply(variables, codes, method="decode")
    out_b = model.apply(variables, codes[::-1] * 3.0, method="decode")
    np.testing.assert_array_equal(out_a, out_b)

    model, variables = _init("tiny")
    variables = {**variables, "params": _perturbed(variables["params"])}
    img_a = np.asarray(model.apply(variables, codes, method="decode"))
    img_b = np.asarray(model.apply(variables, codes[::-1] * 3.0, method="decode"))
    assert np.abs(img_a - img_b).max() > 1e-2 * np.abs(img_a).max()
    bumped = jax.tree_util.tree_map(lambda a: a, variables)
    bumped["params"]["decoder"]["mask_token"] = variables["params"]["decoder"]["mask_token"] + \
        jax.random.normal(jax.random.key(9), (1, 1, 64))          # not constant: LN removes that
    img_c = np.asarray(model.apply(bumped, codes, method="decode"))
    assert np.abs(img_a - img_c).max() > 1e-2 * np.abs(img_a).max()


def _encoder_io(model, variables, x):
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]["encoder"]
    return np.asarray(inter["ln_post"]["__call__"][0], np.float64), \
        np.asarray(inter["__call__"][0], np.float64)


def test_legacy_reshape_quirk():
    legacy, variables = _init("tiny", is_legacy=True)
    plain = TiTok(**titok_variant("tiny", is_legacy=False))
    kernel = np.asarray(variables["params"]["encoder"]["conv_out"]["kernel"], np.float64)
    bias = np.asarray(variables["params"]["encoder"]["conv_out"]["bias"], np.float64)
    x = _images(4)
    h, z = _encoder_io(legacy, variables, x)                      # h [B, N, W]
    bsz, n, w = h.shape
    scrambled = h.reshape(bsz, w, n)                              # PyTorch reshape, no transpose
    np.testing.assert_allclose(z, np.einsum("bwn,wc->bnc", scrambled, kernel) + bias,
                               rtol=0, atol=5e-7)                    # float32: 4e-8 measured
    h2, z2 = _encoder_io(plain, variables, x)
    np.testing.assert_allclose(h2, h, rtol=1e-6, atol=1e-6)       # same params, same features
    np.testing.assert_allclose(z2, h @ kernel + bias, rtol=0, atol=5e-7)
    assert not np.allclose(z, z2, atol=1e-3)


# --------------------------------------------------------------------------- dtypes, remat


def test_bfloat16_compute_with_float32_params():
    _, variables = _init("tiny")                 # params do not depend on the compute dtype
    model = TiTok(**titok_variant("tiny", dtype=jnp.bfloat16))
    fwd = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                           mutable=["intermediates"]))
    (recon, out), state = fwd(variables, _images())
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), _images()))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(shapes))
    inter = state["intermediates"]
    assert inter["encoder"]["transformer_1"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["decoder"]["transformer_1"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["encoder"]["__call__"][0].dtype == jnp.float32  # quantizer input in f32
    assert recon.dtype == jnp.float32 and np.isfinite(np.asarray(recon)).all()
    ref, ref_out = TiTok(**titok_variant("tiny")).apply(variables, _images())
    np.testing.assert_array_equal(out.indices, ref_out.indices)
    # bf16 keeps 8 bits: measured max error 4e-4 = 0.006 of the output's range (~1.5 bf16 ulps of
    # it); allow 10x that.
    err = np.abs(np.asarray(recon) - np.asarray(ref)).max()
    assert 0 < err < 0.06 * np.abs(np.asarray(ref)).max()


def test_remat_wraps_the_blocks():
    _, variables = _init("tiny")
    x = _images()
    for remat in (False, True):
        model = TiTok(**titok_variant("tiny", remat=remat))
        loss = lambda p: jnp.mean(model.apply({"params": p}, x)[0] ** 2)
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == remat
        if remat:
            np.testing.assert_array_equal(model.apply(variables, x)[0],
                                          TiTok(**titok_variant("tiny")).apply(variables, x)[0])


# --------------------------------------------------------------------------- training


def test_tiny_overfits_one_batch_through_the_straight_through_estimator():
    model, variables = _init("tiny")
    x = _images(7, batch=4)
    params, stats = variables["params"], variables["quantizer_stats"]
    opt = optax.adam(2e-3)

    def loss_fn(p, s, quantizer_weight):
        (recon, out), upd = model.apply({"params": p, "quantizer_stats": s}, x, train=True,
                                        mutable=["quantizer_stats"])
        loss = jnp.mean((recon - x) ** 2) + quantizer_weight * out.total_loss()
        return loss, upd["quantizer_stats"]

    @jax.jit
    def step(p, s, o, quantizer_weight):
        (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, quantizer_weight)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), s, o, loss, grads

    opt_state = opt.init(params)
    # The reconstruction loss alone reaches the encoder: only the straight-through path can.
    *_, grads = step(params, stats, opt_state, 0.0)
    assert float(jnp.abs(grads["encoder"]["patch_embed"]["proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["latent_tokens"]).max()) > 0

    losses = []
    for _ in range(30):
        params, stats, opt_state, loss, _ = step(params, stats, opt_state, 1.0)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
    # quantizer_stats passed through: 30 steps x 4 images x 32 tokens counted.
    assert float(stats["quantize"]["usage"]["code_counts"].sum()) == 30 * 4 * 32


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
