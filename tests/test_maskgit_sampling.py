"""MaskGIT parallel decoding (titok_jax.generators.maskgit_sampling) with stub logits functions:
the per-step mask counts of the official sampler, which tokens are kept (re-derived in numpy),
fixed tokens never change, determinism, one batched cond/uncond call, the guidance schedules at hand
points and their effect, softmax temperature annealing, the confidence variants, errors, and the
jitted class-conditional ``generate_tokens`` on the tiny models."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_maskgit_model import numpy_variables

from titok_jax.generators import (MaskGITTransformer, apply_guidance, generate_tokens,
                                  generator_variant, guidance_weight, mask_counts,
                                  maskgit_sample)

K, MASK = 16, 16


def _target_fn(target, gap=30.0, values=None):
    """Logits that put ``gap`` (or ``values[n]``) on code ``target[b, n]``, 0 elsewhere."""
    target = jnp.asarray(target)
    scale = gap if values is None else jnp.asarray(values, jnp.float32)[None, :, None]

    def fn(tokens, uncond):
        b = tokens.shape[0]
        t = jnp.tile(target, (b // target.shape[0], 1))
        return jax.nn.one_hot(t, K) * scale
    return fn


def _sample(fn, key, batch, n, mask_id=MASK, **kw):
    """``maskgit_sample`` under one ``jax.jit`` (faster than eager dispatch around the scan)."""
    return jax.jit(lambda k: maskgit_sample(fn, k, batch, n, mask_id, **kw))(key)


# --------------------------------------------------------------------------- schedule of counts


def test_mask_counts_at_hand_points():
    # floor(32 * arccos(r) / (pi/2)) for r = 1/8 .. 7/8; nothing masked after the last step
    np.testing.assert_array_equal(mask_counts(32, 8), [29, 26, 24, 21, 18, 14, 10, 0])
    # clamped to [1, #masked - 1]: progress of at least one token per step, one left until the end
    np.testing.assert_array_equal(mask_counts(4, 8), [3, 2, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(mask_counts(2, 2), [1, 0])
    np.testing.assert_array_equal(mask_counts(5, 1), [0])
    c = mask_counts(128, 64)
    assert c[0] == 126 and c[-1] == 0 and (np.diff(c) < 0).all()
    np.testing.assert_array_equal(mask_counts(8, 2, "linear"), [4, 0])  # 8 * (1 - 1/2)
    with pytest.raises(ValueError, match="steps and num_tokens"):
        mask_counts(8, 0)


# --------------------------------------------------------------------------- decoding


def test_right_tokens_no_mask_left_and_counts_follow_schedule():
    target = np.random.default_rng(0).integers(0, K, (3, 32))
    out, trace = _sample(_target_fn(target), jax.random.key(0), 3, 32, MASK, steps=8,
                                randomize_temperature=1.0, return_trace=True)
    np.testing.assert_array_equal(out, target)
    assert out.dtype == jnp.int32 and not (np.asarray(out) == MASK).any()
    np.testing.assert_array_equal(trace["num_masked"],
                                  np.repeat(mask_counts(32, 8)[:, None], 3, 1))
    tokens = np.asarray(trace["tokens"])
    np.testing.assert_array_equal(tokens[-1], out)
    for s in range(7):     # a token fixed at step s keeps its value at every later step
        fixed = tokens[s] != MASK
        for later in range(s + 1, 8):
            np.testing.assert_array_equal(tokens[later][fixed], tokens[s][fixed])


def test_init_tokens_are_kept_fixed():
    target = np.random.default_rng(3).integers(0, K, (2, 12))
    init = np.full((2, 12), MASK)
    init[0, [1, 5]] = [7, 9]
    init[1, 0] = 3
    out = _sample(_target_fn(target), jax.random.key(0), 2, 12, steps=4,
                  init_tokens=jnp.asarray(init))
    want = np.where(init == MASK, target, init)
    np.testing.assert_array_equal(out, want)


def test_most_confident_are_kept_numpy_rederivation():
    """Temperature 0: the sampled code is the argmax and the confidence its logit, so after step
    ``s`` exactly the ``m_s`` least confident positions are still masked."""
    n, steps = 12, 5
    rng = np.random.default_rng(1)
    values = rng.permutation(n).astype(np.float32) + 1.0      # distinct confidences per position
    target = rng.integers(0, K, (2, n))
    _, trace = _sample(_target_fn(target, values=values), jax.random.key(0), 2, n, MASK,
                              steps=steps, randomize_temperature=0.0, return_trace=True)
    order = np.argsort(values)                                  # least confident first
    for s, m in enumerate(mask_counts(n, steps)):
        want = np.where(np.isin(np.arange(n), order[:m]), MASK, target)
        np.testing.assert_array_equal(trace["tokens"][s], want)


def test_confidence_logits_vs_log_probs():
    """Position 0: logits [5, 5] (top logit 5, log p = log 1/2); position 1: [3, 0]
    (log p = -log(1 + e^-3) ~ -0.05). The official confidence (raw logit) re-masks position 1
    after step 0; the log-prob confidence re-masks position 0."""
    logits = jnp.array([[[5.0, 5.0], [3.0, 0.0]]])

    def fn(tokens, uncond):
        return jnp.broadcast_to(logits, (tokens.shape[0], 2, 2))
    for conf, masked_pos in (("logits", 1), ("log_probs", 0)):
        _, tr = _sample(fn, jax.random.key(0), 1, 2, 2, steps=2, randomize_temperature=0.0,
                               confidence=conf, return_trace=True)
        np.testing.assert_array_equal(np.asarray(tr["tokens"][0, 0]) == 2, np.arange(2) == masked_pos)


def test_seeds_and_temperature():
    def flat(tokens, uncond):
        return jnp.zeros((tokens.shape[0], tokens.shape[1], K))
    sample = jax.jit(lambda key, tau=2.0: maskgit_sample(flat, key, 4, 16, MASK, steps=4,
                                                         randomize_temperature=tau))
    a, b, c = sample(jax.random.key(1)), sample(jax.random.key(1)), sample(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(np.asarray(a))) > 4                     # flat logits: varied codes
    cold = sample(jax.random.key(1), 0.0)                       # same compile, traced tau
    np.testing.assert_array_equal(cold, 0)                       # T = 0: argmax (first code)


def test_softmax_temperature_annealing_equals_prescaled_logits():
    """Annealing divides the step-``s`` logits by ``0.5 + 0.8 (1 - r)``; a stub that divides by
    itself (it reads the step off the number of masked tokens) gives the same samples."""
    n, steps = 32, 4
    base = jax.random.normal(jax.random.key(5), (4, n, K)) * 2
    counts = np.concatenate([[n], mask_counts(n, steps)[:-1]])   # #masked when step s starts

    def fn(tokens, uncond):
        return base

    def prescaled(tokens, uncond):
        masked = jnp.sum(tokens[0] == MASK)
        s = jnp.argmax(jnp.asarray(counts) == masked)
        ratio = (s + 1).astype(jnp.float32) / steps
        return base / (0.5 + 0.8 * (1.0 - ratio))
    kw = dict(steps=steps, randomize_temperature=6.0)
    key = jax.random.key(3)
    annealed = _sample(fn, key, 4, n, MASK, softmax_temperature_annealing=True, **kw)
    manual = _sample(prescaled, key, 4, n, MASK, **kw)
    plain = _sample(fn, key, 4, n, MASK, **kw)
    np.testing.assert_array_equal(annealed, manual)
    assert (np.asarray(annealed) != np.asarray(plain)).sum() >= 5


def test_jit_scan_traces_logits_fn_once():
    calls = []

    def fn(tokens, uncond):
        calls.append(tokens.shape)
        return jnp.zeros((tokens.shape[0], tokens.shape[1], K))
    jaxpr = jax.make_jaxpr(lambda k: maskgit_sample(fn, k, 2, 8, MASK, steps=16))(jax.random.key(0))
    assert "scan" in str(jaxpr) and calls == [(2, 8)]


# --------------------------------------------------------------------------- guidance


def test_guidance_weights_at_hand_points():
    np.testing.assert_allclose(guidance_weight("constant", 4.5, jnp.arange(3), 8), 4.5)
    np.testing.assert_allclose(guidance_weight("linear", 4.5, jnp.array([0, 4, 7]), 8),
                               [0.0, 2.25, 3.9375])
    # (6.9 - 1) * (1 - cos(pi * f^3)) / 2 + 1 at f = 0, 1/2, 1
    np.testing.assert_allclose(guidance_weight("power-cosine", 6.9, jnp.array([0, 32, 64]), 64),
                               [1.0, 5.9 * (1 - math.cos(math.pi / 8)) / 2 + 1, 6.9], rtol=1e-6)
    np.testing.assert_allclose(guidance_weight("power-cosine", 3.0, 1, 2, power=1.0), 2.0)
    c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, 3.0])
    np.testing.assert_allclose(apply_guidance(c, u, 2.0, "constant"), [2.0, 0.0])   # c + 2(c-u)
    np.testing.assert_allclose(apply_guidance(c, u, 2.0, "power-cosine"), [1.5, 1.0])  # u + 2(c-u)
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        guidance_weight("cosine", 1.0, 0, 8)


def _cfg_fn(calls=None):
    """cond prefers code 1 ([0, 1, .9]); uncond [0, 1.5, 0]; ``c + w (c - u)`` prefers code 2 as
    soon as ``w > 0.1/1.4``."""
    cond = jnp.zeros((K,)).at[1].set(1.0).at[2].set(0.9)
    uncond = jnp.zeros((K,)).at[1].set(1.5)

    def fn(tokens, uncond_flags):
        if calls is not None:
            calls.append((tokens.shape, uncond_flags))
        rows = jnp.where(uncond_flags[:, None], uncond, cond)
        return jnp.broadcast_to(rows[:, None, :], (*tokens.shape, K))
    return fn


def test_guided_one_batched_call_and_effect():
    calls = []
    out = _sample(_cfg_fn(calls), jax.random.key(0), 3, 8, MASK, steps=4,
                  guidance_scale=1.0, randomize_temperature=0.0)
    assert len(calls) == 1 and calls[0][0] == (6, 8)             # traced once, [ids; ids]
    assert calls[0][1].shape == (6,)
    # code 2 needs cond rows first and uncond rows second (swapped flags would give code 1)
    np.testing.assert_array_equal(out, 2)
    unguided = _sample(_cfg_fn(), jax.random.key(0), 3, 8, MASK, steps=4,
                              randomize_temperature=0.0)
    np.testing.assert_array_equal(unguided, 1)


@pytest.mark.parametrize("schedule", ["constant"])
def test_guidance_scale_zero_equals_unguided(schedule):
    """A traced 0 takes the two-pass path; the result equals the single-pass unguided sampler."""
    target = np.random.default_rng(2).integers(0, K, (2, 16))
    base = jax.random.normal(jax.random.key(1), (2, 16, K))

    def fn(tokens, uncond):
        rows = jnp.tile(base, (tokens.shape[0] // 2, 1, 1))
        return rows + 3.0 * uncond[:, None, None] * jax.nn.one_hot(jnp.tile(target, (tokens.shape[0] // 2, 1)), K)
    kw = dict(steps=6, randomize_temperature=2.0, guidance_schedule=schedule)
    guided = jax.jit(lambda s: maskgit_sample(fn, jax.random.key(4), 2, 16, MASK,
                                              guidance_scale=s, **kw))(jnp.float32(0.0))
    plain = _sample(fn, jax.random.key(4), 2, 16, MASK, guidance_scale=0.0, **kw)
    np.testing.assert_array_equal(guided, plain)


def test_linear_schedule_starts_unguided():
    """Linear: step 0 uses w = 0 (cond's code 1), later steps w = g s / S > 0 (code 2)."""
    n, steps = 16, 4
    out, trace = _sample(_cfg_fn(), jax.random.key(0), 2, n, MASK, steps=steps,
                                guidance_scale=8.0, guidance_schedule="linear",
                                randomize_temperature=0.0, return_trace=True)
    np.testing.assert_allclose(trace["guidance"], [0.0, 2.0, 4.0, 6.0])
    fixed_at_0 = n - mask_counts(n, steps)[0]
    np.testing.assert_array_equal((np.asarray(out) == 1).sum(1), fixed_at_0)
    np.testing.assert_array_equal((np.asarray(out) == 2).sum(1), n - fixed_at_0)
    _, pc = _sample(_cfg_fn(), jax.random.key(0), 2, n, MASK, steps=steps,
                           guidance_scale=8.0, guidance_schedule="power-cosine",
                           randomize_temperature=0.0, return_trace=True)
    np.testing.assert_allclose(pc["guidance"], guidance_weight("power-cosine", 8.0,
                                                               jnp.arange(4), 4), rtol=1e-6)


# --------------------------------------------------------------------------- errors and model


def test_errors():
    fn = _target_fn(np.zeros((1, 4), int))
    with pytest.raises(ValueError, match="mask_id 3 is a valid code"):
        maskgit_sample(fn, jax.random.key(0), 1, 4, 3)
    with pytest.raises(ValueError, match=r"logits_fn must return \[1, 5, K\]"):
        maskgit_sample(fn, jax.random.key(0), 1, 5, MASK)
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        maskgit_sample(fn, jax.random.key(0), 1, 4, MASK, guidance_schedule="cos")
    with pytest.raises(ValueError, match="unknown confidence"):
        maskgit_sample(fn, jax.random.key(0), 1, 4, MASK, confidence="prob")
    with pytest.raises(ValueError, match="unknown mask schedule"):
        maskgit_sample(fn, jax.random.key(0), 1, 4, MASK, mask_schedule="sqrt")
    with pytest.raises(ValueError, match=r"init_tokens must be \[1, 4\]"):
        maskgit_sample(fn, jax.random.key(0), 1, 4, MASK, init_tokens=jnp.zeros((1, 5), int))


@pytest.mark.parametrize("name,schedule", [("tiny", "linear"), ("tiny_uvit", "power-cosine")])
def test_generate_tokens_with_tiny_models(name, schedule):
    model = MaskGITTransformer(**generator_variant(name, num_tokens=8))
    variables = numpy_variables(model, std=0.2)
    labels = jnp.array([0, 3, 10])                               # 10 = null class
    a = generate_tokens(model, variables, labels, jax.random.key(1), steps=4,
                        guidance_scale=2.0, guidance_schedule=schedule,
                        randomize_temperature=2.0)
    b = generate_tokens(model, variables, labels, jax.random.key(1), steps=4,
                        guidance_scale=2.0, guidance_schedule=schedule,
                        randomize_temperature=2.0)
    assert a.shape == (3, 8) and a.dtype == jnp.int32
    assert ((np.asarray(a) >= 0) & (np.asarray(a) < model.codebook_size)).all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_generate_tokens_batch_sharded_on_explicit_mesh():
    """Labels sharded over an Explicit 8-device mesh: the samples stay sharded like the batch and
    equal the single-device ones (same noise)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    model = MaskGITTransformer(**generator_variant("tiny", num_tokens=8))
    variables = numpy_variables(model, std=0.2)
    labels = jnp.arange(16) % 11
    kw = dict(steps=3, guidance_scale=1.5, randomize_temperature=2.0)
    want = generate_tokens(model, variables, labels, jax.random.key(2), **kw)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        sharded = jax.device_put(labels, NamedSharding(mesh, P("data")))
        got = generate_tokens(model, variables, sharded, jax.random.key(2), **kw)
        assert got.sharding.spec[0] == "data"
    np.testing.assert_array_equal(got, want)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
