"""The train state and how it is built sharded: ``eval_shape(init)`` -> shardings from the logical
names -> ``jit(init, out_shardings=...)``, so no full copy of the params ever lives on one device;
and the check that a state is finite before it is saved (:func:`first_non_finite`)."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from titok_jax.train import sharding as sharding_lib
from titok_jax.train.optimizer import path_keys, path_str


@flax.struct.dataclass
class TrainState:
    """step: optimizer steps taken; params: ``{group: tree}`` (``model``, optionally ``disc``);
    opt_state: the multi-group optax state; ema_params: EMA of ``params['model']`` (or None);
    model_state: non-param collections (quantizer statistics, loss EMAs, a BatchNorm
    discriminator's running statistics); rng: raw key data (uint32), so checkpoints hold plain
    arrays."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    model_state: Any
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def abstract_and_shardings(init_fn: Callable[[jax.Array], tuple[Any, Any]],
                           tx: Callable[[Any], optax.GradientTransformation], use_ema: bool,
                           mesh: Mesh, rules: Any) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
    """Abstract train state, its shardings, and the optimizer (built on the unboxed param shapes).

    ``init_fn(key) -> (params_groups, model_state)`` may return boxed (logically named) trees."""
    boxed_params, boxed_state = jax.eval_shape(init_fn, jax.random.key(0))
    param_sh = sharding_lib.logical_shardings(boxed_params, mesh, rules)
    state_sh = sharding_lib.logical_shardings(boxed_state, mesh, rules)
    params = nn.unbox(boxed_params)
    optimizer = tx(params)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    repl = NamedSharding(mesh, P())
    opt_sh = optimizer_shardings(opt_abstract, params, param_sh, repl)
    rng_abstract = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_abstract, ema_params=params["model"] if use_ema else None,
                          model_state=nn.unbox(boxed_state), rng=rng_abstract)
    shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh,
                           ema_params=param_sh["model"] if use_ema else None,
                           model_state=state_sh, rng=repl)
    return abstract, shardings, optimizer


def optimizer_shardings(opt_abstract: Any, params: Any, param_shardings: Any, default: Any) -> Any:
    """Shard every optimizer-state leaf that mirrors a parameter (Adam's mu and nu, ...) like that
    parameter; everything else (counts, scalars) gets ``default``. A leaf mirrors a parameter when
    its key path ends with the parameter's path and the shapes agree."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(param_shardings)):
        by_path[path_keys(path)] = (tuple(leaf.shape), sh)

    def pick(path, leaf):
        keys = path_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def create_state(init_fn: Callable[[jax.Array], tuple[Any, Any]], optimizer: optax.GradientTransformation,
                 use_ema: bool, shardings: TrainState, seed: int) -> TrainState:
    """Initialise the state directly into its shardings (one jitted program on every host)."""

    def make(key_data):
        key = jax.random.wrap_key_data(key_data)
        init_key, train_key = jax.random.split(key)
        params, model_state = init_fn(init_key)
        params, model_state = nn.unbox(params), nn.unbox(model_state)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params),
                          ema_params=jax.tree.map(jnp.copy, params["model"]) if use_ema else None,
                          model_state=model_state, rng=jax.random.key_data(train_key))

    key_data = jax.random.key_data(jax.random.key(seed))
    return jax.jit(make, out_shardings=shardings)(key_data)


def first_non_finite(state: Any) -> str | None:
    """The '/'-joined path of the first array of ``state`` (in tree order: ``params``, ``opt_state``,
    ``ema_params``, ``model_state``) holding a NaN or an infinity, or None when every floating array
    is finite. One jitted reduction over the whole tree on the devices, where the arrays live;
    only its result, one int32 scalar, comes to the host. Integer leaves (step, counts, the rng
    key data) are skipped."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return None
    index = int(_first_non_finite_leaf([x for _, x in leaves]))
    return None if index < 0 else path_str(leaves[index][0])


@jax.jit
def _first_non_finite_leaf(leaves: list[jax.Array]) -> jax.Array:
    """The index of the first of ``leaves`` with a non-finite element, or -1."""
    finite = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
    return jnp.where(jnp.all(finite), -1, jnp.argmin(finite.astype(jnp.int32))).astype(jnp.int32)
