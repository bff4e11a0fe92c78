"""The AR generator and its KV-cached sampler: cache == full causal forward, causality, top-k /
top-p against numpy references, temperature 0 == greedy (checked with the uncached forward), CFG
equivalences, seeds and prefix lengths."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.generators.ar import ARTransformer, ar_variant, class_step_fn, generate_tokens
from titok_jax.generators.ar_sampling import (ar_sample, filter_logits, sample_logits, top_k_mask,
                                              top_p_mask)

K, N, C = 16, 8, 3


def make_model(position_embedding="rope", **kw):
    model = ARTransformer(codebook_size=K, num_tokens=N, num_classes=C, width=32, depth=2,
                          num_heads=4, token_dropout=0.0, dropout=0.0,
                          position_embedding=position_embedding, **kw)
    variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, N), jnp.int32),
                                    jnp.zeros((1,), jnp.int32)))
    # Random values everywhere (the head is zero at init, which would make every check trivial).
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def rope_model():
    return make_model("rope")


def random_tokens(b=3, n=N, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, K, (b, n)), jnp.int32), jnp.asarray([0, 2, C][:b], jnp.int32)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_cached_decoding_equals_the_full_forward(pos):
    model, variables = make_model(pos)
    tokens, labels = random_tokens()
    full = jax.jit(model.apply)(variables, tokens, labels)
    assert full.shape == (3, N, K) and full.dtype == jnp.float32
    prev = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    decode = jax.jit(lambda p, i, c: model.apply(variables, p, labels, i, c, method="decode"))
    # One position at a time (the sampler's path) ...
    cache, steps = model.init_cache(3, N), []
    for i in range(N):
        logits, cache = decode(prev[:, i:i + 1], jnp.int32(i), cache)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
    # ... and in uneven chunks (a prefill of 3 positions, then 1, then 4).
    @jax.jit
    def chunked(prev):
        cache, chunks, start = model.init_cache(3, N), [], 0
        for size in (3, 1, 4):
            logits, cache = model.apply(variables, prev[:, start:start + size], labels, start, cache,
                                        method="decode")
            chunks.append(logits)
            start += size
        return jnp.concatenate(chunks, 1)
    np.testing.assert_allclose(chunked(prev), full, rtol=1e-5, atol=1e-5)


def test_the_forward_is_causal_and_class_conditional(rope_model):
    model, variables = rope_model
    tokens, labels = random_tokens()
    forward = jax.jit(model.apply)
    base = np.asarray(forward(variables, tokens, labels))
    j = 4
    changed = np.asarray(forward(variables, tokens.at[:, j].set((tokens[:, j] + 1) % K), labels))
    # logits[:, p] predicts t_p from t_<p: changing t_j moves positions > j only.
    np.testing.assert_array_equal(changed[:, :j + 1], base[:, :j + 1])
    assert np.all(np.abs(changed[:, j + 1:] - base[:, j + 1:]).max(axis=-1) > 1e-4)
    other = np.asarray(forward(variables, tokens, (labels + 1) % (C + 1)))
    assert np.all(np.abs(other - base).max(axis=-1) > 1e-4)  # the class reaches every position
    # A prefix of the sequence gives the same logits as the whole (FlexTok prefixes).
    np.testing.assert_allclose(forward(variables, tokens[:, :3], labels), base[:, :3],
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- filters


def np_top_k(logits, k):
    """Keep the entries >= the k-th largest value of their row (ties kept)."""
    kth = np.sort(logits, axis=-1)[..., ::-1][..., k - 1:k]
    return logits >= kth


def np_top_p(logits, p):
    """Brute force in float64: keep i iff the mass of strictly larger logits is < p (top-1 always)."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = np.zeros(logits.shape, bool)
    for r in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            above = probs[r][logits[r] > logits[r, i]].sum()
            keep[r, i] = above < p or logits[r, i] == logits[r].max()
    return keep


def test_top_k_matches_numpy_with_ties():
    logits = np.array([[3.0, 2.0, 2.0, 1.0, 0.0, 2.0],
                       [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
                       [-1.0, 4.0, 0.0, 4.0, 1.0, -2.0]], np.float32)
    for k in (1, 2, 3, 5):
        np.testing.assert_array_equal(np.asarray(top_k_mask(jnp.asarray(logits), k)),
                                      np_top_k(logits, k))
    assert np.asarray(top_k_mask(jnp.asarray(logits), 2))[0].tolist() == [1, 1, 1, 0, 0, 1]
    for k in (0, 6, 100):  # off / at least K: everything kept
        assert np.asarray(top_k_mask(jnp.asarray(logits), k)).all()
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 5, (20, 12)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(np.asarray(top_k_mask(jnp.asarray(rand), 4)), np_top_k(rand, 4))


def test_top_p_matches_numpy_including_edges():
    rng = np.random.default_rng(1)
    rand = rng.normal(size=(64, 10)).astype(np.float32) * 2
    ties = rng.integers(0, 4, (64, 10)).astype(np.float32)
    jitted = jax.jit(top_p_mask)
    for logits in (rand, ties):
        for p in (0.05, 0.3, 0.5, 0.8, 0.95):
            np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(logits), p)),
                                          np_top_p(logits, p))
    # Probabilities (0.5, 0.25, 0.25): p = 0.5 is reached by the top entry alone.
    row = jnp.log(jnp.asarray([[0.5, 0.25, 0.25]], jnp.float32))
    assert np.asarray(top_p_mask(row, 0.5)).tolist() == [[True, False, False]]
    assert np.asarray(top_p_mask(row, 0.51)).tolist() == [[True, True, True]]  # tied pair kept
    tied = jnp.asarray([[2.0, 1.0, 1.0, 0.0]])
    assert np.asarray(top_p_mask(tied, 0.6)).tolist() == [[True, True, True, False]]
    assert np.asarray(top_p_mask(tied, 0.0)).tolist() == [[True, False, False, False]]
    assert np.asarray(top_p_mask(jnp.asarray([[1.0, 1.0, 0.0]]), 0.0)).tolist() == [[True, True, False]]
    assert np.asarray(top_p_mask(tied, 1.0)).all()
    # Already-filtered entries (-inf) stay out; p may be traced.
    with_inf = jnp.asarray([[1.0, -jnp.inf, 0.5, -jnp.inf]])
    assert np.asarray(jax.jit(top_p_mask)(with_inf, 1.0)).tolist() == [[True, False, True, False]]
    assert np.asarray(jax.jit(top_p_mask)(with_inf, 0.3)).tolist() == [[True, False, False, False]]


def test_filters_compose_top_k_then_top_p_and_sampling_follows_them():
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0]])
    f = np.asarray(filter_logits(logits, top_k=3, top_p=0.6))
    # top-3 renormalised: (0.506, 0.307, 0.186): mass above 1.5 is 0.506 < 0.6, above 1.0 is 0.81
    assert np.isfinite(f).tolist() == [[True, True, False, False, False]]
    # The sampler draws from softmax(filtered logits / T): empirical frequencies match.
    keys = jax.random.split(jax.random.key(0), 10000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(k, logits[0], 0.7, 3, 0.9)))(keys))
    expected = np.exp(np.asarray(filter_logits(logits[0] / 0.7, 3, 0.9), np.float64))
    expected /= expected.sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / draws.size, expected, atol=0.015)
    assert expected[3] == 0 and expected[4] == 0


# --------------------------------------------------------------------------- sampler


def greedy_uncached(model, variables, labels, length, guidance=None):
    """Greedy rollout with the uncached full forward (re-run on the whole prefix each step)."""
    b = labels.shape[0]
    forward = jax.jit(lambda t, y: model.apply(variables, t, y))
    null = jnp.full_like(labels, model.null_label)
    tokens = np.zeros((b, length), np.int32)  # position i only sees tokens < i
    for i in range(length):
        logits = np.asarray(forward(jnp.asarray(tokens), labels))[:, i]
        if guidance is not None:
            unc = np.asarray(forward(jnp.asarray(tokens), null))[:, i]
            logits = unc + guidance * (logits - unc)
        tokens[:, i] = np.argmax(logits, -1)
    return tokens


LABELS = jnp.asarray([0, 1, 2, C], jnp.int32)   # one batch shape for every sampler test
GUIDED = dict(guidance_scale=2.5, top_k=8)       # static settings shared by the guided calls


def test_temperature_zero_is_greedy(rope_model):
    model, variables = rope_model
    greedy = greedy_uncached(model, variables, LABELS, N)
    for seed in (0, 1):
        np.testing.assert_array_equal(generate_tokens(model, variables, LABELS, jax.random.key(seed),
                                                      temperature=0.0), greedy)
    guided = greedy_uncached(model, variables, LABELS, N, guidance=2.5)
    assert not np.array_equal(guided, greedy)
    for t, p in ((0.0, 1.0), (1e-4, 0.9)):  # T = 0, and the T -> 0 limit with top-k / top-p on
        np.testing.assert_array_equal(generate_tokens(model, variables, LABELS, jax.random.key(2),
                                                      temperature=t, top_p=p, **GUIDED), guided)


def test_guided_logits_are_the_cfg_combination(rope_model):
    model, variables = rope_model
    ids, logits = generate_tokens(model, variables, LABELS, jax.random.key(3), guidance_scale=3.0,
                                  return_logits=True)
    forward = jax.jit(model.apply)
    cond = forward(variables, ids, LABELS)  # teacher-forced on the sampled ids
    unc = forward(variables, ids, jnp.full_like(LABELS, C))
    np.testing.assert_allclose(logits, unc + 3.0 * (cond - unc), rtol=1e-4, atol=1e-4)


def test_guidance_scale_one_and_zero(rope_model):
    model, variables = rope_model
    key = jax.random.key(4)
    plain = generate_tokens(model, variables, LABELS, key)  # Python 1: no uncond rows at all
    # A traced 1.0 runs the batched [cond; uncond] call and combines: same samples.
    traced = jax.jit(lambda s: ar_sample(class_step_fn(model, variables, LABELS),
                                         lambda rows: model.init_cache(rows, N), key, 4, N,
                                         guidance_scale=s))(jnp.float32(1.0))
    np.testing.assert_array_equal(traced, plain)
    # Scale 0 is the unconditional model.
    null = generate_tokens(model, variables, jnp.full_like(LABELS, C), key)
    np.testing.assert_array_equal(generate_tokens(model, variables, LABELS, key, guidance_scale=0.0),
                                  null)
    assert not np.array_equal(null, plain)


def test_seeds_and_prefix_lengths(rope_model):
    model, variables = rope_model
    a, b, c = (np.asarray(generate_tokens(model, variables, LABELS, jax.random.key(seed), top_p=0.95,
                                          **GUIDED)) for seed in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and a.shape == (4, N) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < K
    # Generating k positions gives the first k of the full sample (position i draws fold_in(key, i)).
    short = generate_tokens(model, variables, LABELS, jax.random.key(5), max_len=3, top_p=0.95, **GUIDED)
    np.testing.assert_array_equal(short, a[:, :3])
    with pytest.raises(ValueError, match="max_len"):
        generate_tokens(model, variables, LABELS, jax.random.key(5), max_len=N + 1)
    with pytest.raises(ValueError, match="top_k"):
        generate_tokens(model, variables, LABELS, jax.random.key(5), top_k=-1)


def test_variants_and_errors():
    assert ar_variant("flextok_d30")["width"] == 1920 and ar_variant("flextok_d30")["num_heads"] == 30
    with pytest.raises(ValueError, match="unknown AR variant"):
        ar_variant("huge")
    with pytest.raises(ValueError, match="unknown ARTransformer fields"):
        ar_variant("tiny", wdth=3)
    model, variables = make_model()
    with pytest.raises(ValueError, match="tokens must be"):
        model.apply(variables, jnp.zeros((1, N + 1), jnp.int32), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="position_embedding"):
        ARTransformer(codebook_size=K, num_tokens=N, position_embedding="alibi").init(
            jax.random.key(0), jnp.zeros((1, N), jnp.int32), jnp.zeros((1,), jnp.int32))


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
