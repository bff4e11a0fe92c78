"""Quantizers and shared layers on a mesh with Explicit axes ("sharding in types", the default of
``jax.make_mesh`` in jax 0.10): with the batch sharded 8 ways under ``jax.jit``, a training step
(forward, losses, metrics, state update and gradients) equals the single-device one, and the codes
and indices stay sharded like the batch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from titok_jax import nn as tnn
from titok_jax.quantizers import (FSQ, LFQ, RNG, STATS, FactorizedQuantizer, ResidualQuantizer,
                                  VectorQuantizer)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def mesh():
    mesh = jax.make_mesh((8,), ("data",))
    assert tuple(mesh.axis_types) == (AxisType.Explicit,)
    return mesh


def shard(mesh, a):
    return jax.device_put(a, NamedSharding(mesh, P("data")))


def replicate(mesh, tree):
    """Replicated on the mesh with the spec a jitted step gives its (replicated) state outputs, so
    that the second step reuses the first one's compilation."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(*[None] * a.ndim))), tree)


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    """Integer leaves exactly; float leaves to ``rtol`` and ``atol`` times the leaf's largest
    magnitude (at least 1): sums over the batch run in another order across 8 devices, so an entry
    that nearly cancels carries the rounding of the largest terms of its sum."""
    assert jax.tree.structure(got) == jax.tree.structure(want)

    def check(path, g, w):
        g, w = np.asarray(g), np.asarray(w)
        where = f"leaf {jax.tree_util.keystr(path)}"
        if np.issubdtype(w.dtype, np.integer) or w.dtype == np.bool_:
            np.testing.assert_array_equal(g, w, err_msg=where)
        else:
            scale = max(1.0, float(np.max(np.abs(w), initial=0.0)))
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale, err_msg=where)

    jax.tree_util.tree_map_with_path(check, got, want)


# ---- quantizers -------------------------------------------------------------------------------
def _vq_cases():
    # 128 tokens (16 per device). Small max_distance_elements force the strided token chunks (with
    # per-block padding: 16 local tokens in chunks of 5) and, for the EMA case, code chunks too.
    return {
        "vq_learned_entropy": (VectorQuantizer(24, 4, entropy_weight=0.1, entropy_temperature=0.5,
                                               max_distance_elements=24 * 40), 4),
        "vq_ema_dead_kmeans": (VectorQuantizer(12, 4, use_ema=True, ema_decay=0.8,
                                               dead_code_threshold=6.0, kmeans_init=True,
                                               kmeans_iters=3, max_distance_elements=8), 4),
        "vq_cosine_projection": (VectorQuantizer(32, 6, codebook_dim=4, l2_normalize=True,
                                                 rotation_trick=True, max_distance_elements=64), 6),
    }


CASES = {
    **_vq_cases(),
    "fsq": (FSQ((8, 5, 5, 5)), 4),
    "lfq_exact": (LFQ(6, temperature=0.5), 6),
    # grouped batch entropy, 7 bits in groups of 3 (+ 1); FlowMo's sub-token grouping is covered by
    # tests/test_lfq.py::test_explicit_mesh_entropy_and_gradient
    "bsq_grouped": (LFQ(7, spherical=True, temperature=0.5, batch_entropy_group_size=3), 7),
    "factorized": (FactorizedQuantizer((VectorQuantizer(16, 4, l2_normalize=True),
                                        VectorQuantizer(16, 4, use_ema=True)), (4, 4), 6,
                                       disentanglement_weight=0.1,
                                       representation_heads=(nn.Dense(5), None),
                                       representation_weight=0.5), 6),
    "residual": (ResidualQuantizer.repeat(VectorQuantizer(16, 4, use_ema=True,
                                                          dead_code_threshold=2.0), 2,
                                          quantize_dropout_min_levels=1), 4),
}


def make_step(q, weight, targets):
    """One jitted training step: forward with train=True (state updated), and value_and_grad of
    ``total_loss + mean(weight * z_q)`` w.r.t. params and the input."""
    kw = {} if targets is None else dict(representation_targets=(targets, None))

    def step(variables, z, key):
        def loss(params, z):
            (zq, out), upd = q.apply({**variables, "params": params}, z, train=True,
                                     mutable=[STATS], rngs={RNG: key}, **kw)
            return out.total_loss() + jnp.mean(weight * zq), (zq, out, upd)

        (value, (zq, out, upd)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables.get("params", {}), z)
        return zq, out.indices, out.losses, out.metrics, upd, value, grads

    return jax.jit(step)


@pytest.mark.parametrize("name", list(CASES))
def test_train_step_on_explicit_mesh_equals_single_device(mesh, name):
    q, d = CASES[name]
    z = jax.random.normal(jax.random.key(0), (16, 8, d))
    weight = jax.random.normal(jax.random.key(1), (16, 8, d))
    targets = jax.random.normal(jax.random.key(2), (16, 8 * 5)) if name == "factorized" else None
    variables = nn.meta.unbox(jax.jit(q.init)(jax.random.key(3), z))
    key = jax.random.key(4)

    ref_step = make_step(q, weight, targets)
    ref = ref_step(variables, z, key)
    ref2 = ref_step({**variables, **ref[4]}, z + 0.1, key)    # second step from the updated state
    with jax.set_mesh(mesh):
        sharded_targets = None if targets is None else shard(mesh, targets)
        step = make_step(q, shard(mesh, weight), sharded_targets)
        got = step(replicate(mesh, variables), shard(mesh, z), key)
        got2 = step({**replicate(mesh, variables), **got[4]}, shard(mesh, z + 0.1), key)

    zq, indices = got[0], got[1]
    assert jax.typeof(zq).sharding.spec[0] == "data"          # codes and indices stay sharded
    assert jax.typeof(indices).sharding.spec[0] == "data"
    assert len(zq.sharding.device_set) == 8
    for g, r in ((got, ref), (got2, ref2)):
        np.testing.assert_array_equal(g[1], r[1])               # indices: exact
        assert_trees_close(g, r)
    if STATS in ref[4]:                                         # the state really changed
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), ref[4][STATS],
                               variables[STATS])
        assert any(jax.tree.leaves(changed))


def test_indices_to_codes_on_explicit_mesh(mesh):
    """The eval-time lookup of token-sharded indices keeps the batch sharding."""
    q = VectorQuantizer(16, 6, codebook_dim=4)
    variables = nn.meta.unbox(jax.jit(q.init)(jax.random.key(0), jnp.zeros((16, 8, 6))))
    idx = jax.random.randint(jax.random.key(1), (16, 8), 0, 16)
    f = jax.jit(lambda v, i: q.apply(v, i, method="indices_to_codes"))
    ref = f(variables, idx)
    with jax.set_mesh(mesh):
        got = f(variables, shard(mesh, idx))
    assert jax.typeof(got).sharding.spec[0] == "data"
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


# ---- shared layers ----------------------------------------------------------------------------
B, T, D = 8, 6, 16


def _layer_cases():
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    cond = jax.random.normal(jax.random.key(1), (B, D))
    positions = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    mask = tnn.padding_mask(jnp.arange(T)[None].repeat(B, 0) < 4)
    images = jax.random.normal(jax.random.key(2), (B, 8, 12, 3))
    return {
        "block_dropout": (tnn.TransformerBlock(num_heads=4, dropout_rate=0.2,
                                               attention_dropout_rate=0.2),
                          (x,), dict(deterministic=False, rngs={"dropout": jax.random.key(4)})),
        "block_adaln_rope_qknorm_mask": (
            tnn.TransformerBlock(num_heads=4, adaln=True, use_rope=True, qk_norm="rmsnorm",
                                 norm_affine=False, activation="swiglu"),
            (x, cond), dict(positions=positions, mask=mask)),
        "attention_cross_causal": (tnn.MultiHeadAttention(num_heads=4, fused_qkv=False,
                                                          qk_norm="layernorm"),
                                   (x, x), dict(mask=tnn.causal_mask(T))),
        "patch_embed": (tnn.PatchEmbed(4, D), (images,), {}),
    }


@pytest.mark.parametrize("name", list(_layer_cases()))
def test_layer_forward_on_explicit_mesh_equals_unsharded(mesh, name):
    module, args, kwargs = _layer_cases()[name]
    static = {k: v for k, v in kwargs.items() if isinstance(v, bool)}     # e.g. deterministic
    kwargs = {k: v for k, v in kwargs.items() if k not in static}
    init_kwargs = {k: v for k, v in kwargs.items() if k != "rngs"}
    variables = jax.jit(module.init)(jax.random.key(3), *args, **init_kwargs)

    with_grad = name.startswith("block_adaln")   # one gradient check (compiles are the cost here)

    def f(v, args, kwargs):
        y = module.apply(v, *args, **kwargs, **static)
        if not with_grad:
            return y, None
        loss = lambda v: jnp.mean(jnp.square(module.apply(v, *args, **kwargs, **static)))
        return y, jax.grad(loss)(v)

    ref = jax.jit(f)(variables, args, kwargs)
    with jax.set_mesh(mesh):
        # every batch-leading input sharded (masks with a leading 1 and rng keys stay replicated)
        put = lambda a: shard(mesh, a) if a.ndim and a.shape[0] == B else a
        got = jax.jit(f)(variables, jax.tree.map(put, args), jax.tree.map(put, kwargs))
    assert jax.typeof(got[0]).sharding.spec[0] == "data"
    assert_trees_close(got, ref)


def test_unpatchify_on_explicit_mesh(mesh):
    tokens = jax.random.normal(jax.random.key(0), (B, 6, 48))
    for order in ("hwc", "chw"):
        f = jax.jit(lambda t: tnn.patchify(tnn.unpatchify(t, 4, 8, 12, 3, order), 4, order))
        with jax.set_mesh(mesh):
            got = f(shard(mesh, tokens))
        assert jax.typeof(got).sharding.spec[0] == "data"
        np.testing.assert_array_equal(got, tokens)


# ---- LFQ entropy terms (formerly in test_lfq.py) ----------------------------------------------
@pytest.mark.parametrize("grouping", [dict(), dict(batch_entropy_group_size=3, entropy_grouping="subtokens")])
def test_lfq_entropy_and_gradient(mesh, grouping):
    """LFQ's batch-entropy contraction over the sharded batch names its output sharding; values and
    gradients equal the single-device ones."""
    b = 6
    z = jax.random.normal(jax.random.key(5), (16, 3, b)) * 0.05
    q = LFQ(b, temperature=0.1, **grouping)

    def loss(z):
        hs, hb = q.apply({}, z.astype(jnp.float32), method=lambda m, x: m.entropy_terms(x))
        return hs - hb

    ref_v, ref_g = jax.jit(jax.value_and_grad(loss))(z)
    with jax.set_mesh(mesh):
        zs = jax.device_put(z, NamedSharding(mesh, P("data")))
        v, g = jax.jit(jax.value_and_grad(loss))(zs)
    np.testing.assert_allclose(float(v), float(ref_v), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=1e-5, atol=1e-7)


def test_lfq_full_forward(mesh):
    z = jax.random.normal(jax.random.key(5), (16, 3, 6))
    q = LFQ(6, track_usage=False)
    ref = jax.jit(lambda z: q.apply({}, z))(z)[1]
    with jax.set_mesh(mesh):
        out = jax.jit(lambda z: q.apply({}, z))(jax.device_put(z, NamedSharding(mesh, P("data"))))[1]
    np.testing.assert_allclose(float(out.metrics["perplexity"]), float(ref.metrics["perplexity"]), rtol=1e-6)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
