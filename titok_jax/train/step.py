"""The training step: the gradient of the task's loss (optionally accumulated over micro-batches),
one optimizer update of every parameter group, the EMA, and the logged scalars.

``build_step`` is the one place the step is assembled and jitted (the trainer, the benchmarks and
the tests call it): ``jax.jit`` with the state's shardings in and out, the batch split over the
mesh's batch axes, constants replicated, and the state donated."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from titok_jax.train import sharding as sharding_lib
from titok_jax.train.optimizer import ema_update, learning_rates
from titok_jax.train.state import TrainState

# loss_fn(params, model_state, batch, key, step, constants) -> (scalar, (new_model_state, metrics))
LossFn = Callable[[Any, Any, Any, jax.Array, jax.Array, Any], tuple[jax.Array, tuple[Any, dict]]]


def _split_micro(batch: Any, accumulation: int) -> Any:
    def split(x):
        if x.shape[0] % accumulation:
            raise ValueError(f"batch of {x.shape[0]} does not split into {accumulation} micro-batches")
        return x.reshape((accumulation, x.shape[0] // accumulation) + x.shape[1:])
    return jax.tree.map(split, batch)


def loss_grads(loss_fn: LossFn) -> Callable:
    """``(params, model_state, batch, key, step, constants) -> (grads, new model_state, metrics)``:
    the gradient of a task's loss with respect to every parameter group."""
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def grads_fn(params, model_state, batch, key, step, constants):
        grads, (model_state, metrics) = grad_fn(params, model_state, batch, key, step, constants)
        return grads, model_state, metrics

    return grads_fn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    ema_decay: float = 0.0, accumulation_steps: int = 1,
                    lr_fn: Callable[[jax.Array], dict] | None = None) -> Callable:
    """``step(state, batch, constants) -> (state, metrics)`` (not jitted: ``build_step`` does);
    metrics are float32 scalars (``loss`` among them); ``constants`` are frozen inputs of the task
    (e.g. LPIPS weights). The gradient is ``jax.grad(loss_fn)`` with respect to every group."""
    grads_fn = loss_grads(loss_fn)

    def step(state: TrainState, batch: Any, constants: Any = None) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        if accumulation_steps == 1:
            grads, model_state, metrics = grads_fn(state.params, state.model_state, batch, key, state.step, constants)
        else:
            micro = _split_micro(batch, accumulation_steps)

            def body(carry, xs):
                acc, mstate, i = carry
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
    """``build_step``'s keyword options from a run config: EMA decay, accumulation steps and the
    learning rates to log (``abstract_params``: the params tree, for the per-group schedules)."""
    opt = config.optimizer
    return {"ema_decay": float(opt.get("ema_decay", 0.0) or 0.0),
            "accumulation_steps": int(opt.get("accumulation_steps", 1) or 1),
            "lr_fn": lambda st: learning_rates(config, st, abstract_params)}


def build_step(task: Any, optimizer: optax.GradientTransformation, shardings: Any = None,
               mesh: Any = None, *, donate: bool = True, **options: Any) -> Callable:
    """The jitted training step ``(state, batch, constants) -> (state, metrics)`` of ``task``.

    With a ``mesh`` the state keeps ``shardings`` (a ``TrainState`` of shardings), the batch is
    split over the mesh's batch axes and the constants are replicated; without one, plain
    ``jax.jit``. ``options``: ``ema_decay``, ``accumulation_steps``, ``lr_fn`` (``step_options``
    gives them from a config)."""
    step_fn = make_train_step(task.loss, optimizer, **options)
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=donate_argnums)
    if shardings is None:
        raise ValueError("build_step with a mesh needs the state's shardings")
    repl = sharding_lib.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(shardings, sharding_lib.batch_sharding(mesh), repl),
                   out_shardings=(shardings, None), donate_argnums=donate_argnums)
