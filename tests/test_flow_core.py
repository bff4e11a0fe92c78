"""Rectified-flow core: interpolation, time samplers (KS tests vs closed-form CDFs), grids, loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from titok_jax.flow import (FLOW_PRESETS, broadcast_time, edm_sigma_to_t, flow_preset, interpolate,
                            noise_from_velocity, rectified_flow_loss, sample_time, shift_time,
                            time_grid, time_grid_np, time_sampler_preset, velocity_target,
                            x0_from_velocity)

N_KS = 20000


def logit(t):
    return np.log(t) - np.log1p(-t)


def draw(kind, n=N_KS, seed=0, **params):
    t = np.asarray(jax.jit(lambda k: sample_time(k, n, kind, **params))(jax.random.key(seed)),
                   np.float64)
    assert t.shape == (n,) and t.dtype == np.float64
    return t


# ---- interpolation ---------------------------------------------------------------------------
def test_interpolation_endpoints_target_and_broadcast():
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (3, 4, 4, 2))
    eps = jax.random.normal(k2, (3, 4, 4, 2))
    np.testing.assert_array_equal(interpolate(x, eps, 0.0), x)
    np.testing.assert_array_equal(interpolate(x, eps, jnp.ones(3)), eps)
    t = np.array([0.1, 0.5, 0.9])
    want = (1 - t)[:, None, None, None] * np.float64(x) + t[:, None, None, None] * np.float64(eps)
    np.testing.assert_allclose(interpolate(x, eps, jnp.asarray(t)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(velocity_target(x, eps), eps - x)
    # the target is the time derivative of the path
    _, dxdt = jax.jvp(lambda s: interpolate(x, eps, s), (jnp.asarray(t, jnp.float32),),
                      (jnp.ones(3),))
    np.testing.assert_allclose(dxdt, eps - x, atol=1e-6)
    # with the true velocity the one-step estimates recover data and noise
    x_t = interpolate(x, eps, jnp.asarray(t))
    v = velocity_target(x, eps)
    np.testing.assert_allclose(x0_from_velocity(x_t, v, jnp.asarray(t)), x, atol=1e-5)
    np.testing.assert_allclose(noise_from_velocity(x_t, v, jnp.asarray(t)), eps, atol=1e-5)
    assert broadcast_time(jnp.asarray(t), x).shape == (3, 1, 1, 1)


def test_interpolation_errors_and_edm_map():
    x = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match=r"time must be a scalar or \[batch\]"):
        interpolate(x, x, jnp.zeros(4))
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate(x, jnp.zeros((3, 3)), 0.5)
    assert edm_sigma_to_t(0.0) == 0.0
    assert edm_sigma_to_t(1.0) == 0.5
    assert edm_sigma_to_t(0.17) == pytest.approx(0.17 / 1.17)


# ---- time samplers ---------------------------------------------------------------------------
def test_uniform_and_logit_normal_match_closed_form_cdfs():
    assert stats.kstest(draw("uniform"), "uniform").pvalue > 1e-3
    loc, scale = 0.5, 0.7
    t = draw("logit_normal", loc=loc, scale=scale)
    cdf = lambda s: stats.norm.cdf((logit(s) - loc) / scale)  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > 1e-3
    # the test has power: the default (0, 1) is rejected
    assert stats.kstest(draw("logit_normal"), cdf).pvalue < 1e-6


def test_mixture_is_flowmo_fat_lognormal():
    p = 0.1
    t = draw("mixture", uniform_prob=p)
    cdf = lambda s: p * s + (1 - p) * stats.norm.cdf(logit(s))  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > 1e-3
    # heavier tails than the plain logit-normal: P(t < 0.02) = 0.1*0.02 + 0.9*Phi(logit 0.02)
    assert np.mean(t < 0.02) == pytest.approx(cdf(0.02), abs=0.003)
    assert cdf(0.02) > 2 * stats.norm.cdf(logit(0.02))
    assert stats.kstest(t, lambda s: stats.norm.cdf(logit(s))).pvalue < 1e-6


def test_shift_formula_and_shifted_distribution():
    assert float(shift_time(0.5, 3.0)) == pytest.approx(0.75)      # 1.5 / 2
    assert float(shift_time(0.25, 2.0)) == pytest.approx(0.4)      # 0.5 / 1.25
    np.testing.assert_allclose(shift_time(jnp.linspace(0, 1, 7), 1.0), np.linspace(0, 1, 7), atol=1e-7)
    assert float(shift_time(0.0, 5.0)) == 0.0 and float(shift_time(1.0, 5.0)) == 1.0
    s = 3.0
    t = draw("shift", shift=s)
    assert stats.kstest(t, lambda v: v / (s - (s - 1) * v)).pvalue > 1e-3
    # a shifted logit-normal base
    t = draw("shift", shift=s, base="logit_normal", scale=0.8)
    assert stats.kstest(t, lambda v: stats.norm.cdf(logit(v / (s - (s - 1) * v)) / 0.8)).pvalue > 1e-3


def test_stratified_logit_normal_one_sample_per_stratum():
    n, loc, scale = 64, -0.3, 1.2
    t = draw("logit_normal", n=n, loc=loc, scale=scale, stratified=True)
    u = stats.norm.cdf((logit(t) - loc) / scale)
    np.testing.assert_array_equal(np.sort(np.floor(u * n)), np.arange(n))
    assert not np.all(np.diff(t) > 0)     # permuted, not ordered by batch position


def test_time_sampler_presets_and_errors():
    assert time_sampler_preset("flextok") == {"kind": "logit_normal", "loc": 0.0, "scale": 1.0}
    assert time_sampler_preset("flowmo") == {"kind": "mixture", "loc": 0.0, "scale": 1.0,
                                             "uniform_prob": 0.1}
    key = jax.random.key(1)
    np.testing.assert_array_equal(sample_time(key, 8, **time_sampler_preset("flowmo")),
                                  sample_time(key, 8, "mixture"))
    for kwargs, msg in [(dict(kind="gamma"), "unknown time sampler kind"),
                        (dict(kind="uniform", loc=0.0), "unknown parameter"),
                        (dict(kind="logit_normal", scale=0.0), "scale must be > 0"),
                        (dict(kind="mixture", uniform_prob=1.5), r"uniform_prob must be in \[0, 1\]"),
                        (dict(kind="shift"), "needs a shift"),
                        (dict(kind="shift", shift=-1.0), "finite number > 0")]:
        with pytest.raises(ValueError, match=msg):
            sample_time(key, 4, **kwargs)
    with pytest.raises(ValueError, match="unknown time sampler preset"):
        time_sampler_preset("sd3")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        sample_time(key, 0, "uniform")


# ---- grids -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kw", [("uniform", {}), ("power", {"rho": 4.0}),
                                     ("shifted", {"shift": 3.0})])
def test_grid_endpoints_and_monotone(kind, kw):
    g = np.asarray(time_grid(10, kind, **kw))
    assert g.shape == (11,) and g.dtype == np.float32
    assert g[0] == 1.0 and g[-1] == 0.0
    assert np.all(np.diff(g) < 0)


def test_grid_spacings():
    n = 8
    u = (n - np.arange(n + 1)) / n
    np.testing.assert_allclose(time_grid_np(n), u, rtol=0, atol=0)
    np.testing.assert_allclose(time_grid_np(n, "power", rho=4.0), u ** 4, rtol=1e-15)
    np.testing.assert_allclose(time_grid_np(n, "shifted", shift=3.0), 3 * u / (1 + 2 * u), rtol=1e-15)
    np.testing.assert_allclose(time_grid_np(n, "shifted", shift=1.0), u, rtol=1e-15)
    # rho = 4 crowds the steps near the data end t = 0; shift > 1 near the noise end t = 1
    steps = -np.diff(time_grid_np(n, "power", rho=4.0))
    assert np.all(np.diff(steps) < 0)
    assert np.all(np.diff(-np.diff(time_grid_np(n, "shifted", shift=3.0))) > 0)


def test_flowmo_grid_is_pow_025_and_interval_covers_six_steps():
    g = np.asarray(flow_preset("flowmo").grid(), np.float64)
    j = np.arange(25, -1, -1)
    np.testing.assert_allclose(g, (j / 25.0) ** 4, rtol=1e-6)      # ts = j**(1/p) / n**(1/p), p = 1/4
    lo, hi = FLOW_PRESETS["flowmo"].guidance.interval
    assert (lo, hi) == pytest.approx((0.17 / 1.17, 1.02 / 2.02))
    assert int(np.sum((g[:-1] >= lo) & (g[:-1] <= hi))) == 6           # 25 + 6 = 31 forwards
    gf = np.asarray(flow_preset("flextok").grid(), np.float64)
    np.testing.assert_allclose(gf, np.arange(25, -1, -1) / 25.0, rtol=1e-7)


def test_grid_errors():
    for args, kw, msg in [((0,), {}, "int >= 1"), ((4, "cosine"), {}, "unknown time grid"),
                          ((4, "power"), {}, "needs rho > 0"),
                          ((4, "shifted"), {"shift": 0.0}, "shift > 0"),
                          ((4,), {"rho": 2.0}, "only used by the 'power'")]:
        with pytest.raises(ValueError, match=msg):
            time_grid(*args, **kw)


# ---- loss ------------------------------------------------------------------------------------
def test_loss_matches_hand_formula_with_weights():
    rng = np.random.default_rng(0)
    x, eps = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 3, 2))
    t, w = np.array([0.1, 0.4, 0.6, 0.95]), np.array([1.0, 0.5, 0.0, 2.0])
    seen = {}

    def v_fn(x_t, tt):
        seen["x_t"], seen["t"] = x_t, tt
        return 0.3 * x_t                                  # some prediction
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    loss, aux = rectified_flow_loss(v_fn, f32(x), t=f32(t), noise=f32(eps), weights=f32(w))
    x_t = (1 - t)[:, None, None] * x + t[:, None, None] * eps
    per = ((0.3 * x_t - (eps - x)) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(seen["x_t"], x_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux.per_sample, per, rtol=1e-5)
    assert float(loss) == pytest.approx(np.mean(w * per), rel=1e-5)
    np.testing.assert_allclose(aux.x0_pred, x_t - t[:, None, None] * 0.3 * x_t, rtol=1e-5, atol=1e-6)
    loss_unw, _ = rectified_flow_loss(v_fn, f32(x), t=f32(t), noise=f32(eps))
    assert float(loss_unw) == pytest.approx(np.mean(per), rel=1e-5)
    # the true velocity gives zero loss and x0_pred == x
    loss0, aux0 = rectified_flow_loss(lambda xt, tt: f32(eps) - f32(x), f32(x), t=f32(t), noise=f32(eps))
    assert float(loss0) == 0.0
    np.testing.assert_allclose(aux0.x0_pred, x, atol=1e-6)


def test_loss_at_gaussian_optimum_is_conditional_variance():
    """x ~ N(mu, s^2): with v* = E[eps - x | x_t] the loss at time t is s^2 / ((1-t)^2 s^2 + t^2)."""
    mu, s, t0, n = np.array([1.0, -0.5]), np.array([0.5, 2.0]), 0.3, 40000
    k = (t0 - (1 - t0) * s ** 2) / ((1 - t0) ** 2 * s ** 2 + t0 ** 2)
    v_star = lambda x_t, t: -mu + k * (x_t - (1 - t0) * mu)  # noqa: E731
    x = mu + s * jax.random.normal(jax.random.key(3), (n, 2))
    _, aux = jax.jit(lambda x, key: rectified_flow_loss(v_star, x, key, t=jnp.full((n,), t0)))(
        x, jax.random.key(4))
    sq = np.asarray(aux.per_sample, np.float64)
    want = np.mean(s ** 2 / ((1 - t0) ** 2 * s ** 2 + t0 ** 2))
    assert np.mean(sq) == pytest.approx(want, abs=4 * np.std(sq) / np.sqrt(n))


def test_loss_draws_t_from_the_sampler_and_is_deterministic():
    x = jnp.ones((6, 2))
    fn = jax.jit(lambda key: rectified_flow_loss(lambda xt, t: xt, x, key, time_sampler="shift",
                                                 time_params={"shift": 2.0}))
    (l1, a1), (l2, a2) = fn(jax.random.key(7)), fn(jax.random.key(7))
    assert float(l1) == float(l2)
    np.testing.assert_array_equal(a1.noise, a2.noise)
    k_t, _ = jax.random.split(jax.random.key(7))
    np.testing.assert_array_equal(a1.t, sample_time(k_t, 6, "shift", shift=2.0))
    with pytest.raises(ValueError, match="needs a key"):
        rectified_flow_loss(lambda xt, t: xt, x)
    with pytest.raises(ValueError, match="weights must have shape"):
        rectified_flow_loss(lambda xt, t: xt, x, jax.random.key(0), weights=jnp.ones(5))


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
