"""VectorQuantizer on 8 simulated CPU devices: with the batch sharded under jax.jit, and per device
under shard_map with axis_name, the statistics (EMA, dead codes, k-means, entropy, usage) are those
of the global batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from titok_jax.quantizers.base import RNG, STATS
from titok_jax.quantizers.vq import VectorQuantizer
from test_vq import jinit, unboxed
from test_vq_state import assert_recovers, blobs

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def mesh():
    # Auto axes: the quantizers rely on sharding propagation (see the docstring of quantizers/vq.py).
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def step_fn(q):
    def step(v, z, key):
        (zq, out), upd = q.apply(v, z, train=True, rngs={RNG: key}, mutable=[STATS])
        return zq, out.indices, out.losses, out.metrics, upd
    return step


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y),
                                                         rtol=rtol, atol=atol), a, b)


def test_sharded_jit_step_equals_single_device(mesh):
    """EMA + dead codes + k-means init + entropy + usage, batch sharded 8 ways under jit."""
    _, x = blobs(k=8, d=4, per=16, sigma=0.05)                          # 128 tokens
    z = jnp.asarray(x).reshape(16, 8, 4)
    q = VectorQuantizer(12, 4, use_ema=True, ema_decay=0.8, dead_code_threshold=3.0,
                        kmeans_init=True, kmeans_iters=3, entropy_weight=0.1,
                        entropy_temperature=0.5, max_distance_elements=64)
    v = unboxed(jinit(q, jax.random.key(0), z))
    key = jax.random.key(1)
    step = jax.jit(step_fn(q))
    ref = step(v, z, key)
    ref2 = step(ref[-1], z + 0.1, key)                                  # second step: EMA, no k-means
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    got = step(v, shard(z), key)
    got2 = step(got[-1], shard(z + 0.1), key)
    assert len(got[0].sharding.device_set) == 8
    for g, r in ((got, ref), (got2, ref2)):
        np.testing.assert_array_equal(g[1], r[1])
        assert_trees_close(g, r)


def shard_map_step(q, mesh):
    def f(v, z, key):
        zq, idx, losses, metrics, upd = step_fn(q)(v, z, key)
        per_device = jax.tree.map(lambda a: a[None], (losses, metrics, upd))   # one copy per device
        return zq, idx, per_device
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data"), P()),
                                 out_specs=(P("data"), P("data"), P("data"))))


def first_copy_all_equal(tree):
    def check(a):
        a = np.asarray(a)
        for i in range(1, a.shape[0]):
            np.testing.assert_array_equal(a[i], a[0])
        return a[0]
    return jax.tree.map(check, tree)


def test_shard_map_ema_equals_single_device(mesh):
    z = jax.random.normal(jax.random.key(2), (16, 6, 4))
    common = dict(use_ema=True, ema_decay=0.7, l2_normalize=True, entropy_weight=0.2,
                  entropy_temperature=0.5, max_distance_elements=64)
    single = VectorQuantizer(10, 4, **common)
    sharded = VectorQuantizer(10, 4, axis_name="data", **common)
    v = unboxed(jinit(single, jax.random.key(3), z))
    key = jax.random.key(4)
    zq, idx, losses, metrics, upd = jax.jit(step_fn(single))(v, z, key)
    zq_s, idx_s, per_device = shard_map_step(sharded, mesh)(v, z, key)
    losses_s, metrics_s, upd_s = first_copy_all_equal(per_device)
    np.testing.assert_array_equal(idx_s, idx)
    np.testing.assert_array_equal(zq_s, zq)
    assert_trees_close(upd_s, upd)
    assert_trees_close(losses_s, losses)
    assert_trees_close(metrics_s, metrics)
    # The per-device (local) statistics differ from these: the psum matters.
    local = jax.jit(step_fn(single))(v, z[:2], key)
    assert not np.allclose(local[-1][STATS]["ema_counts"], upd[STATS]["ema_counts"])


def test_shard_map_dead_codes_and_kmeans_use_global_batch(mesh):
    centres, x = blobs(k=6, d=3, per=16, sigma=0.01)                   # 96 tokens, 12 per device
    q = VectorQuantizer(6, 3, use_ema=True, kmeans_init=True, axis_name="data", ema_decay=0.5)
    v = unboxed(jinit(q, jax.random.key(5), jnp.asarray(x)))
    _, _, per_device = shard_map_step(q, mesh)(v, jnp.asarray(x), jax.random.key(6))
    state = first_copy_all_equal(per_device[2])[STATS]
    assert_recovers(state["codebook"], centres)
    np.testing.assert_allclose(state["ema_counts"], 16.0, rtol=1e-5)   # global bins, not 12 / device

    # Dead codes: every code but one far away gets the whole batch; replacements are global batch rows,
    # identical on every device.
    qd = VectorQuantizer(6, 3, use_ema=True, axis_name="data", ema_decay=0.5, dead_code_threshold=4.0)
    far = np.full((6, 3), 100.0, np.float32)
    far[0] = 0.0
    vd = {STATS: {"codebook": jnp.asarray(far), "ema_counts": jnp.ones(6), "ema_sums": jnp.asarray(far),
                  "usage": {"code_counts": jnp.zeros(6)}}}
    _, idx, per_device = shard_map_step(qd, mesh)(vd, jnp.asarray(x), jax.random.key(7))
    state = first_copy_all_equal(per_device[2])[STATS]
    assert (np.asarray(idx) == 0).all()
    np.testing.assert_allclose(state["ema_counts"][0], 0.5 + 0.5 * 96, rtol=1e-6)
    rows = {tuple(r) for r in x.tolist()}
    for k in range(1, 6):
        assert tuple(np.asarray(state["codebook"][k]).tolist()) in rows
        assert float(state["ema_counts"][k]) == 4.0
