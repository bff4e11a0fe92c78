"""``config.init_from`` for the video tokenizers (issue 18, ``tasks.video_init``): a tiny 2-D
Open-MAGVIT2 workdir inflated into the tiny causal MAGVIT-v2 video config through the trainer's
sharded init reproduces the image model on a 1-frame clip (per-frame norm); MAGVIT v1 from its
image twin's workdir gives the twin's output on every frame of a static clip; a run that does not
map, or init_from on an image tokenizer, is a one-line ValueError. Tiny shapes (16 px)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.checkpoint import inference_state, write_workdir
from titok_jax.tasks import get_task

from train_helpers import fresh_state, load_config_module

pytestmark = pytest.mark.usefixtures("fast_compile")
SIZE = 16


def _close(got, want, rel=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def _image_workdir(path, config):
    """A workdir of ``config``'s freshly initialised model, every 1-D param (biases, norm scales)
    perturbed so that nothing is at its default; no EMA (an imported-style workdir)."""
    config.optimizer.ema_decay = 0.0
    task = get_task(config)
    params, state = nn.meta.unbox(jax.jit(task.init)(jax.random.key(3)))
    keys = iter(jax.random.split(jax.random.key(4), 1000))
    params = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape)
                          if v.ndim == 1 else v, params["model"])
    write_workdir(str(path), config.to_dict(), inference_state(params, state["model"]))
    return task, params, state["model"]


def _video_config(family, init_from, **model):
    c = load_config_module(family).get_config("tiny")
    c.model.update(dict(image_size=SIZE, **model))
    c.data.image_size = SIZE
    c.batch_size = 8
    c.init_from = str(init_from)
    return c


def test_magvit2_video_inflates_the_image_model_through_the_trainer(tmp_path):
    video = _video_config("magvit2_video", tmp_path / "image")
    image = load_config_module("magvit2").get_config("tiny")
    image.model.update(dict(image_size=SIZE, ch=video.model.ch, ch_mult=video.model.ch_mult,
                            num_res_blocks=video.model.num_res_blocks,
                            z_channels=video.model.z_channels))
    image.model.quantizer = video.model.quantizer
    image.data.image_size = SIZE
    image_task, p2, s2 = _image_workdir(tmp_path / "image", image)
    assert video.model.get("causal_norm", True)   # tiny: per-frame norm (the default)
    task, state, *_ = fresh_state(video)      # the trainer's sharded init
    images = jax.random.uniform(jax.random.key(5), (2, SIZE, SIZE, 3))
    y2, o2 = jax.jit(image_task.model.apply)({"params": p2, **s2}, images)
    y3, o3 = jax.jit(task.model.apply)({"params": state.params["model"],
                                        **state.model_state["model"]}, images[:, None])
    np.testing.assert_array_equal(np.asarray(o3.indices).reshape(2, -1),
                                  np.asarray(o2.indices).reshape(2, -1))
    _close(y3[:, 0], y2)
    # the discriminator-free tiny recipe: only the model was loaded; a wrong family is one line
    with pytest.raises(ValueError, match="does not inflate into this MAGVIT-3D"):
        get_task(_video_config("magvit", tmp_path / "image"))


def test_magvit3d_inflates_its_image_twin(tmp_path):
    video = _video_config("magvit", tmp_path / "twin", channel_mult=(1, 2),
                          temporal_downsample=(True,))
    twin = load_config_module("magvit").get_config("tiny")
    twin.model.update(dict(video.model.to_dict(), temporal_kernel_size=1, num_frames=1,
                           temporal_downsample=(False,)))
    twin.data.image_size, twin.data.num_frames = SIZE, 1
    twin_task, p2, s2 = _image_workdir(tmp_path / "twin", twin)
    task, state, *_ = fresh_state(video)
    images = jax.random.uniform(jax.random.key(6), (2, SIZE, SIZE, 3))
    y2, o2 = jax.jit(twin_task.model.apply)({"params": p2, **s2}, images[:, None])
    static = jnp.repeat(images[:, None], 4, axis=1)
    y3, o3 = jax.jit(task.model.apply)({"params": state.params["model"],
                                        **state.model_state["model"]}, static)
    for t in range(4):
        _close(y3[:, t], y2[:, 0], rel=1e-4)
    for t in range(2):
        np.testing.assert_array_equal(o3.indices[:, t], o2.indices[:, 0])


def test_init_from_on_an_image_tokenizer_is_refused(tmp_path):
    c = load_config_module("magvit2").get_config("tiny")
    c.init_from = str(tmp_path)
    with pytest.raises(ValueError, match="image model"):
        get_task(c)
