"""Shared quantizer helpers in `titok_jax.quantizers.base`, against float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from titok_jax.quantizers import base


def np_entropy(p):
    p = np.asarray(p, np.float64)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def test_straight_through_forward_is_exactly_the_code_and_gradient_is_identity():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
    z_q = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
    assert np.array_equal(np.asarray(base.straight_through(z, z_q)), np.asarray(z_q))
    # the common form z + sg(z_q - z) is not exact on the same data (why the exact form is used)
    common = z + jax.lax.stop_gradient(z_q - z)
    assert not np.array_equal(np.asarray(common), np.asarray(z_q))
    w = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(w * base.straight_through(x, z_q)))(z)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_l2_normalize_and_zero_vector():
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(base.l2_normalize(x)), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


def test_entropies_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, 11)) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = [np_entropy(row) for row in p]
    np.testing.assert_allclose(np.asarray(base.entropy(jnp.asarray(p, jnp.float32))), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(base.entropy_from_logits(jnp.asarray(logits, jnp.float32))), want, rtol=1e-5)
    x = np.array([-30.0, -2.0, 0.0, 0.5, 40.0])
    s = 1 / (1 + np.exp(-x))
    want_bin = [np_entropy([q, 1 - q]) for q in s]
    np.testing.assert_allclose(np.asarray(base.binary_entropy_from_logits(jnp.asarray(x))), want_bin, atol=1e-6)
    np.testing.assert_allclose(np.asarray(base.binary_entropy(jnp.asarray(s))), want_bin, atol=1e-6)
    assert float(base.entropy(jnp.array([1.0, 0.0]))) == 0.0  # 0 log 0 = 0, not NaN


def test_histogram_and_usage_metrics():
    idx = jnp.array([[0, 1, 1, 3], [3, 3, -1, 0]])  # -1 (dropped) is not counted
    counts = base.code_histogram(idx, 6)
    np.testing.assert_array_equal(np.asarray(counts), [2, 2, 0, 3, 0, 0])
    m = base.usage_metrics(counts)
    np.testing.assert_allclose(float(m["perplexity"]), np.exp(np_entropy(np.array([2, 2, 3]) / 7)), rtol=1e-6)
    assert float(m["usage"]) == pytest.approx(0.5)


class _Tracked(nn.Module):
    @nn.compact
    def __call__(self, idx, train=False):
        return base.quantizer_metrics(self, idx, 8, train)


def test_usage_tracker_counts_only_in_training():
    m = _Tracked()
    idx = jnp.array([[0, 1, 1, 3]])
    variables = m.init(jax.random.key(0), idx, train=True)  # init never counts
    assert float(jnp.sum(nn.unbox(variables[base.STATS])["usage"]["code_counts"])) == 0.0
    out, updates = m.apply(variables, idx, train=True, mutable=[base.STATS])
    counts = nn.unbox(updates[base.STATS])["usage"]["code_counts"]
    np.testing.assert_array_equal(np.asarray(counts), [1, 2, 0, 1, 0, 0, 0, 0])
    assert float(out["cumulative_usage"]) == pytest.approx(3 / 8)
    out, same = m.apply(updates, jnp.array([[5, 6, 7, 7]]), train=False, mutable=[base.STATS])
    np.testing.assert_array_equal(np.asarray(nn.unbox(same[base.STATS])["usage"]["code_counts"]), np.asarray(counts))
    assert float(out["usage"]) == pytest.approx(3 / 8)  # batch usage is of this batch: codes 5, 6, 7
    # eval with params only (no stats collection) still reports batch metrics
    out = m.apply({}, idx, train=False)
    assert "cumulative_usage" not in out and float(out["usage"]) == pytest.approx(3 / 8)


def test_huge_codebook_usage_counts_distinct_codes():
    idx = jnp.array([5, 5, 9, 2**25, 2**25, 7])
    m = base.batch_usage_metrics(idx, 2**26)
    assert float(m["usage"]) == pytest.approx(4 / 2**26)
