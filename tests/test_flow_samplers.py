"""ODE samplers and guidance: call counts, hand formulas, convergence on a Gaussian toy problem with
the exact velocity, CFG/APG against a float64 numpy reference, guidance interval, determinism."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.flow import (GuidanceConfig, apg, cfg, flow_preset, guidance_preset, initial_noise,
                            match_batch, sample, time_grid)

# ---- Gaussian toy: x ~ N(mu, s^2 I) -----------------------------------------------------------
# x_t = (1-t) x + t eps ~ N((1-t) mu, sig_t^2), sig_t^2 = (1-t)^2 s^2 + t^2, and
# Cov(eps - x, x_t) = t - (1-t) s^2, so the exact velocity is
#   v(x_t, t) = E[eps - x | x_t] = -mu + (t - (1-t) s^2) / sig_t^2 (x_t - (1-t) mu).
# The ODE from t = 1 is solved by x_t = (1-t) mu + sig_t z with z = x_1, so x_0 = mu + s z exactly.
MU = np.array([1.5, -2.0, 0.5])
S = np.array([0.5, 2.0, 1.0])


def gaussian_velocity(mu, s):
    mu, s = jnp.asarray(mu, jnp.float32), jnp.asarray(s, jnp.float32)

    def v(x, t, cond=None):
        tb = t[:, None]
        var = (1 - tb) ** 2 * s ** 2 + tb ** 2
        return -mu + (tb - (1 - tb) * s ** 2) / var * (x - (1 - tb) * mu)
    return v


def run(v, noise, grid, method="euler", guidance=None):
    return np.asarray(jax.jit(lambda z: sample(v, z, grid, method, guidance))(noise), np.float64)


def affine_fit(z, x):
    """Per-dim (A, B) with x = A + B z (exact for the linear toy ODE): the law is N(A, B^2)."""
    b = ((x - x.mean(0)) * (z - z.mean(0))).sum(0) / ((z - z.mean(0)) ** 2).sum(0)
    return x.mean(0) - b * z.mean(0), b


def test_samplers_converge_to_the_data_distribution_heun_faster():
    z = np.asarray(initial_noise(0, (64, 3)), np.float64)
    v = gaussian_velocity(MU, S)
    errs = {}
    for method in ("euler", "heun"):
        errs[method] = []
        for n in (4, 8, 16, 32):
            x = run(v, jnp.asarray(z, jnp.float32), time_grid(n), method)
            a, b = affine_fit(z, x)
            errs[method].append((np.abs(x - (MU + S * z)).max(), np.abs(a - MU).max(),
                                 np.abs(b - S).max()))
    e, h = np.array(errs["euler"]), np.array(errs["heun"])
    # both schemes keep the mean path (1 - t) mu exactly (v = -mu there, so each step is exact);
    # the std and the per-sample transport errors shrink as the steps grow
    assert e[:, 1].max() < 1e-6 and h[:, 1].max() < 1e-6
    assert np.all(np.diff(e[:, [0, 2]], axis=0) < 0) and np.all(np.diff(h[:, [0, 2]], axis=0) < 0)
    # first order vs second order: halving h divides the error by ~2 and ~4
    ratio_e, ratio_h = e[:-1, 0] / e[1:, 0], h[:-1, 0] / h[1:, 0]
    assert np.all((ratio_e > 1.7) & (ratio_e < 2.3)), ratio_e
    assert np.all((ratio_h > 3.5) & (ratio_h < 5.0)), ratio_h
    assert np.all(h[:, [0, 2]] < e[:, [0, 2]])
    assert h[-1, 0] < 5e-3 and e[-1, 0] > 0.1


def test_heun_samples_have_the_right_mean_and_std():
    n = 4096
    z = initial_noise(jax.random.key(11), (n, 3))
    x = run(gaussian_velocity(MU, S), z, time_grid(32, "power", rho=2.0), "heun")
    np.testing.assert_array_less(np.abs(x.mean(0) - MU), 4 * S / np.sqrt(n))
    np.testing.assert_array_less(np.abs(x.std(0) - S), 4 * S / np.sqrt(2 * n))
    # two Euler steps are visibly wrong on the same noise
    x2 = run(gaussian_velocity(MU, S), z, time_grid(2), "euler")
    assert np.abs(x2.std(0) - S).max() > 20 * S.max() / np.sqrt(2 * n)


# ---- call counts and hand formulas ------------------------------------------------------------
def counting(v):
    calls = []

    def fn(x, t, cond):
        concrete = not isinstance(t, jax.core.Tracer)
        calls.append((x.shape[0], np.array(t) if concrete else None,
                      np.array(cond) if concrete else None))
        return v(x, t, cond)
    return fn, calls


def toy_v(x, t, cond):
    return jnp.sin(x) * t[:, None] + jnp.where(cond[:, None], 1.0, -2.0)


def test_one_euler_step_is_one_network_call():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)
    fn, calls = counting(toy_v)
    with jax.disable_jit():
        out = sample(fn, x, jnp.array([0.8, 0.5]))
    assert len(calls) == 1 and calls[0][0] == 3
    np.testing.assert_array_equal(calls[0][1], np.full(3, 0.8, np.float32))
    assert calls[0][2].all()
    xn = np.float64(x)
    np.testing.assert_allclose(out, xn + (0.5 - 0.8) * (np.sin(xn) * 0.8 + 1.0), rtol=1e-6, atol=1e-7)


def test_heun_step_hand_formula_and_call_counts():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)), jnp.float32)
    xn = np.float64(x)
    f = lambda y, t: np.sin(y) * t + 1.0  # noqa: E731
    fn, calls = counting(toy_v)
    with jax.disable_jit():
        out = sample(fn, x, jnp.array([0.9, 0.4]), "heun")
    h, x_e = -0.5, xn - 0.5 * f(xn, 0.9)
    assert len(calls) == 2
    np.testing.assert_allclose(out, xn + h / 2 * (f(xn, 0.9) + f(x_e, 0.4)), rtol=1e-5)
    for method, n, want in [("euler", 5, 5), ("heun", 5, 9)]:      # Heun's last step onto t=0 is Euler
        fn, calls = counting(toy_v)
        with jax.disable_jit():
            sample(fn, x, time_grid(n), method)
        assert len(calls) == want


def test_loop_is_one_scan_traced_once():
    z = jnp.zeros((2, 3))
    counts = []
    for n in (3, 40):
        fn, calls = counting(gaussian_velocity(MU, S))
        jaxpr = jax.make_jaxpr(lambda z: sample(fn, z, time_grid(n), "heun",
                                                guidance_preset("flowmo")))(z)
        counts.append(len(calls))
        assert "scan" in str(jaxpr)
    assert counts[0] == counts[1]


# ---- guidance -------------------------------------------------------------------------------
CLASS = np.random.default_rng(5).normal(size=(3, 4))           # per-sample conditioning


def toy_guided(xp, x, t, cond, c):
    t = t[:, None]
    vc = xp.tanh(x) * (1 + t) + 2 * t * c
    vu = 0.5 * x - t
    return xp.where(cond[:, None], vc, vu)


def jax_guided(x, t, cond):
    return toy_guided(jnp, x, t, cond, match_batch(jnp.asarray(CLASS, jnp.float32), x.shape[0]))


def ref_sample(x, grid, method="euler", scale=1.0, kind="cfg", interval=None, beta=0.0, r=0.0,
               eta=0.0):
    """float64 numpy sampler with CFG / APG written from the formulas; also counts clipped steps."""
    x, grid = np.float64(x), np.float64(grid)
    state = {"m": np.zeros_like(x), "clipped": 0}
    ones = np.ones(len(x), bool)

    def ev(y, t):
        tt = np.full(len(y), t)
        c = toy_guided(np, y, tt, ones, CLASS)
        if scale == 1.0 or (interval is not None and not interval[0] <= t <= interval[1]):
            return c
        u = toy_guided(np, y, tt, ~ones, CLASS)
        if kind == "cfg":
            return u + scale * (c - u)
        d = c - u
        if beta:
            state["m"] = d + beta * state["m"]
            d = state["m"]
        if r > 0:
            norm = np.linalg.norm(d, axis=1, keepdims=True)
            state["clipped"] += int((norm > r).sum())
            d = d * np.minimum(1.0, r / norm)
        c_hat = c / np.linalg.norm(c, axis=1, keepdims=True)
        par = (d * c_hat).sum(1, keepdims=True) * c_hat
        return c + (scale - 1) * ((d - par) + eta * par)

    for t, tn in zip(grid[:-1], grid[1:]):
        v1 = ev(x, t)
        if method == "heun" and tn > 0:
            x = x + (tn - t) / 2 * (v1 + ev(x + (tn - t) * v1, tn))
        else:
            x = x + (tn - t) * v1
    return x, state["clipped"]


Z = np.random.default_rng(6).normal(size=(3, 4))


def test_cfg_gaussian_closed_form_and_scale_one_is_conditional():
    """Equal variances: u + w (c - u) is the exact velocity of N(mu_u + w (mu_c - mu_u), s^2)."""
    mu_c, mu_u, s, w = np.array([1.0, -1.0]), np.array([0.2, 0.5]), np.array([0.7, 1.3]), 3.0
    vc, vu = gaussian_velocity(mu_c, s), gaussian_velocity(mu_u, s)
    v = lambda x, t, cond: jnp.where(cond[:, None], vc(x, t), vu(x, t))  # noqa: E731
    z = initial_noise(2, (16, 2))
    x = run(v, z, time_grid(64), "heun", GuidanceConfig(scale=w))
    np.testing.assert_allclose(x, mu_u + w * (mu_c - mu_u) + s * np.float64(z), atol=2e-3)
    x1 = run(v, z, time_grid(8), "heun", GuidanceConfig(scale=1.0))
    np.testing.assert_array_equal(x1, run(v, z, time_grid(8), "heun"))
    np.testing.assert_allclose(cfg(jnp.asarray(Z), jnp.asarray(CLASS), 1.0), Z, atol=1e-6)


def test_cfg_guided_sampler_matches_reference_with_one_batched_call():
    grid = time_grid(6)
    fn, calls = counting(jax_guided)
    with jax.disable_jit():
        x = sample(fn, jnp.asarray(Z, jnp.float32), grid, "euler", GuidanceConfig(scale=2.5))
    assert len(calls) == 6 and all(n == 6 for n, _, _ in calls)
    np.testing.assert_array_equal(calls[0][2], [True] * 3 + [False] * 3)
    want, _ = ref_sample(Z, grid, scale=2.5)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)


def test_guidance_interval_flowmo_preset():
    recipe = flow_preset("flowmo")
    calls = []

    def fn(x, t, cond):
        jax.debug.callback(lambda tt: calls.append((x.shape[0], float(tt))), t[0])
        return jax_guided(x, t, cond)
    x = jax.jit(lambda z: sample(fn, z, recipe.grid(), recipe.method, recipe.guidance))(
        jnp.asarray(Z, jnp.float32))
    jax.effects_barrier()
    lo, hi = recipe.guidance.interval
    assert len(calls) == 25
    assert sorted(t for n, t in calls if n == 6) == sorted(t for _, t in calls if lo <= t <= hi)
    assert sum(n == 6 for n, _ in calls) == 6 and sum(n == 3 for n, _ in calls) == 19
    want, _ = ref_sample(Z, recipe.grid(), scale=1.5, interval=(lo, hi))
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    everywhere, _ = ref_sample(Z, recipe.grid(), scale=1.5)
    assert np.abs(everywhere - want).max() > 1e-2


@pytest.mark.parametrize("method,guidance", [
    ("euler", guidance_preset("flextok")),
    ("heun", guidance_preset("flextok", scale=3.0)),
    ("euler", GuidanceConfig(scale=4.0, kind="apg", apg_momentum=0.3, apg_norm_threshold=1.0,
                             apg_eta=0.4, interval=(0.2, 0.7))),
])
def test_apg_matches_reference(method, guidance):
    grid = time_grid(10)
    x = run(jax_guided, jnp.asarray(Z, jnp.float32), grid, method, guidance)
    want, clipped = ref_sample(Z, grid, method, guidance.scale, "apg", guidance.interval,
                               guidance.apg_momentum, guidance.apg_norm_threshold, guidance.apg_eta)
    assert clipped > 0                                   # the norm threshold did act
    np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-4)
    plain = run(jax_guided, jnp.asarray(Z, jnp.float32), grid, method,
                GuidanceConfig(scale=guidance.scale, interval=guidance.interval))
    assert np.abs(plain - x).max() > 1e-2                # APG is not CFG here


def test_apg_without_momentum_threshold_and_with_eta_one_is_cfg():
    g = GuidanceConfig(scale=3.0, kind="apg", apg_eta=1.0)
    grid = time_grid(5, "power", rho=2.0)
    np.testing.assert_allclose(run(jax_guided, jnp.asarray(Z, jnp.float32), grid, "heun", g),
                               run(jax_guided, jnp.asarray(Z, jnp.float32), grid, "heun",
                                   GuidanceConfig(scale=3.0)), rtol=1e-5, atol=1e-5)
    c, u = jnp.asarray(Z, jnp.float32), jnp.asarray(CLASS, jnp.float32)
    np.testing.assert_allclose(apg(c, u, 3.0, None, eta=1.0)[0], cfg(c, u, 3.0), atol=1e-5)


# ---- determinism and errors -----------------------------------------------------------------
def test_same_seed_is_bit_identical_under_jit():
    recipe = flow_preset("flextok")

    def decode(key):
        return sample(jax_guided, initial_noise(key, (3, 4)), recipe.grid(8), "heun", recipe.guidance)
    a = jax.jit(decode)(jax.random.key(5))
    b = jax.jit(lambda k: decode(k))(jax.random.key(5))            # a separate compilation
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(jax.jit(decode)(jax.random.key(6)) - a)).max() > 1e-3
    np.testing.assert_array_equal(initial_noise(5, (3, 4)), initial_noise(jax.random.key(5), (3, 4)))
    x, traj = sample(jax_guided, initial_noise(5, (3, 4)), recipe.grid(8), "heun", recipe.guidance,
                     return_trajectory=True)
    assert traj.shape == (8, 3, 4)
    np.testing.assert_array_equal(traj[-1], x)
    np.testing.assert_allclose(x, a, rtol=1e-5, atol=1e-5)


def test_errors():
    z = jnp.zeros((2, 3))
    v = gaussian_velocity(MU, S)
    for kwargs, msg in [(dict(method="rk4"), "unknown sampler method"),
                        (dict(guidance={"scale": 2.0}), "must be a GuidanceConfig"),
                        (dict(grid=jnp.array([0.0, 1.0])), "strictly decreasing"),
                        (dict(grid=jnp.array([1.0])), "at least 2 points")]:
        args = dict(grid=time_grid(3)) | kwargs
        with pytest.raises(ValueError, match=msg):
            sample(v, z, **args)
    with pytest.raises(ValueError, match="velocity_fn returned shape"):
        sample(lambda x, t, c: x[:, :2], z, time_grid(2))
    for kwargs, msg in [(dict(kind="pag"), "unknown guidance kind"),
                        (dict(interval=(0.6, 0.2)), "t_lo <= t_hi"),
                        (dict(apg_momentum=-0.5), "need kind='apg'"),
                        (dict(scale=float("nan")), "finite number")]:
        with pytest.raises(ValueError, match=msg):
            GuidanceConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown guidance preset"):
        guidance_preset("dit")
    with pytest.raises(ValueError, match="cannot tile"):
        match_batch(jnp.zeros((3, 2)), 4)
    assert dataclasses.replace(guidance_preset("flowmo"), scale=2.0).interval == \
        guidance_preset("flowmo").interval


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
