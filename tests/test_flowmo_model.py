"""FlowMo model: RoPE ids, the double-stream block, the integer token layout, the LFQ loss, decoding,
and the published parameter counts."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.models.flowmo import (FlowMo, bits_to_ids, from_subtokens, ids_to_bits,
                                     to_subtokens)
from titok_jax.models.mmdit import DoubleStreamBlock, default_rope_axes, flowmo_position_ids
from titok_jax.nn import TransformerBlock, rope_angles
from train_helpers import load_config_module

MICRO = dict(image_size=16, patch_size=4, code_length=4, token_bits=8, id_bits=4, entropy_group_bits=4,
             encoder_width=32, encoder_depth=1, encoder_heads=1, decoder_width=32, decoder_depth=1,
             decoder_heads=1)


def _randomize(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def micro():
    """(model, randomised variables, images, jitted encode) shared by the tests of this module."""
    model, v, x = _micro()
    return model, v, x, _apply(model, "encode")


def _micro(**kw):
    model = FlowMo(**{**MICRO, **kw})
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    def init(key):
        variables = nn.unbox(model.init({"params": key, "quantizer": key}, x))
        return dict(variables, params=_randomize(variables["params"], jax.random.key(5)))
    return model, jax.jit(init)(jax.random.key(0)), x


def _apply(model, method, **kw):
    """A jitted ``model.apply(variables, *args, method=method, **kw)`` (op-by-op is slow on CPU)."""
    return jax.jit(lambda v, *a: model.apply(v, *a, method=method, **kw))


# ----------------------------------------------------------------------------- RoPE ids
def test_position_ids_layout():
    img, txt = flowmo_position_ids(2, 3, 4)
    assert img.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert txt.tolist() == [[i, i, i] for i in range(4)]
    assert default_rope_axes(64) == (8, 28, 28) and default_rope_axes(96) == (12, 42, 42)
    with pytest.raises(ValueError, match="RoPE split"):
        default_rope_axes(48)
    # axis 0 (t) owns the first d0/2 angles, then rows, then columns: image token (0, 1, 2)
    ang = np.asarray(rope_angles(jnp.asarray(img[5:6]), (4, 14, 14)))[0]
    theta = lambda d: 10000.0 ** (-np.arange(0, d, 2) / d)  # noqa: E731
    np.testing.assert_allclose(ang, np.concatenate([0 * theta(4), 1 * theta(14), 2 * theta(14)]), rtol=1e-6)


# ----------------------------------------------------------------------------- double stream
@pytest.mark.parametrize("modulated", [True, False])
def test_double_stream_equals_single_stream_with_shared_weights(modulated):
    """Both streams with the same weights == one pre-LN (adaLN) block over [txt || img]."""
    d, heads, axes = 32, 1, (4, 14, 14)
    b, n_img, n_txt = 2, 6, 3
    k = jax.random.split(jax.random.key(0), 4)
    img, txt = jax.random.normal(k[0], (b, n_img, d)), jax.random.normal(k[1], (b, n_txt, d))
    vec = jax.random.normal(k[2], (b, d)) if modulated else None
    img_pos, txt_pos = (jnp.asarray(a) for a in flowmo_position_ids(2, 3, n_txt))
    block = DoubleStreamBlock(heads, rope_axes_dims=axes)
    p = jax.jit(lambda key: _randomize(nn.unbox(block.init(key, img, txt, vec, img_pos, txt_pos))["params"],
                                       key))(k[3])
    names = ("qkv", "q_norm", "k_norm", "out", "mlp") + (("mod",) if modulated else ())
    for n in names:   # the latent stream gets the image stream's weights
        p[f"txt_{n}"] = p[f"img_{n}"]
    out_img, out_txt = jax.jit(block.apply)({"params": p}, img, txt, vec, img_pos, txt_pos)

    single = TransformerBlock(heads, norm_eps=1e-6, norm_affine=False, qk_norm="rmsnorm", attn_scale=8.0 / d,
                              use_rope=True, rope_axes_dims=axes, activation="gelu_tanh", adaln=modulated)
    sp = {"attn": {"qkv": p["img_qkv"], "q_norm": p["img_q_norm"], "k_norm": p["img_k_norm"],
                   "out": p["img_out"]}, "mlp": p["img_mlp"]}
    if modulated:
        sp["adaln"] = p["img_mod"]
    seq = jnp.concatenate([txt, img], axis=1)
    pos = jnp.concatenate([txt_pos, img_pos])[None]
    ref = jax.jit(lambda sp, seq, vec, pos: single.apply({"params": sp}, seq, vec, positions=pos))(
        sp, seq, vec, pos)
    np.testing.assert_allclose(out_txt, ref[:, :n_txt], atol=2e-5)
    np.testing.assert_allclose(out_img, ref[:, n_txt:], atol=2e-5)
    # the last-block variant computes the image stream only, with the same result
    last = DoubleStreamBlock(heads, rope_axes_dims=axes, update="img")
    lp = {k_: v for k_, v in p.items() if not k_.startswith(("txt_out", "txt_mlp", "txt_norm2", "txt_mod"))}
    if modulated:
        lp["txt_mod"] = {"kernel": p["txt_mod"]["kernel"][:, :2], "bias": p["txt_mod"]["bias"][:2]}
    li, lt = jax.jit(last.apply)({"params": lp}, img, txt, vec, img_pos, txt_pos)
    np.testing.assert_allclose(li, out_img, atol=1e-6)
    np.testing.assert_array_equal(lt, txt)


# ----------------------------------------------------------------------------- token layout
def test_subtoken_layout_and_id_round_trip():
    z = jnp.arange(8.0).reshape(1, 1, 8)
    sub = to_subtokens(z, 4)            # G = 2: sub-token h holds channels h, h + 2, h + 4, h + 6
    assert np.asarray(sub)[0, 0].tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    np.testing.assert_array_equal(from_subtokens(sub), z)
    bits = np.zeros((1, 1, 8), bool)
    bits[0, 0, [0, 3, 6]] = True        # sub-token 0: channels 0, 6 -> k = 0, 3; sub-token 1: channel 3 -> k = 1
    assert bits_to_ids(bits, 4).tolist() == [[1 + 8, 2]]
    rng = np.random.default_rng(0)
    for tb, ib in ((18, 18), (56, 14), (8, 4)):
        bits = rng.random((3, 5, tb)) > 0.5
        ids = bits_to_ids(bits, ib)
        assert ids.shape == (3, 5 * tb // ib) and ids.max() < 2 ** ib
        np.testing.assert_array_equal(ids_to_bits(ids, tb, ib), bits)
    ids = rng.integers(0, 2 ** 18, (2, 7))   # lo: plain LSB-first 18-bit ids
    np.testing.assert_array_equal(bits_to_ids(ids_to_bits(ids, 18, 18), 18), ids)
    assert ids_to_bits(np.array([[5]]), 18, 18)[0, 0, :3].tolist() == [True, False, True]


def test_encode_ids_match_sign_bits_and_invert(micro):
    model, v, x, encode = micro
    codes, out = encode(v, x)
    z = _apply(model, "encode_continuous")(v, x)
    assert out.indices.shape == (2, model.num_latent_tokens) == (2, 8) and out.indices.dtype == jnp.int32
    assert model.codebook_size == 16
    np.testing.assert_array_equal(codes, np.where(np.asarray(z) > 0, 1.0, -1.0))
    np.testing.assert_array_equal(out.indices, bits_to_ids(np.asarray(z) > 0, 4))
    np.testing.assert_array_equal(_apply(model, "tokens_to_codes")(v, out.indices), codes)


def test_lfq_loss_matches_brute_force_flowmo_entropy(micro):
    """FlowMo's entropy over 4-bit sub-tokens (softmax(2 x.c / 0.1) over all 16 codes), float64."""
    model, v, x, _ = micro
    z = np.asarray(_apply(model, "encode_continuous")(v, x), np.float64)
    _, out = _apply(model, "quantize")(v, jnp.asarray(z, jnp.float32))
    sub = np.swapaxes(z.reshape(2, 4, 4, 2), -1, -2).reshape(-1, 4)      # [B*L*G, 4]
    codes = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))
    logits = 2 * sub @ codes.T / 0.1
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = lambda q: -np.sum(q * np.log(np.maximum(q, 1e-30)), -1)  # noqa: E731
    entropy = 0.0025 * (h(p).mean() - h(p.mean(0)))
    commit = 0.000625 * np.mean((z - np.sign(z)) ** 2)
    np.testing.assert_allclose(out.losses["entropy"], entropy, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(out.losses["commitment"], commit, rtol=1e-4)


# ----------------------------------------------------------------------------- decoding
def test_decode_deterministic_per_key_and_traced_guidance(micro):
    model, v, x, encode = micro
    _, out = encode(v, x)

    @jax.jit
    def decode(key, g):      # a traced guidance scale, as titok_jax.api passes it
        return model.apply(v, out.indices, key=key, steps=25, guidance_scale=g, method="decode_tokens")

    a, b, c = decode(jax.random.key(1), 1.5), decode(jax.random.key(1), 1.5), decode(jax.random.key(2), 1.5)
    assert a.shape == (2, 16, 16, 3) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    # guidance (inside its interval) changes the result; the traced scale equals the concrete one
    g3 = decode(jax.random.key(1), 3.0)
    assert np.abs(np.asarray(g3) - np.asarray(decode(jax.random.key(1), 1.0))).max() > 1e-4
    concrete = jax.jit(lambda key: model.apply(v, out.indices, key=key, steps=25, guidance_scale=3.0,
                                               method="decode_tokens"))(jax.random.key(1))
    np.testing.assert_allclose(concrete, g3, atol=1e-4)
    with pytest.raises(ValueError, match="ids"):
        model.apply(v, out.indices[:, :3], key=jax.random.key(1), steps=2, method="decode_tokens")


def test_bad_settings_raise(micro):
    with pytest.raises(ValueError, match="id_bits"):
        FlowMo(**{**MICRO, "id_bits": 3})
    with pytest.raises(ValueError, match="patch_size"):
        FlowMo(**{**MICRO, "image_size": 18})
    model, v, _, _ = micro
    with pytest.raises(ValueError, match="images"):
        model.apply(v, jnp.zeros((1, 8, 8, 3)), method="encode")


# ----------------------------------------------------------------------------- published sizes
def _reference_layout_count(bits):
    """Parameters of the official FlowMo module layout (Flux encoder + decoder, LFQ has none)."""
    def flux(h, depth, cin, hd):
        block = 2 * (h * 6 * h + 6 * h + h * 3 * h + 3 * h + 2 * hd + h * h + h + 8 * h * h + 5 * h)
        last = lambda out: h * 2 * h + 2 * h + h * out + out  # noqa: E731
        return (256 * h + h + h * h + h) + (48 * h + h) + (cin * h + h) + depth * block + last(48) + last(cin)
    return flux(768, 8, bits, 64) + flux(1152, 16, bits + 1, 96)


def _unused_in_reference(bits):
    """What the reference creates but never uses (see models/mmdit.py), which we do not create."""
    e, d = 768, 1152
    enc = ((256 * e + e + e * e + e) + 8 * 2 * (e * 6 * e + 6 * e) + bits * e          # time, adaLN, txt_in W
           + (e * e + e) + (8 * e * e + 5 * e)                                          # last img update
           + (e * 2 * e + 2 * e + 48 * e + 48) + (e * 2 * e + 2 * e))                  # img head, txt adaLN
    dec = (4 * (d * d + d) + (d * d + d) + (8 * d * d + 5 * d)                          # last txt update
           + (d * 2 * d + 2 * d + (bits + 1) * (d + 1)))                                # txt head
    return enc + dec


@pytest.mark.parametrize("variant,bits,ids,vocab", [("lo", 18, 256, 2 ** 18), ("hi", 56, 1024, 2 ** 14)])
def test_published_param_counts(variant, bits, ids, vocab):
    c = load_config_module("flowmo").get_config(variant)
    from titok_jax.models.registry import build_model
    m = build_model(c.model)
    assert (m.num_latent_tokens, m.codebook_size, m.token_size) == (ids, vocab, bits)
    params = nn.unbox(jax.eval_shape(lambda k: m.init({"params": k, "quantizer": k},
                                                      jnp.zeros((1, 256, 256, 3)))["params"], jax.random.key(0)))
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    assert count == _reference_layout_count(bits) - _unused_in_reference(bits)
    assert count == {"lo": 860_220_866, "hi": 860_293_864}[variant]      # as the config docstring says
    assert abs(_reference_layout_count(bits) - 945e6) / 945e6 < 0.002     # B2: "~945M"


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""
