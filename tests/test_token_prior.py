"""TiTok's token prior (models/token_prior.py): token homes tile the image, the distance table
has the token-patch blocks only, and the bias makes each latent token read its own region at
initialisation (the encoder output of a token depends on its region's pixels, not the others)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.models.titok import TiTok
from titok_jax.models.token_prior import prior_distances, token_homes


def test_homes_tile_the_image_row_major():
    h = token_homes(8)                                  # 2 x 4 cells
    np.testing.assert_allclose(h[:4, 0], 0.25) and np.testing.assert_allclose(h[4:, 0], 0.75)
    np.testing.assert_allclose(h[:4, 1], [0.125, 0.375, 0.625, 0.875])
    assert token_homes(7).shape == (7, 2) and np.allclose(token_homes(7)[:, 0], 0.5)   # prime: 1 row


def test_distance_table_blocks():
    d = prior_distances(4, 2)                           # [cls, 4 patches, 4 tokens]
    assert d.shape == (9, 9)
    assert np.all(d[0] == 0) and np.all(d[:, 0] == 0)           # class token: no bias
    assert np.all(d[1:5, 1:5] == 0) and np.all(d[5:, 5:] == 0)  # patch-patch, token-token: none
    np.testing.assert_array_equal(d[5:, 1:5], d[1:5, 5:].T)
    # tokens on a 2 x 2 grid of a 2 x 2 patch grid: each home is a patch centre
    np.testing.assert_allclose(np.diag(d[5:, 1:5]), 0.0)
    np.testing.assert_allclose(d[5, 1:5], [0, 1, 1, 2])


def _model(prior):
    return TiTok(image_size=32, patch_size=8, encoder_width=32, encoder_depth=1, encoder_heads=2,
                 decoder_width=32, decoder_depth=1, decoder_heads=2, num_latent_tokens=16,
                 token_size=4, quantizer={"name": "vq", "codebook_size": 16}, token_prior=prior,
                 init_scheme="xavier")


def test_prior_localises_the_tokens_and_is_off_by_default():
    plain = _model(0.0)
    x = jnp.zeros((1, 32, 32, 3))
    assert not any("token_prior" in "/".join(map(str, k)) for k, _ in
                   jax.tree_util.tree_flatten_with_path(jax.eval_shape(plain.init, jax.random.key(0), x))[0])
    model = _model(4.0)
    params = nn.unbox(model.init(jax.random.key(0), x))["params"]
    assert params["encoder"]["token_prior_0"]["scale"].shape == (2,)

    def z(images):
        return model.apply({"params": params}, images, params["latent_tokens"],
                           method=lambda m, i, t: m.encoder(i, t))
    base = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
    poked = base.at[:, :8, :8].add(1.0)                  # change only the top-left patch
    change = jnp.abs(z(poked) - z(base)).sum(-1)[0]      # [16] tokens
    # token 0's home is the top-left patch: it moves most; the far corner's token hardly at all
    assert int(jnp.argmax(change)) == 0 and float(change[15]) < 0.05 * float(change[0])
