"""The training step: task gradients (optionally accumulated over micro-batches), one optimizer
update of every parameter group, the EMA, and the logged scalars; jitted once with the state's
shardings and the state donated."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from titok_jax.train.optimizer import ema_update
from titok_jax.train.state import TrainState

# grads_fn(params, model_state, batch, key, step, constants) -> (grads, new_model_state, metrics)
GradsFn = Callable[[Any, Any, Any, jax.Array, jax.Array, Any], tuple[Any, Any, dict]]


def _split_micro(batch: Any, accumulation: int) -> Any:
    def split(x):
        if x.shape[0] % accumulation:
            raise ValueError(f"batch of {x.shape[0]} does not split into {accumulation} micro-batches")
        return x.reshape((accumulation, x.shape[0] // accumulation) + x.shape[1:])
    return jax.tree.map(split, batch)


def make_train_step(grads_fn: GradsFn, optimizer: optax.GradientTransformation, *,
                    ema_decay: float = 0.0, accumulation_steps: int = 1,
                    lr_fn: Callable[[jax.Array], dict] | None = None) -> Callable:
    """``step(state, batch, constants) -> (state, metrics)``; metrics are float32 scalars (``loss``
    among them); ``constants`` are frozen inputs of the task (e.g. LPIPS weights)."""

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
