"""Params on a mesh that does not divide their preferred dimension: the mesh axis moves to another
dimension it divides (largest first); a large param that no dimension fits is a one-line error
naming it; small ones (biases, norms) stay replicated."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from titok_jax.train import sharding as sharding_lib
from titok_jax.train.sharding import MAX_REPLICATED_ELEMENTS, _fit, logical_shardings

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None), ("norm", None))


@pytest.fixture(scope="module")
def fsdp4():
    return sharding_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})


def test_divisible_dimension_keeps_its_axis(fsdp4):
    assert _fit(P("fsdp", "tensor"), (64, 32), fsdp4) == P("fsdp", "tensor")


def test_axis_moves_to_the_largest_dimension_it_divides(fsdp4):
    # embed = 6 is not a multiple of 4: fsdp goes to the largest free dimension 4 divides (32)
    assert _fit(P("fsdp", None, None), (6, 16, 32), fsdp4) == P(None, None, "fsdp")
    assert _fit(P("fsdp", None), (6, 12), fsdp4) == P(None, "fsdp")
    # a dimension another axis already splits is not free
    assert _fit(P("fsdp", "tensor", None), (6, 8, 12), fsdp4) == P(None, "tensor", "fsdp")


def test_small_param_without_a_fitting_dimension_stays_replicated(fsdp4):
    assert _fit(P("fsdp"), (6,), fsdp4) == P(None)
    assert _fit(P("fsdp", "tensor"), (6, 8), fsdp4) == P(None, "tensor")


def test_size_one_axes_split_nothing():
    mesh = sharding_lib.make_mesh({"data": 8})
    assert _fit(P("fsdp", "tensor"), (7, 5), mesh) == P(None, None)


def test_large_param_without_a_fitting_dimension_is_an_error(fsdp4):
    shape = (1025, 1025)
    assert shape[0] * shape[1] > MAX_REPLICATED_ELEMENTS
    with pytest.raises(ValueError) as err:
        _fit(P("fsdp", None), shape, fsdp4, "model/encoder/kernel")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("model/encoder/kernel", "(1025, 1025)", "fsdp", "size 4"):
        assert part in msg, (part, msg)


class _Net(nn.Module):
    """Kernels whose embed (first) dimension 4 does not divide, a norm scale, a too-large table."""
    odd_table: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        k = self.param("kernel", nn.with_logical_partitioning(init, ("embed", "mlp")), (6, 64))
        p = self.param("proj", nn.with_logical_partitioning(init, ("embed", "kv")), (6, 64))
        s = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (6,))
        y = (x * s) @ k + x @ p
        if self.odd_table:
            t = self.param("table", nn.with_logical_partitioning(init, ("embed", "kv")), (1025, 1025))
            y = y + t[0, :64]
        return y


def test_logical_shardings_place_and_name_the_params(fsdp4):
    x = jnp.zeros((2, 6))
    abstract = jax.eval_shape(_Net().init, jax.random.key(0), x)
    sh = logical_shardings(abstract, fsdp4, RULES)["params"]
    # kernel: embed=6 does not take fsdp=4, mlp=64 takes tensor=2; fsdp has no free dimension left
    # (64 is split by tensor) and the kernel is small -> replicated over fsdp
    assert sh["kernel"].spec == P(None, "tensor")
    # proj: kv is unsplit, so fsdp moves from embed=6 to kv=64
    assert sh["proj"].spec == P(None, "fsdp")
    assert sh["scale"].spec == P(None)
    variables = jax.jit(_Net().init, out_shardings={"params": sh})(jax.random.key(0), x)
    assert variables["params"]["kernel"].value.sharding.spec == P(None, "tensor")
    assert variables["params"]["proj"].value.sharding.spec == P(None, "fsdp")

    abstract = jax.eval_shape(_Net(odd_table=True).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"params/table \(1025, 1025\)"):
        logical_shardings(abstract, fsdp4, RULES)


def test_fsdp_factored_into_two_mesh_axes_places_arrays_on_every_device():
    # fsdp 8 as 4 x 2 (the mesh spec's fsdp_sub override; beyond 128 devices it is automatic)
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "fsdp_sub": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "fsdp_sub": 2, "tensor": 1}
    # 12 = 4 x 3: fsdp splits it and fsdp_sub the other dimension; 16 takes the whole group
    assert _fit(P("fsdp", None), (12, 6), mesh) == P("fsdp", "fsdp_sub")
    assert _fit(P("fsdp", None), (16, 6), mesh) == P(("fsdp", "fsdp_sub"), None)
    split = jax.sharding.NamedSharding(mesh, P("fsdp", "fsdp_sub"))
    x = jax.device_put(jnp.arange(72.0).reshape(12, 6), split)
    assert {s.data.shape for s in x.addressable_shards} == {(3, 3)}
    # the whole group on one dimension is the layout of one fsdp axis of size 8
    one = sharding_lib.make_mesh({"data": 1, "fsdp": 8})
    grouped = jax.sharding.NamedSharding(mesh, P(("fsdp", "fsdp_sub"), None))
    single = jax.sharding.NamedSharding(one, P("fsdp", None))
    assert grouped.devices_indices_map((16, 6)) == single.devices_indices_map((16, 6))
    # the batch is split over all 8 devices
    batch = jax.device_put(jnp.zeros((16, 3)), sharding_lib.batch_sharding(mesh))
    assert {s.data.shape for s in batch.addressable_shards} == {(2, 3)}


def test_unnamed_large_leaves_are_split_over_fsdp(fsdp4):
    # a leaf its names leave unsplit (a codebook, an unnamed statistic) goes on its largest dimension
    assert _fit(P(None, None), (64, 64), fsdp4) == P("fsdp", None)
    assert _fit(P(), (6, 128), fsdp4) == P(None, "fsdp")
    assert _fit(P(None, "tensor"), (64, 64), fsdp4) == P("fsdp", "tensor")
