"""The AR generator task end to end on CPU: a micro TiTok, its token shards of the sample
photographs, a few training steps through the one trainer (with evaluation and a sampled grid),
`titok-jax generate` and `load_generator` on the AR workdir, and the config variants."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titok_jax
from titok_jax import cli

from train_helpers import ROOT, load_config_module

AR = os.path.join(ROOT, "configs", "ar.py") + ":tiny"
AR_MICRO = ["--config.model.codebook_size=32", "--config.model.num_tokens=8", "--config.model.width=32",
            "--config.model.depth=2", "--config.model.num_heads=2", "--config.batch_size=8",
            "--config.total_steps=6", "--config.log_every_steps=2", "--config.eval_every_steps=6",
            "--config.checkpoint.every_steps=6", "--config.checkpoint.async_save=false",
            "--config.optimizer.lr=0.01", "--config.optimizer.warmup_steps=1",
            "--config.data.eval_batch_size=8", "--config.samples.num_images=4", "--progress=false"]


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


@pytest.fixture(scope="module")
def tokenizer_dir(micro_tokenizer_dir):
    return micro_tokenizer_dir


@pytest.fixture(scope="module")
def token_dir(micro_token_dir):
    return micro_token_dir


@pytest.fixture(scope="module")
def ar_dir(token_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ar"))
    assert cli.main(["train", "--config", AR, "--workdir", workdir, *AR_MICRO,
                     f"--config.data.source=tokens:{token_dir}"]) == 0
    return workdir


def test_training_on_token_shards_learns_logs_and_evaluates(ar_dir):
    rows = [json.loads(l) for l in open(os.path.join(ar_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in rows)
    # The head starts at zero (uniform over 32 codes: CE = log 32); a few steps go below it.
    assert rows[-1]["nll"] < math.log(32) - 0.1 and 0 <= rows[-1]["next_token_accuracy"] <= 1
    (ev,) = [json.loads(l) for l in open(os.path.join(ar_dir, "eval.jsonl"))]
    assert ev["step"] == 6 and 0 <= ev["next_token_accuracy"] <= 1 and np.isfinite(ev["loss"])
    assert ev["num_sequences"] == 8
    # The grid of sampled images is decoded by the tokenizer named in the shards' meta.json.
    assert os.path.isfile(os.path.join(ar_dir, "samples", "generated_000000006.png"))


def test_generate_command_on_an_ar_workdir(ar_dir, tokenizer_dir, tmp_path, capsys):
    def run(out, *extra):
        return cli.main(["generate", "--workdir", ar_dir, "--tokenizer", tokenizer_dir,
                         "--output", str(out), "--num", "3", *extra])
    assert run(tmp_path / "a", "--seed", "1") == 0 and run(tmp_path / "b", "--seed", "1") == 0
    assert run(tmp_path / "c", "--seed", "2", "--class-id", "4") == 0
    a, b, c = (np.load(tmp_path / d / "tokens.npz") for d in "abc")
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"]) and c["labels"].tolist() == [4, 4, 4]
    assert a["tokens"].shape == (3, 8) and a["tokens"].min() >= 0 and a["tokens"].max() < 32
    assert sorted(os.listdir(tmp_path / "a")) == ["000000_class0.png", "000001_class1.png",
                                                   "000002_class2.png", "grid.png", "tokens.npz"]
    # --temperature reaches the AR sampler: at 0 it is greedy, so the seed no longer matters.
    assert run(tmp_path / "g", "--seed", "1", "--temperature", "0") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "g" / "tokens.npz")["tokens"],
                                  titok_jax.load_generator(ar_dir).sample([0, 1, 2], seed=7, temperature=0.0))
    capsys.readouterr()
    assert run(tmp_path / "d", "--steps", "4") == 1  # MaskGIT's setting: one clear line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "steps" in err


@pytest.fixture(scope="module")
def gen(ar_dir):
    return titok_jax.load_generator(ar_dir)


def test_generator_api_prefix_lengths_and_settings(gen):
    assert gen.num_tokens == 8 and gen.codebook_size == 32 and gen.step == 6
    assert gen.sampler["guidance_scale"] == 2.0 and gen.sampler["top_k"] == 0
    full = gen.sample([0, 1, 2, 6], seed=3, top_k=10, top_p=0.9)
    assert full.shape == (4, 8)
    # FlexTok-style prefixes: the first k positions of the same draw, later ones never computed.
    np.testing.assert_array_equal(gen.sample([0, 1, 2, 6], seed=3, top_k=10, top_p=0.9, max_len=3),
                                  full[:, :3])
    for bad, match in (({"max_len": 9}, "max_len"), ({"top_k": -2}, "top_k"),
                       ({"temperature": -1.0}, "temperature"), ({"steps": 8}, "unknown sampler")):
        with pytest.raises(ValueError, match=match):
            gen.sample([0], **bad)


def test_eval_metrics_are_next_token_ce_against_numpy(gen):
    rng = np.random.default_rng(0)
    tokens, labels = rng.integers(0, 32, (4, 8)).astype(np.int32), np.array([0, -1, 3, 5], np.int32)
    metrics = gen.task.token_metrics(gen.params, tokens, labels)
    logits = np.asarray(jax.jit(gen.task.model.apply)({"params": gen.params}, jnp.asarray(tokens),
                                                      jnp.asarray([0, 6, 3, 5])), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[..., None], -1).mean()
    np.testing.assert_allclose(float(metrics["loss"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["next_token_accuracy"]),
                               (logits.argmax(-1) == tokens).mean(), rtol=1e-6)


def test_config_variants_and_errors():
    from titok_jax.tasks import get_task
    import flax.linen as nn
    counts = {}
    for variant in ("tiny", "flextok_d10", "flextok_d30"):
        cfg = load_config_module("ar").get_config(variant)
        task = get_task(cfg)
        params, _ = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
        counts[variant] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert counts["flextok_d10"] == 133_364_480 and counts["flextok_d30"] == 1_574_903_040
    with pytest.raises(ValueError, match="unknown ar variant"):
        load_config_module("ar").get_config("huge")
    cfg = load_config_module("ar").get_config("tiny")
    cfg.generator.sampler.top_k = -1
    with pytest.raises(ValueError, match="top_k"):
        get_task(cfg)
    cfg = load_config_module("ar").get_config("tiny")
    cfg.data.source = "sample"
    with pytest.raises(ValueError, match="tokenizer.workdir"):
        get_task(cfg)
