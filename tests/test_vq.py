"""VectorQuantizer: lookup against float64 brute force, losses and gradients by hand, STE, round trip,
dtypes, entropy loss and argument errors. EMA / dead codes / k-means: test_vq_state.py; multi-device:
test_vq_sharding.py."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.quantizers.base import STATS
from titok_jax.quantizers.vq import VectorQuantizer
from titok_jax.quantizers.vq_lookup import entropy_terms, nearest_code



# ----------------------------------------------------------------------------- float64 references
def np_normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def np_costs(x, e, cosine):
    """[N, K] float64 costs to minimise (squared L2, or -cosine)."""
    x, e = np.asarray(x, np.float64), np.asarray(e, np.float64)
    if cosine:
        return -np_normalize(x) @ np_normalize(e).T
    return ((x[:, None, :] - e[None]) ** 2).sum(-1)


def np_nearest(x, e, cosine, gap=1e-4):
    """(argmin, mask of rows whose two best costs differ by >= gap)."""
    c = np_costs(x, e, cosine)
    srt = np.sort(c, axis=1)
    return np.argmin(c, axis=1), (srt[:, 1] - srt[:, 0]) >= gap


@functools.lru_cache(maxsize=None)
def _jitted_init(q):
    return jax.jit(q.init)


@functools.lru_cache(maxsize=None)
def _jitted_apply(q, static):
    kwargs = {k: list(v) if k == "mutable" else v for k, v in static}
    return jax.jit(lambda v, rngs, *a: q.apply(v, *a, rngs=rngs, **kwargs))


def jinit(q, key, z):
    """``q.init`` under jit (one compilation instead of many eager ones: keeps the suite fast)."""
    return _jitted_init(q)(key, z)


def japply(q, variables, *args, rngs=None, **kwargs):
    """``q.apply`` under jit, compiled once per (module, keyword arguments); ``rngs`` is traced,
    the other keyword arguments (train, mutable, method, dtype) are static."""
    static = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
    return _jitted_apply(q, static)(variables, rngs, *args)


def jgrad(f, argnums=0):
    return jax.jit(jax.grad(f, argnums=argnums))


def unboxed(variables):
    return nn.meta.unbox(variables)


def lookup_space(variables, z, cosine):
    """float64 tokens in the lookup space (project_in with the module's own params, then normalise)."""
    x = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    p = unboxed(variables)["params"]
    if "project_in" in p:
        x = x @ np.asarray(p["project_in"]["kernel"], np.float64) + np.asarray(p["project_in"]["bias"])
    return np_normalize(x) if cosine else x


# ----------------------------------------------------------------------------- nearest code
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("max_elements", [1 << 24, 100, 16])   # one chunk; token chunks; token+code chunks
def test_nearest_code_matches_bruteforce(cosine, max_elements):
    kx, ke = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (203, 6))
    e = jax.random.normal(ke, (37, 6))            # 37 codes: 16-code chunks need padding
    if cosine:
        x, e = np_normalize(np.asarray(x)).astype(np.float32), np_normalize(np.asarray(e)).astype(np.float32)
    got = np.asarray(jax.jit(lambda a, b: nearest_code(a, b, cosine=cosine, max_elements=max_elements))(x, e))
    ref, ok = np_nearest(x, e, cosine)
    assert got.dtype == np.int32 and got.shape == (203,)
    assert ok.mean() > 0.9
    np.testing.assert_array_equal(got[ok], ref[ok])


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("codebook_dim", [None, 4])
def test_module_indices_match_bruteforce(cosine, codebook_dim):
    q = VectorQuantizer(29, 8, codebook_dim=codebook_dim, l2_normalize=cosine, max_distance_elements=24)
    z = jax.random.normal(jax.random.key(1), (3, 41, 8))
    v = jinit(q, jax.random.key(2), z)
    zq, out = japply(q, v, z)
    assert out.indices.shape == (3, 41) and out.indices.dtype == jnp.int32
    assert zq.shape == z.shape and zq.dtype == z.dtype
    codebook = np.asarray(unboxed(v)["params"]["codebook"], np.float64)
    ref, ok = np_nearest(lookup_space(v, z, cosine), codebook, cosine)
    assert ok.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1)[ok], ref[ok])


def test_bfloat16_inputs_same_indices_as_float32():
    q = VectorQuantizer(64, 8, max_distance_elements=1000)
    z16 = jax.random.normal(jax.random.key(3), (512, 8)).astype(jnp.bfloat16)
    z32 = z16.astype(jnp.float32)                  # the same values, exactly
    v = jinit(q, jax.random.key(4), z32)
    zq16, out16 = japply(q, v, z16)
    zq32, out32 = japply(q, v, z32)
    assert zq16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out16.indices, out32.indices)
    ref, ok = np_nearest(np.asarray(z32), np.asarray(unboxed(v)["params"]["codebook"]), False)
    np.testing.assert_array_equal(np.asarray(out16.indices)[ok], ref[ok])
    np.testing.assert_array_equal(zq16, zq32.astype(jnp.bfloat16))


@pytest.mark.parametrize("kwargs", [dict(entropy_weight=0.1),
                                    dict(use_ema=True, dead_code_threshold=1.0, kmeans_init=True)])
def test_large_codebook_never_materialises_distance_matrix(kwargs):
    """65,536 codes x 65,536 tokens (a 16 GiB f32 matrix): a compiled training step (forward and
    backward, with the entropy loss / EMA, dead codes and k-means) needs well under 1 GiB of scratch."""
    q = VectorQuantizer(65536, 16, **kwargs)
    z = jax.ShapeDtypeStruct((64, 1024, 16), jnp.float32)
    v = jax.eval_shape(q.init, jax.random.key(0), z)

    def loss(v, z):
        (zq, out), _ = q.apply(v, z, train=True, rngs={"quantizer": jax.random.key(1)}, mutable=[STATS])
        return jnp.sum(zq) + out.total_loss()

    compiled = jax.jit(jax.grad(loss, argnums=1)).lower(v, z).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30


# ----------------------------------------------------------------------------- losses and gradients
def hand_example():
    """E = [[0], [10], [100]] (code 2 never selected), z = [1, 2, 9] -> indices [0, 0, 1]."""
    q = VectorQuantizer(3, 1, commitment_weight=0.25, codebook_weight=1.0)
    v = {"params": {"codebook": jnp.array([[0.0], [10.0], [100.0]])},
         STATS: {"usage": {"code_counts": jnp.zeros((3,))}}}
    z = jnp.array([[1.0], [2.0], [9.0]])
    return q, v, z


def test_hand_example_losses_and_codebook_gradient():
    q, v, z = hand_example()
    zq, out = japply(q, v, z)
    np.testing.assert_array_equal(out.indices, [0, 0, 1])
    np.testing.assert_array_equal(zq, [[0.0], [0.0], [10.0]])
    np.testing.assert_allclose(out.losses["commitment"], 0.25 * (1 + 4 + 1) / 3, rtol=1e-6)   # 0.5
    np.testing.assert_allclose(out.losses["codebook"], (1 + 4 + 1) / 3, rtol=1e-6)
    assert set(out.losses) == {"commitment", "codebook"}

    apply = lambda p, z: japply(q, {**v, "params": p}, z)
    grad_cb = jgrad(lambda p: apply(p, z)[1].losses["codebook"])(v["params"])
    np.testing.assert_allclose(grad_cb["codebook"][:, 0], [-2.0, 2.0 / 3.0, 0.0], rtol=1e-6, atol=0)
    # commitment: d/dz = 2 beta (z - q) / N; it gives the codebook nothing.
    grad_z = jgrad(lambda z: japply(q, v, z)[1].losses["commitment"])(z)
    np.testing.assert_allclose(grad_z[:, 0], 2 * 0.25 * np.array([1.0, 2.0, -1.0]) / 3, rtol=1e-6)
    grad_cb_commit = jgrad(lambda p: apply(p, z)[1].losses["commitment"])(v["params"])
    np.testing.assert_array_equal(grad_cb_commit["codebook"], 0.0)
    # A downstream loss on z_q trains the encoder (STE), never the codebook.
    grad_cb_out = jgrad(lambda p: jnp.sum(apply(p, z)[0] ** 2))(v["params"])
    np.testing.assert_array_equal(grad_cb_out["codebook"], 0.0)


def test_hand_example_metrics():
    q, v, z = hand_example()
    _, out = japply(q, v, z)
    p = np.array([2 / 3, 1 / 3])
    np.testing.assert_allclose(out.metrics["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    np.testing.assert_allclose(out.metrics["usage"], 2 / 3, rtol=1e-6)
    (_, out), upd = japply(q, v, z, train=True, mutable=[STATS])
    np.testing.assert_array_equal(upd[STATS]["usage"]["code_counts"], [2.0, 1.0, 0.0])
    np.testing.assert_allclose(out.metrics["cumulative_usage"], 2 / 3, rtol=1e-6)


def np_normalize_jacobian_t(x, g):
    """(d x^/dx)^T g for x^ = x/||x||: (g - x^ (x^.g)) / ||x||."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    xh = x / n
    return (g - xh * (xh * g).sum(-1, keepdims=True)) / n


@pytest.mark.parametrize("cosine,codebook_dim", [(False, None), (True, None), (True, 3), (False, 3)])
def test_straight_through_gradient_is_analytic(cosine, codebook_dim):
    q = VectorQuantizer(16, 5, codebook_dim=codebook_dim, l2_normalize=cosine)
    z = jax.random.normal(jax.random.key(5), (2, 7, 5))
    w = jax.random.normal(jax.random.key(6), (2, 7, 5))
    v = jinit(q, jax.random.key(7), z)
    grad = jgrad(lambda z: jnp.sum(w * japply(q, v, z)[0]))(z)
    g = np.asarray(w, np.float64).reshape(-1, 5)
    p = unboxed(v)["params"]
    if codebook_dim:
        g = g @ np.asarray(p["project_out"]["kernel"], np.float64).T      # into the lookup space
    if cosine:
        h = np.asarray(z, np.float64).reshape(-1, 5)
        if codebook_dim:
            h = h @ np.asarray(p["project_in"]["kernel"], np.float64) + np.asarray(p["project_in"]["bias"])
        g = np_normalize_jacobian_t(h, g)                                   # through x / ||x||
    if codebook_dim:
        g = g @ np.asarray(p["project_in"]["kernel"], np.float64).T
    np.testing.assert_allclose(np.asarray(grad).reshape(-1, 5), g, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- round trip and state
CONFIGS = {
    "l2": dict(),
    "cosine_proj": dict(l2_normalize=True, codebook_dim=4),
    "ema_cosine": dict(use_ema=True, l2_normalize=True, dead_code_threshold=1.0),
    "rotation_entropy": dict(rotation_trick=True, entropy_weight=0.1, codebook_dim=3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eval_round_trip_exact_and_state_unchanged(name):
    q = VectorQuantizer(32, 6, max_distance_elements=64, **CONFIGS[name])
    z = jax.random.normal(jax.random.key(8), (4, 9, 6))
    v = jinit(q, jax.random.key(9), z)
    (zq, out), state = japply(q, v, z, train=False, mutable=[STATS])
    np.testing.assert_array_equal(japply(q, v, out.indices, method="indices_to_codes"), zq)
    jax.tree.map(np.testing.assert_array_equal, unboxed(state[STATS]), unboxed(v[STATS]))
    if name == "l2":                 # op by op too (slow to compile, so for one config)
        zq_e, out_e = q.apply(v, z)
        np.testing.assert_array_equal(out_e.indices, out.indices)
        np.testing.assert_array_equal(q.apply(v, out_e.indices, method="indices_to_codes"), zq_e)
    if not q.use_ema:
        return
    # Training changes the state (so the check above is not vacuous).
    _, new = japply(q, v, z, train=True, rngs={"quantizer": jax.random.key(0)}, mutable=[STATS])
    for name in ("codebook", "ema_counts", "ema_sums"):
        assert not np.array_equal(unboxed(new[STATS])[name], unboxed(v[STATS])[name])


def test_indices_to_codes_dtype_and_bad_indices():
    q = VectorQuantizer(8, 4)
    z = jax.random.normal(jax.random.key(10), (5, 4)).astype(jnp.bfloat16)
    v = jinit(q, jax.random.key(11), z)
    zq, out = japply(q, v, z)
    codes = japply(q, v, out.indices, method="indices_to_codes", dtype=jnp.bfloat16)
    assert codes.dtype == jnp.bfloat16
    np.testing.assert_array_equal(codes, zq)
    with pytest.raises(ValueError, match="out of range"):
        q.apply(v, jnp.array([0, 8]), method="indices_to_codes")      # concrete indices are checked
    with pytest.raises(ValueError, match="integers"):
        q.apply(v, jnp.array([0.0]), method="indices_to_codes")


# ----------------------------------------------------------------------------- entropy loss
def np_entropy_loss(x, e, t):
    d = ((x[:, None] - e[None]) ** 2).sum(-1)
    a = -d / t
    a -= a.max(1, keepdims=True)
    p = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    h = lambda p: -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
    return h(p).mean() - h(p.mean(0))


@pytest.mark.parametrize("cosine", [False, True])
def test_entropy_loss_against_numpy(cosine):
    q = VectorQuantizer(7, 3, l2_normalize=cosine, entropy_weight=0.3, entropy_temperature=0.5,
                        max_distance_elements=20)      # 2 tokens per chunk
    z = jax.random.normal(jax.random.key(12), (3, 5, 3))
    v = jinit(q, jax.random.key(13), z)
    _, out = japply(q, v, z)
    e = np.asarray(unboxed(v)["params"]["codebook"], np.float64)
    x = lookup_space(v, z, cosine)
    ref = 0.3 * np_entropy_loss(x, np_normalize(e) if cosine else e, 0.5)
    np.testing.assert_allclose(out.losses["entropy"], ref, rtol=1e-5, atol=1e-6)


def test_entropy_chunked_gradient_equals_unchunked():
    x = jax.random.normal(jax.random.key(14), (37, 4))
    e = jax.random.normal(jax.random.key(15), (11, 4))
    loss = lambda m: jax.jit(jax.value_and_grad(
        lambda x, e: (lambda h: h[0] - h[1])(entropy_terms(x, e, 0.3, max_elements=m)), argnums=(0, 1)))
    small, g_small = loss(30)(x, e)            # 2 tokens per chunk, rematerialised
    big, g_big = loss(1 << 20)(x, e)
    np.testing.assert_allclose(small, big, rtol=1e-6)
    for a, b in zip(g_small, g_big):
        assert np.abs(np.asarray(b)).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- errors
def test_bad_arguments_raise():
    z = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 5\]"):
        VectorQuantizer(8, 5).init(jax.random.key(0), z)
    with pytest.raises(ValueError, match="use_ema"):
        VectorQuantizer(8, 4, dead_code_threshold=1.0).init(jax.random.key(0), z)
    with pytest.raises(ValueError, match="vq_kmeans.kmeans"):
        VectorQuantizer(8, 4, kmeans_init=True).init(jax.random.key(0), z)
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(8, 4, use_ema=True, ema_decay=1.0).init(jax.random.key(0), z)
    with pytest.raises(ValueError, match="kmeans_method"):
        VectorQuantizer(8, 4, use_ema=True, kmeans_method="foo").init(jax.random.key(0), z)
    with pytest.raises(ValueError, match="entropy_temperature"):
        VectorQuantizer(8, 4, entropy_temperature=0.0).init(jax.random.key(0), z)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
