"""Reconstruction, GAN (hinge / non-saturating), LeCam, adaptive weight, start gate, PatchGAN."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.losses import gan, reconstruction as rec
from titok_jax.models.discriminator import NLayerDiscriminator

R = jnp.array([2.0, 0.5, -1.0])       # discriminator logits on real images
F = jnp.array([-2.0, 0.0, 0.5])       # ... on fakes


def test_reconstruction_losses():
    x = jnp.array([[[[0.0, 1.0]]], [[[0.5, 0.25]]]])     # [2, 1, 1, 2]
    y = jnp.array([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    assert float(rec.l2_loss(x, y)) == pytest.approx((1 + 0 + 0.25 + 0.0625) / 4)
    assert float(rec.l1_loss(x, y)) == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)
    np.testing.assert_allclose(rec.l2_loss(x, y, reduction="none"), [0.5, 0.3125 / 2])
    np.testing.assert_allclose(rec.reconstruction_loss(x, y, "l1", "none"), [0.5, 0.375])
    assert rec.l2_loss(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)).dtype == jnp.float32
    with pytest.raises(ValueError, match="differ in shape"):
        rec.l2_loss(x, y[:1])
    with pytest.raises(ValueError, match="unknown reconstruction loss"):
        rec.reconstruction_loss(x, y, "l3")


def test_hinge_losses_hand_values():
    # relu(1 - R) = [0, .5, 2], relu(1 + F) = [0, 1, 1.5]
    assert float(gan.hinge_d_loss(R, F)) == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    assert float(gan.hinge_g_loss(F)) == pytest.approx(0.5)
    assert float(gan.discriminator_loss(R, F, "hinge")) == float(gan.hinge_d_loss(R, F))
    assert float(gan.generator_loss(F, "hinge")) == float(gan.hinge_g_loss(F))
    with pytest.raises(ValueError, match="unknown GAN loss"):
        gan.generator_loss(F, "wgan")


def test_non_saturating_losses_hand_values():
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    r, f = np.asarray(R, np.float64), np.asarray(F, np.float64)
    want_d = 0.5 * (np.mean(sp(-r)) + np.mean(sp(f)))
    assert float(gan.discriminator_loss(R, F, "non_saturating")) == pytest.approx(want_d, rel=1e-6)
    want_g = np.mean(sp(-f))
    assert float(gan.generator_loss(F, "non_saturating")) == pytest.approx(want_g, rel=1e-6)


def test_lecam_hand_values_and_update():
    state = gan.LeCamState(jnp.float32(0.1), jnp.float32(-0.2))
    r, f = jnp.array([1.0, 0.0]), jnp.array([-1.0, 0.2])         # means 0.5, -0.4
    # TiTok form: relu(0.5 - (-0.2))**2 + relu(0.1 - (-0.4))**2
    assert float(gan.lecam_loss(r, f, state)) == pytest.approx(0.49 + 0.25)
    # relu clips: mean(r) below ema_fake, ema_real below mean(f)
    assert float(gan.lecam_loss(jnp.array([-0.5]), jnp.array([0.3]), state)) == 0.0
    # per-sample form: mean(relu([1.2, 0.2])**2) + mean(relu([1.1, -0.1])**2)
    assert float(gan.lecam_loss(r, f, state, per_sample=True)) == pytest.approx(
        (1.44 + 0.04) / 2 + (1.21 + 0.0) / 2)
    loss, new = gan.lecam_regularizer(r, f, state, decay=0.9)
    assert float(loss) == pytest.approx(0.74)                     # uses the old EMAs
    assert float(new.ema_real) == pytest.approx(0.9 * 0.1 + 0.1 * 0.5)
    assert float(new.ema_fake) == pytest.approx(0.9 * -0.2 + 0.1 * -0.4)
    init = gan.lecam_init()
    assert float(init.ema_real) == 0.0 and float(init.ema_fake) == 0.0
    # gradient w.r.t. the logits: d/dr_i relu(mean r - a_F)**2 = 2 * 0.7 / 2; the EMAs get none
    g_r, g_s = jax.grad(lambda r, s: gan.lecam_loss(r, f, s), argnums=(0, 1))(r, state)
    np.testing.assert_allclose(g_r, [0.7, 0.7], rtol=1e-6)
    assert float(g_s.ema_real) == 0.0 and float(g_s.ema_fake) == 0.0


def test_adaptive_weight_hand_values():
    rec_g = {"kernel": jnp.array([[3.0, 0.0]]), "bias": jnp.array([4.0])}     # norm 5
    gan_g = {"kernel": jnp.array([[0.0, 1.0]]), "bias": jnp.array([0.0])}     # norm 1
    w = gan.adaptive_weight(rec_g, gan_g, disc_weight=0.5)
    assert float(w) == pytest.approx(5.0 / (1.0 + 1e-4) * 0.5, rel=1e-6)
    # arrays work too; a zero generator gradient clips to 1e4
    zero = jnp.zeros((2,))
    assert float(gan.adaptive_weight(jnp.array([3.0, 4.0]), zero)) == pytest.approx(1e4)
    assert float(gan.adaptive_weight(zero, jnp.array([1.0]))) == 0.0
    # no gradient flows through the weight
    g = jax.grad(lambda a: gan.adaptive_weight(a, jnp.array([1.0, 0.0])))(jnp.array([3.0, 4.0]))
    np.testing.assert_array_equal(g, 0.0)


def test_adaptive_weight_from_last_layer_gradients():
    # rec = sum((w*x - t)**2), g = -sum(w*x): grads 2x(wx - t) and -x w.r.t. w
    x, t, w0 = jnp.array([1.0, 2.0]), jnp.array([0.0, 1.0]), jnp.array([0.5, 0.5])
    g_rec = jax.grad(lambda w: jnp.sum((w * x - t) ** 2))(w0)                 # [1, 0]
    g_gan = jax.grad(lambda w: -jnp.sum(w * x))(w0)                          # [-1, -2]
    want = 1.0 / (np.sqrt(5.0) + 1e-4) * 0.1
    got = gan.adaptive_weight(g_rec, g_gan, disc_weight=0.1)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_start_gate():
    assert float(gan.gated_weight(0.01, 19_999, 20_000)) == 0.0
    assert float(gan.gated_weight(0.01, 20_000, 20_000)) == pytest.approx(0.01)
    gated = jax.jit(lambda s: gan.gated_weight(0.1, s, 200_000))
    assert float(gated(jnp.int32(0))) == 0.0
    assert float(gated(jnp.int32(250_000))) == pytest.approx(0.1)
    assert float(gan.start_gate(5, 0)) == 1.0


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("norm,count", [("batch", 2_765_633), ("group", 2_765_633),
                                        ("none", 2_764_737)])
def test_discriminator_param_count_and_256_shape(norm, count):
    d = NLayerDiscriminator(ndf=64, n_layers=3, norm=norm)
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(d.init, jax.random.key(0), x)
    assert _count(variables["params"]) == count
    assert ("batch_stats" in variables) == (norm == "batch")
    out = jax.eval_shape(lambda v, x: d.apply(v, x), variables, x)
    assert out.shape == (2, 30, 30, 1) and out.dtype == jnp.float32


def _numpy_init(module, x):
    """Variables of ``module`` filled from numpy (avoids compiling the random initialisers)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    fill = lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype)  # noqa: E731
    return jax.tree.map(fill, shapes)


def test_discriminator_64_forward_and_norms():
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    d = NLayerDiscriminator()                                   # GroupNorm default
    v = _numpy_init(d, x)
    apply = jax.jit(d.apply)
    out = apply(v, x)
    assert out.shape == (2, 6, 6, 1) and bool(jnp.all(jnp.isfinite(out)))
    # GroupNorm: each image's logits do not depend on the rest of the batch
    other = x.at[1].set(1.0 - x[1] ** 2)
    np.testing.assert_allclose(apply(v, other)[0], out[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(apply(v, other)[1], out[1])
    # params carry logical axis names for the sharding rules
    specs = nn.get_partition_spec(v)["params"]
    assert specs["conv1"]["kernel"] == jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out")
    assert specs["norm1"]["scale"] == jax.sharding.PartitionSpec("norm")
    # BatchNorm: train mode updates the running statistics
    db = NLayerDiscriminator(ndf=8, norm="batch")
    vb = _numpy_init(db, x)
    _, upd = jax.jit(lambda v, x: db.apply(v, x, train=True, mutable=["batch_stats"]))(vb, x)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), upd["batch_stats"],
                         vb["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 0
    with pytest.raises(ValueError, match="unknown discriminator norm"):
        jax.eval_shape(NLayerDiscriminator(norm="instance").init, jax.random.key(0), x)


def test_discriminator_init_distribution():
    # taming's weights_init: conv kernels N(0, 0.02), norm scales N(1, 0.02), biases 0 (small net)
    d = NLayerDiscriminator(ndf=32, n_layers=1)
    v = jax.jit(d.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    k = np.asarray(nn.unbox(v["conv1"]["kernel"]))
    assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
    s = np.asarray(nn.unbox(v["norm1"]["scale"]))
    assert abs(s.mean() - 1.0) < 0.01 and 0.005 < s.std() < 0.04
    assert "bias" not in v["conv1"] and not np.any(np.asarray(nn.unbox(v["conv0"]["bias"])))
