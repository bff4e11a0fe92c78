"""VectorQuantizer state and training-only features: EMA numbers, dead-code replacement, k-means
init (module and pure function) and the rotation trick, against float64 numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.quantizers.base import RNG, STATS
from titok_jax.quantizers.vq import VectorQuantizer
from titok_jax.quantizers.vq_kmeans import kmeans
from titok_jax.quantizers.vq_lookup import rotate_to
from test_vq import japply, jgrad, jinit, np_normalize, unboxed


def ema_variables(codebook, counts, sums):
    k = len(counts)
    return {STATS: {"codebook": jnp.asarray(codebook, jnp.float32),
                    "ema_counts": jnp.asarray(counts, jnp.float32),
                    "ema_sums": jnp.asarray(sums, jnp.float32),
                    "usage": {"code_counts": jnp.zeros((k,))}}}


def train_step(q, v, z, seed=0):
    return japply(q, v, z, train=True, rngs={RNG: jax.random.key(seed)}, mutable=[STATS])


def np_laplace(counts, eps):
    total = counts.sum()
    return (counts + eps) / (total + len(counts) * eps) * total


# ----------------------------------------------------------------------------- EMA
def test_ema_update_reference_numbers():
    """E = [[0], [10], [100]], N = [1, 1, 1], m = E, g = 0.5, z = [1, 2, 9]: n = [2, 1, 0],
    s = [3, 9, 0] -> N' = [1.5, 1, 0.5], m' = [1.5, 9.5, 50], e' ~ [1.0, 9.5, 100]."""
    q = VectorQuantizer(3, 1, use_ema=True, ema_decay=0.5, ema_eps=1e-5)
    v = ema_variables([[0.0], [10.0], [100.0]], [1.0, 1.0, 1.0], [[0.0], [10.0], [100.0]])
    z = jnp.array([[1.0], [2.0], [9.0]])
    (zq, out), new = train_step(q, v, z)
    new = new[STATS]
    np.testing.assert_array_equal(zq, [[0.0], [0.0], [10.0]])     # codes from the state read at input
    assert set(out.losses) == {"commitment"}                        # no codebook loss with EMA
    np.testing.assert_allclose(out.losses["commitment"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["ema_counts"], [1.5, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(new["ema_sums"][:, 0], [1.5, 9.5, 50.0], rtol=1e-6)
    np.testing.assert_allclose(new["codebook"][:, 0], [1.0, 9.5, 100.0], rtol=2e-5)  # ~: eps = 1e-5
    ref = np.array([1.5, 9.5, 50.0]) / np_laplace(np.array([1.5, 1.0, 0.5]), 1e-5)
    np.testing.assert_allclose(new["codebook"][:, 0], ref, rtol=1e-6)
    # The unassigned code: its count decays, its mean m/N does not move.
    assert new["ema_counts"][2] < 1.0
    np.testing.assert_allclose(new["ema_sums"][2, 0] / new["ema_counts"][2], 100.0, rtol=1e-6)
    # The gradient of the losses reaches z only; the EMA codebook is state, not a param.
    assert "params" not in jinit(q, jax.random.key(0), z)


def test_ema_cosine_codebook_is_renormalised():
    q = VectorQuantizer(4, 3, use_ema=True, l2_normalize=True, ema_decay=0.9)
    z = jax.random.normal(jax.random.key(0), (32, 3))
    v = jinit(q, jax.random.key(1), z)
    (_, out), new = train_step(q, v, z)
    cb = np.asarray(unboxed(new)[STATS]["codebook"], np.float64)
    np.testing.assert_allclose(np.linalg.norm(cb, axis=-1), 1.0, rtol=1e-6)
    s = unboxed(v)[STATS]
    ref = 0.9 * np.asarray(s["ema_sums"], np.float64)
    x = np_normalize(np.asarray(z, np.float64))
    np.add.at(ref, np.asarray(out.indices), 0.1 * x)
    np.testing.assert_allclose(cb, np_normalize(ref), rtol=1e-6, atol=0)   # measured 7e-8


# ----------------------------------------------------------------------------- dead codes
def test_dead_code_replaced_by_batch_vector():
    """thr = 2; code 2 is never selected: N = [3, 3, 3], g = 0.5, n = [2, 2, 0] -> N' = [2.5, 2.5, 1.5]:
    code 2 is dead and becomes a batch vector x with N = 2, m = 2 x; codes 0 and 1 get the plain update."""
    z = jnp.array([[1.0], [2.0], [9.0], [11.0]])
    v = ema_variables([[0.0], [10.0], [1000.0]], [3.0, 3.0, 3.0], [[0.0], [30.0], [3000.0]])
    q = VectorQuantizer(3, 1, use_ema=True, ema_decay=0.5, dead_code_threshold=2.0)
    plain = VectorQuantizer(3, 1, use_ema=True, ema_decay=0.5)
    for seed in range(3):
        (zq, out), new = train_step(q, v, z, seed)
        _, ref = train_step(plain, v, z, seed)
        new, ref = new[STATS], ref[STATS]
        np.testing.assert_array_equal(out.indices, [0, 0, 1, 1])
        x = float(new["codebook"][2, 0])
        assert x in (1.0, 2.0, 9.0, 11.0)
        assert float(new["ema_counts"][2]) == 2.0
        assert float(new["ema_sums"][2, 0]) == 2.0 * x
        for name in ("codebook", "ema_counts", "ema_sums"):          # live codes untouched
            np.testing.assert_array_equal(new[name][:2], ref[name][:2])
        # without the feature: m' / laplace(N') = 0.5 * 3000 / laplace([2.5, 2.5, 1.5])[2] (~1000)
        want = 1500.0 / np_laplace(np.array([2.5, 2.5, 1.5]), 1e-5)[2]
        np.testing.assert_allclose(ref["codebook"][2, 0], want, rtol=1e-6)


# ----------------------------------------------------------------------------- k-means
def blobs(k=5, d=3, per=40, sigma=0.01, cosine=False, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-1, 1, (k, d))
    while np.min(np.linalg.norm(centres[:, None] - centres[None], axis=-1) + 9 * np.eye(k)) < 0.5:
        centres = rng.uniform(-1, 1, (k, d))
    if cosine:
        centres = np_normalize(centres)
    x = np.repeat(centres, per, axis=0) + sigma * rng.normal(size=(k * per, d))
    x = np_normalize(x) if cosine else x
    return centres, rng.permutation(x).astype(np.float32)


def assert_recovers(means, centres, tol=0.05):
    dist = np.linalg.norm(np.asarray(means, np.float64)[:, None] - centres[None], axis=-1)
    match = dist.argmin(axis=1)
    assert sorted(match) == list(range(len(centres))), match        # a permutation
    assert dist[np.arange(len(means)), match].max() < tol


@pytest.mark.parametrize("cosine", [False, True])
def test_kmeans_recovers_blob_centres(cosine):
    centres, x = blobs(cosine=cosine)
    means, bins = kmeans(jax.random.key(0), x, 5, 10, cosine=cosine, max_elements=64)
    assert_recovers(means, centres)
    np.testing.assert_array_equal(bins, [40.0] * 5)
    if cosine:
        np.testing.assert_allclose(np.linalg.norm(means, axis=-1), 1.0, rtol=1e-6)


def test_kmeans_random_init_and_empty_clusters_keep_old_mean():
    a, b = [1.0, 0.0], [0.0, 3.0]
    x = jnp.array([a, a, b, b])
    for method in ("random", "kmeans++"):
        means, bins = kmeans(jax.random.key(1), x, 3, 4, method=method)
        rows = {tuple(r) for r in np.asarray(means).tolist()}
        assert rows == {tuple(a), tuple(b)}                         # a duplicate mean stays put
        assert float(bins.sum()) == 4.0 and sorted(np.asarray(bins).tolist()) == [0.0, 2.0, 2.0]


def test_module_kmeans_init_runs_once_and_sets_ema_stats():
    centres, x = blobs()
    q = VectorQuantizer(5, 3, use_ema=True, kmeans_init=True, ema_decay=0.99)
    v = jinit(q, jax.random.key(0), x)
    assert not bool(v[STATS]["kmeans_done"])
    (_, out), v1 = train_step(q, v, x)
    s = unboxed(v1)[STATS]
    assert bool(s["kmeans_done"])
    assert_recovers(s["codebook"], centres)
    np.testing.assert_array_equal(s["ema_counts"], 40.0)      # counts = bins
    np.testing.assert_allclose(s["ema_sums"], np.asarray(s["codebook"]) * 40.0, rtol=1e-6)  # measured 1e-7
    # beta |z - e_k|^2 averaged over every element, against the k-means codes it quantized with
    cb = np.asarray(s["codebook"], np.float64)
    want = 0.25 * np.mean((np.asarray(x, np.float64) - cb[np.asarray(out.indices)]) ** 2)
    np.testing.assert_allclose(out.losses["commitment"], want, rtol=1e-6)  # measured 3e-8
    # Second call: no new k-means (a shifted batch would otherwise move the codes by 0.5).
    (_, _), v2 = train_step(q, v1, x + 0.5, seed=1)
    moved = np.abs(np.asarray(unboxed(v2)[STATS]["codebook"]) - np.asarray(s["codebook"])).max()
    assert moved < 0.1
    # Eval never initialises.
    (_, _), ve = japply(q, v, x, train=False, mutable=[STATS])
    assert not bool(ve[STATS]["kmeans_done"])


# ----------------------------------------------------------------------------- rotation trick
def np_rotation(e, q):
    e, q = np.asarray(e, np.float64), np.asarray(q, np.float64)
    eh, qh = e / np.linalg.norm(e), q / np.linalg.norm(q)
    s = eh + qh
    r = s / np.linalg.norm(s) if np.linalg.norm(s) > 1e-9 else np.zeros_like(s)
    return np.eye(len(e)) - 2 * np.outer(r, r) + 2 * np.outer(qh, eh)


def rotation_cases():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(4, 5)).astype(np.float32)
    q = rng.normal(size=(4, 5)).astype(np.float32)
    q[3] = -0.5 * e[3]                                   # antipodal: e^ = -q^
    return e, q


def test_rotation_trick_value_and_gradient():
    e, q = rotation_cases()
    g = np.random.default_rng(1).normal(size=e.shape).astype(np.float32)
    value_and_vjp = jax.jit(lambda e, q, g: (lambda out, vjp: (out, vjp(g)[0]))(
        *jax.vjp(lambda e: rotate_to(e, q), e)))
    out, grad = value_and_vjp(jnp.asarray(e), jnp.asarray(q), jnp.asarray(g))
    np.testing.assert_allclose(out, q, atol=1e-6)
    for i in range(len(e)):
        rot = np_rotation(e[i], q[i])
        np.testing.assert_allclose(rot @ rot.T, np.eye(5), atol=1e-12)
        scale = np.linalg.norm(q[i].astype(np.float64)) / np.linalg.norm(e[i].astype(np.float64))
        np.testing.assert_allclose(grad[i], scale * rot.T @ g[i], rtol=0, atol=3e-6)  # measured 3.5e-7
    e[0] = 0.0                                            # ||e|| = 0: plain straight-through
    np.testing.assert_allclose(value_and_vjp(jnp.asarray(e), jnp.asarray(q), jnp.asarray(g))[1][0], g[0])


@pytest.mark.parametrize("antipodal", [False, True])
def test_module_rotation_trick_gradient(antipodal):
    e, _ = rotation_cases()
    codebook = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32)
    if antipodal:                                   # one code, opposite to the one input
        codebook, e = -0.5 * e[3:4], e[3:4]
    k = len(codebook)
    q = VectorQuantizer(k, 5, rotation_trick=True)
    v = {"params": {"codebook": jnp.asarray(codebook)}, STATS: {"usage": {"code_counts": jnp.zeros(k)}}}
    g = np.random.default_rng(3).normal(size=e.shape).astype(np.float32)
    z = jnp.asarray(e)
    zq, out = japply(q, v, z)
    np.testing.assert_array_equal(zq, codebook[np.asarray(out.indices)])     # exact forward value
    grad = jgrad(lambda z: jnp.sum(japply(q, v, z)[0] * g))(z)
    for i, c in enumerate(np.asarray(out.indices)):
        scale = np.linalg.norm(codebook[c].astype(np.float64)) / np.linalg.norm(e[i].astype(np.float64))
        np.testing.assert_allclose(grad[i], scale * np_rotation(e[i], codebook[c]).T @ g[i],
                                   rtol=0, atol=3e-6)                # measured 3e-7


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
