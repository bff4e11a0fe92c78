"""MaskBit discriminator: the official PyTorch outputs (tests/data/vqgan/disc_*, made by
make_vectors.py), its pieces against brute-force numpy, the converter, and the GAN branch of the
tokenizer task with ``losses.discriminator.name = "maskbit"``."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.convert.common import read_state_dict
from titok_jax.convert.vqgan import (maskbit_discriminator_name_table,
                                     maskbit_discriminator_params_from_state_dict)
from titok_jax.models.discriminator import (MaskBitDiscriminator, NLayerDiscriminator,
                                            adaptive_max_pool, blur_downsample, blur_kernel)
from titok_jax.models.discriminators import build_discriminator

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vqgan")


@pytest.fixture(scope="module")
def official():
    sd = read_state_dict(os.path.join(DATA, "disc_state.safetensors"))
    with np.load(os.path.join(DATA, "disc_io.npz")) as f:
        return sd, {k: f[k] for k in f.files}


def test_converted_official_discriminator_matches_logits(official):
    sd, io = official
    params = maskbit_discriminator_params_from_state_dict(sd, source="vectors")  # infers h=32, 3 stages
    apply = jax.jit(MaskBitDiscriminator(hidden_channels=32, num_stages=3).apply)
    for name in ("44", "136"):
        logits = apply({"params": params}, jnp.asarray(io["x" + name]))
        assert logits.shape == io["y" + name].shape and logits.shape[1:] == (16, 16, 1)
        np.testing.assert_allclose(np.asarray(logits), io["y" + name], atol=1e-4)
    assert np.abs(io["y44"]).max() > 0.05   # not a trivially tiny output


def test_converter_errors(official):
    sd, _ = official
    with pytest.raises(ValueError, match=r"missing tensor 'to_logits\.2\.bias'"):
        maskbit_discriminator_params_from_state_dict({k: v for k, v in sd.items()
                                                      if k != "to_logits.2.bias"})
    with pytest.raises(ValueError, match=r"unexpected tensor 'extra'"):
        maskbit_discriminator_params_from_state_dict({**sd, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"blocks\.1\.1\.kernel is not the expected blur"):
        maskbit_discriminator_params_from_state_dict(
            {**sd, "blocks.1.1.kernel": np.ones((1, 1, 4, 4), np.float32) / 16})
    with pytest.raises(ValueError, match=r"'block_in\.0\.weight' has shape \(32, 3, 5, 5\), expected \(64"):
        maskbit_discriminator_params_from_state_dict(sd, {"hidden_channels": 64, "num_stages": 3})


def test_name_table_matches_the_official_default_and_param_count():
    with open(os.path.join(DATA, "official_keys.json")) as f:
        official = {k: tuple(v) for k, v in json.load(f)["discriminator_default"].items()}
    table = {t: tuple(s) for t, _, s, _ in maskbit_discriminator_name_table(128, 3)}
    buffers = {k for k in official if k.endswith(".1.kernel")}
    assert len(buffers) == 3 and table == {k: v for k, v in official.items() if k not in buffers}
    shapes = jax.eval_shape(MaskBitDiscriminator().init, jax.random.key(0),
                            jnp.zeros((1, 256, 256, 3)))
    leaves = jax.tree.leaves(shapes, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert n == sum(int(np.prod(official[k])) for k in table) == 1_909_889
    out = jax.eval_shape(lambda v, x: MaskBitDiscriminator().apply(v, x), shapes,
                         jnp.zeros((2, 256, 256, 3)))
    assert out.shape == (2, 16, 16, 1)


def _torch_adaptive_max(x, out):
    """Brute force: window [floor(i n / out), ceil((i + 1) n / out)) on both axes."""
    b, h, w, c = x.shape
    y = np.zeros((b, out, out, c), x.dtype)
    for i in range(out):
        for j in range(out):
            r0, r1 = (i * h) // out, -(-((i + 1) * h) // out)
            c0, c1 = (j * w) // out, -(-((j + 1) * w) // out)
            y[:, i, j] = x[:, r0:r1, c0:c1].max(axis=(1, 2))
    return y


@pytest.mark.parametrize("size", [6, 16, 17, 32, 23])
def test_adaptive_max_pool_matches_pytorch_windows(size):
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(adaptive_max_pool(jnp.asarray(x), 16)),
                                  _torch_adaptive_max(x, 16))


@pytest.mark.parametrize("size", [11, 12])
def test_blur_downsample_matches_numpy(size):
    x = np.random.default_rng(0).normal(size=(1, size, size, 2)).astype(np.float64)
    k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
    assert np.allclose(blur_kernel(4), k)
    out = -(-size // 2)
    total = (out - 1) * 2 + 4 - size
    lo, hi = total // 2, total - total // 2          # 11 -> (1, 2): the extra row after
    xp = np.pad(x, [(0, 0), (lo, hi), (lo, hi), (0, 0)])
    want = np.zeros((1, out, out, 2))
    for i in range(out):
        for j in range(out):
            want[:, i, j] = np.einsum("bhwc,hw->bc", xp[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4], k)
    got = blur_downsample(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_build_discriminator_by_name():
    assert isinstance(build_discriminator({}), NLayerDiscriminator)
    assert isinstance(build_discriminator({"name": "patchgan", "ndf": 8}), NLayerDiscriminator)
    d = build_discriminator({"name": "maskbit", "hidden_channels": 32, "num_stages": 2})
    assert isinstance(d, MaskBitDiscriminator) and d.num_stages == 2
    with pytest.raises(ValueError, match="unknown discriminator 'stylegan'"):
        build_discriminator({"name": "stylegan"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['ndf'\]"):
        build_discriminator({"name": "maskbit", "ndf": 64})
    with pytest.raises(ValueError, match="multiples of 32"):
        jax.eval_shape(MaskBitDiscriminator(hidden_channels=16).init, jax.random.key(0),
                       jnp.zeros((1, 32, 32, 3)))


def test_tokenizer_task_trains_the_maskbit_discriminator():
    from titok_jax.tasks import get_task

    from train_helpers import micro_config

    config = micro_config(**{"model.quantizer.use_ema": False, "model.quantizer.kmeans_init": False,
                             "model.quantizer.dead_code_threshold": 0.0, "losses.gan_weight": 0.1,
                             "losses.gan_start_step": 0,
                             "losses.discriminator": {"name": "maskbit", "hidden_channels": 32,
                                                      "num_stages": 2}})
    task = get_task(config)
    assert isinstance(task.disc, MaskBitDiscriminator)
    params, state = jax.jit(task.init)(jax.random.key(0))
    params, state = nn.unbox(params), nn.unbox(state)
    assert "block_in" in params["disc"] and "blocks_1_norm" in params["disc"]
    batch = {"image": jnp.asarray(np.random.default_rng(1).uniform(size=(4, 32, 32, 3)),
                                  jnp.float32)}
    from titok_jax.train.step import loss_grads
    grads, _, m = jax.jit(loss_grads(task.loss))(params, state, batch, jax.random.key(1), jnp.int32(0), {})
    disc_norm = float(_global_norm(grads["disc"]))
    assert disc_norm > 0.0 and np.isfinite(float(m["gan/discriminator"]))
    assert np.isfinite(float(m["gan/generator"]))


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
