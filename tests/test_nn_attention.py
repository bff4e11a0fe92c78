"""titok_jax.nn.attention against float64 numpy references; masks block exactly what they claim."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from titok_jax.nn import (MultiHeadAttention, apply_rope, causal_mask, combine_masks,
                          dot_product_attention, padding_mask, prefix_causal_mask, rope_angles,
                          segment_mask)

B, T, D, H = 2, 6, 8, 2


def _params(variables):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                  nn.unbox(variables)["params"])


def _random_variables(m, *args, std=0.5, seed=0, **kwargs):
    """Random float32 params with the module's param shapes (``eval_shape``: no init compile)."""
    shapes = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32), shapes)


def _np_norm(x, kind, eps, p=None):
    if kind == "layernorm":
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    else:
        y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    if p is not None:
        y = y * p["scale"] + p.get("bias", 0.0)
    return y


def _np_rope(x, pos, axes_dims, theta=10000.0, interleaved=True):
    """x [B,T,H,Dh]; pos [B|1,T] or [B|1,T,A]; explicit per-pair rotation loop."""
    pos = np.asarray(pos, np.float64)
    if pos.ndim == 2:
        pos = pos[..., None]
    angles = []
    for a, d in enumerate(axes_dims):
        for j in range(d // 2):
            angles.append(pos[..., a] * theta ** (-2.0 * j / d))
    ang = np.stack(angles, -1)          # [B, T, R]
    r = ang.shape[-1]
    y = np.array(x, np.float64)
    for i in range(r):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + r)
        c, s = np.cos(ang[..., i])[..., None], np.sin(ang[..., i])[..., None]
        y[..., a] = x[..., a] * c - x[..., b] * s
        y[..., b] = x[..., a] * s + x[..., b] * c
    return y


def _np_attention(p, x, ctx=None, mask=None, scale=None, qk_norm=None, eps=1e-6,
                  rope=None, kv_pos=None):
    x = np.asarray(x, np.float64)
    ctx = x if ctx is None else np.asarray(ctx, np.float64)
    if "qkv" in p:
        w, bqkv = p["qkv"]["kernel"], p["qkv"].get("bias", 0.0)
        qkv = np.einsum("btd,dshk->tbshk", x, w) + bqkv   # t first just to index s
        q, k, v = qkv[:, :, 0].transpose(1, 0, 2, 3), qkv[:, :, 1].transpose(1, 0, 2, 3), \
            qkv[:, :, 2].transpose(1, 0, 2, 3)
    else:
        q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"].get("bias", 0.0)
        k = np.einsum("btd,dhk->bthk", ctx, p["key"]["kernel"]) + p["key"].get("bias", 0.0)
        v = np.einsum("btd,dhk->bthk", ctx, p["value"]["kernel"]) + p["value"].get("bias", 0.0)
    if qk_norm:
        q = _np_norm(q, qk_norm, eps, p.get("q_norm"))
        k = _np_norm(k, qk_norm, eps, p.get("k_norm"))
    if rope is not None:
        pos, axes = rope
        q, k = _np_rope(q, pos, axes), _np_rope(k, pos if kv_pos is None else kv_pos, axes)
    dh = q.shape[-1]
    scale = dh ** -0.5 if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    with np.errstate(invalid="ignore"):   # fully masked rows give NaN here; never compared
        e = np.exp(logits - logits.max(-1, keepdims=True))
        wts = e / e.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhd->bqhd", wts, v)
    return np.einsum("bqhd,hde->bqe", y, p["out"]["kernel"]) + p["out"].get("bias", 0.0)


def _x(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ----------------------------------------------------------------------------- maths


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_matches_numpy(fused, bias):
    m = MultiHeadAttention(num_heads=H, fused_qkv=fused, qkv_bias=bias, out_bias=bias)
    x = _x()
    v = _random_variables(m, x)
    p = _params(v)
    assert ("qkv" in p) == fused and ("bias" in p["out"]) == bias
    np.testing.assert_allclose(m.apply(v, x), _np_attention(p, x), atol=1e-5, rtol=1e-5)


def test_cross_attention_and_scale_match_numpy():
    m = MultiHeadAttention(num_heads=H, fused_qkv=False, scale=8.0 / (D // H), out_features=5)
    x, ctx = _x(0), _x(1, (B, 3, 7))
    v = _random_variables(m, x, ctx)
    y = m.apply(v, x, ctx)
    assert y.shape == (B, T, 5)
    np.testing.assert_allclose(y, _np_attention(_params(v), x, ctx, scale=8.0 / (D // H)),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        MultiHeadAttention(num_heads=H).init(jax.random.key(0), x, ctx)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_qk_norm_matches_numpy(kind):
    m = MultiHeadAttention(num_heads=H, qk_norm=kind, qk_norm_eps=1e-6)
    x = _x()
    v = _random_variables(m, x, std=1.0)
    p = _params(v)
    assert p["q_norm"]["scale"].shape == (D // H,)
    assert ("bias" in p["q_norm"]) == (kind == "layernorm")
    want = _np_attention(p, x, qk_norm=kind, eps=1e-6)
    np.testing.assert_allclose(m.apply(v, x), want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(want, _np_attention(p, x), atol=1e-3)   # the norm does something


# ----------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("axes", [(8,), (2, 2, 4), (4,)])
def test_apply_rope_matches_numpy_rotation(interleaved, axes):
    x = _x(3, (B, T, H, 8))
    pos = (np.arange(T)[None].repeat(B, 0) * 1.5 if len(axes) == 1
           else np.random.default_rng(0).integers(0, 9, (B, T, len(axes))))
    got = apply_rope(x, rope_angles(pos, axes), interleaved=interleaved)
    want = _np_rope(np.asarray(x, np.float64), pos, axes, interleaved=interleaved)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if sum(axes) < 8:   # unrotated tail passes through
        np.testing.assert_array_equal(got[..., sum(axes):], x[..., sum(axes):])


@pytest.mark.parametrize("axes", [(8,), (2, 2, 4)])
def test_rope_dot_product_depends_only_on_position_difference(axes):
    q = _x(4, (1, 1, 1, 8))
    k = _x(5, (1, 1, 1, 8))
    n_ax = len(axes)

    def dot(m, n):
        pm = jnp.full((1, 1, n_ax), m, jnp.float32)
        pn = jnp.full((1, 1, n_ax), n, jnp.float32)
        if n_ax == 1:
            pm, pn = pm[..., 0], pn[..., 0]
        return float(jnp.sum(apply_rope(q, rope_angles(pm, axes))
                             * apply_rope(k, rope_angles(pn, axes))))

    assert dot(3, 1) == pytest.approx(dot(7, 5), abs=1e-4)
    assert dot(0, 4) == pytest.approx(dot(10, 14), abs=1e-4)
    assert dot(3, 1) != pytest.approx(dot(3, 2), abs=1e-3)


def test_attention_with_3axis_rope_matches_numpy():
    axes = (2, 2, 4)
    m = MultiHeadAttention(num_heads=1, head_dim=8, use_rope=True, rope_axes_dims=axes,
                           qk_norm="rmsnorm")
    x = _x()
    pos = jnp.asarray(np.random.default_rng(1).integers(0, 5, (1, T, 3)), jnp.float32)
    v = _random_variables(m, x, positions=pos)
    want = _np_attention(_params(v), x, qk_norm="rmsnorm", rope=(np.asarray(pos), axes))
    np.testing.assert_allclose(m.apply(v, x, positions=pos), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        m.apply(v, x)   # positions are required


def test_cross_attention_rope_uses_kv_positions():
    m = MultiHeadAttention(num_heads=H, fused_qkv=False, use_rope=True)
    x, ctx = _x(0), _x(1, (B, 3, D))
    qpos, kpos = jnp.arange(T)[None] * 1.0, jnp.asarray([[2.0, 7.0, 4.0]])
    v = _random_variables(m, x, ctx, positions=qpos, kv_positions=kpos)
    got = m.apply(v, x, ctx, positions=qpos, kv_positions=kpos)
    want = _np_attention(_params(v), x, ctx, rope=(np.asarray(qpos), (D // H,)),
                         kv_pos=np.asarray(kpos))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        MultiHeadAttention(num_heads=H, fused_qkv=False).apply(v, x, positions=qpos)  # RoPE off


# ----------------------------------------------------------------------------- masks


def test_mask_matrices_match_hand_written():
    np.testing.assert_array_equal(causal_mask(3)[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    # two patches (P) then three registers (R): P sees P only; R_i sees P and R_0..R_i.
    want = np.array([[1, 1, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 0],
                     [1, 1, 1, 1, 1]], bool)
    got = prefix_causal_mask(2, 3)
    assert got.shape == (1, 1, 5, 5) and got.dtype == bool
    np.testing.assert_array_equal(got[0, 0], want)
    want2 = want.copy()
    want2[:2] = True
    np.testing.assert_array_equal(prefix_causal_mask(2, 3, prefix_sees_suffix=True)[0, 0], want2)

    pm = padding_mask(np.array([[1, 1, 0], [1, 0, 0]], bool))
    assert pm.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(pm[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(pm[1, 0], [[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    pk = padding_mask(np.ones((1, 2), bool), np.array([[1, 0, 1]], bool))
    np.testing.assert_array_equal(pk[0, 0], [[1, 0, 1], [1, 0, 1]])

    sm = segment_mask(np.array([[0, 0, 1]]))
    np.testing.assert_array_equal(sm[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])

    assert combine_masks(None, None) is None
    np.testing.assert_array_equal(combine_masks(None, causal_mask(3)), causal_mask(3))
    both = combine_masks(causal_mask(3), pm)
    assert both.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(both[0, 0], [[1, 0, 0], [1, 1, 0], [0, 0, 0]])


def _self_attn():
    m = MultiHeadAttention(num_heads=H)
    return m, _random_variables(m, _x(), seed=7)


def _changed_rows(m, v, mask, j, x=None):
    """Perturb token j; return a bool per (batch, query) telling whether its output moved."""
    x = _x() if x is None else x
    x2 = x.at[:, j].add(1.0)
    d = np.abs(np.asarray(m.apply(v, x2, mask=mask) - m.apply(v, x, mask=mask))).max(-1)
    return d > 1e-6


def test_masked_attention_matches_numpy():
    m, v = _self_attn()
    mask = combine_masks(prefix_causal_mask(2, 4),
                         padding_mask(np.array([[1] * 6, [1] * 5 + [0]], bool)))
    got = np.asarray(m.apply(v, _x(), mask=mask))
    want = _np_attention(_params(v), _x(), mask=np.asarray(mask))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1, :5], want[1, :5], atol=1e-5, rtol=1e-5)


def test_causal_mask_blocks_future_only():
    m, v = _self_attn()
    for j in range(T):
        changed = _changed_rows(m, v, causal_mask(T), j)
        np.testing.assert_array_equal(changed, np.broadcast_to(np.arange(T) >= j, (B, T)))
    assert _changed_rows(m, v, None, T - 1).all()   # without the mask everything moves


def test_prefix_causal_mask_blocks_exactly_what_it_claims():
    m, v = _self_attn()
    n_p = 2   # tokens 0,1 = patches, 2..5 = registers
    mask = prefix_causal_mask(n_p, T - n_p)
    for j in range(T):
        changed = _changed_rows(m, v, mask, j)[0]
        if j < n_p:   # a patch moves every token (all see the patches)
            np.testing.assert_array_equal(changed, np.ones(T, bool))
        else:         # a register moves itself and later registers, never a patch
            np.testing.assert_array_equal(changed, np.arange(T) >= j)
    changed = _changed_rows(m, v, prefix_causal_mask(n_p, T - n_p, prefix_sees_suffix=True), T - 1)
    assert changed[0, :n_p].all()


def test_padding_mask_ignores_padded_keys():
    m, v = _self_attn()
    valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    mask = padding_mask(valid)
    changed = _changed_rows(m, v, mask, 4)
    assert not changed[0, :4].any()     # valid queries of sample 0 ignore padded token 4
    assert changed[1].all()             # sample 1 has token 4 valid: everyone sees it
    changed = _changed_rows(m, v, mask, 2)
    assert changed[0, :4].all()


def test_fully_masked_rows_are_finite_with_finite_grads():
    m, v = _self_attn()
    mask = padding_mask(np.zeros((B, T), bool))   # nothing may attend anywhere
    y = m.apply(v, _x(), mask=mask)
    assert np.isfinite(np.asarray(y)).all()
    # zero attention weights: the output is the output bias everywhere
    np.testing.assert_allclose(y, np.broadcast_to(nn.unbox(v)["params"]["out"]["bias"], y.shape))
    g = jax.grad(lambda p: m.apply(p, _x(), mask=mask).sum())(v)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(g))
    q = k = vv = _x(0, (1, 3, 1, 4))
    out = dot_product_attention(q, k, vv, mask=np.zeros((3, 3), bool))
    np.testing.assert_array_equal(out, np.zeros_like(out))


def test_bf16_compute_keeps_float32_softmax_and_params():
    m = MultiHeadAttention(num_heads=H, dtype=jnp.bfloat16)
    x = _x()
    v = jax.jit(m.init)(jax.random.key(1), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(nn.unbox(v)))
    y = m.apply(v, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), _np_attention(_params(v), x),
                               atol=5e-2, rtol=5e-2)


def test_attention_dropout():
    m = MultiHeadAttention(num_heads=H, dropout_rate=0.5)
    x = _x()
    v = _random_variables(m, x)
    base = MultiHeadAttention(num_heads=H).apply(v, x)
    np.testing.assert_allclose(m.apply(v, x), base, atol=1e-6)      # deterministic by default
    y = m.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(y, base, atol=1e-4)


@pytest.mark.parametrize("kind", [None, "rmsnorm"])
def test_chunked_attention_matches_numpy(kind):
    """Query blocks of 4 over T = 6 (one padded block): the same maths as the plain path, with a
    mask (a fully padded query row included) and qk-norm."""
    m = MultiHeadAttention(num_heads=H, qk_norm=kind, implementation="chunked", query_chunk_size=4)
    x = _x()
    v = _random_variables(m, x, std=1.0)
    mask = combine_masks(prefix_causal_mask(2, 4),
                         padding_mask(np.array([[1] * 6, [1] * 5 + [0]], bool)))
    got = np.asarray(m.apply(v, x, mask=mask))
    want = _np_attention(_params(v), x, mask=np.asarray(mask), qk_norm=kind, eps=1e-6)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1, :5], want[1, :5], atol=1e-5, rtol=1e-5)
    assert np.isfinite(got).all()


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
