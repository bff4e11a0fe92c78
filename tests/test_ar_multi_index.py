"""The AR generator on several sub-tokens per position (issue 17 §3; generators/ar_subtokens.py):
FQGAN's factorized head on fq ids ``[B, N, k]`` and Open-MAGVIT2's split-bit head on one LFQ index.

The losses against numpy from the model's own logits (the split-bit one also as the CE of the whole
index under the factorised distribution, built by running the head for every first group), the
head's causality, the cached sampler against the teacher-forced forward (shapes, ranges, seeds,
guidance, 2D RoPE), and end to end: a micro TiTok ``quantizer=fq`` trained 2 steps and its
``tokenize`` shards, ``configs/ar.py:tiny_factorized`` trained on them and ``titok-jax generate``
decoding the sampled ``[B, N, 2]`` ids."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax import cli
from titok_jax.generators.ar import ARTransformer, generate_tokens
from titok_jax.generators.ar_subtokens import from_subtokens, sub_vocab_sizes, to_subtokens
from titok_jax.tasks.ar import ar_loss

from conftest import MICRO_TOKENIZER_ARGS
from train_helpers import ROOT, load_config_module

MICRO = dict(num_tokens=4, num_classes=3, width=16, depth=1, num_heads=2, token_dropout=0.0,
             dropout=0.0)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


def _model(**kw):
    """A micro model and variables with every param perturbed (the heads start at zero)."""
    m = ARTransformer(**{**MICRO, **kw})

    @jax.jit
    def init():   # one program: op by op, the init alone compiles for seconds
        v = m.init(jax.random.key(0), jnp.zeros((2,) + m.token_shape, jnp.int32),
                   jnp.zeros((2,), jnp.int32))
        leaves, tree = jax.tree.flatten(v)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys)])
    return m, init()


def _logp(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def test_sub_token_layouts_and_errors():
    assert sub_vocab_sizes(16, 2) == (16, 16) and sub_vocab_sizes(2 ** 18, 1, (6, 12)) == (64, 4096)
    assert sub_vocab_sizes(1024, 1, 2) == (32, 32) and sub_vocab_sizes(64) == (64,)
    t = jnp.asarray([[0, 5, 63, 37]])
    subs = to_subtokens(t, 1, (2, 4))
    np.testing.assert_array_equal(subs[0], [[0, 0], [1, 1], [3, 15], [1, 9]])   # LSB group first
    np.testing.assert_array_equal(from_subtokens(subs, 1, (2, 4)), t)
    for args, match in (((12, 1, 2), "power of two"), ((64, 1, (2, 3)), "summing to the 6 bits"),
                        ((64, 1, 4), "must divide"), ((64, 2, 2), "exclude each other")):
        with pytest.raises(ValueError, match=match):
            sub_vocab_sizes(*args)
    with pytest.raises(ValueError, match="square number of tokens"):
        _model(codebook_size=8, position_embedding="rope_2d", num_tokens=5)
    # the config variants: 2 factors of 16 codes; a 12-bit index as 2 x 6 bits
    import flax.linen as nn
    from titok_jax.tasks import get_task
    for variant, ids, k, heads in (("tiny_factorized", (32, 2), 2, (16, 16)),
                                   ("tiny_split_bits", (32,), 1, (64, 64))):
        task = get_task(load_config_module("ar").get_config(variant))
        params, _ = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
        assert task.model.token_shape == ids and task.generator_spec.num_codebooks == k
        assert tuple(params["model"][f"head_{i}"]["kernel"].shape[1] for i in range(2)) == heads


def test_factorized_loss_is_the_summed_factor_ce_and_the_head_is_causal():
    m, v = _model(codebook_size=8, num_codebooks=3, factor_embedding="concat")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8, (2, 4, 3)).astype(np.int32)
    labels = jnp.asarray([0, 3])
    apply = jax.jit(m.apply)
    logits = apply(v, tokens, labels)
    assert [l.shape for l in logits] == [(2, 4, 8)] * 3
    loss, metrics = jax.jit(lambda l, t: ar_loss(m, l, t))(logits, jnp.asarray(tokens))
    ce = [-np.take_along_axis(_logp(l), tokens[..., i, None], -1).mean() for i, l in enumerate(logits)]
    np.testing.assert_allclose(float(loss), sum(ce), rtol=1e-5)
    mean_loss, mean_metrics = ar_loss(m, logits, jnp.asarray(tokens), subtoken_reduction="mean")
    np.testing.assert_allclose(float(mean_loss), sum(ce) / 3, rtol=1e-5)     # FAR's mean
    np.testing.assert_allclose(float(mean_metrics["nll"]), sum(ce), rtol=1e-5)
    with pytest.raises(ValueError, match="subtoken_reduction"):
        ar_loss(m, logits, jnp.asarray(tokens), subtoken_reduction="max")
    for i in range(3):
        np.testing.assert_allclose(float(metrics[f"nll_{i}"]), ce[i], rtol=1e-5)
    right = np.all([np.argmax(l, -1) == tokens[..., i] for i, l in enumerate(logits)], 0)
    np.testing.assert_allclose(float(metrics["next_token_accuracy"]), right.mean())
    # factor i of position p sees t_<p and the factors < i of t_p, nothing else
    changed = tokens.copy()
    changed[:, 2, 1] = (changed[:, 2, 1] + 1) % 8
    other = apply(v, changed, labels)
    for i, (a, b) in enumerate(zip(logits, other)):
        np.testing.assert_array_equal(a[:, :2], b[:, :2])           # earlier positions
        assert np.array_equal(a[:, 2], b[:, 2]) == (i <= 1), i       # factor 2 sees factor 1
        assert not np.array_equal(a[:, 3], b[:, 3])                  # later positions


def test_split_bit_loss_is_the_ce_of_the_index_under_the_factorised_distribution():
    m, v = _model(codebook_size=32, split_bits=(2, 3), factor_embedding="sum")
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, 32, (2, 4)), jnp.int32)
    labels = jnp.asarray([1, 2])
    logits = jax.jit(m.apply)(v, tokens, labels)
    assert [l.shape for l in logits] == [(2, 4, 4), (2, 4, 8)]
    loss, _ = jax.jit(lambda l, t: ar_loss(m, l, t))(logits, tokens)
    # p(t) = p(s_0) p(s_1 | s_0) over all 32 indices: the head run with every value of s_0
    subs = np.asarray(to_subtokens(tokens, 1, (2, 3)))
    prev = np.concatenate([np.zeros_like(subs[:, :1]), subs[:, :-1]], 1)    # the trunk's inputs
    h, _ = jax.jit(lambda v, p, l: m.apply(v, p, l, 0, m.init_cache(2), method="decode_hidden"))(
        v, jnp.asarray(prev), labels)
    logp = np.zeros((2, 4, 32))
    head = jax.jit(lambda v, h, s: m.apply(v, h, s, method="sub_logits"))
    for t in range(32):
        s0, s1 = t & 3, t >> 2
        forced = subs.copy()
        forced[..., 0] = s0
        l0, l1 = head(v, h, jnp.asarray(forced))
        logp[..., t] = _logp(l0)[..., s0] + _logp(l1)[..., s1]
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-5)   # a distribution over indices
    ce = -np.take_along_axis(logp, np.asarray(tokens)[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), ce, rtol=1e-5)


@pytest.mark.parametrize("kw,shape,high", [
    (dict(codebook_size=8, num_codebooks=2), (3, 4, 2), 8),
    (dict(codebook_size=32, split_bits=(2, 3), position_embedding="rope_2d"), (3, 4), 32)],
    ids=["factorized", "split_bits_rope_2d"])
def test_sampling_shapes_ranges_seeds_and_the_cache(kw, shape, high):
    m, v = _model(**kw)
    labels = jnp.asarray([0, 1, 3])
    draw = lambda seed, **s: np.asarray(generate_tokens(m, v, labels, jax.random.key(seed), **s))
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == shape and a.dtype == np.int32 and 0 <= a.min() and a.max() < high
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    if "num_codebooks" in kw:   # guidance per sub-token, filters per sub-vocabulary
        guided = draw(0, guidance_scale=2.0, top_k=3, top_p=0.9)
        assert guided.shape == shape and 0 <= guided.min() and guided.max() < high
    # the KV-cached sampler's logits are the teacher-forced forward's at the drawn ids
    ids, logits = generate_tokens(m, v, labels, jax.random.key(2), return_logits=True)
    for got, want in zip(logits, jax.jit(m.apply)(v, ids, labels)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    greedy, logits = generate_tokens(m, v, labels, jax.random.key(3), temperature=0.0, return_logits=True)
    subs = np.asarray(m.subtoken_ids(greedy))
    for i, l in enumerate(logits):
        np.testing.assert_array_equal(subs[..., i], np.argmax(l, -1))


# ----------------------------------------------------------------------------- end to end
AR = os.path.join(ROOT, "configs", "ar.py") + ":tiny_factorized"
AR_MICRO = ["--config.model.codebook_size=8", "--config.model.num_tokens=8", "--config.model.width=32",
            "--config.model.depth=1", "--config.model.num_heads=2", "--config.batch_size=8",
            "--config.total_steps=4", "--config.log_every_steps=2", "--config.eval_every_steps=4",
            "--config.checkpoint.every_steps=4", "--config.checkpoint.async_save=false",
            "--config.optimizer.lr=0.01", "--config.optimizer.warmup_steps=1",
            "--config.data.eval_batch_size=8", "--config.samples.num_images=2", "--progress=false"]


@pytest.fixture(scope="module")
def fq_run(tmp_path_factory):
    """A micro TiTok ``quantizer=fq`` (8 tokens x 2 factors of 8 codes) trained 2 steps, its
    token shards and an AR ``tiny_factorized`` trained 4 steps on them."""
    root = tmp_path_factory.mktemp("ar_fq")
    tok, shards, ar = str(root / "tok"), str(root / "shards"), str(root / "ar")
    args = [a for a in MICRO_TOKENIZER_ARGS if "codebook_size" not in a]
    assert cli.main(["train", "--config", os.path.join(ROOT, "configs", "titok.py") + ":tiny_vq,quantizer=fq",
                     "--workdir", tok, *args, "--config.model.quantizer.codebook_size=8",
                     # a plain VQ per factor: the EMA k-means one costs seconds of compile each
                     "--config.model.quantizer.quantizer.kmeans_init=false",
                     "--config.model.quantizer.quantizer.use_ema=false",
                     "--config.model.quantizer.quantizer.dead_code_threshold=0"]) == 0
    assert cli.main(["tokenize", "--workdir", tok, "--data", "sample", "--output", shards]) == 0
    assert cli.main(["train", "--config", AR, "--workdir", ar, *AR_MICRO,
                     f"--config.data.source=tokens:{shards}"]) == 0
    return tok, shards, ar


def test_end_to_end_on_fq_shards_train_and_generate(fq_run, tmp_path):
    import titok_jax
    tok, _, ar = fq_run
    rows = [json.loads(l) for l in open(os.path.join(ar, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    # zero heads: uniform over 8 codes per factor at the start, CE 2 log 8 summed over factors
    assert rows[-1]["nll"] < 2 * math.log(8) and {"nll_0", "nll_1", "accuracy_1"} <= set(rows[-1])
    (ev,) = [json.loads(l) for l in open(os.path.join(ar, "eval.jsonl"))]
    assert np.isfinite(ev["loss"]) and os.path.isfile(os.path.join(ar, "samples", "generated_000000004.png"))
    out = tmp_path / "gen"
    assert cli.main(["generate", "--workdir", ar, "--tokenizer", tok, "--output", str(out), "--num", "2",
                     "--seed", "1"]) == 0
    ids = np.load(out / "tokens.npz")["tokens"]
    assert ids.shape == (2, 8, 2) and 0 <= ids.min() and ids.max() < 8
    assert os.path.isfile(out / "grid.png") and os.path.isfile(out / "000001_class1.png")
    gen = titok_jax.load_generator(ar)
    assert gen.num_codebooks == 2
    np.testing.assert_array_equal(gen.sample([0, 1], seed=1, batch_size=2), ids)
    logits = gen.logits(ids, [0, 1])
    assert isinstance(logits, tuple) and [l.shape for l in logits] == [(2, 8, 8)] * 2
    # a one-id AR model on the same shards: one line that names the factorized head
    cfg = load_config_module("ar").get_config("tiny")
    cfg.model.update(codebook_size=8, num_tokens=8)
    cfg.data.source = f"tokens:{fq_run[1]}"
    from titok_jax.tasks import get_task
    with pytest.raises(ValueError, match=r"2 ids per token .* --config.model.num_codebooks=2"):
        get_task(cfg).constants()
