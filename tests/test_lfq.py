"""LFQ / BSQ: codes and indices, entropy terms against full-softmax float64 references, grouping,
sharding, gradients and dtypes."""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from titok_jax.quantizers.base import STATS
from titok_jax.quantizers.lfq import LFQ, contiguous_groups

LN2 = math.log(2.0)


# ---- float64 numpy reference (full softmax over every code) ----------------------------------
def np_codebook(b, s=1.0):
    """[2^b, b]: row j has +s at bit i iff (j >> i) & 1 (LSB first)."""
    j = np.arange(2 ** b)[:, None]
    return np.where((j >> np.arange(b)) & 1, s, -s).astype(np.float64)


def np_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def np_entropy(p):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def np_prep(z, spherical=False, scale=1.0):
    x = np.asarray(z, np.float64).reshape(-1, np.shape(z)[-1])
    b = x.shape[-1]
    if spherical:
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
        return x, scale / math.sqrt(b)
    return x, scale


def np_probs(x, s, T):
    """p(c|x) = softmax_c(2 x.c / T) over all 2^b codes c in {-s, +s}^b."""
    return np_softmax(2.0 * x @ np_codebook(x.shape[-1], s).T / T)


def np_terms(z, T, spherical=False, groups=None, subtokens=None):
    """(mean per-sample entropy, batch entropy), full softmax in float64.
    groups: contiguous group sizes (separate mixtures, summed); subtokens: FlowMo sub-token size."""
    x, s = np_prep(z, spherical)
    b = x.shape[-1]
    if subtokens is not None:
        n_sub = b // subtokens
        sub = np.concatenate([x[:, h::n_sub] for h in range(n_sub)], axis=0)  # sub-token h: bits h, h+G, ..
        p = np_probs(sub, s, T)
        return np_entropy(p).mean(), np_entropy(p.mean(0))
    h_sample = np_entropy(np_probs(x, s, T)).mean()
    groups = groups or [b]
    h_batch, start = 0.0, 0
    for g in groups:
        h_batch += np_entropy(np_probs(x[:, start:start + g], s, T).mean(0))
        start += g
    return h_sample, h_batch


def np_loss(z, T, spherical, ew, cw, gamma=1.0):
    hs, hb = np_terms(z, T, spherical)
    x, s = np_prep(z, spherical)
    q = np.where(x > 0, s, -s)
    return ew * (hs - gamma * hb) + cw * np.mean((x - q) ** 2)


def apply(q, z, train=False):
    """init + apply under one jit (eager op-by-op dispatch is slow on this CPU)."""
    return jax.jit(lambda z: q.apply(q.init(jax.random.key(0), z), z, train=train))(z)


# ---- codes, indices, round trips -----------------------------------------------------------
@pytest.mark.parametrize("spherical", [False, True])
def test_codes_and_indices(spherical):
    b = 6
    rng = np.random.default_rng(0)
    z = rng.standard_normal((40, b)).astype(np.float32)
    z[::3, 1] = 0.0          # ties map to -s
    z[1::3, 2] = -0.0
    z[5] = 0.0               # the zero vector (spherical: stays zero, all bits -s)
    q = LFQ(b, spherical=spherical, codebook_scale=2.0)
    z_q, out = jax.jit(lambda z: apply(q, z))(z)
    s = 2.0 / math.sqrt(b) if spherical else 2.0
    np.testing.assert_array_equal(np.asarray(z_q), np.where(z > 0, s, -s).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out.indices), ((z > 0) * 2 ** np.arange(b)).sum(-1))
    assert out.indices.dtype == jnp.int32 and out.indices.shape == (40,)
    assert int(out.indices[5]) == 0
    # LSB first: one-hot bit i -> 2^i
    _, out1 = apply(q, jnp.eye(b) - 0.5 * (1 - jnp.eye(b)))
    np.testing.assert_array_equal(np.asarray(out1.indices), 2 ** np.arange(b))


@pytest.mark.parametrize("spherical", [False, True])
def test_round_trip_over_all_indices(spherical):
    b = 7
    q = LFQ(b, spherical=spherical)
    assert q.codebook_size == 2 ** b
    arange = jnp.arange(2 ** b, dtype=jnp.int32)
    codes = q.indices_to_codes(arange)
    np.testing.assert_array_equal(np.asarray(codes),
                                  np_codebook(b, 1 / math.sqrt(b) if spherical else 1.0).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(q.codes_to_indices(codes)), np.arange(2 ** b))
    z_q, out = apply(q, codes)
    np.testing.assert_array_equal(np.asarray(out.indices), np.arange(2 ** b))
    np.testing.assert_array_equal(np.asarray(z_q), np.asarray(codes))


@pytest.mark.parametrize("spherical,dtype", [(False, jnp.float32), (True, jnp.float32), (True, jnp.bfloat16)])
def test_eval_round_trip_exact(spherical, dtype):
    q = LFQ(5, spherical=spherical, codebook_scale=0.7)
    z = jax.random.normal(jax.random.key(1), (4, 9, 5)).astype(dtype)
    variables = jax.jit(q.init)(jax.random.key(0), z)
    z_q, out = jax.jit(lambda z: q.apply(variables, z))(z)
    back = jax.jit(lambda i: q.apply(variables, i, dtype, method="indices_to_codes"))(out.indices)
    assert z_q.dtype == back.dtype == dtype
    np.testing.assert_array_equal(np.asarray(back.astype(jnp.float32)), np.asarray(z_q.astype(jnp.float32)))


# ---- entropy terms ----------------------------------------------------------------------------
@pytest.mark.parametrize("x,h_sample,h_batch,loss", [
    ([[0.0], [0.0]], LN2, LN2, 0.0),
    ([[1.0], [-1.0]], 0.0, LN2, -LN2),
])
def test_entropy_hand_examples(x, h_sample, h_batch, loss):
    q = LFQ(1, temperature=0.01, entropy_weight=1.0, diversity_gamma=1.0, commitment_weight=0.0)
    _, out = apply(q, jnp.asarray(x))
    np.testing.assert_allclose(float(out.metrics["per_sample_entropy"]), h_sample, atol=1e-6)
    np.testing.assert_allclose(float(out.metrics["batch_entropy"]), h_batch, atol=1e-6)
    np.testing.assert_allclose(float(out.losses["entropy"]), loss, atol=1e-6)


@pytest.mark.parametrize("b,T,spherical", [(1, 0.01, False), (3, 0.01, False), (6, 0.1, False),
                                           (10, 0.05, False), (8, 0.05, True)])
def test_factorised_entropies_equal_full_softmax(b, T, spherical):
    """Per-sample (factorised) and exact batch (hi^T lo mixture) entropies equal the float64
    full softmax over all 2^b codes."""
    rng = np.random.default_rng(b)
    scale = 1.0 if spherical else T * 0.6  # keep the soft assignments far from one-hot
    z = (rng.standard_normal((3, 7, b)) * scale).astype(np.float32)
    q = LFQ(b, temperature=T, spherical=spherical, entropy_weight=0.5, diversity_gamma=0.75)
    _, out = jax.jit(lambda z: apply(q, z))(z)
    hs, hb = np_terms(z, T, spherical)
    assert 0.05 < hs < b * LN2 and 0.05 < hb <= b * LN2 + 1e-9
    np.testing.assert_allclose(float(out.metrics["per_sample_entropy"]), hs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out.metrics["batch_entropy"]), hb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out.losses["entropy"]), 0.5 * (hs - 0.75 * hb), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("b,g", [(8, 1), (8, 3), (8, 4), (8, 8), (18, None), (9, 4)])
def test_grouped_batch_entropy(b, g):
    """"separate" grouping: contiguous groups (last one smaller), entropies summed; None above 16
    bits means nearly equal groups of <= 16 bits; g = bits is the exact entropy."""
    T = 0.05
    rng = np.random.default_rng(10 + b)
    z = (rng.standard_normal((6, 5, b)) * 0.03).astype(np.float32)
    q = LFQ(b, temperature=T, batch_entropy_group_size=g)
    _, out = jax.jit(lambda z: apply(q, z))(z)
    groups = {(8, 3): [3, 3, 2], (18, None): [9, 9], (9, 4): [4, 4, 1]}.get((b, g), [g] * (b // (g or 1)))
    assert list(contiguous_groups(b, g)) == groups
    _, hb = np_terms(z, T, groups=groups)
    np.testing.assert_allclose(float(out.metrics["batch_entropy"]), hb, rtol=1e-5)
    if g in (1, 3):  # a strict upper bound of the exact mixture entropy here
        assert hb > np_terms(z, T)[1] + 1e-3
    if g == b:
        _, exact = apply(LFQ(b, temperature=T), z)
        np.testing.assert_allclose(float(out.metrics["batch_entropy"]), float(exact.metrics["batch_entropy"]),
                                   rtol=1e-6)


def test_subtoken_grouping_matches_flowmo_layout():
    """FlowMo: 12 bits, 4-bit sub-tokens h = bits {h, h+3, h+6, h+9}, pooled into one 2^4 mixture,
    per-sample term per sub-token."""
    b, g, T = 12, 4, 0.1
    rng = np.random.default_rng(3)
    # bits 4j..4j+3 share one value per token: contiguous 4-bit groups would be (nearly) constant
    # sign patterns, FlowMo's strided sub-tokens are not; the two layouts give different entropies
    z = np.repeat(rng.standard_normal((4, 6, 3)) * 0.05, 4, axis=-1).astype(np.float32)
    q = LFQ.flowmo(bits=b, group_size=g)
    assert (q.temperature, q.entropy_weight, q.commitment_weight) == (0.1, 0.0025, 0.000625)
    _, out = jax.jit(lambda z: apply(q, z))(z)
    hs, hb = np_terms(z, T, subtokens=g)
    np.testing.assert_allclose(float(out.metrics["per_sample_entropy"]), hs, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["batch_entropy"]), hb, rtol=1e-5)
    np.testing.assert_allclose(float(out.losses["entropy"]), 0.0025 * (hs - hb), rtol=1e-4)
    # a contiguous split would give a different value: the layout matters
    contiguous = np.concatenate([z.reshape(-1, b)[:, j * g:(j + 1) * g] for j in range(b // g)], 0)
    assert abs(np_terms(contiguous, T)[1] - hb) > 0.1


def test_permutation_invariance():
    z = jax.random.normal(jax.random.key(2), (32, 6)) * 0.05
    perm = jax.random.permutation(jax.random.key(3), 32)
    q = LFQ(6, temperature=0.1, batch_entropy_group_size=3)
    f = jax.jit(lambda z: q.apply(q.init(jax.random.key(0), z), z)[1])
    a, b = f(z), f(z[perm])
    for name in ("per_sample_entropy", "batch_entropy", "perplexity", "usage"):
        np.testing.assert_allclose(float(a.metrics[name]), float(b.metrics[name]), rtol=1e-6)
    for name in ("entropy", "commitment"):
        np.testing.assert_allclose(float(a.losses[name]), float(b.losses[name]), rtol=1e-6)


# ---- sharding ---------------------------------------------------------------------------------
def _terms(out):
    return {"batch_entropy": out.metrics["batch_entropy"], "per_sample_entropy": out.metrics["per_sample_entropy"],
            "perplexity": out.metrics["perplexity"], **out.losses}


@pytest.mark.parametrize("grouping", [dict(), dict(batch_entropy_group_size=3), dict(
    batch_entropy_group_size=3, entropy_grouping="subtokens")])
def test_sharded_jit_and_shard_map_equal_single_device(grouping):
    b = 6
    z = jax.random.normal(jax.random.key(4), (16, 3, b)) * 0.05
    q = LFQ(b, temperature=0.1, track_usage=False, **grouping)
    ref = _terms(jax.jit(lambda z: q.apply({}, z))(z)[1])
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    zs = jax.device_put(z, NamedSharding(mesh, P("data")))
    got = _terms(jax.jit(lambda z: q.apply({}, z))(zs)[1])
    qa = LFQ(b, temperature=0.1, track_usage=False, axis_name="data", **grouping)
    fn = jax.shard_map(lambda z: _terms(qa.apply({}, z)[1]), mesh=mesh, in_specs=P("data"), out_specs=P())
    got_sm = jax.jit(fn)(zs)
    flat = np.asarray(z).reshape(16, 3, b)
    local_hb = np_terms(flat[:2], 0.1, **({"subtokens": 3} if grouping.get("entropy_grouping") else
                                          {"groups": contiguous_groups(b, grouping.get("batch_entropy_group_size"))}))[1]
    assert abs(local_hb - float(ref["batch_entropy"])) > 1e-3  # one device's view differs
    for name in ref:
        np.testing.assert_allclose(float(got[name]), float(ref[name]), rtol=2e-6, err_msg=name)
        np.testing.assert_allclose(float(got_sm[name]), float(ref[name]), rtol=2e-6, err_msg=name)


# ---- BSQ geometry -----------------------------------------------------------------------------
def test_bsq_geometry():
    b = 9
    rng = np.random.default_rng(6)
    z = rng.standard_normal((200, b)).astype(np.float32) * rng.uniform(0.01, 100, (200, 1)).astype(np.float32)
    z[0] = np.eye(b)[0] * 3       # one hot: the largest error 2 - 2/sqrt(b)
    z[1] = np.ones(b)             # on a code: zero error
    z_q, _ = apply(LFQ(b, spherical=True), jnp.asarray(z))
    z_q = np.asarray(z_q, np.float64)
    u = z / np.linalg.norm(z.astype(np.float64), axis=-1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(z_q, axis=-1), 1.0, rtol=1e-6)
    err = np.sum((u - z_q) ** 2, -1)
    np.testing.assert_allclose(err, 2 - 2 * np.abs(u).sum(-1) / math.sqrt(b), atol=1e-5)
    assert (err >= -1e-6).all() and (err <= 2 - 2 / math.sqrt(b) + 1e-6).all()
    np.testing.assert_allclose(err[[0, 1]], [2 - 2 / math.sqrt(b), 0.0], atol=1e-6)


# ---- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("spherical", [False, True])
def test_loss_gradient_matches_finite_differences(spherical):
    """d(entropy + commitment)/dz against central differences of the float64 full-softmax loss."""
    b, T, ew, cw, gamma = 3, 0.5, 0.7, 0.3, 0.8
    rng = np.random.default_rng(7)
    z = rng.standard_normal((5, b)) * (1.0 if spherical else 0.4)
    q = LFQ(b, temperature=T, spherical=spherical, entropy_weight=ew, commitment_weight=cw,
            diversity_gamma=gamma, track_usage=False)
    g = jax.jit(jax.grad(lambda z: q.apply({}, z)[1].total_loss()))(jnp.asarray(z, jnp.float32))
    fd = np.zeros_like(z)
    h = 1e-6
    for idx in itertools.product(*map(range, z.shape)):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (np_loss(zp, T, spherical, ew, cw, gamma) - np_loss(zm, T, spherical, ew, cw, gamma)) / (2 * h)
    assert np.abs(fd).max() > 1e-2
    np.testing.assert_allclose(np.asarray(g), fd, rtol=2e-4, atol=2e-6)


def test_straight_through_gradient_is_identity():
    z = jax.random.normal(jax.random.key(8), (4, 5, 8))
    w = jax.random.normal(jax.random.key(9), (4, 5, 8))
    q = LFQ(8, track_usage=False)
    g = jax.jit(jax.grad(lambda z: jnp.sum(w * q.apply({}, z)[0])))(z)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_bf16_indices_equal_f32():
    z = jax.random.normal(jax.random.key(10), (8, 16, 12))
    qs = [LFQ(12, track_usage=False), LFQ(12, spherical=True, track_usage=False)]

    def both(z):
        return [(q.apply({}, z.astype(jnp.bfloat16)), q.apply({}, z)) for q in qs]

    for (z_q16, out16), (_, out32) in jax.jit(both)(z):
        np.testing.assert_array_equal(np.asarray(out16.indices), np.asarray(out32.indices))
        assert z_q16.dtype == jnp.bfloat16
        assert out16.losses["entropy"].dtype == jnp.float32
        assert all(np.isfinite(float(v)) for v in out16.losses.values())


# ---- state, big codebooks, errors -------------------------------------------------------------
def test_usage_state_and_large_codebooks():
    q = LFQ(4)
    z = jnp.array([[1.0, -1, -1, -1], [1.0, 1, -1, -1]])
    variables = jax.jit(q.init)(jax.random.key(0), z)
    (_, out), upd = jax.jit(lambda v, z: q.apply(v, z, train=True, mutable=[STATS]))(variables, z)
    counts = np.asarray(nn.unbox(upd)[STATS]["usage"]["code_counts"])
    assert counts[1] == 1 and counts[3] == 1 and counts.sum() == 2
    assert float(out.metrics["cumulative_usage"]) == 2 / 16
    # 24 bits: no histogram state, grouped (12, 12) batch entropy, metrics still finite
    big = LFQ(24)
    zb = jax.random.normal(jax.random.key(11), (4, 24))
    variables = jax.jit(big.init)(jax.random.key(0), zb)
    assert STATS not in variables
    _, outb = jax.jit(big.apply)(variables, zb)
    assert contiguous_groups(24, None) == (12, 12)
    assert np.isfinite(float(outb.metrics["batch_entropy"])) and np.isfinite(float(outb.losses["entropy"]))


@pytest.mark.parametrize("kwargs", [
    dict(bits=0), dict(bits=32), dict(bits=4.0), dict(bits=4, temperature=0.0),
    dict(bits=4, entropy_weight=-1.0), dict(bits=4, codebook_scale=0.0),
    dict(bits=4, batch_entropy_group_size=5), dict(bits=4, batch_entropy_group_size=0),
    dict(bits=4, entropy_grouping="pooled"), dict(bits=6, batch_entropy_group_size=4, entropy_grouping="subtokens"),
    dict(bits=6, entropy_grouping="subtokens"), dict(bits=30, batch_entropy_group_size=25),
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        LFQ(**kwargs)


def test_wrong_input_dim_is_clear_error():
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 4\]"):
        apply(LFQ(4), jnp.zeros((2, 5)))


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
