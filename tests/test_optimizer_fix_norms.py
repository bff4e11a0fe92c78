"""FlowMo's weight normalisation as an optimizer option: matched weights keep their initial
Frobenius norm after every update; everything else trains as before."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from titok_jax.train.optimizer import fix_initial_norms, make_optimizer


def _params():
    rng = np.random.default_rng(0)
    return {"model": {"block_0": {"fc": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                                         "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}},
                      "head": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}}}


def test_fix_initial_norms_keeps_matched_norms_and_equals_manual_rescale():
    params = _params()
    tx = optax.chain(optax.sgd(0.5), fix_initial_norms(r"block_\d+/.*/kernel$"))
    state = tx.init(params)
    n0 = float(jnp.linalg.norm(params["model"]["block_0"]["fc"]["kernel"]))
    p = params
    for i in range(3):
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3 * (i + 1)), p)
        updates, state = tx.update(grads, state, p)
        manual = jax.tree.map(lambda x, g: x - 0.5 * g, p, grads)  # plain SGD, then rescale by hand
        k = manual["model"]["block_0"]["fc"]["kernel"]
        manual["model"]["block_0"]["fc"]["kernel"] = k * n0 / jnp.linalg.norm(k)
        p = optax.apply_updates(p, updates)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(manual)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert abs(float(jnp.linalg.norm(p["model"]["block_0"]["fc"]["kernel"])) - n0) < 1e-4
    # Unmatched weights (head, the 1-D bias) moved freely.
    assert abs(float(jnp.linalg.norm(p["model"]["head"]["kernel"]))
               - float(jnp.linalg.norm(params["model"]["head"]["kernel"]))) > 1e-2


def test_config_switch_in_make_optimizer():
    c = ml_collections.ConfigDict({"total_steps": 10, "optimizer": {
        "lr": 0.1, "end_lr": 0.0, "warmup_steps": 0, "weight_decay": 0.0, "fix_norms": r"block_\d+/.*/kernel$"}})
    params = _params()
    tx = make_optimizer(c, params)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    n0 = float(jnp.linalg.norm(params["model"]["block_0"]["fc"]["kernel"]))
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert abs(float(jnp.linalg.norm(params["model"]["block_0"]["fc"]["kernel"])) - n0) < 1e-4
