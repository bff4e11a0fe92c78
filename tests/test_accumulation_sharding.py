"""Gradient accumulation on a mesh: micro-batch ``j`` is rows ``j, A + j, 2A + j, ...`` of the batch, so
each micro-batch is split over every data x fsdp device like the whole batch (the compiled step
gathers and permutes nothing), and the accumulated update equals the full-batch one."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from titok_jax.train import sharding as sharding_lib
from titok_jax.train.state import TrainState
from titok_jax.train.step import _split_micro, build_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

D_IN, D_OUT, BATCH = 24, 5, 32


class _Task:
    """A mean over examples of a per-example loss (no batch statistics): its gradient is the mean
    of the micro-batch gradients however the batch is split."""

    @staticmethod
    def loss(params, model_state, batch, key, step, constants):
        h = jnp.tanh(batch["x"] @ params["model"]["w"])
        loss = jnp.mean(jnp.sum(jnp.square(h - batch["y"]), axis=-1))
        return loss, (model_state, {"loss": loss})


def _state(optimizer):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((D_IN, D_OUT)) / np.sqrt(D_IN), jnp.float32)
    params = {"model": {"w": w}}
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params), ema_params=None,
                      model_state={}, rng=jax.random.key_data(jax.random.key(0)))


def _batch(n=BATCH):
    rng = np.random.default_rng(1)
    return {"x": jnp.asarray(rng.standard_normal((n, D_IN)), jnp.float32),
            "y": jnp.asarray(rng.uniform(-1, 1, (n, D_OUT)), jnp.float32)}


def _mesh_step(spec, accumulation, optimizer):
    mesh = sharding_lib.make_mesh(spec)
    repl = sharding_lib.replicated(mesh)
    shardings = jax.tree.map(lambda _: repl, _state(optimizer))
    return mesh, build_step(_Task, optimizer, shardings, mesh, donate=False, accumulation_steps=accumulation)


def test_micro_batches_interleave_the_rows():
    micro = _split_micro({"x": jnp.arange(8), "y": jnp.arange(16).reshape(8, 2)}, 2)
    np.testing.assert_array_equal(micro["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])
    np.testing.assert_array_equal(micro["y"][1], [[2, 3], [6, 7], [10, 11], [14, 15]])
    with pytest.raises(ValueError, match="does not split into 3"):
        _split_micro({"x": jnp.arange(8)}, 3)


@pytest.mark.parametrize("spec", [None, {"data": 4, "fsdp": 2}], ids=["no_mesh", "data4_fsdp2"])
def test_accumulated_update_equals_the_full_batch_update(spec):
    optimizer = optax.sgd(0.5)
    batch = _batch()
    results = []
    for accumulation in (1, 2, 4):
        if spec is None:
            step = build_step(_Task, optimizer, donate=False, accumulation_steps=accumulation)
            b = batch
        else:
            mesh, step = _mesh_step(spec, accumulation, optimizer)
            b = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
        state, metrics = step(_state(optimizer), b, None)
        results.append((np.asarray(state.params["model"]["w"]), float(metrics["loss"])))
    w1, loss1 = results[0]
    assert np.abs(w1 - np.asarray(_state(optimizer).params["model"]["w"])).max() > 1e-3   # it moved
    for w, loss in results[1:]:
        np.testing.assert_allclose(w, w1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(loss, loss1, rtol=1e-6)


def _compiled(spec, accumulation):
    optimizer = optax.sgd(0.5)
    mesh, step = _mesh_step(spec, accumulation, optimizer)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=sharding_lib.batch_sharding(mesh)), _batch())
    return step.lower(_state(optimizer), batch, None).compile().as_text()


def _collectives(text):
    ops = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
    return {op: len(re.findall(rf" {op}(-start)?\(", text)) for op in ops}


def _forward_rows(text):
    """Per-device rows of the forward matmul ``x @ w`` (output ``f32[rows, D_OUT]``)."""
    return {int(n) for n in re.findall(rf"= f32\[(\d+),{D_OUT}\]\{{1,0\}} dot\(", text)}


@pytest.mark.parametrize("spec", [{"data": 8}, {"data": 4, "fsdp": 2}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["data8", "data4_fsdp2", "data2_fsdp2_tensor2"])
def test_each_micro_batch_is_split_over_all_batch_devices(spec):
    mesh = sharding_lib.make_mesh(spec)
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    plain, accum = _compiled(spec, 1), _compiled(spec, 2)
    # the forward runs on a micro-batch of BATCH / 2 rows split over all batch devices
    assert _forward_rows(plain) == {BATCH // devices}
    assert _forward_rows(accum) == {BATCH // 2 // devices}
    # and, like the plain data-parallel step, it only all-reduces (the gradient): nothing is
    # gathered or permuted to regroup the micro-batches
    ops = _collectives(accum)
    assert ops == _collectives(plain), (ops, _collectives(plain))
    assert ops["all-gather"] == ops["collective-permute"] == ops["all-to-all"] == 0, ops


def test_micro_batch_the_devices_do_not_divide_is_an_error():
    optimizer = optax.sgd(0.5)
    mesh, step = _mesh_step({"data": 8}, 8, optimizer)        # 32 / 8 = 4 rows for 8 devices
    batch = jax.device_put(_batch(), sharding_lib.batch_sharding(mesh))
    with pytest.raises(ValueError, match=r"micro-batch of 4 .* 8 devices"):
        step(_state(optimizer), batch, None)
