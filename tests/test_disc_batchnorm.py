"""A BatchNorm PatchGAN (taming / Open-MAGVIT2 / FQGAN) through the trainer: its running statistics
live in the train state (``model_state["disc"]["batch_stats"]``), move in the GAN step in taming's
order (generator pass on the fakes, then real, then fake), survive a stop-and-resume, and are
sharded; a GroupNorm discriminator's state is unchanged. And the step learning-rate schedule
(Open-MAGVIT2's epoch drops), checked by hand."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from titok_jax.checkpoint import restore_params
from titok_jax.train.loop import train
from titok_jax.train.optimizer import learning_rates, make_optimizer
from titok_jax.train.step import build_step

from train_helpers import fresh_state, load_config_module, micro_config

pytestmark = pytest.mark.usefixtures("fast_compile")

BATCH_DISC = {"name": "patchgan", "ndf": 8, "n_layers": 2, "norm": "batch"}
GROUP_DISC = {"name": "patchgan", "ndf": 8, "n_layers": 2, "norm": "group", "num_groups": 4}


def _gan_config(disc, start=0):
    return micro_config(**{"losses.gan_weight": 0.1, "losses.gan_start_step": start,
                           "losses.lecam_weight": 0.001, "losses.discriminator": dict(disc),
                           "optimizers.disc": {"lr": 1e-3, "warmup_steps": 0,
                                               "weight_decay": 0.0}})


def _batch(seed=1):
    return {"image": jnp.asarray(np.random.default_rng(seed).uniform(size=(8, 32, 32, 3)),
                                 jnp.float32)}


def test_group_norm_discriminator_keeps_its_state_layout():
    """No new collection: the state is ``{model, lecam}`` and D's params are ``disc.init``'s."""
    from titok_jax.tasks import get_task
    task = get_task(_gan_config(GROUP_DISC))
    params, state = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    assert sorted(state) == ["lecam", "model"]
    own = jax.eval_shape(task.disc.init, jax.random.key(0), task._dummy())
    assert sorted(own) == ["params"]
    assert jax.tree.structure(params["disc"]) == jax.tree.structure(nn.unbox(own["params"]))


def test_batch_norm_stats_move_in_taming_order():
    config = _gan_config(BATCH_DISC)
    task, state, optimizer, _, _ = fresh_state(config)
    stats0 = jax.tree.map(np.asarray, state.model_state["disc"]["batch_stats"])
    assert set(stats0) == {"norm1", "norm2"} and "batch_stats" not in state.params["disc"]
    np.testing.assert_array_equal(stats0["norm1"]["mean"], 0.0)
    np.testing.assert_array_equal(stats0["norm1"]["var"], 1.0)

    # One loss evaluation: the new statistics are D's train-mode updates on rec, images, rec.
    batch, key = _batch(), jax.random.key(3)
    loss = jax.jit(task.loss)
    _, (new_state, metrics) = loss(state.params, state.model_state, batch, key,
                                   jnp.asarray(0), {})
    rec, *_ = jax.jit(task.forward)(state.params, state.model_state, batch["image"], key, {})

    def d_train(stats, x):
        _, upd = task.disc.apply({"params": state.params["disc"], **stats}, x, train=True,
                                 mutable=["batch_stats"])
        return dict(upd)

    want = state.model_state["disc"]
    for x in (rec, batch["image"], rec):
        want = d_train(want, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 new_state["disc"], want)

    # Through the jitted train step: the statistics in the state move from their init.
    step = build_step(task, optimizer, donate=False)
    for _ in range(2):
        state, metrics = step(state, batch, {})
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm/disc"]) > 0
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                         state.model_state["disc"]["batch_stats"], stats0)
    assert min(jax.tree.leaves(moved)) > 0, moved


def test_batch_norm_stats_hold_before_gan_start():
    task, state, optimizer, _, _ = fresh_state(_gan_config(BATCH_DISC, start=5))
    stats0 = jax.tree.map(np.asarray, state.model_state["disc"])
    state, _ = build_step(task, optimizer, donate=False)(state, _batch(), {})
    jax.tree.map(np.testing.assert_array_equal, state.model_state["disc"], stats0)


def test_batch_norm_stats_are_sharded_and_the_sharded_step_runs():
    config = _gan_config(BATCH_DISC)
    mesh_spec = {"data": 4, "fsdp": 2}
    task, state, optimizer, shardings, mesh = fresh_state(config, mesh_spec, jax.devices())
    sh = shardings.model_state["disc"]["batch_stats"]["norm2"]["mean"]
    assert isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.shape == mesh.shape
    from titok_jax.train import sharding as sharding_lib
    step = build_step(task, optimizer, shardings, mesh, donate=False)
    state, metrics = step(state, jax.device_put(_batch(), sharding_lib.batch_sharding(mesh)), {})
    assert np.isfinite(float(metrics["loss"]))
    assert state.model_state["disc"]["batch_stats"]["norm2"]["mean"].sharding == sh


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def _saved_disc(workdir, config):
    """D's params and running statistics from a workdir's latest checkpoint."""
    from titok_jax.tasks import get_task
    params, state = nn.unbox(jax.eval_shape(get_task(config).init, jax.random.key(0)))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with_sh = lambda t: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), t)
    restored, step = restore_params(workdir, {"params": {"disc": with_sh(params["disc"])},
                                              "model_state": {"disc": with_sh(state["disc"])}})
    return step, restored


def test_stop_and_resume_with_batch_norm_discriminator(tmp_path):
    config = _gan_config(BATCH_DISC, start=2)
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(config, str(full), progress=False)
    assert train(config, str(parts), progress=False, stop_at_step=4)["step"] == 4
    assert train(config, str(parts), progress=False)["step"] == 6
    want, got = _losses(full), _losses(parts)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == want[step], (step, got[step], want[step])
    (s1, a), (s2, b) = _saved_disc(str(full), config), _saved_disc(str(parts), config)
    assert s1 == s2 == 6
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert float(np.abs(a["model_state"]["disc"]["batch_stats"]["norm1"]["mean"]).max()) > 0


# ----------------------------------------------------------------------------- step schedule
def _schedule_config(start=0, **disc):
    return ml_collections.ConfigDict({
        "total_steps": 12,
        "optimizer": {"lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.0, "schedule": "step",
                      "decay_steps": [5, 8], "decay_factor": 0.1},
        "optimizers": {"disc": {"lr": 2e-3, **disc}},
        "losses": {"gan_start_step": start}})


def _step_lr(step, lr=1e-3, warmup=2, start=0, boundaries=(5, 8), factor=0.1):
    """By hand: 0 before the start; linear warmup of the group's own count; x factor per boundary
    (train steps) reached."""
    if step < start:
        return 0.0
    t = step - start
    ramp = min(1.0, t / warmup) if warmup else 1.0
    return lr * ramp * factor ** sum(step >= b for b in boundaries)


def test_step_schedule_by_hand():
    config = _schedule_config(start=3, warmup_steps=0)
    for step in range(13):
        got = learning_rates(config, jnp.asarray(step, jnp.int32), ["model", "disc"])
        np.testing.assert_allclose(float(got["lr/model"]), _step_lr(step), rtol=1e-6, atol=0)
        # D starts at 3 (its own warmup 0) but drops at the same train steps 5 and 8
        np.testing.assert_allclose(float(got["lr/disc"]), _step_lr(step, 2e-3, 0, start=3),
                                   rtol=1e-6, atol=0)
    assert _step_lr(4) == 1e-3 and abs(_step_lr(5) - 1e-4) < 1e-12 and abs(_step_lr(9) - 1e-5) < 1e-12


def test_step_schedule_drives_adam():
    """A constant gradient makes Adam's step exactly ``-lr(t) * g / (|g| + eps)``."""
    config = _schedule_config()
    params = {"model": {"w": jnp.ones((3, 2), jnp.float32)}}
    tx = make_optimizer(config, params)
    opt_state = tx.init(params)
    g = {"model": {"w": jnp.full((3, 2), 0.5, jnp.float32)}}
    for step in range(10):
        updates, opt_state = tx.update(g, opt_state, params)
        want = -_step_lr(step) * 0.5 / (0.5 + 1e-8)
        # (float32 bias corrections: ~1e-5 relative)
        np.testing.assert_allclose(np.asarray(updates["model"]["w"]), want, rtol=1e-4, atol=1e-12)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("bad,match", [
    ({"schedule": "exponential"}, "unknown learning-rate schedule"),
    ({"decay_steps": [8, 5]}, "increasing"),
    ({"decay_steps": [5, -1]}, "increasing"),
    ({"decay_factor": 0.0}, "decay_factor"),
])
def test_bad_schedule_settings_are_clear_value_errors(bad, match):
    config = _schedule_config()
    config.optimizer.update(bad)
    with pytest.raises(ValueError, match=match):
        make_optimizer(config, {"model": {"w": jnp.ones((2, 2))}})


def test_published_configs_use_the_official_discriminator_and_schedule():
    magvit2 = load_config_module("magvit2")
    for variant, epochs in (("open_magvit2_128", (250, 300)), ("open_magvit2_256", (200, 250))):
        c = magvit2.get_config(variant)
        assert c.losses.discriminator.norm == "batch"
        assert c.optimizer.schedule == "step" and c.optimizer.decay_factor == 0.1
        assert list(c.optimizer.decay_steps) == [e * magvit2.STEPS_PER_EPOCH for e in epochs]
        make_optimizer(c, {"model": {"w": jnp.ones((2, 2))}, "disc": {"w": jnp.ones((2, 2))}})
    assert load_config_module("vqgan").get_config("taming_f16_1024").losses.discriminator.norm == "batch"
    for variant in ("dual", "triple"):
        assert load_config_module("fqgan").get_config(variant).losses.discriminator.norm == "batch"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_norm_state_keeps_its_float32_layout_under_the_start_gate(dtype):
    """Traced only: both branches of the start gate give D's statistics the state's float32
    shapes, whatever the compute dtype."""
    from titok_jax.tasks import get_task
    config = _gan_config(BATCH_DISC, start=3)
    config.compute_dtype = dtype
    config.losses.discriminator.dtype = dtype
    task = get_task(config)
    params, state = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    batch = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    _, (new_state, _) = jax.eval_shape(task.loss, params, state, {"image": batch}, jax.random.key(0),
                                       jnp.asarray(0), {})
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new_state["disc"]), jax.tree.leaves(state["disc"])):
        assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32


def test_adaptive_weight_through_a_batch_norm_discriminator():
    """taming's adaptive weight with its BatchNorm PatchGAN in train mode: the gradient of the
    generator loss reaches the decoder's conv_out kernel through the batch statistics too."""
    from titok_jax import losses as L
    from titok_jax.tasks import get_task

    c = load_config_module("vqgan").get_config("taming_f16_1024")
    assert c.losses.discriminator.norm == "batch"
    c.model.update(image_size=32, ch=32, ch_mult=(2, 1), num_res_blocks=1, attn_resolutions=(16,),
                   z_channels=16, embed_dim=8, quantizer={"name": "vq", "codebook_size": 64})
    c.data.image_size = 32
    c.compute_dtype = "float32"
    c.losses.update(perceptual_weight=0.0, gan_start_step=0, discriminator=BATCH_DISC)
    task = get_task(c)
    params, state = nn.unbox(task.init(jax.random.key(0)))
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
    _, (_, m) = jax.jit(task.loss)(params, state, {"image": images}, jax.random.key(1),
                                   jnp.asarray(0), {})

    def rec_of(w):
        dec = dict(params["model"]["decoder"], conv_out={
            "kernel": w, "bias": params["model"]["decoder"]["conv_out"]["bias"]})
        return task.model.apply({"params": dict(params["model"], decoder=dec), **state["model"]},
                                images, train=False)[0]

    def g(w):
        logits, _ = task.disc.apply({"params": params["disc"], **state["disc"]}, rec_of(w),
                                    train=True, mutable=["batch_stats"])
        return L.generator_loss(logits, "hinge")

    nll = lambda w: 2.0 * L.reconstruction_loss(rec_of(w), images, "l1")  # noqa: E731
    w0 = params["model"]["decoder"]["conv_out"]["kernel"]
    g_nll, g_gan = jax.jit(lambda w: (jax.grad(nll)(w), jax.grad(g)(w)))(w0)
    want = 0.8 * np.linalg.norm(np.asarray(g_nll)) / (np.linalg.norm(np.asarray(g_gan)) + 1e-4)
    np.testing.assert_allclose(float(m["gan/weight"]), want, rtol=1e-4)
