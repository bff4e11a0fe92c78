"""The extractor model (models/extractor.py, models/extractor_masking.py): MAE input masking removes
exactly the patches it claims (with their positions), r = 1 leaves class + latent slots only, the
encoder's cost falls with r, nested dropout / prefix decoding, decoder masking counts and what the
decoder sees, the continuous bottleneck, the published size's parameter count."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.models import extractor_masking as M
from titok_jax.models.extractor import EXTRACTOR_VARIANTS, Extractor

B, S, P_SIZE = 2, 16, 4   # 16 px, 4 px patches: a 4 x 4 grid, P = 16
G, P, N = S // P_SIZE, (S // P_SIZE) ** 2, 4


def micro(**overrides):
    kw = dict(image_size=S, patch_size=P_SIZE, encoder_width=16, encoder_depth=2, encoder_heads=2,
              decoder_width=16, decoder_depth=1, decoder_heads=2, num_latent_tokens=N, token_size=3,
              quantizer={"name": "fsq", "levels": [5, 5, 5]}, repa_layer=0, repa_dim=8,
              repa_hidden_dim=16, token_prior=1.0, init_scheme="xavier")
    return Extractor(**{**kw, **overrides})


def images(seed=0, batch=B):
    return jax.random.uniform(jax.random.key(seed), (batch, S, S, 3))


@pytest.fixture(scope="module")
def model_and_vars(fast_compile):
    m = micro()
    v = nn.unbox(jax.jit(m.init)(jax.random.key(0), images()))
    # the decoder's patch embedding for visible patches and the null code start at zero / random:
    # give the dropped code a value so that "dropped" differs from "a zero code"
    v["params"]["dropped_code"] = jnp.asarray([0.3, -0.2, 0.1])
    return m, v


def patch_slice(i):
    r, c = divmod(int(i), G)
    return slice(r * P_SIZE, (r + 1) * P_SIZE), slice(c * P_SIZE, (c + 1) * P_SIZE)


def test_keep_indices_are_distinct_sorted_and_uniform():
    keep = np.asarray(M.random_keep_indices(jax.random.key(1), 500, P, 5))
    assert keep.shape == (500, 5) and keep.dtype == np.int32
    assert (np.diff(keep, axis=1) > 0).all() and keep.min() >= 0 and keep.max() < P
    counts = np.bincount(keep.ravel(), minlength=P) / 500      # each patch kept w.p. 5/16
    np.testing.assert_allclose(counts, 5 / P, atol=0.08)
    assert M.keep_counts((0, 0.25, 0.5, 0.75, 1), P) == (16, 12, 8, 4, 0)
    with pytest.raises(ValueError, match="summing to 1"):
        M.check_ratios((0.5, 1.0), (0.3, 0.3), "masking.encoder")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        M.check_ratios((1.5,), None, "masking.encoder")


def test_encoder_sees_exactly_the_kept_patches_with_their_positions(model_and_vars):
    """The sequence entering the blocks is [cls, the kept patches' own (embedding + position)]:
    ln_pre's rows equal the full sequence's rows at 1 + keep; pixels of removed patches change
    nothing, pixels of a kept patch do; the order of ``keep`` does not matter (positions travel
    with the patches, not with the sequence slots)."""
    m, v = model_and_vars
    x = images()
    keep = M.random_keep_indices(jax.random.key(3), B, P, 6)
    latents = lambda imgs, k: m.apply(v, imgs, k, method="latents")   # noqa: E731
    _, inter = m.apply(v, x, keep, method="latents", capture_intermediates=True)
    enc = inter["intermediates"]["encoder"]
    full = enc["positional_embedding"]["__call__"][0]                  # [cls, all patches] + pos
    ln = v["params"]["encoder"]["ln_pre"]
    mu, var = full.mean(-1, keepdims=True), full.var(-1, keepdims=True)
    want = (full - mu) / jnp.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]
    got = enc["ln_pre"]["__call__"][0]
    assert got.shape == (B, 1 + 6 + N, 16)
    np.testing.assert_allclose(got[:, 1:7], jnp.take_along_axis(want[:, 1:], keep[..., None], 1),
                               atol=1e-5)
    np.testing.assert_allclose(got[:, :1], want[:, :1], atol=1e-5)
    z = latents(x, keep)
    removed = [i for i in range(P) if i not in set(np.asarray(keep[0]).tolist())]
    x2 = np.array(x)
    for i in removed:
        x2[0][patch_slice(i)] = 1.0 - x2[0][patch_slice(i)]
    np.testing.assert_array_equal(np.asarray(latents(jnp.asarray(x2), keep)[0]), np.asarray(z[0]))
    x3 = np.array(x)
    x3[0][patch_slice(keep[0, 0])] = 1.0 - x3[0][patch_slice(keep[0, 0])]
    assert np.abs(np.asarray(latents(jnp.asarray(x3), keep)[0] - z[0])).max() > 1e-4
    np.testing.assert_allclose(latents(x, keep[:, ::-1]), z, atol=1e-5)   # order-free


def test_ratio_one_leaves_only_class_and_latent_slots(model_and_vars):
    m, v = model_and_vars
    none = jnp.zeros((B, 0), jnp.int32)
    _, inter = m.apply(v, images(), none, method="latents", capture_intermediates=True)
    assert inter["intermediates"]["encoder"]["ln_pre"]["__call__"][0].shape == (B, 1 + N, 16)
    a = m.apply(v, images(0), none, method="latents")
    b = m.apply(v, images(1), none, method="latents")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))    # no image content reaches them
    rec, _, feats, _ = m.apply(v, images(), keep=none, method="forward")
    assert rec.shape == (B, S, S, 3) and feats.shape == (B, 0, 8)


def test_encoder_cost_falls_with_the_masking_ratio(fast_compile):
    """One compiled encoder per bucket (static kept counts): FLOPs strictly fall as r grows."""
    m = micro(encoder_width=32, encoder_heads=2, repa_dim=0, repa_layer=-1, token_prior=0.0)
    v = jax.eval_shape(m.init, jax.random.key(0), images())
    flops = []
    for n in M.keep_counts((0.0, 0.25, 0.5, 0.75, 1.0), P):
        keep = jax.ShapeDtypeStruct((B, n), jnp.int32)
        fn = jax.jit(lambda v_, x, k: m.apply(v_, x, k, method="latents"))
        cost = fn.lower(v, jax.ShapeDtypeStruct((B, S, S, 3), jnp.float32), keep).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops.append(float(cost["flops"]))
    assert all(a > b for a, b in zip(flops, flops[1:])), flops


def test_nested_dropout_and_prefix_decoding(model_and_vars):
    """Slots >= k hold the learned dropped code in training (keep_k) and in a prefix decode, so
    a prefix decodes exactly as training saw it, and tokens past k change nothing."""
    m, v = model_and_vars
    codes, out = m.apply(v, images(), method="encode")
    padded = m.apply(v, codes, jnp.array([1, 3]), method="pad_codes")
    np.testing.assert_array_equal(np.asarray(padded[0, :1]), np.asarray(codes[0, :1]))
    np.testing.assert_array_equal(np.asarray(padded[1, :3]), np.asarray(codes[1, :3]))
    np.testing.assert_allclose(padded[0, 1:], np.broadcast_to([0.3, -0.2, 0.1], (3, 3)), atol=1e-7)
    ids = out.indices
    for k in (1, 2, N):
        prefix = m.apply(v, ids[:, :k], method="decode_tokens")
        trained = m.apply(v, codes, keep_k=jnp.full((B,), k), method="decode")
        np.testing.assert_allclose(prefix, trained, atol=1e-5)
    # in training (keep_k), codes past k change nothing
    noisy = codes.at[:, 2:].add(0.7)
    np.testing.assert_array_equal(np.asarray(m.apply(v, noisy, keep_k=jnp.full((B,), 2), method="decode")),
                                  np.asarray(m.apply(v, codes, keep_k=jnp.full((B,), 2), method="decode")))
    moved = m.apply(v, noisy, method="decode") - m.apply(v, codes, method="decode")
    assert np.abs(np.asarray(moved)).max() > 1e-5
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        m.apply(v, jnp.zeros((B, N + 1), jnp.int32), method="decode_tokens")


def test_decoder_masking_counts_and_what_the_decoder_sees(model_and_vars):
    visible, ratio = M.decoder_visible(jax.random.key(5), 400, P, (0.5, 0.75, 1.0), (0.2, 0.3, 0.5))
    visible, ratio = np.asarray(visible), np.asarray(ratio)
    assert set(np.unique(ratio).tolist()) == {0.5, 0.75, 1.0}
    np.testing.assert_array_equal(visible.sum(1), P - np.round(ratio * P).astype(int))
    np.testing.assert_allclose([np.mean(ratio == r) for r in (0.5, 0.75, 1.0)], (0.2, 0.3, 0.5), atol=0.07)
    w = np.asarray(M.pixel_weights(jnp.asarray(~visible[:2]), P_SIZE, S))
    for b in range(2):
        for i in range(P):
            assert (w[b][patch_slice(i)] == float(not visible[b, i])).all()
    # the decoder reads the visible patches' pixels and nothing of the masked ones
    m, v = model_and_vars
    x = images()
    codes, _ = m.apply(v, x, method="encode")
    mask = jnp.zeros((B, P), bool).at[:, :5].set(True)
    base = m.apply(v, codes, x, mask, method="decode")
    x2 = np.array(x)
    x2[:, 8:, 8:] = 0.0                      # masked patches only (rows/cols 2..3)
    np.testing.assert_array_equal(np.asarray(m.apply(v, codes, jnp.asarray(x2), mask, method="decode")),
                                  np.asarray(base))
    x3 = np.array(x)
    x3[:, :4, :4] = 0.0                      # patch 0: visible
    assert np.abs(np.asarray(m.apply(v, codes, jnp.asarray(x3), mask, method="decode") - base)).max() > 1e-5
    none = m.apply(v, codes, x, jnp.zeros((B, P), bool), method="decode")
    np.testing.assert_allclose(none, m.apply(v, codes, method="decode"), atol=1e-6)   # m = 1: TiTok's
    assert np.abs(np.asarray(none - base)).max() > 1e-5


def test_continuous_bottleneck_features_are_the_posterior_mean(fast_compile):
    m = micro(quantizer={"name": "vae"}, repa_dim=0, repa_layer=-1)
    v = nn.unbox(jax.jit(m.init)({"params": jax.random.key(0), "sample": jax.random.key(1)}, images()))
    feats = m.apply(v, images(), method="latents")
    codes, out = m.apply(v, images(), method="encode")
    assert feats.shape == (B, N, 3) and out.indices is None
    np.testing.assert_allclose(feats, codes, atol=1e-6)
    assert m.apply(v, codes[:, :2], method="decode_tokens").shape == (B, S, S, 3)


def test_param_names_carry_logical_axes_and_the_published_count():
    m = micro()
    boxed = m.init(jax.random.key(0), images())["params"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
    kw = dict(EXTRACTOR_VARIANTS["bl128"], scan_layers=True)
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    params = nn.unbox(jax.eval_shape(Extractor(**kw).init, jax.random.key(0), x)["params"])
    count = lambda t: sum(math.prod(a.shape) for a in jax.tree.leaves(t))   # noqa: E731
    # the docstring's numbers: 398.21M in all, 7.87M of them the training-only REPA projector
    assert round(count(params) / 1e6, 2) == 398.21, count(params)
    assert round(count(params["repa_projector"]) / 1e6, 2) == 7.87


def test_scanned_layers_give_the_same_masked_forward(model_and_vars):
    """``scan_layers``: the REPA features ride the scan's carry; same outputs as unrolled."""
    from titok_jax.nn.scan import match_layers
    m, v = model_and_vars
    ms = micro(scan_layers=True)
    like = nn.unbox(jax.eval_shape(ms.init, jax.random.key(0), images()))
    vs = {"params": match_layers(jax.tree.map(np.asarray, v["params"]), like["params"])}
    keep = M.random_keep_indices(jax.random.key(4), B, P, 5)
    visible = jnp.zeros((B, P), bool).at[:, 3].set(True)
    kw = dict(keep=keep, keep_k=jnp.array([2, 4]), visible=visible, method="forward")
    rec, _, feats, _ = m.apply(v, images(), **kw)
    rec_s, _, feats_s, _ = ms.apply(vs, images(), **kw)
    assert feats_s.shape == (B, 5, 8)
    np.testing.assert_allclose(feats_s, feats, atol=1e-5)
    np.testing.assert_allclose(rec_s, rec, atol=1e-5)


def test_pixel_head_unchanged_and_what_the_flow_switch_adds(model_and_vars):
    """decoder_head="pixel" (the default) keeps the param tree and outputs the extractor had before
    the flow head existed (values recorded from that version: 74 params, names and shapes hashed,
    the sum of their initial values, reconstruction values); "flow" swaps the mask token for the
    noised-patch embedding, the time embedding and the head's adaLN; decoder REPA adds its own
    projector."""
    import hashlib
    m, v = model_and_vars
    v = {"params": {**v["params"], "dropped_code": jnp.zeros((3,))}}   # as initialised
    flat = jax.tree_util.tree_flatten_with_path(v["params"])[0]
    desc = ";".join(f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}" for p, x in flat)
    assert len(flat) == 74 and hashlib.sha256(desc.encode()).hexdigest()[:16] == "cc1167ea93267a34"
    np.testing.assert_allclose(sum(float(np.sum(np.asarray(x, np.float64))) for _, x in flat),
                               170.44919872276296, rtol=1e-6)
    rec, _ = jax.jit(m.apply)(v, images(1))
    np.testing.assert_allclose(float(np.asarray(rec, np.float64).sum()), 19.137571, rtol=1e-4)
    np.testing.assert_allclose(rec[0, 0, 0], [1.1327472, -0.25067288, -0.71649057], atol=1e-4)
    vis = jnp.zeros((B, P), bool).at[:, 3].set(True)
    out = jax.jit(lambda v_, x: m.apply(v_, x, keep_k=jnp.array([2, 4]), visible=vis,
                                        method="forward"))(v, images(1))
    np.testing.assert_allclose(out[0][1, 9, 3], [0.8044833, 0.29285052, 0.6628178], atol=1e-4)
    assert out[3] is None
    shapes = lambda mod: nn.unbox(jax.eval_shape(mod.init, jax.random.key(0), images())["params"])  # noqa: E731
    pixel = set(shapes(m)["decoder"])
    flow = shapes(micro(decoder_head="flow", decoder_repa_layer=0))
    assert set(flow["decoder"]) - pixel == {"noised_embed", "time_embed", "head_adaln"}
    assert pixel - set(flow["decoder"]) == {"mask_token"}
    assert flow["decoder_repa_projector"]["fc_2"]["kernel"].shape == (16, 8)
    with pytest.raises(ValueError, match="decoder_head"):
        shapes(micro(decoder_head="diffusion"))
