"""The discriminator's optimizer starts at ``losses.gan_start_step``: before it the ``disc`` group gets
no update and its optimizer state does not move; from it on the group is a fresh optimizer whose
schedule (warmup, cosine decay) counts from the start step."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from titok_jax.train.optimizer import learning_rates, make_optimizer
from titok_jax.train.step import build_step, loss_grads

from train_helpers import fresh_state, micro_config

TOTAL, START = 12, 3


def _config(start: int, total: int = TOTAL, disc_warmup: int = 2) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "total_steps": total,
        "optimizer": {"lr": 1e-3, "end_lr": 1e-5, "warmup_steps": 2, "weight_decay": 1e-4, "grad_clip": 1.0},
        "optimizers": {"disc": {"lr": 2e-3, "end_lr": 2e-4, "warmup_steps": disc_warmup, "weight_decay": 1e-2,
                                "b2": 0.99}},
        "losses": {"gan_start_step": start}})


def _params(rng):
    return {"model": {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}},
            "disc": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
                              "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}}


def _grads_like(tree, rng, scale=1.0):
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32), tree)


@pytest.mark.parametrize("disc_warmup", [0, 2])
def test_disc_optimizer_holds_until_the_start_then_runs_like_a_fresh_one(disc_warmup):
    rng = np.random.default_rng(0)
    params = _params(rng)
    gated = make_optimizer(_config(START, disc_warmup=disc_warmup), params)
    state = gated.init(params)
    zero_disc = jax.tree.map(jnp.zeros_like, params["disc"])
    disc0 = jax.tree.map(np.asarray, params["disc"])
    # Steps 0 .. START-1: the task hands D a zero gradient; nothing of D's may move.
    for _ in range(START):
        grads = {"model": _grads_like(params["model"], rng), "disc": zero_disc}
        updates, state = gated.update(grads, state, params)
        assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["disc"]))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    jax.tree.map(np.testing.assert_array_equal, params["disc"], disc0)
    # D's optimizer state is still its initial state (Adam and schedule counts 0, zero moments).
    disc_state = state.inner_states["disc"]
    for key in ("count", "mu", "nu"):
        found = optax.tree_utils.tree_get_all_with_path(disc_state, key)
        assert found, key
        for _, leaf in found:
            assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(leaf)), key

    # From the start on: the same updates as a fresh optimizer made at the start step for the
    # remaining TOTAL - START steps (its schedule counts from 0 there).
    fresh = make_optimizer(_config(0, total=TOTAL - START, disc_warmup=disc_warmup), {"disc": params["disc"]})
    f_state, f_params = fresh.init({"disc": params["disc"]}), {"disc": params["disc"]}
    for k in range(TOTAL - START):
        g_disc = _grads_like(params["disc"], rng, scale=10.0 ** (k % 3 - 1))
        updates, state = gated.update({"model": _grads_like(params["model"], rng), "disc": g_disc}, state,
                                      params)
        f_updates, f_state = fresh.update({"disc": g_disc}, f_state, f_params)
        for a, b in zip(jax.tree.leaves(updates["disc"]), jax.tree.leaves(f_updates["disc"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-10)
        if k == 0 and disc_warmup == 0:
            # A fresh AdamW's first step, by hand: -lr (g / (|g| + eps) + wd p) on the kernel (ndim 2),
            # -lr g / (|g| + eps) on the bias (no decay). Zero-gradient history would shrink it.
            lr, wd = 2e-3, 1e-2
            for name, decay in (("kernel", wd), ("bias", 0.0)):
                g = np.asarray(g_disc["conv"][name], np.float64)
                p = np.asarray(params["disc"]["conv"][name], np.float64)
                # grad_clip 1.0 first (the disc group inherits the model's grad_clip)
                norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                                     for x in jax.tree.leaves(g_disc)))
                g = g * min(1.0, 1.0 / norm)
                want = -lr * (g / (np.abs(g) + 1e-8) + decay * p)
                np.testing.assert_allclose(np.asarray(updates["disc"]["conv"][name]), want, rtol=1e-5,
                                           atol=1e-9)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        f_params = jax.tree.map(lambda p, u: p + u, f_params, f_updates)


def _warmup_cosine(t: int, lr: float, end: float, warm: int, horizon: int) -> float:
    """Linear warmup 0 -> lr over ``warm`` steps, then cosine to ``end`` at ``horizon``."""
    if t < warm:
        return lr * t / warm
    frac = min(t - warm, horizon - warm) / (horizon - warm)
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))


def test_logged_disc_learning_rate_counts_from_the_start_step():
    config = _config(START)
    for step in range(TOTAL + 2):
        got = learning_rates(config, jnp.asarray(step, jnp.int32), ["model", "disc"])
        # disc: 0 before the start, then its schedule counted from the start, ending at TOTAL
        want = 0.0 if step < START else _warmup_cosine(step - START, 2e-3, 2e-4, 2, TOTAL - START)
        np.testing.assert_allclose(float(got["lr/disc"]), want, rtol=1e-6, atol=1e-12)
        # The model group is unaffected: its warmup starts at step 0 and decays at TOTAL.
        np.testing.assert_allclose(float(got["lr/model"]), _warmup_cosine(step, 1e-3, 1e-5, 2, TOTAL),
                                   rtol=1e-6, atol=1e-12)


def test_trainer_leaves_the_discriminator_alone_until_gan_start_step(fast_compile):
    """Through the task and the train step: D's params are bit-identical for steps 0..2, and its
    first update (step 3) is a fresh optimizer's first update on the same gradient."""
    config = micro_config(**{"model.quantizer.use_ema": False, "model.quantizer.kmeans_init": False,
                             "model.quantizer.dead_code_threshold": 0.0,
                             "losses.gan_weight": 0.1, "losses.gan_start_step": START,
                             "losses.discriminator": {"ndf": 8, "n_layers": 2, "norm": "group", "num_groups": 4},
                             "optimizers.disc": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 1e-4}})
    task, state, optimizer, _, _ = fresh_state(config)
    step = build_step(task, optimizer, donate=False)
    batch = {"image": jnp.asarray(np.random.default_rng(1).uniform(size=(8, 32, 32, 3)), jnp.float32)}
    disc0 = jax.tree.map(np.asarray, state.params["disc"])
    for _ in range(START):
        state, _ = step(state, batch, {})
        jax.tree.map(np.testing.assert_array_equal, state.params["disc"], disc0)
    before = state
    state, m = step(state, batch, {})
    assert float(m["grad_norm/disc"]) > 0
    # D's gradient at the start step (this model has no sampling, so the step's key does not matter).
    grads_fn = jax.jit(loss_grads(task.loss))   # one compile, not an op-by-op trace
    g1 = grads_fn(before.params, before.model_state, batch, jax.random.key(1), jnp.asarray(START), {})[0]
    g2 = grads_fn(before.params, before.model_state, batch, jax.random.key(2), jnp.asarray(START), {})[0]
    jax.tree.map(np.testing.assert_array_equal, g1["disc"], g2["disc"])
    fresh_cfg = config.copy_and_resolve_references()
    fresh_cfg.losses.gan_start_step = 0
    fresh = make_optimizer(fresh_cfg, {"disc": before.params["disc"]})
    want, _ = fresh.update({"disc": g1["disc"]}, fresh.init({"disc": before.params["disc"]}),
                           {"disc": before.params["disc"]})
    got = jax.tree.map(lambda a, b: a - b, state.params["disc"], before.params["disc"])
    moved = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want["disc"])):
        # p + u - p in float32: round-off of |p| * 2^-24 per element
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)
        moved = max(moved, float(np.abs(np.asarray(b)).max()))
    assert moved > 5e-4  # ~ lr: a fresh Adam's first step, not a zero-gradient-history one
