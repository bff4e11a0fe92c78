"""titok_jax.nn MLP, transformer block and adaLN-zero against float64 numpy compositions."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from scipy.special import erf

from titok_jax.nn import MLP, AdaLNModulation, TransformerBlock, modulate

B, T, D = 2, 5, 8


def _params(variables):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                  nn.unbox(variables)["params"])


def _randomize(variables, seed=0, std=0.3):
    """Replace every param by random values (so zero-init biases/gates are really exercised)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a + std * rng.standard_normal(a.shape), jnp.float32),
        nn.unbox(variables))


def _random_variables(m, *args, std=0.3, seed=0, **kwargs):
    """Random params with the module's shapes via ``eval_shape`` (no init compile)."""
    shapes = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32), shapes)


def _x(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _dense(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def _np_mlp(p, x, act):
    x = np.asarray(x, np.float64)
    if act == "swiglu":
        g, v = _dense(x, p["gate"]), _dense(x, p["value"])
        h = g / (1 + np.exp(-g)) * v
    else:
        u = _dense(x, p["fc_in"])
        if act == "gelu":
            h = 0.5 * u * (1 + erf(u / np.sqrt(2)))
        else:
            h = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
    return _dense(h, p["fc_out"])


def _np_ln(x, p, eps):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * p["scale"] + p["bias"] if p is not None else y


def _np_attn(p, x):
    qkv = np.einsum("btd,dshk->sbthk", x, p["qkv"]["kernel"]) + p["qkv"]["bias"][:, None, None]
    q, k, v = qkv
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhd->bqhd", w, v)
    return np.einsum("bqhd,hde->bqe", y, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "swiglu"])
def test_mlp_activations_match_numpy(act):
    m = MLP(hidden_dim=12, out_dim=6, activation=act)
    x = 2.0 * _x()
    v = _random_variables(m, x)
    p = _params(v)
    assert set(p) == ({"gate", "value", "fc_out"} if act == "swiglu" else {"fc_in", "fc_out"})
    assert p["fc_out"]["kernel"].shape == (12, 6)
    y = m.apply(v, x)
    np.testing.assert_allclose(y, _np_mlp(p, x, act), atol=1e-5, rtol=1e-5)
    if act != "swiglu":   # exact and tanh GELU differ measurably on these inputs
        other = "gelu_tanh" if act == "gelu" else "gelu"
        assert np.abs(_np_mlp(p, x, other) - _np_mlp(p, x, act)).max() > 1e-4


def test_mlp_without_bias():
    m = MLP(hidden_dim=12, use_bias=False, activation="swiglu")
    v = _random_variables(m, _x())
    assert all("bias" not in layer for layer in _params(v).values())
    np.testing.assert_allclose(m.apply(v, _x()), _np_mlp(_params(v), _x(), "swiglu"),
                               atol=1e-5, rtol=1e-5)


def test_mlp_dropout():
    m = MLP(hidden_dim=12, dropout_rate=0.5)
    v = _random_variables(m, _x())
    y = m.apply(v, _x())
    np.testing.assert_allclose(y, _np_mlp(_params(v), _x(), "gelu"), atol=1e-5, rtol=1e-5)
    y2 = m.apply(v, _x(), deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(y, y2, atol=1e-4)


def test_block_equals_numpy_composition():
    """TiTok / open_clip ResidualAttentionBlock: LN eps 1e-5, exact GELU MLP ratio 4."""
    m = TransformerBlock(num_heads=2)
    x = _x()
    v = _random_variables(m, x)
    p = _params(v)
    assert p["mlp"]["fc_in"]["kernel"].shape == (D, 4 * D)
    xx = np.asarray(x, np.float64)
    h = xx + _np_attn(p["attn"], _np_ln(xx, p["ln_1"], 1e-5))
    want = h + _np_mlp(p["mlp"], _np_ln(h, p["ln_2"], 1e-5), "gelu")
    np.testing.assert_allclose(m.apply(v, x), want, atol=1e-5, rtol=1e-5)


def test_adaln_block_is_identity_at_init():
    m = TransformerBlock(num_heads=2, adaln=True, norm_affine=False, norm_eps=1e-6)
    x, c = _x(), _x(1, (B, 6))
    v = jax.jit(m.init)(jax.random.key(1), x, c)
    np.testing.assert_array_equal(m.apply(v, x, c), x)
    p = _params(v)
    assert "ln_1" not in p and not p["adaln"]["kernel"].any()   # affine-free norms
    with pytest.raises(ValueError):
        m.apply(v, x)


@pytest.mark.parametrize("per_token", [False, True])
def test_adaln_block_equals_numpy_composition(per_token):
    m = TransformerBlock(num_heads=2, adaln=True, norm_affine=False, norm_eps=1e-6,
                         activation="gelu_tanh")
    x = _x()
    c = _x(1, (B, T, 6) if per_token else (B, 6))
    v = _random_variables(m, x, c)
    p = _params(v)
    xx, cc = np.asarray(x, np.float64), np.asarray(c, np.float64)
    silu = cc / (1 + np.exp(-cc))
    mod = np.einsum("...c,ckd->...kd", silu, p["adaln"]["kernel"]) + p["adaln"]["bias"]
    if not per_token:
        mod = mod[:, None]                       # broadcast over tokens
    s1, c1, g1, s2, c2, g2 = [mod[..., i, :] for i in range(6)]
    h = xx + g1 * _np_attn(p["attn"], _np_ln(xx, None, 1e-6) * (1 + c1) + s1)
    want = h + g2 * _np_mlp(p["mlp"], _np_ln(h, None, 1e-6) * (1 + c2) + s2, "gelu_tanh")
    np.testing.assert_allclose(m.apply(v, x, c), want, atol=1e-5, rtol=1e-5)


def test_adaln_modulation_and_modulate():
    m = AdaLNModulation(num_chunks=3, features=D)
    c = _x(1, (B, 4))
    v = jax.jit(m.init)(jax.random.key(0), c)
    chunks = m.apply(v, c)
    assert len(chunks) == 3 and all(ch.shape == (B, D) for ch in chunks)
    assert all(not np.asarray(ch).any() for ch in chunks)          # adaLN-zero
    v = _randomize(v)
    p = _params(v)
    cc = np.asarray(c, np.float64)
    full = (cc / (1 + np.exp(-cc))) @ p["kernel"].reshape(4, 3 * D) + p["bias"].reshape(-1)
    for i, ch in enumerate(m.apply(v, c)):   # chunk i = columns [i*D, (i+1)*D) of torch Linear
        np.testing.assert_allclose(ch, full[:, i * D:(i + 1) * D], atol=1e-5, rtol=1e-5)
    nz_m = AdaLNModulation(num_chunks=2, features=D, zero_init=False)
    nz = jax.jit(nz_m.init)(jax.random.key(0), c)
    assert np.asarray(nn.unbox(nz)["params"]["kernel"]).any()

    x = np.asarray(_x(), np.float64)
    shift, scale = np.asarray(_x(2, (B, D))), np.asarray(_x(3, (B, D)))
    np.testing.assert_allclose(modulate(x, shift, scale),
                               x * (1 + scale[:, None]) + shift[:, None], rtol=1e-6)
    shift_t, scale_t = np.asarray(_x(2)), np.asarray(_x(3))
    np.testing.assert_allclose(modulate(x, shift_t, scale_t), x * (1 + scale_t) + shift_t,
                               rtol=1e-6)


def test_block_options_rmsnorm_qknorm_nobias_dropout():
    m = TransformerBlock(num_heads=2, norm_type="rmsnorm", qk_norm="layernorm",
                         qkv_bias=False, out_bias=False, mlp_bias=False, activation="swiglu",
                         mlp_dim=10, dropout_rate=0.5)
    x = _x()
    v = _random_variables(m, x)
    p = _params(v)
    assert "bias" not in p["attn"]["qkv"] and "bias" not in p["attn"]["out"]
    assert "bias" not in p["ln_1"] and "q_norm" in p["attn"]
    assert p["mlp"]["gate"]["kernel"].shape == (D, 10)
    y = m.apply(v, x)
    assert y.shape == x.shape
    y2 = m.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(y, y2, atol=1e-4)
