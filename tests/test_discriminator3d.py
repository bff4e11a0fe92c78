"""3-D discriminators for the video tokenizers (MAGVIT v1's StyleGAN-3D, Open-MAGVIT2's 3-D
PatchGAN), the R1 penalty, and a video tokenizer training with a GAN through the task. Tiny
shapes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax import losses as L
from titok_jax.models.discriminator import blur_downsample
from titok_jax.models.discriminators import build_discriminator
from titok_jax.models.discriminator3d import (NLayerDiscriminator3D, StyleGANDiscriminator3D,
                                              blur_downsample_3d)
from titok_jax.train.step import build_step

from train_helpers import fresh_state, load_config_module

pytestmark = pytest.mark.usefixtures("fast_compile")

SIZE = 16
TRAIN_SIZE = 8   # the tokenizer runs: two levels (f2) at 8 px


def _clips(shape=(2, 4, SIZE, SIZE, 3), seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


@pytest.mark.parametrize("options", [{}, {"downsample": "blur", "norm": "group", "num_groups": 2}])
def test_stylegan3d_gives_one_logit_per_clip(options):
    d = build_discriminator({"name": "stylegan3d", "filters": 4, "channel_multipliers": (1, 2),
                             **options})
    assert isinstance(d, StyleGANDiscriminator3D)
    x = _clips()
    variables = d.init(jax.random.key(0), x)
    assert sorted(variables) == ["params"]
    out = d.apply(variables, x)
    assert out.shape == (2, 1) and out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    # per clip: a clip's logit does not depend on the other clips (what R1 needs)
    np.testing.assert_allclose(np.asarray(d.apply(variables, x[:1])), np.asarray(out[:1]),
                               rtol=1e-5, atol=1e-6)
    # MAGVIT v1's UCF shape: T 16 -> 8 -> 4 -> 2 -> 1 -> 1, 128 -> 4; Dense(4 * 4 * 256 -> 256)
    ucf = build_discriminator({"name": "stylegan3d"})
    shapes = jax.eval_shape(ucf.init, jax.random.key(0), jnp.zeros((1, 16, 128, 128, 3)))
    assert nn.unbox(shapes)["params"]["dense"]["kernel"].shape == (4 * 4 * 256, 256)


def test_patchgan3d_shapes_and_batch_stats():
    x = _clips((2, 5, SIZE, SIZE, 3))
    d = build_discriminator({"name": "patchgan3d", "ndf": 4, "n_layers": 2, "norm": "group",
                             "num_groups": 2})
    assert isinstance(d, NLayerDiscriminator3D)
    out = d.apply(d.init(jax.random.key(0), x), x)
    # k3 s2 p1 halves (ceil) T in conv0 and conv1, space in conv0, conv1
    assert out.shape == (2, 2, 4, 4, 1)
    bn = build_discriminator({"name": "patchgan3d", "ndf": 4, "n_layers": 2, "norm": "batch"})
    variables = bn.init(jax.random.key(0), x)
    assert set(variables["batch_stats"]) == {"norm1", "norm2"}
    _, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    assert float(np.abs(np.asarray(upd["batch_stats"]["norm1"]["mean"])).max()) > 0
    # Open-MAGVIT2's video shape: 17 x 128^2 -> 5 x 16 x 16 patch logits
    om2 = build_discriminator({"name": "patchgan3d", "ndf": 64, "n_layers": 3, "norm": "batch"})
    big = jnp.zeros((1, 17, 128, 128, 3))
    out = jax.eval_shape(lambda: om2.apply(om2.init(jax.random.key(0), big), big))
    assert out.shape == (1, 5, 16, 16, 1)
    with pytest.raises(ValueError, match="clips"):
        d.init(jax.random.key(0), x[:, 0])
    with pytest.raises(ValueError, match="unknown option"):
        build_discriminator({"name": "patchgan3d", "filters": 4})


def test_3d_blur_of_a_still_clip_is_the_2d_blur_of_its_frame():
    """2-D vs 3-D: the separable 3-D blur on a 1-frame clip is MaskBit's 2-D blur of the frame;
    on a clip of equal frames it blurs every (halved) frame the same."""
    img = _clips((2, SIZE, SIZE, 3))
    np.testing.assert_allclose(np.asarray(blur_downsample_3d(img[:, None])[:, 0]),
                               np.asarray(blur_downsample(img)), rtol=1e-5, atol=1e-6)
    still = jnp.repeat(img[:, None], 4, axis=1)
    out = np.asarray(blur_downsample_3d(still))
    assert out.shape == (2, 2, SIZE // 2, SIZE // 2, 3)
    # T 4, SAME pad (1, 1) in time: each output frame sees one zero frame (weight 1/8 of 1, 3, 3, 1)
    for t in range(2):
        np.testing.assert_allclose(out[:, t], 7 / 8 * np.asarray(blur_downsample(img)),
                                   rtol=1e-5, atol=1e-6)


def test_r1_penalty_by_hand():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 2, 4, 4, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
    # linear D(x_b) = <w, x_b> + 1: dD/dx_b = w for every b, so R1 = ||w||^2, dR1/dw = 2 w
    linear = lambda w, x: jnp.sum(w * x, axis=(1, 2, 3, 4))[:, None] + 1.0  # noqa: E731
    r1 = L.r1_penalty(lambda t: linear(w, t), x)
    np.testing.assert_allclose(float(r1), float(jnp.sum(w ** 2)), rtol=1e-5)
    g = jax.grad(lambda w: L.r1_penalty(lambda t: linear(w, t), x))(w)
    np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(w), rtol=1e-5, atol=1e-6)
    # quadratic D(x_b) = <w, x_b^2>: dD/dx_b = 2 w x_b, R1 = mean_b ||2 w x_b||^2
    quad = lambda t: jnp.sum(w * t ** 2, axis=(1, 2, 3, 4))  # noqa: E731
    want = np.mean(np.sum((2 * np.asarray(w)[None] * np.asarray(x)) ** 2, axis=(1, 2, 3, 4)))
    np.testing.assert_allclose(float(L.r1_penalty(quad, x)), want, rtol=1e-5)
    # against central finite differences of D for one sample
    eps, xb, wn = 1e-2, np.asarray(x[:1], np.float64), np.asarray(w, np.float64)
    fd = np.zeros_like(xb)
    for idx in np.ndindex(xb.shape):
        e = np.zeros_like(xb)
        e[idx] = eps
        fd[idx] = (np.sum(wn * (xb + e) ** 2) - np.sum(wn * (xb - e) ** 2)) / (2 * eps)
    np.testing.assert_allclose(float(L.r1_penalty(quad, x[:1])), np.sum(fd ** 2), rtol=1e-3)


def _video_gan_config(family, disc, **losses):
    c = load_config_module(family).get_config("tiny")
    c.model.image_size = c.data.image_size = TRAIN_SIZE
    if family == "magvit":
        c.model.update(channel_mult=(1, 2), temporal_downsample=(True,))
    else:
        c.model.update(ch_mult=(1, 2), temporal_downsample=(True,))
    c.batch_size = 2
    c.optimizer.warmup_steps = 0
    c.losses.update(gan_weight=0.1, gan_start_step=0, discriminator=disc, **losses)
    return c


@pytest.mark.parametrize("family,disc,losses", [
    ("magvit", {"name": "stylegan3d", "filters": 4, "channel_multipliers": (1, 2)},
     {"gan_loss": "non_saturating", "r1_weight": 10.0}),
    ("magvit2_video", {"name": "patchgan3d", "ndf": 4, "n_layers": 2, "norm": "batch"},
     {"gan_loss": "hinge_nonsat", "lecam_weight": 0.05, "lecam_per_sample": True,
      "adaptive_weight_layer": "decoder/conv_out/kernel"}),
])
def test_video_tokenizer_trains_with_a_3d_discriminator(family, disc, losses):
    config = _video_gan_config(family, disc, **losses)
    task, state, optimizer, _, _ = fresh_state(config)
    t = task.num_frames
    params, dstate = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    # D is built on one clip
    assert jax.tree.structure(params["disc"]) == jax.tree.structure(nn.unbox(
        jax.eval_shape(task.disc.init, jax.random.key(0),
                       jnp.zeros((1, t, TRAIN_SIZE, TRAIN_SIZE, 3))))["params"])
    disc0 = jax.tree.map(np.asarray, state.params["disc"])
    step = build_step(task, optimizer, donate=False)
    batch = {"image": _clips((2, t, TRAIN_SIZE, TRAIN_SIZE, 3), seed=1)}
    for _ in range(2):
        state, metrics = step(state, batch, {})
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm/disc"]) > 0
    assert np.isfinite(float(metrics["gan/discriminator"])) and float(metrics["gan/weight"]) > 0
    if "r1_weight" in losses:
        assert float(metrics["gan/r1"]) > 0
    else:
        assert "gan/r1" not in metrics
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                         state.params["disc"], disc0)
    assert max(jax.tree.leaves(moved)) > 0
    if disc.get("norm") == "batch":
        assert "disc" in state.model_state


def test_2d_discriminator_on_clips_is_a_one_line_error():
    from titok_jax.tasks import get_task
    c = _video_gan_config("magvit2_video", {"name": "patchgan", "ndf": 8, "n_layers": 2})
    with pytest.raises(ValueError, match="3D discriminator") as err:
        get_task(c)
    assert "\n" not in str(err.value)
    images = load_config_module("vqgan").get_config("tiny")
    images.losses.update(gan_weight=0.1, discriminator={"name": "stylegan3d"})
    with pytest.raises(ValueError, match="2D discriminator"):
        get_task(images)
