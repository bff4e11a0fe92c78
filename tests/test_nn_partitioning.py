"""Every param of every titok_jax.nn module carries logical axis names of the right length."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from titok_jax.nn import (LOGICAL_AXES, MLP, AdaLNModulation, LearnedPositionEmbedding,
                          MultiHeadAttention, PatchEmbed, TimestepEmbedder, TransformerBlock,
                          boxed, flat_kernel_init)

X = jnp.zeros((2, 4, 8))
COND = jnp.zeros((2, 6))
CASES = {
    "attn_fused": (MultiHeadAttention(num_heads=2), (X,), {}),
    "attn_split_qknorm_rope": (
        MultiHeadAttention(num_heads=2, fused_qkv=False, qk_norm="layernorm", use_rope=True),
        (X,), {"positions": jnp.arange(4)[None]}),
    "attn_rmsnorm": (MultiHeadAttention(num_heads=2, qk_norm="rmsnorm"), (X,), {}),
    "mlp_gelu": (MLP(hidden_dim=16), (X,), {}),
    "mlp_swiglu": (MLP(hidden_dim=16, activation="swiglu"), (X,), {}),
    "block": (TransformerBlock(num_heads=2), (X,), {}),
    "block_adaln": (TransformerBlock(num_heads=2, adaln=True, qk_norm="rmsnorm",
                                     norm_type="rmsnorm"), (X, COND), {}),
    "adaln": (AdaLNModulation(num_chunks=6, features=8), (COND,), {}),
    "patch": (PatchEmbed(patch_size=2, features=8), (jnp.zeros((1, 4, 4, 3)),), {}),
    "posemb": (LearnedPositionEmbedding(num_tokens=5, features=8), (X,), {}),
    "timestep": (TimestepEmbedder(features=8, frequency_dim=4), (jnp.zeros((2,)),), {}),
}


def _boxed_leaves(variables):
    return jax.tree_util.tree_leaves_with_path(
        variables, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_param_has_logical_names(case):
    module, args, kwargs = CASES[case]
    variables = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    leaves = _boxed_leaves(variables["params"])
    assert leaves
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), where
        assert len(leaf.names) == leaf.value.ndim, (where, leaf.names, leaf.value.shape)
        named = [n for n in leaf.names if n is not None]
        assert set(named) <= LOGICAL_AXES, where
        assert len(named) == len(set(named)), where     # a mesh axis may be used only once
        assert leaf.value.dtype == jnp.float32, where


def test_flat_kernel_init_sees_pytorch_fans():
    """A [D, 3, H, Dh] qkv kernel is drawn as the 2-D [D, 3*H*Dh] matrix (PyTorch in_proj fans)."""
    seen = []

    def init(key, shape, dtype=jnp.float32):
        seen.append(tuple(shape))
        return jnp.arange(np.prod(shape), dtype=dtype).reshape(shape)

    k = flat_kernel_init(init, 1)(jax.random.key(0), (8, 3, 2, 4))
    assert seen == [(8, 24)] and k.shape == (8, 3, 2, 4)
    np.testing.assert_array_equal(k.reshape(8, 24), np.arange(192).reshape(8, 24))
    out = flat_kernel_init(init, 2)(jax.random.key(0), (2, 4, 8))      # [H, Dh, D] out-proj
    assert seen[-1] == (8, 8) and out.shape == (2, 4, 8)
    bound = np.sqrt(6 / (8 + 24))    # xavier_uniform with fan_in 8, fan_out 24
    real = jax.jit(MultiHeadAttention(num_heads=2).init)(jax.random.key(0), X)
    kq = np.asarray(nn.unbox(real)["params"]["qkv"]["kernel"])
    assert np.abs(kq).max() <= bound and np.abs(kq).max() > 0.8 * bound


def test_boxed_rejects_unknown_names():
    with pytest.raises(ValueError):
        boxed(nn.initializers.zeros_init(), ("embed", "model"))


def test_block_params_shard_on_a_mesh():
    """The names map through a rules table to shardings that jit(init) honours on 8 devices."""
    module, args, _ = CASES["block_adaln"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", None),
             ("norm", None))
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    variables = jax.jit(module.init, out_shardings=shardings)(jax.random.key(0), *args)
    qkv = variables["params"]["attn"]["qkv"]["kernel"]
    assert qkv.names == ("embed", None, "heads", "kv")
    assert qkv.value.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    fc_in = variables["params"]["mlp"]["fc_in"]["kernel"].value
    assert fc_in.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert np.isfinite(np.asarray(fc_in)).all()
