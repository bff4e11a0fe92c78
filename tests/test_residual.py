"""ResidualQuantizer: residual recursion, summed codes, per-level indices, quantize-dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.quantizers import FSQ, STATS, ResidualQuantizer, VectorQuantizer


def np_fsq(z, levels, eps=1e-3):
    """float64 FSQ (atanh bound with 1 + eps), returns codes and mixed-radix indices."""
    levels = np.asarray(levels)
    half = (levels - 1) * (1 + eps) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half)
    k = np.round(np.tanh(z + shift) * half - offset)
    width = levels // 2
    codes = k / width
    basis = np.cumprod(np.concatenate([[1], levels[:-1]]))
    idx = ((k + width) * basis).sum(-1).astype(np.int64)
    return codes, idx


def test_residual_fsq_matches_float64_recursion_with_scales():
    levels = (5, 5, 5)
    scales = (1.0, 0.2, 0.04)  # residual FSQ: s_l = L^-l
    rq = ResidualQuantizer.repeat(FSQ(levels=levels), 3, scales=scales)
    z = jax.random.normal(jax.random.key(0), (4, 6, 3)) * 0.8
    variables = rq.init(jax.random.key(1), z)
    z_q, out = rq.apply(variables, z)
    r = np.asarray(z, np.float64)
    total = np.zeros_like(r)
    want_idx = []
    for s in scales:
        c, idx = np_fsq(r / s, levels)
        total += s * c
        r = r - s * c
        want_idx.append(idx)
    assert out.indices.shape == (4, 6, 3) and out.indices.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out.indices), np.stack(want_idx, -1))
    np.testing.assert_allclose(np.asarray(z_q), total, atol=1e-5)
    # the residual shrinks level by level: the sum approximates z better than the first level alone
    first = scales[0] * np_fsq(np.asarray(z, np.float64), levels)[0]
    assert np.abs(total - np.asarray(z)).mean() < 0.5 * np.abs(first - np.asarray(z)).mean()
    # eval round trip is exact
    codes = rq.apply(variables, out.indices, method="indices_to_codes")
    assert np.array_equal(np.asarray(codes), np.asarray(z_q))
    assert rq.codebook_size == (125, 125, 125)
    assert set(out.metrics) >= {"perplexity", "usage", "level0/perplexity", "level2/usage"}


def test_residual_vq_sums_levels_losses_and_gradient():
    rq = ResidualQuantizer.repeat(VectorQuantizer(codebook_size=16, dim=4), 2)
    z = jax.random.normal(jax.random.key(2), (32, 4))
    variables = rq.init(jax.random.key(3), z)
    z_q, out = rq.apply(variables, z)
    # level by level with the same codebooks, through the sub-module's own apply
    sub = VectorQuantizer(codebook_size=16, dim=4)
    p = variables["params"]
    q0, o0 = sub.apply({"params": p["quantizers_0"]}, z)
    q1, o1 = sub.apply({"params": p["quantizers_1"]}, z - q0)
    np.testing.assert_allclose(np.asarray(z_q), np.asarray(q0 + q1), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.indices), np.stack([o0.indices, o1.indices], -1))
    for name in o0.losses:
        np.testing.assert_allclose(float(out.losses[name]), float(o0.losses[name] + o1.losses[name]), rtol=1e-6)
    # each level's straight-through carries the identity: dz_q/dz = num_levels * I
    w = jax.random.normal(jax.random.key(4), z.shape)
    g = jax.grad(lambda x: jnp.sum(w * rq.apply(variables, x)[0]))(z)
    np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(w), rtol=1e-6)


def test_quantize_dropout_drops_trailing_levels_consistently():
    rq = ResidualQuantizer.repeat(FSQ(levels=(5, 5)), 4, scales=(1, .2, .04, .008),
                                  quantize_dropout_min_levels=1)
    z = jax.random.normal(jax.random.key(5), (8, 2))
    variables = rq.init(jax.random.key(6), z)
    full, out_full = rq.apply(variables, z)  # eval: every level
    assert bool(jnp.all(out_full.indices >= 0))
    seen = set()
    for seed in range(12):
        (z_q, out), _ = rq.apply(variables, z, train=True, rngs={"quantizer": jax.random.key(seed)},
                                 mutable=[STATS])
        keep = int(out.metrics["kept_levels"])
        seen.add(keep)
        idx = np.asarray(out.indices)
        assert (idx[..., :keep] >= 0).all() and (idx[..., keep:] == -1).all()
        np.testing.assert_array_equal(idx[..., :keep], np.asarray(out_full.indices)[..., :keep])
        decoded = rq.apply(variables, out.indices, method="indices_to_codes")
        np.testing.assert_allclose(np.asarray(decoded), np.asarray(z_q), atol=1e-6)
    assert len(seen) > 1 and seen <= {1, 2, 3, 4}


def test_bad_arguments_are_clear():
    z = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="scales"):
        ResidualQuantizer.repeat(FSQ(levels=(5, 5)), 2, scales=(1.0,)).init(jax.random.key(0), z)
    with pytest.raises(ValueError, match="num_levels"):
        ResidualQuantizer.repeat(FSQ(levels=(5, 5)), 0)
    rq = ResidualQuantizer.repeat(FSQ(levels=(5, 5)), 2)
    v = rq.init(jax.random.key(0), z)
    with pytest.raises(ValueError, match="levels"):
        rq.apply(v, jnp.zeros((2, 3), jnp.int32), method="indices_to_codes")
