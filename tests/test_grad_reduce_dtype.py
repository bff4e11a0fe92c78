"""With a bfloat16 compute dtype the weight gradients are summed across devices in float32
(``optimizer.grad_reduce_dtype``, default "float32"); "compute" keeps the old bfloat16 sums.

The HLO is read right after the SPMD partitioner (an XLA dump): that is where the cross-device sums
get their dtype. The CPU backend's later ``all-reduce-promotion`` pass widens every bfloat16
all-reduce to float32 anyway (CPU collectives have no bfloat16), so the final CPU text would show
float32 whatever the step does; GPU and TPU keep the partitioner's dtype."""
import glob
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from titok_jax.train import sharding as sharding_lib
from titok_jax.train.precision import float32_reductions
from titok_jax.train.state import TrainState
from titok_jax.train.step import build_step, loss_grads, step_options

from train_helpers import fresh_state, micro_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

D_IN, D_OUT, BATCH = 64, 32, 16


def _partitioned_hlo(lowered, tmp_path) -> str:
    """The step's HLO right after SPMD partitioning (see the module docstring)."""
    lowered.compile(compiler_options={"xla_dump_to": str(tmp_path),
                                      "xla_dump_hlo_pass_re": "spmd-partitioning"})
    files = sorted(glob.glob(str(tmp_path / "*after_spmd-partitioning*.txt")))
    assert files, "XLA wrote no dump after spmd-partitioning"
    with open(files[-1]) as f:
        return f.read()


def _reduction_dtypes(hlo: str) -> dict:
    """``{dtype: count}`` over the results of every all-reduce / reduce-scatter (tuples included)."""
    out: dict = {}
    for m in re.finditer(r"= (.*?) (?:all-reduce|reduce-scatter)(?:-start)?\(", hlo):
        for dtype in re.findall(r"\b(bf16|f16|f32|f64|s32)\[", m.group(1)):
            out[dtype] = out.get(dtype, 0) + 1
    return out


class _Bf16Dense:
    """A bfloat16 dense layer (float32 params cast to the compute dtype, as the models do)."""

    @staticmethod
    def loss(params, model_state, batch, key, step, constants):
        p = params["model"]
        h = batch["x"].astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16) + p["b"].astype(jnp.bfloat16)
        loss = jnp.mean(jnp.square(h.astype(jnp.float32) - batch["y"]))
        return loss, (model_state, {"loss": loss})


def _toy(mesh, optimizer):
    rng = np.random.default_rng(0)
    params = {"model": {"w": jnp.asarray(rng.standard_normal((D_IN, D_OUT)) / 8, jnp.float32),
                        "b": jnp.zeros((D_OUT,), jnp.float32)}}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params), ema_params=None,
                       model_state={}, rng=jax.random.key_data(jax.random.key(0)))
    repl = sharding_lib.replicated(mesh)
    shardings = jax.tree.map(lambda _: repl, state)
    shardings = shardings.replace(params={"model": {"w": NamedSharding(mesh, P("fsdp", None)), "b": repl}})
    batch = {"x": jnp.asarray(rng.standard_normal((BATCH, D_IN)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((BATCH, D_OUT)), jnp.float32)}
    batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
    return jax.device_put(state, shardings), shardings, batch


@pytest.mark.parametrize("mode", ["compute", "float32"])
def test_toy_bf16_step_reduces_weight_gradients_in_the_configured_dtype(mode, tmp_path):
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    optimizer = optax.sgd(0.1)
    state, shardings, batch = _toy(mesh, optimizer)
    step = build_step(_Bf16Dense, optimizer, shardings, mesh, donate=False, grad_reduce_dtype=mode)
    dtypes = _reduction_dtypes(_partitioned_hlo(step.lower(state, batch, {}), tmp_path))
    if mode == "compute":   # the old behaviour: dW and db summed over the batch devices in bf16
        assert dtypes.get("bf16", 0) >= 2, dtypes
    else:
        assert "bf16" not in dtypes and dtypes.get("f32", 0) >= 2, dtypes
    new, metrics = step(state, batch, {})
    assert np.isfinite(float(metrics["loss"]))


def test_float32_reduction_keeps_the_gradient_unrounded():
    """With "compute" the weight gradient reaches the float32 param as a bfloat16 value; with
    "float32" it keeps float32 bits. The forward pass (the loss) is the same."""
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    state, _, batch = _toy(mesh, optax.sgd(1.0))
    grad, loss = {}, {}
    for mode in ("compute", "float32"):
        grads_fn = jax.jit(loss_grads(_Bf16Dense.loss, mode))
        grads, _, metrics = grads_fn(state.params, {}, batch, jax.random.key(0), jnp.int32(0), {})
        grad[mode], loss[mode] = np.asarray(grads["model"]["w"]), float(metrics["loss"])
    assert loss["float32"] == loss["compute"]                # only the backward pass is rewritten

    def bf16_exact(g):
        return np.mean(g == np.asarray(jnp.asarray(g).astype(jnp.bfloat16).astype(jnp.float32)))
    assert np.abs(grad["compute"]).max() > 1e-2                         # it moved
    assert bf16_exact(grad["compute"]) == 1.0
    assert bf16_exact(grad["float32"]) < 0.5
    np.testing.assert_allclose(grad["float32"], grad["compute"], rtol=1e-2, atol=1e-3)


def _conv_loss(dtype):
    def loss(params, model_state, batch, key, step, constants):
        p = params["model"]
        y = jax.lax.conv_general_dilated(batch["x"].astype(dtype), p["k"].astype(dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + p["b"].astype(dtype)
        loss = jnp.mean(jnp.square(y.astype(jnp.float32) - batch["t"]))
        return loss, (model_state, {"loss": loss})
    return loss


def test_bias_gradient_of_a_bf16_conv_matches_float32_on_one_device():
    """A conv bias's gradient sums 8 x 32 x 32 cotangents: in bfloat16 it is mostly rounding error
    (the old behaviour, ~90% off here); summed in float32 it matches the float32 model's."""
    rng = np.random.default_rng(0)
    params = {"model": {"k": jnp.asarray(rng.standard_normal((3, 3, 3, 16)) * 0.2, jnp.float32),
                        "b": jnp.full((16,), 0.1, jnp.float32)}}
    batch = {"x": jnp.asarray(rng.uniform(size=(8, 32, 32, 3)), jnp.float32),
             "t": jnp.asarray(rng.uniform(size=(8, 32, 32, 16)), jnp.float32)}

    def grads(dtype, mode):
        fn = jax.jit(loss_grads(_conv_loss(dtype), mode))
        g = fn(params, {}, batch, jax.random.key(0), jnp.int32(0), {})
        return {k: np.asarray(v) for k, v in g[0]["model"].items()}
    ref = grads(jnp.float32, "float32")
    old, new = grads(jnp.bfloat16, "compute"), grads(jnp.bfloat16, "float32")
    err = lambda g, k: np.linalg.norm(g[k] - ref[k]) / np.linalg.norm(ref[k])  # noqa: E731
    assert err(old, "b") > 0.1
    assert err(new, "b") < 0.01 and err(new, "k") < 0.01


def test_rewrite_reaches_scan_and_remat_bodies_and_keeps_dtypes():
    def f(w, x):
        def body(c, xi):
            return c + jax.checkpoint(lambda a, b: a @ b)(xi, w.astype(jnp.bfloat16)).sum(0), None
        c, _ = jax.lax.scan(body, jnp.zeros((w.shape[1],), jnp.bfloat16), x.astype(jnp.bfloat16))
        return jnp.sum(c.astype(jnp.float32) ** 2)

    w = jnp.ones((8, 4), jnp.float32) / 8
    x = jnp.ones((3, 5, 8), jnp.float32)
    grad = jax.grad(f)
    wrapped = float32_reductions(grad)
    assert wrapped(w, x).dtype == jnp.float32
    np.testing.assert_allclose(wrapped(w, x), grad(w, x), rtol=2e-2)

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "reduce_sum"):
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)
    closed = jax.make_jaxpr(wrapped)(w, x)
    found = list(dots(closed.jaxpr))
    assert found and all(e.outvars[0].aval.dtype == jnp.float32 for e in found), found
    assert any(e.primitive.name == "dot_general" for e in found)


def test_float32_model_is_untouched():
    def grad(w):
        return jax.grad(lambda v: jnp.sum(jnp.tanh(v @ v.T)))(w)
    w = jnp.linspace(-1, 1, 16, dtype=jnp.float32).reshape(4, 4)
    np.testing.assert_array_equal(float32_reductions(grad)(w), grad(w))
    prims = lambda f: [e.primitive.name for e in jax.make_jaxpr(f)(w).eqns]  # noqa: E731
    assert prims(float32_reductions(grad)) == prims(grad)      # nothing to rewrite: the same program


def test_micro_titok_bf16_step_has_no_bf16_gradient_reduction(tmp_path):
    config = micro_config(**{"compute_dtype": "bfloat16"})
    assert "grad_reduce_dtype" not in config.optimizer       # an old config: the default applies
    assert step_options(config, None)["grad_reduce_dtype"] == "float32"
    task, state, optimizer, shardings, mesh = fresh_state(config, {"data": 1, "fsdp": 8}, jax.devices())
    step = build_step(task, optimizer, shardings, mesh, donate=False, **step_options(config, state.params))
    batch = jax.device_put({"image": np.zeros((8, 32, 32, 3), np.float32)}, sharding_lib.batch_sharding(mesh))
    dtypes = _reduction_dtypes(_partitioned_hlo(step.lower(state, batch, {}), tmp_path))
    assert "bf16" not in dtypes and dtypes.get("f32", 0) > 10, dtypes


def test_unknown_grad_reduce_dtype_is_an_error():
    with pytest.raises(ValueError, match="grad_reduce_dtype"):
        build_step(_Bf16Dense, optax.sgd(0.1), grad_reduce_dtype="float16")
