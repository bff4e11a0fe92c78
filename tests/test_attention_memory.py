"""Memory headroom: the chunked attention path equals the plain one (masks, biases, scale, qk-norm,
RoPE; values and gradients) and plans less temporary memory for a long sequence; the frozen
perceptual nets run in the compute dtype (bfloat16 convolutions) and stay close to float32.

On the CPU the compiler upcasts bfloat16 convolutions to float32 (the backend has no bfloat16
convolution), so the dtype check reads the program handed to XLA; on a GPU or TPU the compiled
convolutions are bfloat16 too (``test_compiled_convolutions_are_bf16_on_an_accelerator``)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.losses.perceptual import convnext_loss, lpips_distance, lpips_loss
from titok_jax.nn import MultiHeadAttention, causal_mask, dot_product_attention, padding_mask
from titok_jax.nn.attention import CHUNKED_MIN_LOGITS, attention_implementation

from test_perceptual_sharding import _images, convnext_params, lpips_params  # noqa: F401 (fixtures)


def _qkv(b, q, k, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in ((b, q, h, d), (b, k, h, d), (b, k, h, d)))


def _cases(b, q, k, h):
    rng = np.random.default_rng(1)
    mask = rng.uniform(size=(b, 1, q, k)) > 0.3
    mask[0, 0, 3] = False                                   # a fully masked row
    keys = rng.uniform(size=(b, k)) > 0.2
    return {
        "mask_bias_scale": dict(mask=jnp.asarray(mask), scale=0.3,
                                bias=jnp.asarray(rng.standard_normal((1, h, q, k)), jnp.float32)),
        "key_padding_2d_bias": dict(mask=padding_mask(np.ones((b, q), bool), keys)[:, :, :1],
                                    bias=jnp.asarray(rng.standard_normal((q, k)), jnp.float32)),
        "causal_2d": dict(mask=causal_mask(q)[0, 0]),
    }


@pytest.mark.parametrize("case", list(_cases(2, 40, 40, 3)))
def test_chunked_equals_plain_values_and_grads(case):
    b, q, k, h, d = 2, 40, 40, 3, 8                        # 40 queries: blocks of 16, padded
    kw = _cases(b, q, k, h)[case]
    qkv = _qkv(b, q, k, h, d)

    @jax.jit
    def both(q, k, v, kw):
        out = []
        for impl in ("plain", "chunked"):
            f = lambda *a: dot_product_attention(*a, implementation=impl, query_chunk_size=16, **kw)
            loss = lambda *a: jnp.sum(jnp.sin(f(*a)))
            out.append((f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
        return out

    (y0, g0), (y1, g1) = both(*qkv, kw)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    for a, b_ in zip(g1, g0):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(y1)).all()


def test_chunked_module_with_qk_norm_rope_and_bias_equals_plain():
    b, t, width, h = 2, 40, 24, 3
    x = jax.random.normal(jax.random.key(0), (b, t, width))
    pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    bias = jax.random.normal(jax.random.key(1), (1, h, t, t))
    mask = causal_mask(t)
    common = dict(num_heads=h, qk_norm="rmsnorm", use_rope=True, scale=0.2, fused_qkv=False)
    plain = MultiHeadAttention(implementation="plain", **common)
    chunked = MultiHeadAttention(implementation="chunked", query_chunk_size=16, **common)
    shapes = jax.eval_shape(plain.init, jax.random.key(2), x, positions=pos, mask=mask, bias=bias)
    rng = np.random.default_rng(2)
    v = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32),
                     nn.unbox(shapes))
    y0, y1 = jax.jit(lambda v, x: [m.apply(v, x, positions=pos, mask=mask, bias=bias)
                                   for m in (plain, chunked)])(v, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)


def test_chunked_dropout_keeps_the_expected_scale():
    q, k, v = _qkv(1, 64, 64, 2, 8)
    drop, base = jax.jit(lambda q, k, v: [
        dot_product_attention(q, k, v, implementation="chunked", query_chunk_size=16, **kw)
        for kw in (dict(dropout_rate=0.5, dropout_rng=jax.random.key(0)), {})])(q, k, v)
    assert drop.shape == base.shape and np.isfinite(np.asarray(drop)).all()
    assert not np.allclose(drop, base, atol=1e-3)


def test_automatic_choice_and_bad_names():
    assert attention_implementation(4352, 4352) == "chunked"             # FlowMo's sequence
    assert attention_implementation(320, 320) == "plain"                 # TiTok-B/64 at 256 px
    assert attention_implementation(2048, 256) == "plain"                # 2**19 logits
    assert attention_implementation(2048, 2048, "plain") == "plain"
    assert 1024 * 1024 >= CHUNKED_MIN_LOGITS
    with pytest.raises(ValueError, match="attention implementation"):
        attention_implementation(10, 10, "flash")


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
def test_chunked_attention_plans_less_temporary_memory(grad):
    s = jax.ShapeDtypeStruct((1, 2048, 2, 32), jnp.float32)     # logits 2 x 2048 x 2048: 32 MiB
    mask = jax.ShapeDtypeStruct((1, 1, 2048, 2048), jnp.bool_)

    def temp_bytes(impl):
        attend = lambda q, k, v, m: dot_product_attention(q, k, v, mask=m, implementation=impl,
                                                          query_chunk_size=256)
        f = jax.grad(lambda *a: jnp.sum(attend(*a)), argnums=(0, 1, 2)) if grad else attend
        return jax.jit(f).lower(s, s, s, mask).compile().memory_analysis().temp_size_in_bytes

    plain, chunked = temp_bytes("plain"), temp_bytes("chunked")
    assert plain >= 32 * 2 ** 20                                   # the full float32 logits
    assert chunked < plain / 3, (chunked, plain)


# ---- perceptual nets in the compute dtype ---------------------------------------------------------


def _conv_types(fn, *args):
    """Element types of every convolution's operands and result in the HLO handed to XLA."""
    hlo = jax.jit(fn).lower(*args).as_text(dialect="hlo")
    convs = [line for line in hlo.splitlines() if " convolution(" in line]
    assert convs
    return {t for line in convs for t in re.findall(r"\b(bf16|f16|f32|f64)\[", line)}


def test_lpips_in_bfloat16_matches_float32(lpips_params):
    x, y = _images(3, 16, 0)
    both = lambda p, a, b: (lpips_distance(p, a, b), lpips_distance(p, a, b, dtype="bfloat16"))
    want, got = jax.jit(both)(lpips_params, x, y)
    assert got.dtype == jnp.float32                             # the distance reduction is float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2)
    assert _conv_types(lambda p, a, b: lpips_loss(p, a, b, dtype=jnp.bfloat16),
                       lpips_params, x, y) == {"bf16"}
    assert _conv_types(lpips_loss, lpips_params, x, y) == {"f32"}    # default: float32


def test_convnext_in_bfloat16_matches_float32(convnext_params):
    x, y = _images(3, 32, 1)
    both = lambda p, a, b: (convnext_loss(p, a, b), convnext_loss(p, a, b, dtype=jnp.bfloat16))
    want, got = jax.jit(both)(convnext_params, x, y)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), float(want), rtol=3e-2)
    assert _conv_types(lambda p, a, b: convnext_loss(p, a, b, dtype=jnp.bfloat16),
                       convnext_params, x, y) == {"bf16"}


@pytest.mark.accelerator
@pytest.mark.skipif(jax.default_backend() == "cpu", reason="the CPU compiler upcasts bf16 convolutions")
def test_compiled_convolutions_are_bf16_on_an_accelerator(lpips_params):
    x, y = _images(3, 16, 0)
    text = jax.jit(lambda p, a, b: lpips_loss(p, a, b, dtype=jnp.bfloat16)).lower(
        lpips_params, x, y).compile().as_text()
    convs = [line for line in text.splitlines() if re.search(r" convolution\(|custom-call.*conv", line)]
    assert convs and all("bf16[" in line for line in convs), convs[:3]
