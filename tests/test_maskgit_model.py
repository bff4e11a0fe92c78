"""MaskGIT generator model and training pieces (titok_jax.generators.maskgit / masking): parameter
counts of the published variants, a float64 numpy reference of the tiny ViT (post-LN BERT) and U-ViT
forward passes (vocabulary layout, class token first, skips), bidirectional attention, the mask
schedules, training masks, class dropout, the loss against numpy, and a tiny memorisation run that
the sampler then reproduces."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from titok_jax.generators import (GENERATOR_VARIANTS, MaskGITTransformer, apply_mask,
                                  drop_classes, generate_tokens, generator_variant, mask_ratio,
                                  maskgit_loss, num_masked, training_mask)
from titok_jax.nn import LOGICAL_AXES


def _count(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def numpy_variables(model, seed=0, std=0.02):
    """Variables shaped like ``model.init``'s, filled in numpy: N(0, std) kernels and tables, zero
    biases, unit norm scales (the official init for std 0.02). Compiling the initialisers
    (threefry) costs seconds of CPU per model; ``jax.eval_shape`` costs nothing."""
    n = model.num_tokens
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, n), jnp.int32),
                                     jnp.zeros((1,), jnp.int32)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _init(name, std=0.02, **overrides):
    model = MaskGITTransformer(**generator_variant(name, **overrides))
    return model, numpy_variables(model, std=std)


def _apply(model):
    """``model.apply`` under ``jax.jit`` (one compile instead of eager op-by-op dispatch)."""
    return jax.jit(model.apply, static_argnames=("train",))


# --------------------------------------------------------------------------- sizes


def _bert_count(k, n, c, d, depth, ffn):
    """HF BertModel(add_pooling_layer=False) + lm_head, by hand."""
    emb = (k + c + 2) * d + (n + 1) * d + 2 * d + 2 * d
    layer = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 4 * d
    return emb + depth * layer + d * k + k


def _uvit_count(k, n, c, d, depth, ffn):
    block = 2 * d + (3 * d * d) + (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d)
    skips = (depth // 2) * (2 * d * d + d)
    return (k + c + 2) * d + (n + 1) * d + (depth + 1) * block + skips + 2 * d + d * k + k


@pytest.mark.parametrize("name,expected", [
    ("titok_l32", _bert_count(4096, 32, 1000, 768, 24, 3072)),
    ("titok_b64", _bert_count(4096, 64, 1000, 768, 24, 3072)),
    ("titok_s128", _uvit_count(4096, 128, 1000, 1024, 20, 4096)),
])
def test_published_param_counts(name, expected):
    model = MaskGITTransformer(**generator_variant(name))
    n = model.num_tokens
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, n), jnp.int32),
                            jnp.zeros((1,), jnp.int32))
    count = _count(nn.unbox(shapes))
    assert count == expected
    if name != "titok_s128":
        assert count == (177_202_432 if n == 32 else 177_227_008)
        assert abs(count / 1e6 - 177) < 0.5          # HF card: 177M
    else:
        assert count == 294_990_848                   # 21 blocks + 10 skip linears


def test_variant_table_and_errors():
    assert {"tiny", "titok_l32", "titok_b64", "titok_s128"} <= set(GENERATOR_VARIANTS)
    assert generator_variant("titok_s128")["arch"] == "uvit"
    assert generator_variant("tiny", width=32)["width"] == 32
    with pytest.raises(ValueError, match="unknown generator variant"):
        generator_variant("huge")
    with pytest.raises(ValueError, match="unknown MaskGITTransformer fields"):
        generator_variant("tiny", widht=3)


def test_logical_names_and_vocabulary():
    model = MaskGITTransformer(**generator_variant("tiny"))
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32), jnp.int32),
                               jnp.zeros((1,), jnp.int32))
    assert model.mask_id == 64 and model.null_label == 10 and model.vocab_size == 64 + 10 + 2
    for leaf in jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(
            x, nn.LogicallyPartitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == len(leaf.value.shape)
        assert set(n for n in leaf.names if n) <= LOGICAL_AXES
    assert nn.unbox(variables)["params"]["word_embeddings"].shape == (76, 64)


def test_input_errors():
    model, variables = _init("tiny")
    ok_tokens, ok_labels = jnp.zeros((2, 32), jnp.int32), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="tokens must be"):
        model.apply(variables, jnp.zeros((2, 33), jnp.int32), ok_labels)
    with pytest.raises(ValueError, match="labels must be"):
        model.apply(variables, ok_tokens, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="integer ids"):
        model.apply(variables, ok_tokens.astype(jnp.float32), ok_labels)
    with pytest.raises(ValueError, match="unknown MaskGIT arch"):
        MaskGITTransformer(**generator_variant("tiny", arch="gpt")).apply(
            variables, ok_tokens, ok_labels)


# --------------------------------------------------------------------------- numpy reference


def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _attn(x, p, fused):
    if fused:
        qkv = np.einsum("btd,dkhe->btkhe", x, p["qkv"]["kernel"])
        if "bias" in p["qkv"]:
            qkv = qkv + p["qkv"]["bias"]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
        q, k, v = (np.einsum("btd,dhe->bthe", x, p[n]["kernel"]) + p[n]["bias"]
                   for n in ("query", "key", "value"))
    s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)                    # no mask: fully bidirectional
    y = np.einsum("bhqk,bkhe->bqhe", a, v)
    return np.einsum("bqhe,hed->bqd", y, p["out"]["kernel"]) + p["out"]["bias"]


def _mlp(x, p):
    h = _gelu(x @ p["fc_in"]["kernel"] + p["fc_in"]["bias"])
    return h @ p["fc_out"]["kernel"] + p["fc_out"]["bias"]


def _reference(params, tokens, labels, k, arch, depth):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    ids = np.concatenate([(labels + k + 1)[:, None], tokens], 1)   # class token first
    x = p["word_embeddings"][ids] + p["position_embeddings"]["embedding"][: ids.shape[1]]
    if arch == "vit":                                               # HF BERT, post-LN
        x = _ln(x + p["token_type_embeddings"][0], p["embeddings_ln"], 1e-12)
        for i in range(depth):
            lp = p[f"layer_{i}"]
            x = _ln(x + _attn(x, lp["attn"], fused=False), lp["attn_ln"], 1e-12)
            x = _ln(x + _mlp(x, lp["mlp"]), lp["mlp_ln"], 1e-12)
    else:                                                           # U-ViT, pre-LN, long skips
        def block(x, bp):
            x = x + _attn(_ln(x, bp["ln_1"], 1e-5), bp["attn"], fused=True)
            return x + _mlp(_ln(x, bp["ln_2"], 1e-5), bp["mlp"])
        skips = []
        for i in range(depth // 2):
            x = block(x, p[f"in_blocks_{i}"])
            skips.append(x)
        x = block(x, p["mid_block"])
        for i in range(depth // 2):
            sl = p[f"out_blocks_{i}_skip_linear"]
            x = np.concatenate([x, skips.pop()], -1) @ sl["kernel"] + sl["bias"]
            x = block(x, p[f"out_blocks_{i}"])
        x = _ln(x, p["norm"], 1e-5)
    return x[:, 1:] @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]


@pytest.mark.parametrize("name,depth", [("tiny", 2), ("tiny_uvit", 2)])
def test_forward_matches_numpy_reference(name, depth):
    model, variables = _init(name, depth=depth, num_tokens=6)
    apply = _apply(model)
    params = nn.unbox(variables)["params"]
    # perturb LayerNorm/bias params so every term is exercised
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map(
        lambda leaf: leaf + jnp.asarray(0.05 * rng.normal(size=leaf.shape), leaf.dtype), params)
    if name == "tiny_uvit":
        assert "bias" not in params["mid_block"]["attn"]["qkv"]          # qkv_bias=False
        assert len([k for k in params if k.startswith("out_blocks") and "skip" in k]) == depth // 2
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65, (3, 6)).astype(np.int32)               # incl. the mask id 64
    labels = np.array([0, 9, 10], np.int32)                              # 10 = null class
    got = apply({"params": params}, jnp.asarray(tokens), jnp.asarray(labels))
    want = _reference(params, tokens, labels, 64, model.arch, depth)
    assert got.shape == (3, 6, 64) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny_uvit"])
def test_bidirectional_and_class_conditioning(name):
    model, variables = _init(name, std=0.2, num_tokens=8)
    apply = _apply(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
    labels = jnp.array([3, 3], jnp.int32)
    base = apply(variables, tokens, labels)
    last = apply(variables, tokens.at[:, -1].set(64), labels)     # mask the last token
    assert not np.allclose(base[:, 0], last[:, 0])                      # first position sees it
    other = apply(variables, tokens, jnp.array([4, 10], jnp.int32))
    assert not np.allclose(base[:, 0], other[:, 0])                     # the class token matters
    shorter = apply(variables, tokens[:, :5], labels)             # N <= num_tokens
    assert shorter.shape == (2, 5, 64)


def test_dropout_only_in_training():
    model, variables = _init("tiny", dropout=0.5, attention_dropout=0.5)
    apply = _apply(model)
    tokens, labels = jnp.zeros((2, 32), jnp.int32), jnp.zeros((2,), jnp.int32)
    a = apply(variables, tokens, labels)
    np.testing.assert_array_equal(a, apply(variables, tokens, labels))
    b = apply(variables, tokens, labels, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)


# --------------------------------------------------------------------------- masking


def test_mask_ratio_schedules_at_hand_points():
    t = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(mask_ratio(t, "arccos"), [1.0, 2 / 3, 0.0], atol=1e-6)
    np.testing.assert_allclose(mask_ratio(t, "cosine"), [1.0, 0.5 ** 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(mask_ratio(jnp.array([0.25]), "linear"), [0.75], atol=1e-7)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        mask_ratio(t, "square")


def test_num_masked_hand_cases():
    # 32 * 2/3 = 21.33 -> 21; t = 1 -> ratio clipped to 1e-6 -> at least 1; t = 0 -> all
    np.testing.assert_array_equal(num_masked(jnp.array([0.5, 1.0, 0.0]), 32), [21, 1, 32])
    # round half to even, as torch.round: 1.5 -> 2, 2.5 -> 2
    np.testing.assert_array_equal(num_masked(jnp.array([0.5]), 3, "linear"), [2])
    np.testing.assert_array_equal(num_masked(jnp.array([0.5]), 5, "linear"), [2])


def test_training_mask_counts_and_distribution():
    key = jax.random.key(3)
    mask = np.asarray(training_mask(key, 4096, 64))
    t = jax.random.uniform(jax.random.split(key)[0], (4096,))
    np.testing.assert_array_equal(mask.sum(1), num_masked(t, 64))       # exact counts per row
    assert mask.sum(1).min() >= 1
    # E[arccos(U) / (pi/2)] = 2/pi; every position equally likely
    assert abs(mask.mean() - 2 / np.pi) < 0.015
    assert np.abs(mask.mean(0) - mask.mean()).max() < 0.05
    mid = mask[(mask.sum(1) >= 8) & (mask.sum(1) <= 56)][:100]          # C(64, 8) > 4e9
    assert len({r.tobytes() for r in mid}) == len(mid) > 50               # positions are random
    tokens = jnp.arange(64)[None].repeat(2, 0)
    masked = apply_mask(tokens, jnp.asarray(mask[:2]), 99)
    np.testing.assert_array_equal(masked, np.where(mask[:2], 99, np.arange(64)))


def test_class_dropout_rate():
    labels = jnp.arange(20000) % 1000
    out = np.asarray(drop_classes(jax.random.key(0), labels, 0.3, 1000))
    dropped = out == 1000
    assert abs(dropped.mean() - 0.3) < 0.015
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    np.testing.assert_array_equal(drop_classes(jax.random.key(0), labels, 0.0, 1000), labels)
    assert (np.asarray(drop_classes(jax.random.key(0), labels, 1.0, 1000)) == 1000).all()
    np.testing.assert_array_equal(drop_classes(jax.random.key(0), jnp.array([-1, 5]), 0.0, 10),
                                  [10, 5])                               # unknown -> null
    with pytest.raises(ValueError, match="class dropout"):
        drop_classes(jax.random.key(0), labels, 1.5, 1000)


# --------------------------------------------------------------------------- loss


def _loss_reference(logits, targets, mask, eps, w_unmasked):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    k = logits.shape[-1]
    smoothed = np.full(logits.shape, eps / k) + (1 - eps) * np.eye(k)[targets]
    per = -(smoothed * logp).sum(-1)                     # CE against the smoothed distribution
    w = np.where(mask, 1.0, w_unmasked)
    return (w * per).sum() / (w.sum() + 1e-8)


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)) * 3
    targets = rng.integers(0, 7, (3, 5))
    mask = rng.random((3, 5)) < 0.5
    for eps, w in [(0.1, 0.1), (0.0, 1.0), (0.3, 0.0)]:
        got, metrics = maskgit_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                    jnp.asarray(mask), eps, w)
        np.testing.assert_allclose(got, _loss_reference(logits, targets, mask, eps, w),
                                   rtol=1e-5)
    # unmasked weight 0 and no smoothing: the mean CE over masked positions only
    z = logits - logits.max(-1, keepdims=True)
    nll = -(np.take_along_axis(z, targets[..., None], -1)[..., 0] - np.log(np.exp(z).sum(-1)))
    got, _ = maskgit_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), 0.0, 0.0)
    np.testing.assert_allclose(got, nll[mask].mean(), rtol=1e-5)
    acc = ((logits.argmax(-1) == targets) * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(metrics["masked_accuracy"], acc.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="maskgit_loss needs"):
        maskgit_loss(jnp.asarray(logits), jnp.asarray(targets[:, :4]), jnp.asarray(mask))


# --------------------------------------------------------------------------- tiny end to end


def test_tiny_memorises_one_sequence_per_class_and_the_sampler_reproduces_it():
    """Train with the official masking + loss + class dropout; then sampling each class (with
    guidance) gives back its sequence."""
    model = MaskGITTransformer(**generator_variant(
        "tiny", codebook_size=16, num_tokens=8, num_classes=2, width=32, num_heads=2))
    data = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 8)), jnp.int32)
    labels = jnp.array([0, 1] * 8, jnp.int32)
    targets = data[labels]
    params = numpy_variables(model)["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        k_mask, k_drop = jax.random.split(key)
        mask = training_mask(k_mask, 16, 8)
        lab = drop_classes(k_drop, labels, 0.1, 2)

        def loss_fn(p):
            logits = model.apply({"params": p}, apply_mask(targets, mask, model.mask_id), lab)
            return maskgit_loss(logits, targets, mask)[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(400):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    # the smoothed-target entropy (eps 0.1, 16 codes) is a floor of 0.565; class dropout adds noise
    assert losses[0] > 2.0 and min(losses[-50:]) < 0.65
    all_masked = model.apply({"params": params}, jnp.full((2, 8), model.mask_id), jnp.array([0, 1]))
    np.testing.assert_array_equal(all_masked.argmax(-1), data)
    out = generate_tokens(model, {"params": params}, jnp.array([0, 1, 1, 0]), jax.random.key(9),
                          steps=4, guidance_scale=2.0, randomize_temperature=0.5)
    np.testing.assert_array_equal(out, data[jnp.array([0, 1, 1, 0])])


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
