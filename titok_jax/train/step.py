"""The training step: the gradient of the task's loss (optionally accumulated over micro-batches),
one optimizer update of every parameter group, the EMA, and the logged scalars.

``build_step`` is the one place the step is assembled and jitted (the trainer, the benchmarks and
the tests call it): ``jax.jit`` with the state's shardings in and out, the batch split over the
mesh's batch axes, the frozen constants sharded like params (``sharding.constant_shardings``), and
the state donated. With a bfloat16 compute dtype the gradients are summed - across devices too -
in float32 (``optimizer.grad_reduce_dtype``, ``precision.float32_reductions``). The step is traced
under the mesh and the logical-axis rules (``nn.activation_sharding.activation_rules``), so the
activations the models constrain by name (``batch``, ``tokens``, ``act_embed``) are placed by the
same rules table as the params."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from titok_jax.nn.activation_sharding import activation_rules
from titok_jax.train import sharding as sharding_lib
from titok_jax.train.optimizer import ema_update, learning_rates
from titok_jax.train.precision import float32_reductions
from titok_jax.train.state import TrainState

# loss_fn(params, model_state, batch, key, step, constants) -> (scalar, (new_model_state, metrics))
# optimizer.grad_reduce_dtype: "float32" (default) or "compute" (sum in the compute dtype, as before)
GRAD_REDUCE_DTYPES = ("float32", "compute")

LossFn = Callable[[Any, Any, Any, jax.Array, jax.Array, Any], tuple[jax.Array, tuple[Any, dict]]]


def _split_micro(batch: Any, accumulation: int, sharding: NamedSharding | None = None) -> Any:
    """Every ``[B, ...]`` leaf -> ``[A, B/A, ...]`` (``A = accumulation``), micro-batch ``j`` being
    rows ``j, A + j, 2A + j, ...``: example ``i`` of micro-batch ``j`` is row ``i * A + j``.

    The batch is split over the devices along its first axis, so the ``[B/A, A]`` reshape keeps
    every device's rows on it and each micro-batch stays split over all of them (an ``[A, B/A]``
    reshape would put part of the batch sharding on the accumulation axis). With ``sharding`` (the
    batch ``NamedSharding``) the micro-batches are constrained to it, and a micro-batch the batch
    devices do not divide is a ``ValueError``."""
    devices, spec = 1, None
    if sharding is not None:
        spec = sharding.spec[0] if len(sharding.spec) else None
        names = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
        devices = math.prod(sharding.mesh.shape[a] for a in names)

    def split(x):
        b = x.shape[0]
        if b % accumulation:
            raise ValueError(f"batch of {b} does not split into {accumulation} micro-batches")
        micro = b // accumulation
        if micro % devices:
            raise ValueError(f"micro-batch of {micro} ({b} / {accumulation} accumulation steps) does "
                             f"not split over the {devices} devices of mesh axes {spec}")
        x = jnp.swapaxes(x.reshape((micro, accumulation) + x.shape[1:]), 0, 1)
        if sharding is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, P(None, spec)))
        return x
    return jax.tree.map(split, batch)


def loss_grads(loss_fn: LossFn, grad_reduce_dtype: str = "float32") -> Callable:
    """``(params, model_state, batch, key, step, constants) -> (grads, new model_state, metrics)``:
    the gradient of a task's loss with respect to every parameter group (``jax.vjp`` of the
    loss with cotangent 1, as ``jax.grad`` does).

    ``grad_reduce_dtype``: ``"float32"`` sums every low-precision contribution to a gradient - so
    also its cross-device reduction - in float32, by rewriting the backward pass
    (``precision.float32_reductions``; the forward pass is untouched); ``"compute"`` leaves the
    backward ops in the compute dtype (bfloat16 sums under a bfloat16 compute dtype)."""
    if grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
        raise ValueError(f"optimizer.grad_reduce_dtype must be one of {GRAD_REDUCE_DTYPES}, "
                         f"got {grad_reduce_dtype!r}")

    def grads_fn(params, model_state, batch, key, step, constants):
        loss, vjp_fn, (model_state, metrics) = jax.vjp(
            lambda p: loss_fn(p, model_state, batch, key, step, constants), params, has_aux=True)
        if jnp.shape(loss) != () or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
            raise TypeError(f"a task's loss must be a real scalar, got {jnp.result_type(loss)} "
                            f"{jnp.shape(loss)}")
        backward = float32_reductions(vjp_fn) if grad_reduce_dtype == "float32" else vjp_fn
        (grads,) = backward(jnp.ones_like(loss))
        return grads, model_state, metrics

    return grads_fn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    ema_decay: float = 0.0, accumulation_steps: int = 1,
                    lr_fn: Callable[[jax.Array], dict] | None = None,
                    batch_sharding: NamedSharding | None = None,
                    grad_reduce_dtype: str = "float32") -> Callable:
    """``step(state, batch, constants) -> (state, metrics)`` (not jitted: ``build_step`` does);
    metrics are float32 scalars (``loss`` among them); ``constants`` are frozen inputs of the task
    (e.g. LPIPS weights). The gradient is ``jax.grad(loss_fn)`` with respect to every group.

    With ``accumulation_steps = A > 1`` the gradient is the mean of the gradients of ``A``
    micro-batches (``_split_micro``: interleaved rows), each one split over the devices of
    ``batch_sharding`` like the whole batch (``build_step`` passes the mesh's batch sharding)."""
    grads_fn = loss_grads(loss_fn, grad_reduce_dtype)

    def step(state: TrainState, batch: Any, constants: Any = None) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        if accumulation_steps == 1:
            grads, model_state, metrics = grads_fn(state.params, state.model_state, batch, key, state.step, constants)
        else:
            micro = _split_micro(batch, accumulation_steps, batch_sharding)

            def body(carry, xs):
                acc, mstate, i = carry
                if batch_sharding is not None:
                    xs = jax.lax.with_sharding_constraint(xs, batch_sharding)
                g, mstate, m = grads_fn(state.params, mstate, xs, jax.random.fold_in(key, i), state.step,
                                     constants)
                acc = jax.tree.map(lambda a, b: a + b / accumulation_steps, acc, g)
                return (acc, mstate, i + 1), m

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, model_state, _), ms = jax.lax.scan(body, (zeros, state.model_state, 0), micro)
            metrics = jax.tree.map(jnp.mean, ms)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params["model"], state.step, ema_decay)
        metrics = dict(metrics)
        for group, g in grads.items():
            metrics[f"grad_norm/{group}"] = optax.tree.norm(g)
        metrics["param_norm/model"] = optax.tree.norm(params["model"])
        if lr_fn is not None:
            metrics.update(lr_fn(state.step))
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema, model_state=model_state)
        return new_state, metrics

    return step


def step_options(config: Any, abstract_params: Any) -> dict:
    """``build_step``'s keyword options from a run config: EMA decay, accumulation steps, the
    learning rates to log (``abstract_params``: the params tree, for the per-group schedules), the
    dtype gradients are summed in (``optimizer.grad_reduce_dtype``, default ``"float32"``) and the
    logical-axis rules that place the activations (``logical_axis_rules``, as the params')."""
    opt = config.optimizer
    return {"ema_decay": float(opt.get("ema_decay", 0.0) or 0.0),
            "accumulation_steps": int(opt.get("accumulation_steps", 1) or 1),
            "lr_fn": lambda st: learning_rates(config, st, abstract_params),
            "grad_reduce_dtype": str(opt.get("grad_reduce_dtype", "float32") or "float32"),
            "rules": sharding_lib.rules_from_config(config.get("logical_axis_rules"))}


def build_step(task: Any, optimizer: optax.GradientTransformation, shardings: Any = None,
               mesh: Any = None, *, donate: bool = True, constants: Any = None,
               rules: Any = None, **options: Any) -> Callable:
    """The jitted training step ``(state, batch, constants) -> (state, metrics)`` of ``task``.

    With a ``mesh`` the state keeps ``shardings`` (a ``TrainState`` of shardings) and the batch is
    split over the mesh's batch axes. ``constants`` (the tree the step will be called with, arrays
    or ``ShapeDtypeStruct`` s) fixes the constants' shardings to ``sharding.constant_shardings``
    (sharded over ``fsdp`` like params; place them with ``sharding.place_constants``); without it
    the step takes the constants as they are placed. The step is traced under ``mesh`` and
    ``rules`` (default ``sharding.DEFAULT_RULES``; ``()`` turns the activation constraints off), so
    ``nn.activation_sharding.constrain`` places the models' activations. Without a mesh, plain
    ``jax.jit`` (the constraints are the identity). ``options``: ``ema_decay``,
    ``accumulation_steps``, ``lr_fn``, ``grad_reduce_dtype`` (``step_options`` gives them, and
    ``rules``, from a config)."""
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(make_train_step(task.loss, optimizer, **options), donate_argnums=donate_argnums)
    if shardings is None:
        raise ValueError("build_step with a mesh needs the state's shardings")
    rules = sharding_lib.DEFAULT_RULES if rules is None else tuple(rules)
    const_sh = None if constants is None else sharding_lib.constant_shardings(constants, mesh)
    batch_sh = sharding_lib.batch_sharding(mesh)
    step_fn = make_train_step(task.loss, optimizer, batch_sharding=batch_sh, **options)

    def step(state, batch, constants):          # traced under the trainer's mesh and rules
        with activation_rules(mesh, rules):
            return step_fn(state, batch, constants)

    return jax.jit(step, in_shardings=(shardings, batch_sh, const_sh),
                   out_shardings=(shardings, None), donate_argnums=donate_argnums)
