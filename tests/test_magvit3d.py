"""MAGVIT v1's 3D-VQ (``models.magvit3d``) and the 3-D conv helpers (``nn.conv3d``): shapes for
several T / H / W, the encode / decode / decode_tokens round trip, MAGVIT v1's central 2-D -> 3-D
inflation (a static clip gives the 2-D twin's output on every frame, with non-default norm params)
and a jitted training step with optax adam. Tiny widths; every test takes seconds."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from titok_jax.models.magvit3d import Magvit3D, image_twin, inflate_from_2d
from titok_jax.nn.conv3d import (Conv3d, avg_pool_3d, inflate_kernel, inflate_params,
                                 upsample_nearest_3d)

# f = 4 in space, ft = 2 in time (stage 0 halves T, H, W; stage 1 only H, W)
TINY = dict(num_frames=4, image_size=8, hidden_channels=32, channel_mult=(1, 1, 1),
            num_res_blocks=1, temporal_downsample=(True, False), z_channels=4,
            quantizer={"name": "vq", "codebook_size": 16, "entropy_weight": 0.1,
                       "entropy_temperature": 0.01})


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


def close(got, want, rel=1e-5):
    """float32 round-off: |got - want| <= rel * max|want| everywhere."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def clip(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


@pytest.fixture(scope="module")
def tiny():
    model = Magvit3D(**TINY)
    variables = jax.jit(model.init)(jax.random.key(1), clip((1, 4, 8, 8, 3)))
    return model, variables


# ----------------------------------------------------------------------------- helpers
def test_conv3d_helpers():
    x = clip((1, 3, 5, 4, 2))
    # TF-style SAME average pooling: the padding cells are not counted (odd T and H)
    y = avg_pool_3d(x, (2, 2, 2))
    assert y.shape == (1, 2, 3, 2, 2)
    np.testing.assert_allclose(y[0, 1, 2, 1], x[0, 2, 4, 2:4].mean(0), rtol=1e-6)
    np.testing.assert_allclose(y[0, 0, 0, 0], x[0, :2, :2, :2].mean((0, 1, 2)), rtol=1e-6)
    assert upsample_nearest_3d(x, (2, 1, 3)).shape == (1, 6, 5, 12, 2)
    k = np.arange(8.0).reshape(1, 2, 2, 2) + 1
    for mode, slot in (("central", 1), ("last", 2)):
        got = inflate_kernel(k, 3, mode)
        assert got.shape == (3, 1, 2, 2, 2) and np.array_equal(got[slot], k)
        assert not np.any(np.delete(got, slot, axis=0))
    np.testing.assert_allclose(inflate_kernel(k, 4, "average").sum(0), k)
    # "same" padding keeps T; causal conv output T' = floor((T - 1) / s) + 1
    conv = Conv3d(3, (3, 3, 3), strides=(2, 1, 1), padding="causal")
    out = conv.apply(conv.init(jax.random.key(0), x), x)
    assert out.shape == (1, 2, 5, 4, 3)
    with pytest.raises(ValueError, match="padding"):
        Conv3d(3, padding="valid").init(jax.random.key(0), x)
    # replicate: the kt - 1 frames before the clip are copies of frame 0
    rep = Conv3d(3, (3, 3, 3), padding="causal_replicate")
    v = rep.init(jax.random.key(0), x)
    padded = jnp.concatenate([x[:, :1], x[:, :1], x], axis=1)
    want = Conv3d(3, (3, 3, 3), padding="causal").apply(v, padded)[:, 2:]
    np.testing.assert_allclose(rep.apply(v, x), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 2, 8, 12), (1, 6, 12, 4), (1, 8, 4, 16)])
def test_shapes_for_several_clip_sizes(tiny, shape):
    model, variables = tiny
    b, t, h, w = shape
    x = jax.ShapeDtypeStruct((*shape, 3), jnp.float32)
    (codes, out) = jax.eval_shape(functools.partial(model.apply, method="encode"), variables, x)
    assert codes.shape == (b, t // 2, h // 4, w // 4, 4) and codes.dtype == jnp.float32
    assert out.indices.shape == (b, t // 2, h // 4, w // 4) and out.indices.dtype == jnp.int32
    recon, _ = jax.eval_shape(model.apply, variables, x)
    assert recon.shape == (*shape, 3) and recon.dtype == jnp.float32


def test_metadata_and_bad_clips(tiny):
    model, variables = tiny
    assert (model.spatial_factor, model.temporal_factor) == (4, 2)
    assert model.latent_shape == (2, 2, 2) and model.num_latent_tokens == 8
    assert (model.token_size, model.codebook_size, model.quantizer_name) == (4, 16, "vq")
    # a JSON round trip gives lists: stored as tuples (hashable fields)
    listed = Magvit3D(**{**TINY, "channel_mult": [1, 1, 1], "temporal_downsample": [1, 0]})
    assert (listed.channel_mult, listed.temporal_downsample) == ((1, 1, 1), (True, False))
    for bad in [(1, 3, 8, 8, 3), (1, 4, 6, 8, 3), (1, 4, 8, 8, 1), (4, 8, 8, 3)]:
        with pytest.raises(ValueError):
            model.apply(variables, jnp.zeros(bad))
    with pytest.raises(ValueError, match="temporal_downsample"):
        Magvit3D(**{**TINY, "temporal_downsample": (True,)}).init(
            jax.random.key(0), jnp.zeros((1, 4, 8, 8, 3)))


def test_encode_decode_round_trip(tiny):
    model, variables = tiny
    x = clip((2, 4, 8, 8, 3), seed=3)
    codes, out = jax.jit(functools.partial(model.apply, method="encode"))(variables, x)
    assert codes.shape == (2, 2, 2, 2, 4) and out.indices.shape == (2, 2, 2, 2)
    assert out.indices.dtype == jnp.int32 and set(out.losses) >= {"commitment", "codebook"}
    decode = jax.jit(functools.partial(model.apply, method="decode"))
    recon = decode(variables, codes)
    assert recon.shape == x.shape and recon.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(recon)))
    from_ids = jax.jit(functools.partial(model.apply, method="decode_tokens"))
    np.testing.assert_array_equal(from_ids(variables, out.indices), recon)
    # the flat nominal forms: [B, N] ids, [B, N, z] codes
    np.testing.assert_array_equal(from_ids(variables, out.indices.reshape(2, -1)), recon)
    np.testing.assert_array_equal(decode(variables, codes.reshape(2, -1, 4)), recon)
    full, _ = jax.jit(model.apply)(variables, x)
    np.testing.assert_array_equal(full, recon)


# ----------------------------------------------------------------------------- inflation
def _perturb_norms(params, key):
    """Every GroupNorm scale / bias drawn at random (so the test does not rest on 1 / 0)."""
    flat = flatten_dict(nn.meta.unbox(params))
    for i, (k, v) in enumerate(sorted(flat.items())):
        if k[-2].startswith("norm") and k[-1] in ("scale", "bias"):
            base = 1.0 if k[-1] == "scale" else 0.0
            flat[k] = base + 0.5 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
    return unflatten_dict(flat)


def test_central_inflation_matches_the_2d_twin_on_a_static_clip(tiny):
    model, variables = tiny
    twin = image_twin(model)
    assert twin.temporal_kernel_size == 1 and twin.temporal_factor == 1
    frames = clip((2, 1, 8, 8, 3), seed=5)
    p2 = _perturb_norms(jax.jit(twin.init)(jax.random.key(7), frames)["params"], jax.random.key(8))
    p3 = inflate_from_2d(p2, variables["params"])
    k3 = nn.meta.unbox(p3)["encoder"]["down_0_block_0"]["conv1"]["kernel"]
    k2 = p2["encoder"]["down_0_block_0"]["conv1"]["kernel"]
    assert k3.shape == (3, 3, 3, 32, 32) and np.array_equal(k3[1], k2[0])
    assert not np.any(k3[0]) and not np.any(k3[2])
    static = jnp.repeat(frames, 4, axis=1)                       # one frame, four times
    pre = functools.partial(model.apply, method="pre_quant")
    z2 = jax.jit(functools.partial(twin.apply, method="pre_quant"))({"params": p2}, frames)
    z3 = jax.jit(pre)({"params": p3}, static)
    assert z3.shape == (2, 2, 2, 2, 4)
    for t in range(2):
        close(z3[:, t], z2[:, 0])
    y2, o2 = jax.jit(twin.apply)({"params": p2}, frames)
    y3, o3 = jax.jit(model.apply)({"params": p3}, static)
    for t in range(2):
        np.testing.assert_array_equal(o3.indices[:, t], o2.indices[:, 0])
    for t in range(4):
        close(y3[:, t], y2[:, 0])
    with pytest.raises(ValueError, match="differ"):
        inflate_params({"encoder": {}}, variables["params"])


# ----------------------------------------------------------------------------- training
def test_jit_grad_step_reduces_the_loss(tiny):
    model, variables = tiny
    x = clip((2, 4, 8, 8, 3), seed=11)
    params = nn.meta.unbox(variables["params"])
    stats = {k: v for k, v in variables.items() if k != "params"}   # quantizer_stats (usage)
    opt = optax.adam(3e-4)

    def loss_fn(p):
        (recon, out), _ = model.apply({"params": p, **stats}, x, train=True,
                                      mutable=["quantizer_stats"])
        mse = jnp.mean(jnp.square(recon - x))
        return mse + out.total_loss(), mse

    @jax.jit
    def step(p, s):
        (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss, mse

    state = opt.init(params)
    losses, mses = [], []
    for _ in range(8):
        params, state, loss, mse = step(params, state)
        losses.append(float(loss))
        mses.append(float(mse))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert mses[-1] < 0.5 * mses[0], mses


def test_remat_gives_identical_gradients(tiny):
    """``remat=True`` (every ResBlock3D under ``nn.remat``): same params, same loss, same
    gradients as without."""
    model, variables = tiny
    x = clip((2, 4, 8, 8, 3), seed=13)
    params = nn.meta.unbox(variables["params"])
    stats = {k: v for k, v in variables.items() if k != "params"}

    def grads(m):
        def loss_fn(p):
            (recon, out), _ = m.apply({"params": p, **stats}, x, train=True,
                                      mutable=["quantizer_stats"])
            return jnp.mean(jnp.square(recon - x)) + out.total_loss()
        return jax.jit(jax.value_and_grad(loss_fn))(params)

    remat = model.clone(remat=True)
    assert jax.tree.structure(nn.meta.unbox(jax.eval_shape(remat.init, jax.random.key(1), x)[
        "params"])) == jax.tree.structure(params)
    (l0, g0), (l1, g1) = grads(model), grads(remat)
    close(l1, l0)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):   # round-off of the largest
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale
