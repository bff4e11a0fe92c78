"""The MaskGIT generator end to end on CPU: a micro TiTok, its tokens of the sample photographs
(pre-tokenized shards and on the fly), generator training with evaluation, and `titok-jax generate`."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titok_jax
from titok_jax import cli

from train_helpers import ROOT

GEN = os.path.join(ROOT, "configs", "maskgit.py") + ":tiny"
GEN_MICRO = ["--config.model.codebook_size=32", "--config.model.num_tokens=8", "--config.model.width=32",
             "--config.model.depth=2", "--config.model.num_heads=2", "--config.batch_size=8",
             "--config.total_steps=4", "--config.log_every_steps=2", "--config.eval_every_steps=4",
             "--config.checkpoint.every_steps=4", "--config.checkpoint.async_save=false",
             "--config.data.eval_batch_size=8", "--config.samples.num_images=4",
             "--config.generator.sampler.steps=4", "--progress=false"]


@pytest.fixture(scope="module")
def tokenizer_dir(micro_tokenizer_dir):
    return micro_tokenizer_dir


@pytest.fixture(scope="module")
def token_dir(micro_token_dir):
    return micro_token_dir


@pytest.fixture(scope="module")
def generator_dir(token_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gen"))
    assert cli.main(["train", "--config", GEN, "--workdir", workdir, *GEN_MICRO,
                     f"--config.data.source=tokens:{token_dir}"]) == 0
    return workdir


def test_training_on_token_shards_logs_and_evaluates(generator_dir):
    rows = [json.loads(l) for l in open(os.path.join(generator_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    # Each of the 8 x 8 tokens is masked or not, at least one per row: mask_ratio = k / 64, k in [8, 64].
    for r in rows:
        k = r["mask_ratio"] * 64
        assert k == pytest.approx(round(k), abs=1e-4) and 8 <= round(k) <= 64
    (ev,) = [json.loads(l) for l in open(os.path.join(generator_dir, "eval.jsonl"))]
    assert ev["step"] == 4 and 0 <= ev["masked_accuracy"] <= 1 and np.isfinite(ev["loss"])
    # The grid of sampled images is decoded by the tokenizer named in the shards' meta.json.
    assert os.path.isfile(os.path.join(generator_dir, "samples", "generated_000000004.png"))


def test_on_the_fly_tokens_equal_the_tokenizer_ids(tokenizer_dir, tmp_path):
    from train_helpers import load_config_module
    from titok_jax.tasks import get_task
    cfg = load_config_module("maskgit").get_config("tiny")
    cfg.data.source = "sample"
    cfg.data.image_size = 32
    cfg.tokenizer.workdir = tokenizer_dir
    cfg.model.update(codebook_size=32, num_tokens=8, width=32, depth=1, num_heads=2)
    task = get_task(cfg)
    assert task.batch_keys == ("image", "label")
    images = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    ids = task.batch_tokens({"image": jnp.asarray(images)}, task.constants())
    np.testing.assert_array_equal(np.asarray(ids), titok_jax.load_tokenizer(tokenizer_dir).encode(images))
    # And a short run trains on them.
    workdir = str(tmp_path / "fly")
    assert cli.main(["train", "--config", GEN, "--workdir", workdir, *GEN_MICRO, "--config.data.source=sample",
                     "--config.data.image_size=32", f"--config.tokenizer.workdir={tokenizer_dir}",
                     "--config.eval_every_steps=0", "--config.total_steps=2"]) == 0


def test_on_the_fly_needs_a_tokenizer(tmp_path, capsys):
    assert cli.main(["train", "--config", GEN, "--workdir", str(tmp_path / "x"), *GEN_MICRO,
                     "--config.data.source=sample"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer.workdir" in err


def test_generate_is_seeded_and_checks_its_inputs(generator_dir, tokenizer_dir, tmp_path, capsys):
    def run(out, *extra):
        return cli.main(["generate", "--workdir", generator_dir, "--tokenizer", tokenizer_dir,
                         "--output", str(out), "--num", "3", *extra])
    assert run(tmp_path / "a", "--seed", "1") == 0 and run(tmp_path / "b", "--seed", "1") == 0
    assert run(tmp_path / "c", "--seed", "2", "--class-id", "4") == 0
    a, b, c = (np.load(tmp_path / d / "tokens.npz") for d in "abc")
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"]) and c["labels"].tolist() == [4, 4, 4]
    assert a["tokens"].shape == (3, 8) and a["tokens"].min() >= 0 and a["tokens"].max() < 32
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["000000_class0.png", "000001_class1.png", "000002_class2.png", "grid.png", "tokens.npz"]
    capsys.readouterr()
    assert run(tmp_path / "d", "--class-id", "99") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class id 99" in err
    assert cli.main(["generate", "--workdir", tokenizer_dir, "--tokenizer", tokenizer_dir,
                     "--output", str(tmp_path / "e")]) == 1
    assert "not a generator" in capsys.readouterr().err


def test_generator_api_is_seeded(generator_dir, tmp_path):
    gen = titok_jax.load_generator(generator_dir)
    assert gen.num_tokens == 8 and gen.codebook_size == 32 and gen.step == 4
    ids = gen.sample([0, 1, 2], seed=1, batch_size=32)
    np.testing.assert_array_equal(ids, gen.sample([0, 1, 2], seed=1, batch_size=32))
    assert not np.array_equal(ids, gen.sample([0, 1, 2], seed=2, batch_size=32))
    # A generator workdir is not a tokenizer: one line, exit 1.
    assert cli.main(["generate", "--workdir", generator_dir, "--tokenizer", generator_dir,
                     "--output", str(tmp_path / "x")]) == 1


def test_generate_streams_chunks_and_checks_fid_flags(generator_dir, tokenizer_dir, tmp_path, capsys):
    # 5 images in chunks of 2: chunk i uses seed + i, so the ids equal the API's per-chunk samples.
    assert cli.main(["generate", "--workdir", generator_dir, "--tokenizer", tokenizer_dir, "--output",
                     str(tmp_path / "s"), "--num", "5", "--batch_size", "2", "--seed", "3",
                     "--save_images=false"]) == 0
    got = np.load(tmp_path / "s" / "tokens.npz")["tokens"]
    gen = titok_jax.load_generator(generator_dir)
    labels = np.arange(5) % gen.num_classes
    want = np.concatenate([gen.sample(labels[i:i + 2], seed=3 + i // 2, batch_size=2) for i in range(0, 5, 2)])
    np.testing.assert_array_equal(got, want)
    assert sorted(os.listdir(tmp_path / "s")) == ["grid.png", "tokens.npz"]
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", generator_dir, "--tokenizer", tokenizer_dir, "--output",
                     str(tmp_path / "t"), "--fid_reference", "ref.npz"]) == 2
    assert "needs --inception_weights" in capsys.readouterr().err


def _maskgit_loss_float64(logits, targets, mask, eps, w_unmasked):
    """TiTok's MLMLoss in float64 numpy: cross-entropy against the label-smoothed target
    ``(1 - eps) onehot(y) + eps / K`` at every position, weight 1 where masked and ``w_unmasked``
    elsewhere, normalised by the sum of the weights."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    k = logits.shape[-1]
    target = (1 - eps) * np.eye(k)[targets] + eps / k
    per_token = -(target * logp).sum(-1)
    w = np.where(mask, 1.0, w_unmasked)
    return (w * per_token).sum() / (w.sum() + 1e-8)


def test_maskgit_task_loss_and_mask_match_their_definitions():
    """The task's training loss on a tiny case: the mask is the documented one (t ~ U[0, 1) per row,
    round(N arccos(t) / (pi/2)) >= 1 positions, the lowest ranks of i.i.d. uniforms) and the loss
    is the float64 label-smoothed, unmasked-weighted cross-entropy of the model's logits."""
    from train_helpers import load_config_module
    from titok_jax.tasks import get_task
    cfg = load_config_module("maskgit").get_config("tiny")
    cfg.data.source = "tokens:unused"
    cfg.model.update(codebook_size=16, num_tokens=8, num_classes=3, width=32, depth=1, num_heads=2,
                     dropout=0.0, attention_dropout=0.0)
    cfg.generator.update(class_dropout=0.0, label_smoothing=0.2, unmasked_weight=0.3)
    task = get_task(cfg)
    params, state = task.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    # Random weights far from the initialisation, so the logits are far from uniform.
    params = jax.tree.map(lambda p: p + jnp.asarray(0.5 * rng.normal(size=p.shape), p.dtype), params)
    b, n, k = 6, 8, 16
    tokens = rng.integers(0, k, (b, n)).astype(np.int32)
    labels = np.array([0, 1, 2, -1, 1, 0], np.int32)
    key = jax.random.key(7)
    loss, (_, metrics) = task.loss(params, state, {"tokens": jnp.asarray(tokens), "label": jnp.asarray(labels)},
                                   key, jnp.asarray(0), {})
    # The mask, from its definition (the task's first key of three is the mask key).
    t_key, perm_key = jax.random.split(jax.random.split(key, 3)[0])
    t = np.asarray(jax.random.uniform(t_key, (b,)), np.float64)
    counts = np.maximum(1, np.round(n * np.clip(np.arccos(t) / (np.pi / 2), 1e-6, 1.0))).astype(int)
    u = np.asarray(jax.random.uniform(perm_key, (b, n)))
    mask = np.zeros((b, n), bool)
    for row in range(b):
        mask[row, np.argsort(u[row], kind="stable")[:counts[row]]] = True
    assert float(metrics["mask_ratio"]) == pytest.approx(mask.mean(), abs=1e-7)
    inputs = np.where(mask, task.model.mask_id, tokens)
    logits = np.asarray(task.logits(params["model"], jnp.asarray(inputs), jnp.asarray(labels)), np.float64)
    want = _maskgit_loss_float64(logits, tokens, mask, 0.2, 0.3)
    # float32 round-off measured at ~1e-7 relative; the same loss on another mask of the same
    # counts, or without one of its terms (below), is off by > 1e-3.
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-6)
    acc = (((logits.argmax(-1) == tokens) & mask).sum(1) / mask.sum(1)).mean()
    assert float(metrics["masked_accuracy"]) == pytest.approx(acc, abs=1e-6)
    # A loss without the unmasked positions' weight (or without smoothing) would be far off.
    assert abs(_maskgit_loss_float64(logits, tokens, mask, 0.2, 0.0) - want) > 1e-2
    assert abs(_maskgit_loss_float64(logits, tokens, mask, 0.0, 0.3) - want) > 1e-2
    shuffled = np.stack([rng.permutation(row) for row in mask])
    assert abs(_maskgit_loss_float64(logits, tokens, shuffled, 0.2, 0.3) - want) > 1e-3
