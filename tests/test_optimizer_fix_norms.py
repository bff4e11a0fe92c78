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


def test_stacked_layers_keep_per_layer_norms_and_skip_decay_like_unrolled_blocks():
    """A scanned stack (``layers/block/...``, leading layer axis) gets exactly the unrolled blocks'
    update: each layer keeps its own initial norm, and a stacked bias [L, d] is not decayed."""
    from titok_jax.nn.scan import match_layers
    from titok_jax.train.optimizer import decay_mask
    rng = np.random.default_rng(1)
    unrolled = {"model": {f"block_{i}": {"fc": {
        "kernel": jnp.asarray(rng.normal(size=(6, 5)) * (i + 1), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}} for i in range(3)}}
    stacked = {"model": match_layers(unrolled["model"], {"layers": {"block": {"fc": {
        "kernel": jnp.zeros((3, 6, 5)), "bias": jnp.zeros((3, 5))}}}})}
    assert stacked["model"]["layers"]["block"]["fc"]["kernel"].shape == (3, 6, 5)
    mask = decay_mask(stacked, no_decay="")
    assert mask["model"]["layers"]["block"]["fc"] == {"kernel": True, "bias": False}

    def run(params, pattern):
        tx = optax.chain(optax.adamw(0.1, weight_decay=0.5, mask=decay_mask(params, no_decay="")),
                         fix_initial_norms(pattern))
        state, p = tx.init(params), params
        for i in range(2):
            grads = jax.tree.map(lambda x: jnp.sin(x * (i + 2)), p)
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        return p

    pu = run(unrolled, r"block_\d+/.*/kernel$")
    ps = run(stacked, r"(block_\d+|layers/block)/.*/kernel$")
    for a, b in zip(jax.tree.leaves(match_layers(pu["model"], ps["model"])), jax.tree.leaves(ps["model"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    norms = np.linalg.norm(np.asarray(ps["model"]["layers"]["block"]["fc"]["kernel"]).reshape(3, -1), axis=1)
    want = [np.linalg.norm(np.asarray(unrolled["model"][f"block_{i}"]["fc"]["kernel"])) for i in range(3)]
    np.testing.assert_allclose(norms, want, rtol=1e-5)
