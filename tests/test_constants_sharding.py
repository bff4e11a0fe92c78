"""A task's frozen constants (LPIPS, ConvNeXt, a teacher) are sharded like params: over ``fsdp``, on
their largest dimension it divides, tiny ones replicated; the step gives the same result as with
replicated constants."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from titok_jax.train import sharding as sharding_lib
from titok_jax.train.sharding import MAX_REPLICATED_ELEMENTS, constant_shardings, place_constants
from titok_jax.train.state import TrainState
from titok_jax.train.step import build_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

D_FEAT, D_PROJ, D_OUT, BATCH = 1024, 64, 8, 16


@pytest.fixture(scope="module")
def fsdp8():
    return sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})


class _Task:
    """A loss through a frozen projection (the constant) into a trained head."""

    @staticmethod
    def loss(params, model_state, batch, key, step, constants):
        feats = jnp.tanh(batch["x"] @ constants["proj"] + constants["bias"])
        h = feats @ params["model"]["w"]
        loss = jnp.mean(jnp.square(h - batch["y"]))
        return loss, (model_state, {"loss": loss})


def _constants():
    rng = np.random.default_rng(0)
    return {"proj": (rng.standard_normal((D_FEAT, D_PROJ)) / np.sqrt(D_FEAT)).astype(np.float32),
            "bias": rng.standard_normal(D_PROJ).astype(np.float32)}


def _state(optimizer):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((D_PROJ, D_OUT)) / 8, jnp.float32)
    params = {"model": {"w": w}}
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params), ema_params=None,
                      model_state={}, rng=jax.random.key_data(jax.random.key(0)))


def _batch(mesh):
    rng = np.random.default_rng(2)
    b = {"x": rng.standard_normal((BATCH, D_FEAT)).astype(np.float32),
         "y": rng.standard_normal((BATCH, D_OUT)).astype(np.float32)}
    return jax.device_put(b, sharding_lib.batch_sharding(mesh))


def test_rule_largest_divisible_dimension_small_ones_replicated(fsdp8):
    def spec(shape):
        return constant_shardings(jax.ShapeDtypeStruct(shape, jnp.float32), fsdp8).spec
    assert spec((1024, 64)) == P("fsdp", None)
    assert spec((64, 1024)) == P(None, "fsdp")
    assert spec((3, 3, 512, 512)) == P(None, None, None, "fsdp")     # ties: the last (output features)
    assert spec((1002, 72)) == P(None, "fsdp")                       # 1002 % 8 != 0: the next largest
    assert spec((64,)) == P()                                        # tiny: replicated
    assert spec(()) == P()
    assert spec((1001, 999)) == P()                                  # fits nowhere, under the limit
    one = sharding_lib.make_mesh({"data": 8})
    assert constant_shardings(jax.ShapeDtypeStruct((1024, 64), jnp.float32), one).spec == P()


def test_large_constant_that_fits_nowhere_is_one_line_error(fsdp8):
    shape = (1025, 1025)
    assert shape[0] * shape[1] > MAX_REPLICATED_ELEMENTS
    with pytest.raises(ValueError) as err:
        constant_shardings({"teacher": {"k": jax.ShapeDtypeStruct(shape, jnp.float32)}}, fsdp8)
    assert "\n" not in str(err.value) and "teacher/k" in str(err.value)


def test_sharded_constants_give_the_replicated_result(fsdp8):
    optimizer = optax.adam(1e-2)
    host = _constants()
    repl_state = jax.tree.map(lambda _: sharding_lib.replicated(fsdp8), _state(optimizer))

    sharded = place_constants(host, fsdp8)
    shard = sharded["proj"].addressable_shards[0].data
    assert shard.shape == (D_FEAT // 8, D_PROJ)                      # 1/8 of the constant per device
    assert shard.nbytes * 8 == host["proj"].nbytes
    assert sharded["bias"].sharding.spec == P()

    step = build_step(_Task, optimizer, repl_state, fsdp8, donate=False, constants=sharded)
    compiled = step.lower(_state(optimizer), _batch(fsdp8), sharded).compile()
    assert compiled.input_shardings[0][2]["proj"].spec == P("fsdp", None)
    s_new, s_metrics = step(_state(optimizer), _batch(fsdp8), sharded)

    replicated = jax.device_put(host, sharding_lib.replicated(fsdp8))
    old = build_step(_Task, optimizer, repl_state, fsdp8, donate=False)  # takes them as placed
    r_new, r_metrics = old(_state(optimizer), _batch(fsdp8), replicated)

    np.testing.assert_allclose(float(s_metrics["loss"]), float(r_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s_new.params["model"]["w"]), np.asarray(r_new.params["model"]["w"]),
                               rtol=1e-5, atol=1e-6)
    moved = np.asarray(s_new.params["model"]["w"]) - np.asarray(_state(optimizer).params["model"]["w"])
    assert np.abs(moved).max() > 1e-3
