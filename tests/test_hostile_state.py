"""Poisoned state and interruptions (issue 13): nothing non-finite (params, optimizer state, EMA) is
ever saved - the run stops with one line naming the first non-finite array and the step, and the
last good checkpoint stays the latest; optimizer values that cannot work are refused before the
run starts; Ctrl-C saves a checkpoint like SIGTERM, and a second Ctrl-C aborts at once."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from titok_jax import cli
from titok_jax.errors import ConfigError
from titok_jax.train import loop
from titok_jax.train.optimizer import make_optimizer, path_str

from train_helpers import ROOT, fresh_state, micro_config

CONFIG = os.path.join(ROOT, "configs", "titok.py") + ":tiny_vq"


def steps_saved(workdir):
    ckdir = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []


def leaf_path(tree, part, contains=""):
    """The '/'-joined path (as the train state names it) of the first float leaf of ``part`` of a
    train state (``params``, ``opt_state``, ``ema_params``) whose path contains ``contains``."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_str(path)
        if (name.startswith(part + "/") and contains in name
                and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2):
            return name
    raise AssertionError(f"no float leaf under {part} with {contains!r}")


def poison(state, name):
    """``state`` with the array at path ``name`` replaced by NaN (same sharding)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * jnp.nan if path_str(p) == name else x, state)


class Hooked:
    """The trainer's jitted step with ``hook(state_after, step_after) -> state`` run after each
    call; the logged parameter norm is the hooked state's, as if the update had made it."""

    def __init__(self, jitted, hook):
        self.jitted, self.hook = jitted, hook

    def lower(self, *args):
        return self.jitted.lower(*args)

    def __call__(self, state, batch, constants):
        import optax
        state, metrics = self.jitted(state, batch, constants)
        hooked = self.hook(state, int(state.step))
        if hooked is not state:
            metrics = {**metrics, "param_norm/model": optax.tree.norm(hooked.params["model"])}
        return hooked, metrics


def hook_step(monkeypatch, hook):
    real = loop.build_step
    monkeypatch.setattr(loop, "build_step", lambda *a, **k: Hooked(real(*a, **k), hook))


# ----------------------------------------------------------------------------- non-finite state
def test_first_non_finite_names_the_array():
    from titok_jax.train.state import first_non_finite
    config = micro_config()
    _, state, _, _, _ = fresh_state(config, ema=True)
    assert first_non_finite(state) is None
    for part, contains in [("params", "decoder"), ("opt_state", "mu"), ("opt_state", "nu"),
                           ("ema_params", "encoder")]:
        name = leaf_path(state, part, contains)
        assert first_non_finite(poison(state, name)) == name
    inf = jax.tree.map(lambda x: x, state)
    name = leaf_path(state, "params", "encoder")
    inf = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[(0,) * x.ndim].set(jnp.inf) if path_str(p) == name else x, inf)
    assert first_non_finite(inf) == name


@pytest.mark.parametrize("part,contains", [
    ("opt_state", "mu"), pytest.param("ema_params", "decoder", marks=pytest.mark.slow)])
def test_a_non_finite_state_on_a_save_step_is_never_saved(tmp_path, monkeypatch, capsys, part, contains):
    """The update of step 2 (a checkpoint step) leaves a NaN in the optimizer state (or the EMA)
    while the loss, computed before the update, is finite: step 2 is not saved, the run stops with
    one line naming the array and the step, and step 1 stays the latest checkpoint."""
    workdir = str(tmp_path / "w")
    named = {}

    def hook(state, step):
        if step == 2:
            named["path"] = leaf_path(state, part, contains)
            state = poison(state, named["path"])
        return state

    hook_step(monkeypatch, hook)
    args = ["train", "--config", CONFIG, "--workdir", workdir, "--progress=false",
            "--config.data.image_size=32", "--config.model.image_size=32",
            "--config.model.encoder_width=32", "--config.model.decoder_width=32",
            "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
            "--config.model.num_latent_tokens=8", "--config.model.quantizer.codebook_size=32",
            "--config.batch_size=8", "--config.total_steps=3", "--config.log_every_steps=100",
            "--config.eval_every_steps=0", "--config.checkpoint.every_steps=1",
            "--config.checkpoint.async_save=false", "--config.optimizer.ema_decay=0.99"]
    capsys.readouterr()
    assert cli.main(args) == 1
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("[titok_jax]")]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert named["path"] in lines[0] and "step 2" in lines[0] and "non-finite" in lines[0], lines[0]
    assert "latest checkpoint (step 1)" in lines[0], lines[0]
    assert steps_saved(workdir) == [1]
    from titok_jax.checkpoint import verify
    assert verify(os.path.join(workdir, "checkpoints", "000000001")) == ("ok", "")


@pytest.mark.slow
def test_a_non_finite_update_between_checks_is_named_with_its_step(tmp_path, monkeypatch):
    """Params poisoned by the update of step 3 (no log, no save there): the run stops at the next
    check (step 4's save) naming step 3, not the non-finite loss that follows at step 4."""
    config = micro_config(**{"total_steps": 6, "log_every_steps": 100, "checkpoint.every_steps": 2})
    hook_step(monkeypatch, lambda state, step: (
        poison(state, leaf_path(state, "params", "decoder")) if step == 3 else state))
    with pytest.raises(loop.TrainingError) as info:
        loop.train(config, str(tmp_path / "w"), progress=False)
    text = str(info.value)
    assert "step 3" in text and "params/model/" in text and "\n" not in text, text
    assert steps_saved(str(tmp_path / "w")) == [2]


# ----------------------------------------------------------------------------- optimizer values
@pytest.mark.parametrize("key,value,needle", [
    ("optimizer.lr", -1e-3, "optimizer.lr"),
    ("optimizer.lr", float("nan"), "optimizer.lr"),
    ("optimizer.end_lr", float("inf"), "optimizer.end_lr"),
    ("optimizer.warmup_steps", -5, "optimizer.warmup_steps"),
    ("optimizer.b1", 1.0, "optimizer.b1"),
    ("optimizer.b2", -0.1, "optimizer.b2"),
    ("optimizer.eps", 0.0, "optimizer.eps"),
    ("optimizer.weight_decay", float("nan"), "optimizer.weight_decay"),
    ("optimizer.grad_clip", -1.0, "optimizer.grad_clip"),
    ("optimizer.ema_decay", 1.5, "optimizer.ema_decay"),
    ("optimizer.frozen", "model/(", "optimizer.frozen"),
    ("optimizers", {"disc": {"lr": float("inf")}}, "optimizers.disc.lr"),
])
def test_optimizer_values_that_cannot_work_are_a_config_error(key, value, needle):
    config = micro_config(**{key: value})
    params = {"model": {"w": jnp.zeros((4, 4))}, "disc": {"w": jnp.zeros((4, 4))}}
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as info:
        make_optimizer(config, params)
    assert "\n" not in str(info.value)


def test_a_negative_learning_rate_is_one_line_before_anything_is_written(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir),
                     "--config.optimizer.lr=-0.001"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimizer.lr" in err, err
    assert not workdir.exists()


# ----------------------------------------------------------------------------- Ctrl-C
def test_the_first_signal_asks_to_stop_and_a_second_ctrl_c_aborts():
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    for first in (signal.SIGINT, signal.SIGTERM):
        stop = loop.StopSignals().install()
        try:
            try:
                os.kill(os.getpid(), first)
                time.sleep(0.05)  # the handler runs here, in the main thread
            except KeyboardInterrupt:  # not pytest's to see: it would end the whole session
                pytest.fail("the first signal raised KeyboardInterrupt")
            assert stop.signal == signal.Signals(first).name
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.0)
        finally:
            stop.restore()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def send_sigint(at_step, times, seen):
    """A step hook that sends this process ``times`` SIGINTs after step ``at_step``, noting in
    ``seen`` how many of them returned (the first must not abort the step)."""
    def hook(state, step):
        if step == at_step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs here, in the main thread
                seen.append(step)
        return state
    return hook


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_restores_the_handlers(tmp_path, monkeypatch):
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    seen = []
    hook_step(monkeypatch, send_sigint(2, 1, seen))
    config = micro_config(**{"total_steps": 50, "checkpoint.every_steps": 1000})
    try:
        summary = loop.train(config, str(tmp_path / "w"), progress=False)
    except KeyboardInterrupt:  # not pytest's to see: it would end the whole session
        pytest.fail("the first Ctrl-C raised KeyboardInterrupt instead of saving a checkpoint")
    assert seen == [2] and summary["step"] == 2
    assert steps_saved(str(tmp_path / "w")) == [2]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_the_loop_at_once(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    seen = []
    hook_step(monkeypatch, send_sigint(2, 2, seen))
    config = micro_config(**{"total_steps": 50, "checkpoint.every_steps": 1000})
    try:
        loop.train(config, str(tmp_path / "w"), progress=False)
    except KeyboardInterrupt:
        pass
    else:
        pytest.fail("two Ctrl-C did not abort the run")
    assert seen == [2]  # the first Ctrl-C let the step go on; the second raised at once
    assert steps_saved(str(tmp_path / "w")) == []
    assert signal.getsignal(signal.SIGINT) == before


def test_sigint_from_outside_saves_and_exits_cleanly(tmp_path):
    from conftest import MICRO_TOKENIZER_ARGS
    workdir = str(tmp_path / "run")
    args = [a for a in MICRO_TOKENIZER_ARGS if "total_steps" not in a and "log_every" not in a
            and "every_steps" not in a]
    proc = subprocess.Popen(
        [sys.executable, "-m", "titok_jax", "train", "--config", CONFIG, "--workdir", workdir, *args,
         "--config.total_steps=100000", "--config.log_every_steps=1", "--config.eval_every_steps=0",
         "--config.checkpoint.every_steps=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",   # one device: quick
             "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"})                # (and a quick compile)
    metrics = os.path.join(workdir, "metrics.jsonl")
    try:
        for _ in range(1200):  # at most ~5 min until two steps are logged
            if proc.poll() is not None or (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2):
                break
            time.sleep(0.25)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal SIGINT" in err, err[-3000:]
    last_logged = json.loads(open(metrics).readlines()[-1])["step"]
    assert steps_saved(workdir) and steps_saved(workdir)[-1] >= last_logged >= 2


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
