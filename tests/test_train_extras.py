"""Trainer paths beyond the plain step: gradient accumulation, the GAN branch, SIGTERM."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.train.step import build_step

from train_helpers import ROOT, fresh_state, micro_config

PLAIN_VQ = {"model.quantizer.use_ema": False, "model.quantizer.kmeans_init": False,
            "model.quantizer.dead_code_threshold": 0.0}


def _one_step(config, batch, accumulation):
    task, state, optimizer, _, _ = fresh_state(config)
    step = build_step(task, optimizer, accumulation_steps=accumulation)
    return step(state, batch, {})


def test_gradient_accumulation_equals_the_full_batch_step():
    config = micro_config(**PLAIN_VQ)
    batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(size=(8, 32, 32, 3)), jnp.float32)}
    full, m_full = _one_step(config, batch, 1)
    accum, m_acc = _one_step(config, batch, 2)
    # the update is built from the mean of the two half-batch gradients == the full-batch gradient
    np.testing.assert_allclose(float(m_acc["grad_norm/model"]), float(m_full["grad_norm/model"]), rtol=1e-4)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_gan_branch_trains_the_discriminator_after_its_start_step():
    config = micro_config(**PLAIN_VQ, **{"losses.gan_weight": 0.1, "losses.gan_start_step": 1,
                                         "losses.lecam_weight": 0.001,
                                         # no warmup: D's first update (step 1) has a non-zero rate
                                         "optimizers.disc": {"warmup_steps": 0},
                                         "losses.discriminator": {"ndf": 8, "n_layers": 2, "norm": "group",
                                                                  "num_groups": 4}})
    task, state, optimizer, _, _ = fresh_state(config)
    assert set(state.params) == {"model", "disc"}
    step = build_step(task, optimizer, donate=False)
    batch = {"image": jnp.asarray(np.random.default_rng(1).uniform(size=(8, 32, 32, 3)), jnp.float32)}
    disc0 = jax.tree.map(np.asarray, state.params["disc"])
    state, m0 = step(state, batch, {})  # step 0 < start: the gate is closed, D gets zero gradient
    assert float(m0["grad_norm/disc"]) == 0.0
    # Before the start step neither branch of the GAN runs: no generator term, LeCam EMAs untouched.
    assert float(m0["gan/generator"]) == 0.0 and float(m0["gan/discriminator"]) == 0.0
    assert float(state.model_state["lecam"].ema_real) == 0.0
    state, m1 = step(state, batch, {})  # step 1: D and the generator term are on
    assert float(m1["grad_norm/disc"]) > 0.0 and np.isfinite(float(m1["gan/discriminator"]))
    assert np.isfinite(float(m1["gan/lecam"])) and "gan/generator" in m1
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(state.params["disc"]),
                                                             jax.tree.leaves(disc0))]
    assert max(moved) > 0
    assert float(state.model_state["lecam"].ema_real) != 0.0  # LeCam EMAs advanced


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "run")
    args = [sys.executable, "-m", "titok_jax", "train", "--config", os.path.join(ROOT, "configs", "titok.py") + ":tiny",
            "--workdir", workdir, "--config.data.image_size=32", "--config.model.image_size=32",
            "--config.model.encoder_width=32", "--config.model.decoder_width=32",
            "--config.total_steps=100000", "--config.log_every_steps=1", "--config.eval_every_steps=0",
            "--config.checkpoint.every_steps=100000", "--config.batch_size=8", "--progress=false"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu",
                                 "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"})   # quick compile
    metrics = os.path.join(workdir, "metrics.jsonl")
    try:
        for _ in range(600):  # wait (at most ~5 min) until a few steps are logged
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
                break
            if proc.poll() is not None:
                break
            import time
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in err
    steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert steps, "no checkpoint was written"
    last_logged = json.loads(open(metrics).readlines()[-1])["step"]
    assert int(steps[-1]) >= last_logged >= 3


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
