"""MAGVIT-v2's causal video tokenizer (``models.magvit2_video``): shapes for several T / H / W
(``T = 1 + 4k`` -> ``1 + k`` latent frames, an image is a 1-frame clip), causality of the encoder
(frame t changes no latent frame before it; the first frame is encoded alone) and of the decoder,
the inflation of ``models.magvit2`` params (a 1-frame clip and a static clip reproduce the image
model, with non-default norm params), the encode / decode / decode_tokens round trip, the 3-D
depth-to-space and a jitted training step with optax adam. Tiny widths; each test takes seconds."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from titok_jax.models.magvit2 import Magvit2
from titok_jax.models.magvit2_video import (OPEN_MAGVIT2_VIDEO_UCF_128, Magvit2Video,
                                            default_temporal_downsample, inflate_from_image)
from titok_jax.nn.conv import depth_to_space
from titok_jax.nn.conv3d import depth_to_space_3d

LFQ = {"name": "lfq", "bits": 6, "entropy_weight": 0.1, "commitment_weight": 0.25,
       "temperature": 0.01}
TRUNK = dict(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=6, quantizer=LFQ)
# f = 4 in space, ft = 4 in time (both down stages halve T): 1 + 4k frames -> 1 + k latent frames
TINY = dict(num_frames=5, image_size=8, temporal_downsample=(True, True), **TRUNK)


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
    model = Magvit2Video(**TINY)
    variables = jax.jit(model.init)(jax.random.key(1), clip((1, 5, 8, 8, 3)))
    return model, variables


@pytest.fixture(scope="module")
def pre_quant(tiny):
    model, variables = tiny
    return jax.jit(functools.partial(model.apply, variables, method="pre_quant"))


# ----------------------------------------------------------------------------- shapes
def test_depth_to_space_3d_is_dcr_and_per_frame_in_space():
    x = clip((2, 3, 2, 4, 2 * 2 * 2 * 5), seed=1)
    y = depth_to_space_3d(x, (2, 2, 2))
    assert y.shape == (2, 6, 4, 8, 5)
    # output (2t + i, 2h + j, 2w + k, c) is input channel ((2i + j) 2 + k) 5 + c
    np.testing.assert_array_equal(y[1, 2 * 2 + 1, 2 * 1 + 0, 2 * 3 + 1],
                                  x[1, 2, 1, 3, ((2 * 1 + 0) * 2 + 1) * 5:][:5])
    z = clip((2, 3, 2, 4, 12), seed=2)
    np.testing.assert_array_equal(depth_to_space_3d(z, (1, 2, 2)),
                                  jnp.stack([depth_to_space(z[:, t], 2) for t in range(3)], 1))


@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (1, 1, 8, 8), (1, 9, 8, 12), (1, 13, 4, 16)])
def test_shapes_for_several_clip_sizes(tiny, shape):
    model, variables = tiny
    b, t, h, w = shape
    tl = (t - 1) // 4 + 1
    x = jax.ShapeDtypeStruct((*shape, 3), jnp.float32)
    codes, out = jax.eval_shape(functools.partial(model.apply, method="encode"), variables, x)
    assert codes.shape == (b, tl, h // 4, w // 4, 6) and codes.dtype == jnp.float32
    assert out.indices.shape == (b, tl, h // 4, w // 4) and out.indices.dtype == jnp.int32
    recon, _ = jax.eval_shape(model.apply, variables, x)
    assert recon.shape == (*shape, 3) and recon.dtype == jnp.float32
    # Open-MAGVIT2's clip-wide norms: the same shapes and params
    om2 = Magvit2Video(**{**TINY, "causal_norm": False})
    assert jax.eval_shape(om2.apply, variables, x)[0].shape == (*shape, 3)


def test_metadata_defaults_and_bad_clips(tiny):
    model, variables = tiny
    assert (model.spatial_factor, model.temporal_factor) == (4, 4)
    assert model.latent_shape == (2, 2, 2) and model.num_latent_tokens == 8
    assert [model.latent_frames(t) for t in (1, 5, 9, 17)] == [1, 2, 3, 5]
    assert (model.token_size, model.codebook_size, model.quantizer_name) == (6, 64, "lfq")
    # Open-MAGVIT2's rule and its UCF model: 17 x 128^2 -> 5 x 16^2 tokens of 2^18 codes
    assert default_temporal_downsample((1, 2, 2, 4)) == (False, True, True)
    ucf = Magvit2Video(**OPEN_MAGVIT2_VIDEO_UCF_128)
    assert ucf.latent_shape == (5, 16, 16) and ucf.codebook_size == 2 ** 18
    for bad in [(1, 4, 8, 8, 3), (1, 5, 6, 8, 3), (1, 5, 8, 8, 4), (5, 8, 8, 3)]:
        with pytest.raises(ValueError):
            model.apply(variables, jnp.zeros(bad))


# ----------------------------------------------------------------------------- causality
def test_encoder_is_causal(tiny, pre_quant):
    model, variables = tiny
    x = clip((1, 9, 8, 8, 3), seed=3)
    z = pre_quant(x)
    encode = jax.jit(functools.partial(model.apply, variables, method="encode"))
    codes, out = encode(x)
    for t in (1, 3, 4, 5, 8):
        y = x.at[:, t:].set(clip((1, 9 - t, 8, 8, 3), seed=10 + t))   # frames >= t changed
        zy = pre_quant(y)
        keep = math.ceil(t / 4)            # latent frame j sees input frames <= 4 j
        np.testing.assert_allclose(zy[:, :keep], z[:, :keep], rtol=0, atol=1e-6)
        assert np.abs(zy[:, keep] - z[:, keep]).max() > 1e-3          # and the next one moves
        codes_y, out_y = encode(y)
        np.testing.assert_array_equal(out_y.indices[:, :keep], out.indices[:, :keep])
        np.testing.assert_array_equal(codes_y[:, :keep], codes[:, :keep])
    # the first frame is encoded alone: as a 1-frame clip (an image)
    close(pre_quant(x[:, :1])[:, 0], z[:, 0])   # (another T: another conv schedule, round-off)


def test_replicate_padding_is_causal_too(tiny, pre_quant):
    model, variables = tiny
    rep = Magvit2Video(**{**TINY, "temporal_padding": "replicate"})   # the same params
    run = jax.jit(functools.partial(rep.apply, variables, method="pre_quant"))
    x = clip((1, 9, 8, 8, 3), seed=20)
    y = x.at[:, 5:].set(0.5)
    zx, zy = run(x), run(y)
    np.testing.assert_allclose(zy[:, :2], zx[:, :2], rtol=0, atol=1e-6)
    assert np.abs(zx - pre_quant(x)).max() > 1e-3           # and it is not the zero padding
    with pytest.raises(ValueError, match="temporal_padding"):
        Magvit2Video(**{**TINY, "temporal_padding": "reflect"}).apply(variables, x)


def test_decoder_is_causal(tiny):
    model, variables = tiny
    decode_tokens = jax.jit(functools.partial(model.apply, variables, method="decode_tokens"))
    ids = jax.random.randint(jax.random.key(4), (1, 3, 2, 2), 0, 64, jnp.int32)
    y = decode_tokens(ids)
    assert y.shape == (1, 9, 8, 8, 3)
    for j in (1, 2):
        other = ids.at[:, j].set((ids[:, j] + 17) % 64)
        yo = decode_tokens(other)
        keep = 4 * (j - 1) + 1              # frames t with ceil(t / 4) < j
        np.testing.assert_allclose(yo[:, :keep], y[:, :keep], rtol=0, atol=1e-6)
        assert np.abs(yo[:, keep] - y[:, keep]).max() > 1e-4


# ----------------------------------------------------------------------------- inflation
def _perturb_norms(params, key):
    """Every GroupNorm scale / bias drawn at random (so the test does not rest on 1 / 0)."""
    flat = flatten_dict(nn.meta.unbox(params))
    for i, (k, v) in enumerate(sorted(flat.items())):
        if k[-2].startswith("norm") and k[-1] in ("scale", "bias"):
            base = 1.0 if k[-1] == "scale" else 0.0
            flat[k] = base + 0.5 * jax.random.normal(jax.random.fold_in(key, i), v.shape)
    return unflatten_dict(flat)


def test_inflated_image_model_on_one_frame_and_static_clips(tiny):
    model, variables = tiny
    image_model = Magvit2(image_size=8, **TRUNK)
    images = clip((2, 8, 8, 3), seed=5)
    p2 = _perturb_norms(jax.jit(image_model.init)(jax.random.key(6), images)["params"],
                        jax.random.key(7))
    p3 = inflate_from_image(p2, variables["params"])
    up = nn.meta.unbox(p3)["decoder"]["up_2_upsample"]
    k2, b2 = p2["decoder"]["up_2_upsample"]["kernel"], p2["decoder"]["up_2_upsample"]["bias"]
    assert up["kernel"].shape == (3, 3, 3, 32, 256)      # C -> 8C: the 2-D C -> 4C twice
    np.testing.assert_array_equal(up["kernel"][2], jnp.concatenate([k2, k2], -1))
    np.testing.assert_array_equal(up["bias"], jnp.concatenate([b2, b2]))
    assert not np.any(up["kernel"][:2])
    y2, o2 = jax.jit(image_model.apply)({"params": p2}, images)
    z2 = jax.jit(functools.partial(image_model.apply, method="pre_quant"))({"params": p2}, images)
    run = jax.jit(model.apply)
    pre = jax.jit(functools.partial(model.apply, method="pre_quant"))
    # an image is a 1-frame video: same latents, same tokens, same pixels
    z3 = pre({"params": p3}, images[:, None])
    close(z3[:, 0], z2.reshape(2, 2, 2, 6))
    y3, o3 = run({"params": p3}, images[:, None])
    np.testing.assert_array_equal(o3.indices.reshape(2, -1), o2.indices)
    close(y3[:, 0], y2)
    # a static clip: every frame as the image
    static = jnp.repeat(images[:, None], 5, axis=1)
    y3, o3 = run({"params": p3}, static)
    for t in range(2):
        np.testing.assert_array_equal(o3.indices[:, t].reshape(2, -1), o2.indices)
    for t in range(5):
        close(y3[:, t], y2)


# ----------------------------------------------------------------------------- sharding
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices")
@pytest.mark.parametrize("causal_norm", [True, False])
def test_explicit_mesh_equals_unsharded(tiny, causal_norm):
    """Batch sharded over an Explicit mesh (the frame folds and depth-to-space name their output
    sharding): the same reconstruction and tokens, still sharded like the batch."""
    model, variables = tiny
    model = model.clone(causal_norm=causal_norm)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:2])
    x = clip((2, 5, 8, 8, 3), seed=12)
    want, want_out = jax.jit(model.apply)(variables, x)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
        got, out = jax.jit(model.apply)(variables, sharded)
        assert jax.typeof(got).sharding.spec[0] == "data"
        assert jax.typeof(out.indices).sharding.spec[0] == "data"
    np.testing.assert_array_equal(out.indices, want_out.indices)
    close(got, want)


# ----------------------------------------------------------------------------- round trip, training
def test_encode_decode_round_trip(tiny):
    model, variables = tiny
    x = clip((2, 5, 8, 8, 3), seed=8)
    codes, out = jax.jit(functools.partial(model.apply, method="encode"))(variables, x)
    assert codes.shape == (2, 2, 2, 2, 6) and set(np.unique(np.asarray(codes))) <= {-1.0, 1.0}
    assert out.indices.shape == (2, 2, 2, 2) and out.indices.dtype == jnp.int32
    decode = jax.jit(functools.partial(model.apply, method="decode"))
    recon = decode(variables, codes)
    assert recon.shape == x.shape and recon.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(recon)))
    from_ids = jax.jit(functools.partial(model.apply, method="decode_tokens"))
    np.testing.assert_array_equal(from_ids(variables, out.indices), recon)
    np.testing.assert_array_equal(from_ids(variables, out.indices.reshape(2, -1)), recon)


def test_jit_grad_step_reduces_the_loss(tiny):
    model, variables = tiny
    x = clip((2, 5, 8, 8, 3), seed=9)
    params = nn.meta.unbox(variables["params"])
    stats = {k: v for k, v in variables.items() if k != "params"}
    opt = optax.adam(1e-3)

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
    x = clip((2, 5, 8, 8, 3), seed=13)
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
