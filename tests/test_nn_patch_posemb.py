"""titok_jax.nn patchify/unpatchify/PatchEmbed and position/timestep embeddings vs numpy."""
import math
import os

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from titok_jax.nn import (LearnedPositionEmbedding, PatchEmbed, TimestepEmbedder, grid_positions,
                          patchify, sincos_1d, sincos_2d, timestep_embedding, unpatchify)

RNG = np.random.default_rng(0)
IMG = RNG.standard_normal((2, 8, 12, 3)).astype(np.float32)   # B, H, W, C (non-square)
P = 4


def _np_patchify_loops(img, p, order):
    """Explicit loops: PyTorch-conv-weight order (c, i, j) for "chw", (i, j, c) for "hwc"."""
    b, h, w, c = img.shape
    gh, gw = h // p, w // p
    out = np.zeros((b, gh * gw, p * p * c), img.dtype)
    for r in range(gh):
        for s in range(gw):
            for i in range(p):
                for j in range(p):
                    for k in range(c):
                        f = k * p * p + i * p + j if order == "chw" else (i * p + j) * c + k
                        out[:, r * gw + s, f] = img[:, r * p + i, s * p + j, k]
    return out


@pytest.mark.parametrize("order", ["hwc", "chw"])
def test_patchify_order_and_exact_roundtrip(order):
    tok = patchify(jnp.asarray(IMG), P, order)
    assert tok.shape == (2, 6, P * P * 3)
    np.testing.assert_array_equal(tok, _np_patchify_loops(IMG, P, order))
    np.testing.assert_array_equal(unpatchify(tok, P, 8, 12, 3, order), IMG)
    with pytest.raises(ValueError):
        unpatchify(tok, P, 12, 8, 4, order)


def test_channel_orders_differ_and_torch_rearrange_is_hwc():
    a, b = patchify(jnp.asarray(IMG), P, "hwc"), patchify(jnp.asarray(IMG), P, "chw")
    assert not np.array_equal(a, b)
    # TiTok head: 'b (p1 p2 c) h w -> b c (h p1) (w p2)' on a [B, p*p*C, gh, gw] conv output.
    feats = RNG.standard_normal((2, P * P * 3, 2, 3))
    img = np.zeros((2, 3, 8, 12))
    for p1 in range(P):
        for p2 in range(P):
            for c in range(3):
                img[:, c, p1::P, p2::P] = feats[:, (p1 * P + p2) * 3 + c]
    tokens = feats.reshape(2, P * P * 3, 6).transpose(0, 2, 1)     # row-major grid tokens
    np.testing.assert_allclose(unpatchify(jnp.asarray(tokens), P, 8, 12, 3, "hwc"),
                               img.transpose(0, 2, 3, 1), rtol=1e-6)


def test_patch_embed_equals_torch_style_conv():
    d = 5
    w_torch = RNG.standard_normal((d, 3, P, P))                   # Conv2d weight [out, in, kh, kw]
    bias = RNG.standard_normal(d)
    want = np.zeros((2, 2, 3, d))
    for r in range(2):
        for s in range(3):
            patch = IMG[:, r * P:(r + 1) * P, s * P:(s + 1) * P, :].astype(np.float64)
            want[:, r, s] = np.einsum("bijc,dcij->bd", patch, w_torch) + bias
    want = want.reshape(2, 6, d)
    m = PatchEmbed(patch_size=P, features=d)                       # default "chw"
    v = {"params": {"proj": {"kernel": jnp.asarray(w_torch.reshape(d, -1).T, jnp.float32),
                             "bias": jnp.asarray(bias, jnp.float32)}}}
    shapes = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), jnp.asarray(IMG)))
    assert shapes["params"]["proj"]["kernel"].shape == (P * P * 3, d)
    np.testing.assert_allclose(m.apply(v, jnp.asarray(IMG)), want, atol=1e-4, rtol=1e-5)
    # "hwc" loads a flax conv kernel [p, p, C, D] by reshape
    m2 = PatchEmbed(patch_size=P, features=d, channel_order="hwc")
    v2 = {"params": {"proj": {"kernel": jnp.asarray(
        w_torch.transpose(2, 3, 1, 0).reshape(-1, d), jnp.float32),
        "bias": jnp.asarray(bias, jnp.float32)}}}
    np.testing.assert_allclose(m2.apply(v2, jnp.asarray(IMG)), want, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- sin-cos


def _np_mae_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _np_mae_2d(dim, gh, gw):
    """MAE get_2d_sincos_pos_embed, generalised to gh x gw (meshgrid(w, h), grid[0] = w)."""
    grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    grid = np.stack(grid, 0).reshape(2, 1, gh, gw)
    emb_a = _np_mae_1d(dim // 2, grid[0])
    emb_b = _np_mae_1d(dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1)


def test_sincos_match_mae():
    np.testing.assert_allclose(sincos_1d(7, 10), _np_mae_1d(10, np.arange(7)), atol=1e-5)
    pos = np.array([0.5, 3.25, 100.0])
    np.testing.assert_allclose(sincos_1d(jnp.asarray(pos), 6), _np_mae_1d(6, pos), atol=1e-4)
    e = np.asarray(sincos_2d(3, 5, 8))
    assert e.shape == (15, 8)
    np.testing.assert_allclose(e, _np_mae_2d(8, 3, 5), atol=1e-5)
    # documented: first half = column (w) index, second half = row (h) index, tokens row-major
    np.testing.assert_allclose(e[1 * 5 + 2, :4], _np_mae_1d(4, [2])[0], atol=1e-6)
    np.testing.assert_allclose(e[1 * 5 + 2, 4:], _np_mae_1d(4, [1])[0], atol=1e-6)


OFFICIAL_FLEXTOK = os.path.join(os.path.dirname(__file__), "data", "flextok", "posemb_vectors.npz")


def test_sincos_2d_row_first_matches_official_flextok():
    """``row_first=True`` == apple/ml-flextok ``build_2d_sincos_posemb`` (vectors made by running
    the official code: tests/data/flextok/make_posemb_vectors.py). The official order is the reference;
    the default (column half first) stays MAE's, pinned by ``test_sincos_match_mae``."""
    ref = np.load(OFFICIAL_FLEXTOK)
    for key, (gh, gw, dim) in {"square_4x4_d16": (4, 4, 16), "square_3x3_d8": (3, 3, 8),
                               "crop_3x4_d8_of_4x4": (3, 4, 8)}.items():
        got = np.asarray(sincos_2d(gh, gw, dim, row_first=True))
        np.testing.assert_allclose(got, ref[key], rtol=0, atol=1e-6, err_msg=key)
    # the halves are swapped, not otherwise changed
    swapped = np.asarray(sincos_2d(3, 4, 8)).reshape(12, 2, 4)[:, ::-1].reshape(12, 8)
    np.testing.assert_array_equal(np.asarray(sincos_2d(3, 4, 8, row_first=True)), swapped)


def test_timestep_embedding_matches_dit():
    for dim, scale, t in [(8, 1.0, np.array([0.0, 3.5, 999.0])),        # DiT: integer-ish t
                          (7, 1000.0, np.array([0.0, 0.3, 1.0]))]:       # FlowMo: 1000 * t
        half = dim // 2
        freqs = np.exp(-math.log(10000) * np.arange(half) / half)
        args = scale * t[:, None] * freqs[None]
        want = np.concatenate([np.cos(args), np.sin(args)], -1)    # cos first
        if dim % 2:
            want = np.concatenate([want, np.zeros_like(want[:, :1])], -1)
        got = timestep_embedding(jnp.asarray(t), dim, time_scale=scale)
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)


def test_timestep_embedder_matches_numpy():
    m = TimestepEmbedder(features=6, frequency_dim=8)
    t = jnp.asarray([0.1, 0.7])
    v = jax.jit(m.init)(jax.random.key(0), t)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(v)["params"])
    assert p["fc_in"]["kernel"].shape == (8, 6) and p["fc_out"]["kernel"].shape == (6, 6)
    p["fc_in"]["bias"] = RNG.standard_normal(6)
    v = {"params": jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)}
    e = np.asarray(timestep_embedding(t, 8), np.float64)
    h = e @ p["fc_in"]["kernel"] + p["fc_in"]["bias"]
    h = h / (1 + np.exp(-h))
    want = h @ p["fc_out"]["kernel"] + p["fc_out"]["bias"]
    np.testing.assert_allclose(m.apply(v, t), want, atol=1e-5, rtol=1e-5)


def test_learned_position_embedding():
    m = LearnedPositionEmbedding(num_tokens=40, features=64)
    x = jnp.asarray(RNG.standard_normal((2, 33, 64)), jnp.float32)
    v = jax.jit(m.init)(jax.random.key(0), x)
    table = np.asarray(nn.unbox(v)["params"]["embedding"])
    assert table.shape == (40, 64)                       # like positional_embedding [g*g+1, W]
    assert abs(table.std() - 64 ** -0.5) < 0.02          # TiTok init: width**-0.5 * randn
    np.testing.assert_allclose(m.apply(v, x), x + table[:33], rtol=1e-6)
    with pytest.raises(ValueError):
        m.apply(v, jnp.zeros((1, 41, 64)))


def test_grid_positions():
    g = np.asarray(grid_positions(2, 3))
    np.testing.assert_array_equal(g, [[0, 0, 0], [0, 0, 1], [0, 0, 2],
                                      [0, 1, 0], [0, 1, 1], [0, 1, 2]])


def test_check_images_names_the_model_shape_and_dtype():
    import jax.numpy as jnp
    import pytest
    from titok_jax.nn import check_images
    check_images(jnp.zeros((2, 8, 8, 3)), 8, "M")  # a float batch of the right size passes
    with pytest.raises(ValueError, match=r"^M expects images \[B, 8, 8, 3\] in \[0, 1\], got \(8, 8, 3\)"):
        check_images(jnp.zeros((8, 8, 3)), 8, "M")
    with pytest.raises(ValueError, match=r"got \(1, 16, 16, 3\)"):
        check_images(jnp.zeros((1, 16, 16, 3)), 8, "M")
    with pytest.raises(ValueError, match="float images in \\[0, 1\\], got dtype uint8"):
        check_images(jnp.zeros((1, 8, 8, 3), jnp.uint8), 8, "M")
