"""FactorizedQuantizer (FQGAN): per-factor projections and indices, disentanglement, InfoNCE hook."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.quantizers import FactorizedQuantizer, VectorQuantizer, disentanglement_loss
from titok_jax.quantizers.factorized import info_nce


@pytest.mark.parametrize("q1,q2,want", [
    ([1.0, 0.0], [0.0, 1.0], 0.0),
    ([1.0, 0.0], [1.0, 0.0], 1.0),
    ([1.0, 1.0], [1.0, 0.0], 0.5),
    ([3.0, 3.0], [0.5, 0.0], 0.5),   # invariant to rescaling each code
])
def test_disentanglement_hand_examples(q1, q2, want):
    got = disentanglement_loss([jnp.asarray([q1]), jnp.asarray([q2])])
    assert float(got) == pytest.approx(want, abs=1e-6)


def test_disentanglement_three_factors_is_mean_of_pairs():
    a, b, c = jnp.array([[1.0, 0.0]]), jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
    assert float(disentanglement_loss([a, b, c])) == pytest.approx((1 + 0 + 0) / 3, abs=1e-6)


def test_info_nce_hand_examples():
    feats = jnp.eye(2)
    assert float(info_nce(feats, feats)) == pytest.approx(-math.log(math.e / (math.e + 1)), abs=1e-4)  # 0.3133
    assert float(info_nce(feats, feats[::-1])) == pytest.approx(1.3133, abs=1e-4)


class MeanHead(nn.Module):
    """Pools factor codes over tokens and maps them to a feature (a stand-in representation head)."""
    features: int

    @nn.compact
    def __call__(self, codes):
        return nn.Dense(self.features)(codes.mean(axis=1))


def make_fq(**kw):
    return FactorizedQuantizer(
        quantizers=(VectorQuantizer(codebook_size=8, dim=3, l2_normalize=True),
                    VectorQuantizer(codebook_size=8, dim=3, l2_normalize=True)),
        factor_dims=(3, 3), dim=6, **kw)


def test_factors_index_their_own_projection_and_round_trip():
    fq = make_fq(disentanglement_weight=0.1)
    z = jax.random.normal(jax.random.key(0), (2, 5, 6))
    variables = fq.init(jax.random.key(1), z)
    z_q, out = fq.apply(variables, z)
    assert out.indices.shape == (2, 5, 2) and z_q.shape == z.shape
    p = variables["params"]
    zn = np.asarray(z, np.float64)
    codes = []
    for i in range(2):
        proj = p[f"in_proj_{i}"]
        x = zn @ np.asarray(nn.unbox(proj["kernel"]), np.float64) + np.asarray(nn.unbox(proj["bias"]))
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        e = np.asarray(nn.unbox(p[f"quantizers_{i}"]["codebook"]), np.float64)
        e /= np.linalg.norm(e, axis=-1, keepdims=True)
        sims = x @ e.T
        np.testing.assert_array_equal(np.asarray(out.indices[..., i]), sims.argmax(-1))
        codes.append(e[sims.argmax(-1)])
    want_dis = 0.1 * np.mean((codes[0] * codes[1]).sum(-1) ** 2)
    assert float(out.losses["disentanglement"]) == pytest.approx(want_dis, rel=1e-5)
    joined = np.concatenate(codes, -1)
    out_k = np.asarray(nn.unbox(p["out_proj"]["kernel"]), np.float64)
    out_b = np.asarray(nn.unbox(p["out_proj"]["bias"]), np.float64)
    np.testing.assert_allclose(np.asarray(z_q), joined @ out_k + out_b, atol=1e-5)
    decoded = fq.apply(variables, out.indices, method="indices_to_codes")
    assert np.array_equal(np.asarray(decoded), np.asarray(z_q))
    assert fq.codebook_size == (8, 8)
    assert "commitment" in out.losses and "factor1/usage" in out.metrics


def test_representation_hook_adds_info_nce_and_trains_the_head():
    fq = make_fq(representation_heads=(None, MeanHead(4)), representation_weight=0.5)
    z = jax.random.normal(jax.random.key(2), (3, 5, 6))
    target = jax.random.normal(jax.random.key(3), (3, 4))
    variables = fq.init(jax.random.key(4), z)
    _, out = fq.apply(variables, z, representation_targets=(None, target))
    feature = out.aux["representation_1"]
    assert feature.shape == (3, 4) and "representation_0" not in out.aux
    assert float(out.losses["representation"]) == pytest.approx(0.5 * float(info_nce(feature, target)), rel=1e-6)
    _, no_target = fq.apply(variables, z)  # no targets: the head runs, no loss term
    assert "representation" not in no_target.losses

    def loss(params):
        return fq.apply({"params": params}, z, representation_targets=(None, target))[1].losses["representation"]

    grads = jax.grad(loss)(variables["params"])
    head_grad = nn.unbox(grads["representation_heads_1"])
    assert float(jnp.abs(head_grad["Dense_0"]["kernel"]).sum()) > 0


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="factor_dims"):
        FactorizedQuantizer(quantizers=(VectorQuantizer(codebook_size=4, dim=3),), factor_dims=(3, 3),
                            dim=6).init(jax.random.key(0), jnp.zeros((2, 6)))
    fq = make_fq()
    with pytest.raises(ValueError, match="last dim 6"):
        fq.init(jax.random.key(0), jnp.zeros((2, 5)))


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
