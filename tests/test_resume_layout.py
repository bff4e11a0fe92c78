"""Runs that read another run's weights whatever its layer layout: a TiTok stage-1 workdir starts a
stage-2 model, a FlowMo main-stage workdir a post-training one, each scanned or unrolled either side
(``nn.scan.match_layers`` before the tree check); and ``train``'s resume check reads a config.json
without ``scan_layers`` (an older workdir) as unrolled and lets ``remat`` / ``remat_policy`` change."""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax import cli
from titok_jax.checkpoint import inference_state, write_workdir
from titok_jax.commands.train import check_same_model
from titok_jax.errors import ConfigMismatchError
from titok_jax.nn.scan import match_layers
from titok_jax.tasks import get_task

from conftest import MICRO_TOKENIZER_ARGS
from train_helpers import ROOT, load_config_module, micro_config, one_line_error, tree_digest


@pytest.fixture(scope="module")
def fast_compile():
    """XLA's heavy optimisation passes cost more than these tiny programs run; restored afterwards."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _write_run(config, workdir, seed=0):
    """A workdir of ``config`` holding seeded random model params (drawn on the host from the
    abstract init: nothing trained or compiled); returns them."""
    params, state = nn.unbox(jax.eval_shape(get_task(config).init, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), params["model"])
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), state["model"])
    write_workdir(workdir, config.to_dict(), inference_state(params, state))
    return params


def _assert_same(tree, like):
    assert jax.tree.structure(tree) == jax.tree.structure(like)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(like)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _has_layers(tree):
    return "layers" in tree


# ----------------------------------------------------------------------------- TiTok stage 1 -> 2
@pytest.mark.usefixtures("fast_compile")
@pytest.mark.parametrize("scan1,scan2", [(False, True), (True, False)])
def test_titok_stage2_starts_from_a_stage1_run_of_the_other_layout(tmp_path, scan1, scan2):
    m = load_config_module("titok")
    c1 = m.get_config("tiny_stage1")
    c1.model.scan_layers = scan1
    c1.optimizer.ema_decay = 0.0          # the written state has no EMA copy
    written = _write_run(c1, str(tmp_path / "s1"))
    assert _has_layers(written["encoder"]) == scan1
    c2 = m.get_config("tiny_stage2")
    c2.model.scan_layers = scan2
    c2.init_from = str(tmp_path / "s1")
    task = get_task(c2)                   # the tree check passes
    loaded = task.loaded()[0]
    assert _has_layers(loaded["encoder"]) == _has_layers(loaded["decoder"]) == scan2
    for name in ("encoder", "decoder", "quantize", "latent_tokens"):
        _assert_same(match_layers(written[name], loaded[name]), loaded[name])
        _assert_same(match_layers(loaded[name], written[name]), written[name])
    if scan2:   # the published direction (stage configs scan): the init carries the weights over
        params, _ = jax.jit(task.init)(jax.random.key(3))
        _assert_same(nn.unbox(params)["model"]["encoder"], loaded["encoder"])


# ----------------------------------------------------------------------------- FlowMo main -> post
def _flowmo(variant, scan):
    c = load_config_module("flowmo").get_config(variant)
    c.model.update(dict(image_size=16, patch_size=4, code_length=4, token_bits=8, id_bits=8,
                        entropy_group_bits=4, encoder_width=32, encoder_depth=2, encoder_heads=1,
                        decoder_width=32, decoder_depth=3, decoder_heads=1, scan_layers=scan))
    c.data.image_size = 16
    return c


@pytest.mark.usefixtures("fast_compile")
@pytest.mark.parametrize("scan1,scan2", [(False, True), (True, False)])
def test_flowmo_post_starts_from_a_main_run_of_the_other_layout(tmp_path, scan1, scan2):
    written = _write_run(_flowmo("tiny", scan1), str(tmp_path / "main"))
    assert _has_layers(written["decoder"]) == scan1 and "block_2" in written["decoder"]
    post = _flowmo("tiny_post", scan2)
    post.init_from = str(tmp_path / "main")
    task = get_task(post)
    params, _ = jax.jit(task.init)(jax.random.key(3))
    params = nn.unbox(params)["model"]
    assert _has_layers(params["encoder"]) == _has_layers(params["decoder"]) == scan2
    _assert_same(match_layers(written, params), params)


# ----------------------------------------------------------------------------- the resume check
def _older_workdir(tmp_path, model=None):
    """A workdir whose config.json predates ``scan_layers`` (and any ``remat`` key), with a step."""
    config = micro_config()
    old = json.loads(json.dumps(config.to_dict()))
    for key in ("scan_layers", "remat", "remat_policy"):
        old["model"].pop(key, None)
    old["model"].update(model or {})
    workdir = str(tmp_path / "old")
    write_workdir(workdir, old, inference_state({"w": np.ones(3, np.float32)}))
    return workdir, config


def test_a_config_without_scan_layers_reads_as_unrolled(tmp_path):
    workdir, config = _older_workdir(tmp_path)
    config.model.scan_layers = False
    check_same_model(workdir, config)                     # the same model: resumable
    config.model.scan_layers = True
    with pytest.raises(ConfigMismatchError, match="model.scan_layers false vs true"):
        check_same_model(workdir, config)


def test_remat_settings_may_change_on_resume(tmp_path):
    workdir, config = _older_workdir(tmp_path, {"remat": False, "remat_policy": ""})
    for remat, policy in [(True, ""), (True, "dots"), (False, "dots_saveable")]:
        config.model.remat, config.model.remat_policy = remat, policy
        check_same_model(workdir, config)
    config.model.encoder_width = 64                         # anything else is still named
    with pytest.raises(ConfigMismatchError, match="model.encoder_width 32 vs 64") as info:
        check_same_model(workdir, config)
    assert "remat" not in str(info.value).split("workdir vs this run:")[1]


def test_train_resumes_an_older_workdir_only_into_its_own_layout(micro_tokenizer_dir, tmp_path, capsys):
    """The session's micro run with its config.json rewritten as an older version wrote it: turning
    ``scan_layers`` on is the one-line mismatch (not Orbax's tree error), and nothing is touched;
    turning remat on resumes (total_steps reached: nothing to train)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(micro_tokenizer_dir, workdir)
    path = os.path.join(workdir, "config.json")
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    for key in ("scan_layers", "remat", "remat_policy"):
        stored["model"].pop(key, None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stored, f)
    args = ["train", "--config", os.path.join(ROOT, "configs", "titok.py") + ":tiny_vq", "--workdir",
            workdir, *MICRO_TOKENIZER_ARGS]
    before = tree_digest(workdir)
    capsys.readouterr()
    assert cli.main([*args, "--config.model.scan_layers=true"]) == 1
    err = one_line_error(capsys)
    assert "model.scan_layers false vs true" in err and "cannot resume" in err
    assert tree_digest(workdir) == before
    assert cli.main([*args, "--config.model.remat=true", "--config.model.remat_policy=dots"]) == 0
    assert "resumed from step 2" in capsys.readouterr().err
