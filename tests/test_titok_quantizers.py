"""Any quantizer in TiTok (issue 17): `configs/titok.py:tiny,quantizer=NAME` builds, trains a step
and tokenizes into ids of that quantizer's codebook; the factory refuses a token_size the
quantizer cannot take."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_helpers import load_config_module

from titok_jax.models.registry import build_model
from titok_jax.quantizers.factory import build_quantizer


@pytest.mark.parametrize("name,codes,token_size", [("fsq", 240, 3), ("lfq", 256, 8), ("bsq", 256, 8),
                                                   ("vq", 256, 12)])
def test_variant_string_selects_the_quantizer(name, codes, token_size):
    c = load_config_module("titok").get_config(f"tiny_vq,quantizer={name}")
    assert c.model.quantizer.name == name and c.model.token_size == token_size
    c.model.update(image_size=32, encoder_width=32, decoder_width=32, encoder_depth=1,
                   decoder_depth=1, encoder_heads=2, decoder_heads=2, num_latent_tokens=8)
    model = build_model(c.model)
    assert model.codebook_size == codes and model.quantizer_name == name
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    # jitted: op-by-op dispatch of the un-jitted model took 7-20 s per quantizer
    variables = nn.unbox(jax.jit(model.init)({"params": jax.random.key(1),
                                              "sample": jax.random.key(2)}, images))

    def loss(params):
        (rec, out), _ = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=True, rngs={"sample": jax.random.key(3), "quantizer": jax.random.key(4)})
        return jnp.mean((rec - images) ** 2) + sum(out.losses.values())

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    assert np.isfinite(float(value))
    assert float(jnp.abs(grads["encoder"]["conv_out"]["kernel"]).sum()) > 0   # gradient reaches the encoder
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode", mutable=True)[0][1].indices)
    ids = np.asarray(encode(variables, images))
    assert ids.shape == (2, 8) and ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < codes
    pixels = jax.jit(lambda v, t: model.apply(v, t, method="decode_tokens"))(variables, jnp.asarray(ids))
    assert pixels.shape == (2, 32, 32, 3)


def test_bits_option_and_unknown_options():
    titok = load_config_module("titok")
    assert dict(titok.get_config("bl64_vq,quantizer=fsq,bits=14").model.quantizer) == \
        {"name": "fsq", "levels": [8, 8, 8, 6, 5]}
    assert titok.get_config("tiny_vq,bits=10").model.quantizer.codebook_size == 1024
    with pytest.raises(ValueError, match="unknown titok config option"):
        titok.get_config("tiny,codebook=3")
    with pytest.raises(ValueError, match="unknown quantizer 'xyz'"):
        titok.get_config("tiny,quantizer=xyz")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        titok.get_config("tiny,fsq")


@pytest.mark.parametrize("spec,match", [({"name": "fsq", "levels": [8, 5, 5]}, "token_size is 4"),
                                        ({"name": "lfq", "bits": 6}, "bits 6 != the model's token_size 4"),
                                        ({"name": "bsq", "bits": 40}, "got 40")])
def test_factory_refuses_a_token_size_the_quantizer_cannot_take(spec, match):
    dim = 40 if spec.get("bits") == 40 else 4
    with pytest.raises(ValueError, match=match):
        build_quantizer(spec, dim, dtype=jnp.float32, param_dtype=jnp.float32)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""
