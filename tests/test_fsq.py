"""FSQ: grid, index maths, hand table, gradients, symmetric variant, dtypes, state (float64 numpy references)."""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from titok_jax.quantizers.base import STATS
from titok_jax.quantizers.fsq import FSQ, RECOMMENDED_LEVELS, fsq_levels

EPS = 1e-3


# ---- float64 numpy reference ------------------------------------------------------------------
def np_fsq(z, levels, eps=EPS):
    """Standard FSQ in float64: (codes, integer levels, indices, bounded value f, d code/dz)."""
    L = np.asarray(levels, np.float64)
    half = (L - 1) * (1 + eps) / 2
    offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half)
    width = np.floor(L / 2)
    t = np.tanh(np.asarray(z, np.float64) + shift)
    f = t * half - offset
    r = np.round(f)
    k = (r + width).astype(np.int64)
    basis = np.cumprod([1] + list(levels[:-1]))
    return r / width, k, (k * basis).sum(-1), f, (1 - t ** 2) * half / width


def np_fsq_symmetric(z, levels):
    L = np.asarray(levels, np.float64)
    t = np.tanh(np.asarray(z, np.float64))
    y = (L - 1) * (t + 1) / 2 + 0.5
    k = np.floor(y).astype(np.int64)
    basis = np.cumprod([1] + list(levels[:-1]))
    return 2 * k / (L - 1) - 1, k, (k * basis).sum(-1), y, 1 - t ** 2


def run(q, z, train=False):
    """init + apply under one jit (eager op-by-op dispatch is slow on this CPU)."""
    return jax.jit(lambda z: q.apply(q.init(jax.random.key(0), z), z, train=train))(z)


def bin_centres(levels, k, eps=EPS, jitter=None):
    """Inputs z whose bounded value is (near) the centre of level k (float64)."""
    L = np.asarray(levels, np.float64)
    half = (L - 1) * (1 + eps) / 2
    offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
    r = k - np.floor(L / 2) + (0.0 if jitter is None else jitter)
    return np.arctanh(np.clip((r + offset) / half, -0.999, 0.999)) - np.arctanh(offset / half)


# ---- grid and index maths ---------------------------------------------------------------------
@pytest.mark.parametrize("levels", [(3, 5, 4), (8, 8, 8, 6, 5), (7, 5, 5, 5, 5)])
def test_outputs_on_grid_at_all_scales(levels):
    """Every output is k/floor(L/2) with k in the level range, and equals the f64 reference
    (except within 1e-4 of a rounding boundary), for inputs of scale 1e-3 .. 1e3."""
    rng = np.random.default_rng(0)
    scales = np.array([1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3])
    z = (rng.standard_normal((len(scales), 64, len(levels))) * scales[:, None, None]).astype(np.float32)
    z_q, out = jax.jit(lambda z: run(FSQ(levels), z))(z)
    z_q, idx = np.asarray(z_q, np.float64), np.asarray(out.indices)
    width = np.floor(np.asarray(levels) / 2)
    k = np.round(z_q * width)
    np.testing.assert_array_equal(z_q, (k / width).astype(np.float32))  # f32 values of k/floor(L/2)
    assert (k >= -width).all() and (k <= np.asarray(levels) - 1 - width).all()
    codes, _, ref_idx, f, _ = np_fsq(z.astype(np.float64), levels)
    safe = (np.abs(np.abs(f - np.floor(f)) - 0.5) > 1e-4).all(-1)
    assert safe.mean() > 0.9
    np.testing.assert_array_equal(z_q[safe], codes[safe].astype(np.float32))
    np.testing.assert_array_equal(idx[safe], ref_idx[safe])
    assert out.indices.dtype == jnp.int32 and out.indices.shape == z.shape[:-1]
    assert out.losses == {}


@pytest.mark.parametrize("levels,symmetric", [((3, 5, 4), False), ((8, 6, 5), False), ((2, 3, 4), True)])
def test_codebook_distinct_and_round_trip(levels, symmetric):
    q = FSQ(levels, symmetric=symmetric)
    n = math.prod(levels)
    assert q.codebook_size == n
    cb = np.asarray(q.implicit_codebook())
    assert cb.shape == (n, len(levels))
    assert len({tuple(r) for r in cb}) == n
    # index order: dimension 0 varies fastest (itertools.product varies the last one fastest)
    grids = []
    for L in levels:
        ks = np.arange(L)
        grids.append(2 * ks / (L - 1) - 1 if symmetric else (ks - L // 2) / (L // 2))
    expect = np.array([row[::-1] for row in itertools.product(*grids[::-1])])
    np.testing.assert_array_equal(cb, expect.astype(np.float32))
    arange = jnp.arange(n, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(q.codes_to_indices(cb)), np.arange(n))
    np.testing.assert_array_equal(np.asarray(q.indices_to_codes(arange)), cb)
    # quantizing a preimage of each code returns that code and index
    z = np.arctanh(np.clip(cb * 0.999, -0.999, 0.999)) if symmetric else None
    if not symmetric:
        z = bin_centres(levels, np.asarray(q.indices_to_levels(arange)))
    z_q, out = run(q, jnp.asarray(z, jnp.float32))
    np.testing.assert_array_equal(np.asarray(out.indices), np.arange(n))
    np.testing.assert_array_equal(np.asarray(z_q), cb)


@pytest.mark.parametrize("z,codes,idx", [
    ([0.25, 0.6, -7.0], [0.0, 0.5, -1.0], 10),
    ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 37),
    ([np.inf] * 3, [1.0, 1.0, 0.5], 59),
    ([-np.inf] * 3, [-1.0, -1.0, -1.0], 0),
])
def test_hand_table(z, codes, idx):
    z_q, out = run(FSQ((3, 5, 4)), jnp.asarray([z], jnp.float32))
    np.testing.assert_array_equal(np.asarray(z_q)[0], codes)
    assert int(out.indices[0]) == idx


def test_hand_index_maths():
    q = FSQ((8, 5, 5, 5))
    assert int(q.levels_to_indices(jnp.array([7, 4, 4, 4]))) == 999
    np.testing.assert_array_equal(np.asarray(q.indices_to_levels(jnp.array(999))), [7, 4, 4, 4])
    cb = np.asarray(FSQ((3, 4)).implicit_codebook())
    np.testing.assert_array_equal(cb[:5], [[-1, -1], [0, -1], [1, -1], [-1, -0.5], [0, -0.5]])
    np.testing.assert_array_equal(cb[-1], [1, 0.5])


def test_monotone_and_zero():
    levels = (3, 4, 5, 8)
    z = np.linspace(-4, 4, 2001, dtype=np.float32)[:, None].repeat(len(levels), 1)
    z_q, out = run(FSQ(levels), jnp.asarray(z))
    z_q = np.asarray(z_q)
    assert (np.diff(z_q, axis=0) >= 0).all()
    assert all(len(np.unique(z_q[:, i])) == L for i, L in enumerate(levels))  # every level reached
    z_q0, _ = run(FSQ((3, 5, 7)), jnp.zeros((1, 3)))
    np.testing.assert_array_equal(np.asarray(z_q0), 0.0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradient_is_bound_derivative(symmetric):
    """d sum(w * z_q)/dz = w * tanh'(z + shift) * half / floor(L/2) (standard), w * tanh'(z) (symmetric)."""
    levels = (3, 4, 5, 8) if not symmetric else (2, 3, 4, 8)
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, len(levels))).astype(np.float32)
    w = rng.standard_normal((6, len(levels))).astype(np.float32)
    q = FSQ(levels, symmetric=symmetric)
    variables = jax.jit(q.init)(jax.random.key(0), z)
    g = jax.jit(jax.grad(lambda z: jnp.sum(w * q.apply(variables, z)[0])))(jnp.asarray(z))
    ref = (np_fsq_symmetric if symmetric else np_fsq)(z.astype(np.float64), levels)[4]
    np.testing.assert_allclose(np.asarray(g), w * ref, rtol=2e-6, atol=1e-7)


# ---- symmetric variant and level rules -------------------------------------------------------
def test_symmetric_grid_and_reference():
    levels = (2, 3, 4, 5)
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((512, 4)) * 2).astype(np.float32)
    z_q, out = run(FSQ(levels, symmetric=True), jnp.asarray(z))
    codes, _, idx, y, _ = np_fsq_symmetric(z.astype(np.float64), levels)
    safe = (np.abs(y - np.round(y)) > 1e-4).all(-1)
    np.testing.assert_array_equal(np.asarray(z_q)[safe], codes[safe].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out.indices)[safe], idx[safe])
    L = np.asarray(levels)
    k = (np.asarray(z_q, np.float64) + 1) * (L - 1) / 2
    assert np.allclose(k, np.round(k), atol=1e-6) and (np.round(k) >= 0).all() and (np.round(k) <= L - 1).all()
    # L = 2 symmetric: codes +-1, index = [z > 0]
    z_q2, out2 = run(FSQ((2,), symmetric=True), jnp.array([[-3.0], [-0.1], [0.1], [3.0]]))
    np.testing.assert_array_equal(np.asarray(z_q2)[:, 0], [-1, -1, 1, 1])
    np.testing.assert_array_equal(np.asarray(out2.indices), [0, 0, 1, 1])
    # the even-L symmetric grid has no zero and is symmetric
    cb4 = np.asarray(FSQ((4,), symmetric=True).implicit_codebook())[:, 0]
    np.testing.assert_allclose(cb4, [-1, -1 / 3, 1 / 3, 1], rtol=1e-7)


@pytest.mark.parametrize("kwargs", [
    dict(levels=(2, 5)), dict(levels=(1, 5), symmetric=True), dict(levels=()),
    dict(levels=(3.0, 5)), dict(levels=5), dict(levels=(2 ** 16, 2 ** 16)), dict(levels=(5,), eps=-0.1),
    dict(levels=(5,), saturation_weight=-0.1), dict(levels=(5,), saturation_weight=float("nan")),
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        FSQ(**kwargs)


def test_wrong_input_dim_is_clear_error():
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 3\]"):
        run(FSQ((3, 5, 4)), jnp.zeros((2, 4)))


# ---- saturation: the metric and the optional penalty --------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
def test_saturation_metric_and_penalty_match_reference(symmetric):
    """``saturated`` = mean(|u| > 2) and ``saturation`` = w mean(relu(|u| - 2)^2) over the tanh's
    arguments u (z + shift; z when symmetric); its gradient is 2 w relu(|u| - 2) sign(u) / n, zero
    wherever |u| <= 2 (only saturated values are pulled back)."""
    levels = (8, 5, 4, 3)
    z = (np.random.default_rng(3).standard_normal((64, 4)) * 3).astype(np.float64)
    L = np.asarray(levels, np.float64)
    half = (L - 1) * (1 + EPS) / 2
    u = z if symmetric else z + np.arctanh(np.where(L % 2 == 0, 0.5, 0.0) / half)
    excess = np.maximum(np.abs(u) - 2, 0)
    assert 0.2 < (excess > 0).mean() < 0.8            # the case holds both kinds of values
    w = 0.3
    q = FSQ(levels, symmetric=symmetric, saturation_weight=w)
    _, out = run(q, jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(float(out.metrics["saturated"]), (np.abs(u) > 2).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(out.losses["saturation"]), w * np.mean(excess ** 2), rtol=1e-5)
    variables = jax.jit(q.init)(jax.random.key(0), jnp.asarray(z, jnp.float32))
    g = jax.jit(jax.grad(lambda z: q.apply(variables, z)[1].losses["saturation"]))(
        jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(np.asarray(g), 2 * w * excess * np.sign(u) / z.size, rtol=1e-5,
                               atol=1e-9)
    # off by default: the metric is still logged, no loss term
    _, off = run(FSQ(levels, symmetric=symmetric), jnp.asarray(z, jnp.float32))
    assert off.losses == {} and float(off.metrics["saturated"]) == float(out.metrics["saturated"])


# ---- dtypes and round trips --------------------------------------------------------------------
def test_bf16_indices_equal_f32():
    """Levels [8,8,8,6,5] (15360 codes, beyond bf16's 8 significant bits): bf16 inputs near the
    level centres give the f32 indices, and z_q comes back in bf16."""
    levels = (8, 8, 8, 6, 5)
    rng = np.random.default_rng(3)
    k = rng.integers(0, levels, size=(4096, 5))
    z = bin_centres(levels, k, jitter=rng.uniform(-0.25, 0.25, k.shape)).astype(np.float32)
    expect = (k * np.cumprod([1] + list(levels[:-1]))).sum(-1)
    assert expect.max() > 256
    q = FSQ(levels)
    _, out32 = run(q, jnp.asarray(z))
    z_q16, out16 = run(q, jnp.asarray(z, jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out32.indices), expect)
    np.testing.assert_array_equal(np.asarray(out16.indices), expect)
    assert z_q16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(z_q16.astype(jnp.float32)),
                                  np.asarray(q.indices_to_codes(expect, jnp.bfloat16).astype(jnp.float32)))


@pytest.mark.parametrize("symmetric,dtype", [(False, jnp.float32), (True, jnp.float32),
                                             (False, jnp.bfloat16)])
def test_eval_round_trip_exact(symmetric, dtype):
    levels = (8, 5, 7, 4) if not symmetric else (2, 5, 6, 4)
    q = FSQ(levels, symmetric=symmetric)
    z = jax.random.normal(jax.random.key(4), (3, 50, 4)).astype(dtype) * 2
    variables = jax.jit(q.init)(jax.random.key(0), z)
    z_q, out = jax.jit(lambda z: q.apply(variables, z))(z)
    back = jax.jit(lambda i: q.apply(variables, i, dtype, method="indices_to_codes"))(out.indices)
    assert back.dtype == z_q.dtype == dtype
    np.testing.assert_array_equal(np.asarray(back.astype(jnp.float32)), np.asarray(z_q.astype(jnp.float32)))


def test_recommended_levels_table():
    table = {2 ** 4: (5, 3), 2 ** 6: (8, 8), 2 ** 8: (8, 6, 5), 2 ** 9: (8, 8, 8), 2 ** 10: (8, 5, 5, 5),
             2 ** 11: (8, 8, 6, 5), 2 ** 12: (7, 5, 5, 5, 5), 2 ** 14: (8, 8, 8, 6, 5),
             2 ** 16: (8, 8, 8, 5, 5, 5)}
    assert RECOMMENDED_LEVELS == table
    for n, levels in table.items():
        assert fsq_levels(n) == levels
        q = FSQ.from_codebook_size(n, symmetric=False)
        assert tuple(q.levels) == levels and 0.5 * n < q.codebook_size <= 1.1 * n
    for bad in (2 ** 13, 1000, 0):
        with pytest.raises(ValueError, match="no recommended FSQ levels"):
            fsq_levels(bad)


# ---- state, metrics, sharding, size ----------------------------------------------------------
def test_usage_state_only_changes_in_training():
    q = FSQ((3, 5, 4))
    z = jnp.array([[0.25, 0.6, -7.0], [0.0, 0.0, 0.0]])
    variables = jax.jit(q.init)(jax.random.key(0), z)
    assert float(jnp.sum(nn.unbox(variables)[STATS]["usage"]["code_counts"])) == 0
    (_, out), upd = jax.jit(lambda v, z: q.apply(v, z, train=True, mutable=[STATS]))(variables, z)
    counts = np.asarray(nn.unbox(upd)[STATS]["usage"]["code_counts"])
    assert counts[10] == 1 and counts[37] == 1 and counts.sum() == 2
    np.testing.assert_allclose(float(out.metrics["perplexity"]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(float(out.metrics["usage"]), 2 / 60, rtol=1e-6)
    _, out_eval = jax.jit(q.apply)(variables, z)  # not mutable: would raise if it wrote
    assert float(out_eval.metrics["cumulative_usage"]) == 0


def test_shard_map_metrics_are_global():
    """Under shard_map with axis_name, perplexity / usage cover the global batch."""
    levels = (3, 5, 4)
    mesh = jax.make_mesh((8,), ("data",))
    z = jax.random.normal(jax.random.key(5), (16, 3)) * 2
    _, ref = run(FSQ(levels, track_usage=False), z)
    q = FSQ(levels, track_usage=False, axis_name="data")
    fn = jax.shard_map(lambda z: q.apply({}, z)[1].metrics, mesh=mesh, in_specs=P("data"), out_specs=P())
    got = jax.jit(fn)(jax.device_put(z, jax.sharding.NamedSharding(mesh, P("data"))))
    local = run(FSQ(levels, track_usage=False), z[:2])[1].metrics
    assert float(local["usage"]) < float(ref.metrics["usage"])  # the test can tell local from global
    for name in ("perplexity", "usage", "saturated"):
        np.testing.assert_allclose(float(got[name]), float(ref.metrics[name]), rtol=1e-6)


def test_huge_codebook_is_never_enumerated():
    """4^15 = 2^30 codes: the forward works on a tiny batch (an eager [K, d] codebook would need 60 GiB)."""
    q = FSQ((4,) * 15)
    z = jax.random.normal(jax.random.key(6), (4, 15))
    z_q, out = run(q, z)
    assert q.codebook_size == 2 ** 30
    np.testing.assert_array_equal(np.asarray(q.indices_to_codes(out.indices)), np.asarray(z_q))
    assert (np.asarray(out.indices) >= 0).all()
