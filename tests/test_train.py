"""The trainer: sharded step == single-device step, stop-and-resume == uninterrupted, clear errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.tasks import get_task
from titok_jax.train import sharding as sharding_lib
from titok_jax.train.loop import train
from titok_jax.train.optimizer import decay_mask, make_optimizer, path_str
from titok_jax.train.state import abstract_and_shardings
from titok_jax.train.step import build_step

from train_helpers import fresh_state, load_config_module, micro_config


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def _run_steps(config, mesh_spec, devices, batches):
    task, state, optimizer, shardings, mesh = fresh_state(config, mesh_spec, devices, ema=True)
    step = build_step(task, optimizer, shardings, mesh, ema_decay=0.999)
    losses = []
    for b in batches:
        state, metrics = step(state, jax.device_put(b, sharding_lib.batch_sharding(mesh)), {})
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.mark.parametrize("mesh_spec", [{"data": 8}, {"data": 4, "fsdp": 2}])
def test_sharded_step_equals_single_device(mesh_spec):
    config = micro_config(**{"model.encoder_width": 64, "model.decoder_width": 64})
    rng = np.random.default_rng(0)
    batches = [{"image": jnp.asarray(rng.uniform(size=(8, 32, 32, 3)), jnp.float32)} for _ in range(3)]
    single, s1 = _run_steps(config, {"data": 1}, jax.devices()[:1], batches)
    sharded, s8 = _run_steps(config, mesh_spec, jax.devices(), batches)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    # FSDP really shards: some parameter is split over the fsdp axis
    if mesh_spec.get("fsdp", 1) > 1:
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(s8.params)]
        assert any("fsdp" in str(spec) for spec in specs)
    # (params are not compared elementwise: Adam turns 1e-9 differences in near-zero gradients into
    # lr-sized steps, so only the losses, which average over everything, are a stable comparison)


def test_stop_and_resume_equals_uninterrupted(tmp_path, fast_compile):
    config = micro_config()
    full = tmp_path / "full"
    train(config, str(full), progress=False)
    parts = tmp_path / "parts"
    # Stop at 4, not a periodic save step (every_steps=3): only the stop itself can save step 4.
    assert config.checkpoint.every_steps == 3
    first = train(config, str(parts), progress=False, stop_at_step=4)
    assert first["step"] == 4
    assert max(int(s) for s in os.listdir(parts / "checkpoints")) == 4
    second = train(config, str(parts), progress=False)
    assert second["step"] == 6
    # The second run resumed from the stop-save (step 4), not from the periodic save at 3:
    # every step is logged exactly once.
    with open(parts / "metrics.jsonl") as f:
        assert [json.loads(row)["step"] for row in f] == list(range(1, 7))
    want, got = _losses(full), _losses(parts)
    assert sorted(want) == list(range(1, 7)) and sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == want[step], (step, got[step], want[step])


def test_weight_decay_mask_spares_norms_biases_embeddings_and_tokens():
    config = micro_config(**{"model.quantizer.use_ema": False, "model.quantizer.kmeans_init": False,
                             "model.quantizer.dead_code_threshold": 0.0})  # a learned codebook (a param)
    task = get_task(config)
    params = jax.eval_shape(lambda: __import__("flax").linen.unbox(task.init(jax.random.key(0))[0]))
    mask = decay_mask(params)
    decayed = {path_str(p) for p, v in jax.tree_util.tree_flatten_with_path(mask)[0] if v}
    spared = {path_str(p) for p, v in jax.tree_util.tree_flatten_with_path(mask)[0] if not v}
    assert any(p.endswith("kernel") and "mlp" in p.lower() or "Dense" in p for p in decayed)
    for must_spare in ("latent_tokens", "codebook"):
        assert any(must_spare in p for p in spared), must_spare
    assert not any("latent_tokens" in p or "codebook" in p or p.endswith("bias") or "norm" in p.lower()
                   or "embed" in p.lower() for p in decayed), sorted(decayed)


@pytest.mark.parametrize("variant", load_config_module("titok").VARIANTS)
def test_every_config_variant_initialises_abstractly(variant):
    config = load_config_module("titok").get_config(variant)
    for key in ("seed", "total_steps", "batch_size", "data", "mesh", "checkpoint", "log_every_steps",
                "eval_every_steps"):
        assert key in config, key
    assert config.checkpoint.every_steps > 0 and config.data.source and config.data.image_size > 0
    task = get_task(config)
    mesh = sharding_lib.make_mesh({"data": 4, "fsdp": 2})
    abstract, shardings, _ = abstract_and_shardings(task.init, lambda p: make_optimizer(config, p),
                                                    True, mesh, sharding_lib.DEFAULT_RULES)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params["model"]))
    assert n > (1e8 if not variant.startswith("tiny") else 1e4)
    assert jax.tree.structure(abstract.params) == jax.tree.structure(shardings.params)
