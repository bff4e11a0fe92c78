"""The task registry and the interface a task implements."""
from __future__ import annotations

from typing import Any, Callable, Protocol

import jax

TASKS: dict[str, Callable[[Any], "Task"]] = {}


class Task(Protocol):
    """What the trainer needs from a family.

    init(key) -> (params: {group: tree}, model_state: tree)   trees may be logically boxed
    constants() -> tree of frozen arrays passed to every step (e.g. LPIPS weights), or {}
    grads(params, model_state, batch, key, step, constants) -> (grads, model_state, metrics)
    reconstruct(model_params, model_state, images) -> (reconstructions in [0,1], indices or None)
    """

    def init(self, key: jax.Array) -> tuple[Any, Any]: ...
    def constants(self) -> Any: ...
    def grads(self, params: Any, model_state: Any, batch: Any, key: jax.Array, step: jax.Array,
              constants: Any) -> tuple[Any, Any, dict]: ...
    def reconstruct(self, model_params: Any, model_state: Any, images: jax.Array) -> tuple[jax.Array, Any]: ...


def register_task(name: str) -> Callable:
    def deco(factory: Callable[[Any], Task]) -> Callable[[Any], Task]:
        TASKS[name] = factory
        return factory
    return deco


def get_task(config: Any) -> Task:
    name = config.task.name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](config)
