"""The task contract (tasks/base.py): registration refuses incomplete tasks, every registered family
implements the whole life cycle, and the trainer's and the API's loaders resolve a run only through
``TASKS`` (a task registered here, under a new name, loads with no list to extend)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titok_jax
from titok_jax.tasks import TASKS, GeneratorTaskBase, TokenizerTaskBase, register_task
from titok_jax.tasks.base import Task, TokenSpec
from titok_jax.tasks.tokenizer import TokenizerTask


def renamed_copy(workdir, dst, task_name):
    """A copy of ``workdir`` whose ``config.json`` names another task."""
    shutil.copytree(workdir, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["task"]["name"] = task_name
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_every_registered_task_implements_its_kind():
    assert {"tokenizer", "titok_stage1", "titok_stage2", "flowmo", "flextok", "maskgit", "ar"} <= set(TASKS)
    for name, cls in TASKS.items():
        assert issubclass(cls, (TokenizerTaskBase, GeneratorTaskBase)), name
        assert not cls.__abstractmethods__, (name, cls.__abstractmethods__)
        assert cls.kind in ("tokenizer", "generator")
        assert cls.task_name == name


def test_registration_refuses_an_incomplete_or_foreign_task():
    class NoLoss(TokenizerTaskBase):  # every inference method, no loss
        def init(self, key): ...
        def evaluate(self, p, s, ctx): ...
        token_spec = TokenSpec(8, 4, 16, 2, "vq")
        def encode(self, p, s, x): ...
        def decode(self, p, s, t, *, key=None, steps=None, guidance=None): ...
        def features(self, p, s, x): ...
        def reconstruct(self, p, s, x): ...

    with pytest.raises(TypeError, match="does not implement loss"):
        register_task("_no_loss")(NoLoss)

    class Duck:  # has the methods, is not a Task
        def init(self, key): ...
        def loss(self, *a): ...

    with pytest.raises(TypeError, match="must subclass"):
        register_task("_duck")(Duck)

    class PlainTask(Task):  # a Task of no kind
        def init(self, key): ...
        def loss(self, *a): ...
        def evaluate(self, *a): ...

    with pytest.raises(TypeError, match="must subclass"):
        register_task("_plain")(PlainTask)
    assert not {"_no_loss", "_duck", "_plain"} & set(TASKS)


def test_a_newly_registered_task_loads_through_TASKS_alone(micro_tokenizer_dir, tmp_path):
    """Copy a trained workdir, rename its task to one registered only here: ``load_tokenizer``
    builds that class (for inference) and every encode/decode goes through its methods."""
    calls = []

    @register_task("_contract_probe")
    class Probe(TokenizerTask):
        def __init__(self, config, *, inference=False):
            super().__init__(config, inference=inference)
            calls.append(("init", inference))

        def encode(self, model_params, model_state, images):
            calls.append("encode")
            return super().encode(model_params, model_state, images)

        def decode(self, model_params, model_state, tokens, **kw):
            calls.append("decode")
            return super().decode(model_params, model_state, tokens, **kw)

    try:
        wd = renamed_copy(micro_tokenizer_dir, tmp_path / "probe", "_contract_probe")
        probe, plain = titok_jax.load_tokenizer(wd), titok_jax.load_tokenizer(micro_tokenizer_dir)
        assert isinstance(probe.task, Probe) and ("init", True) in calls
        x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
        ids = probe.encode(x)
        np.testing.assert_array_equal(ids, plain.encode(x))
        np.testing.assert_array_equal(probe.decode(ids), plain.decode(ids))
        assert "encode" in calls and "decode" in calls   # traced through the probe's methods
    finally:
        TASKS.pop("_contract_probe", None)


def test_load_tokenizer_refuses_a_generator_and_load_generator_a_tokenizer(micro_tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="not a generator"):
        titok_jax.load_generator(micro_tokenizer_dir)
    wd = renamed_copy(micro_tokenizer_dir, tmp_path / "unknown", "no_such_task")
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        titok_jax.load_tokenizer(wd)


def test_tokenizer_inference_methods_agree_with_the_model(micro_tokenizer_dir):
    """``features`` are the codes the decoder reads: decoding them equals decoding the ids, and
    they are the codebook rows of the ids."""
    tok = titok_jax.load_tokenizer(micro_tokenizer_dir)
    x = np.random.default_rng(1).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    ids, (feats, pooled) = tok.encode(x), tok.features(x)
    assert feats.shape == (3, tok.num_tokens, tok.token_dim) and feats.dtype == np.float32
    np.testing.assert_allclose(pooled, feats.mean(axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="not ordered"):
        tok.features(x, num_tokens=2)                  # TiTok's tokens are not a prefix code
    def lookup(model, t):
        return model.quantize.indices_to_codes(t, dtype=jnp.float32)

    rows = np.asarray(tok.model.apply({"params": tok.params, **tok.model_state}, jnp.asarray(ids), method=lookup))
    np.testing.assert_allclose(feats, rows, rtol=1e-6, atol=1e-6)
    via_codes = np.asarray(jax.jit(lambda p, s, c: tok.model.apply({"params": p, **s}, c, method="decode"))(
        tok.params, tok.model_state, jnp.asarray(feats)))
    np.testing.assert_allclose(tok.decode(ids), np.clip(via_codes, 0, 1), rtol=1e-5, atol=1e-6)
