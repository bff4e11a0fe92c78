"""KL-VAE: the SD layout's parameter count, token layout, the KL term against numpy."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.models.kl_vae import KLVAE


def test_sd_layout_parameter_count():
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    count = lambda c: sum(math.prod(a.shape) for a in jax.tree.leaves(  # noqa: E731
        nn.unbox(jax.eval_shape(KLVAE(image_size=64, latent_channels=c).init, jax.random.key(0), x))))
    assert count(4) == 83_653_863            # the SD VAE (diffusers AutoencoderKL, 4 channels)
    assert abs(count(16) / 84e6 - 1) < 0.01  # FlexTok's 16-channel VAE, ~84M


def test_tokens_and_kl_term():
    model = KLVAE(image_size=16, latent_channels=4, base_channels=32, channel_mult=(1, 2),
                  num_res_blocks=1, kl_weight=0.5)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    v = jax.jit(model.init)(jax.random.key(1), x)

    @jax.jit
    def run(v, x):
        m = model.apply(v, x, method="moments")
        tokens, out = model.apply(v, x, method="encode")
        rec, out_t = model.apply(v, x, train=True, rngs={"sample": jax.random.key(2)})
        return m, tokens, out, rec, out_t

    m, tokens, out, rec, out_t = (jax.device_get(a) for a in run(v, x))
    assert m.shape == (2, 8, 8, 8) and tokens.shape == (2, 64, 4) and rec.shape == (2, 16, 16, 3)
    mean, logvar = np.split(np.asarray(m, np.float64), 2, axis=-1)
    np.testing.assert_allclose(tokens, mean.reshape(2, 64, 4), atol=1e-6)   # eval: the mean, row-major
    kl = np.mean(np.sum(0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar), axis=(1, 2, 3)))
    np.testing.assert_allclose(float(out.losses["kl"]), 0.5 * kl, rtol=1e-4)
    assert out.indices is None and model.quantizer_name == "vae" and model.num_latent_tokens == 64


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
