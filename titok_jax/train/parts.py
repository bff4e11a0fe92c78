"""What a run is built from, with nothing on disk touched: the mesh, the logical-axis rules, the
task, and the abstract train state with its shardings and the optimizer. The trainer adds the
workdir (checkpoints, metrics) on top; ``memory.dry_run`` uses these alone."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from titok_jax.tasks import get_task
from titok_jax.train import sharding as sharding_lib
from titok_jax.train.optimizer import make_optimizer
from titok_jax.train.state import TrainState, abstract_and_shardings


@dataclasses.dataclass
class RunParts:
    """``abstract``: the train state's ``ShapeDtypeStruct`` s; ``shardings``: a ``TrainState`` of
    ``NamedSharding`` s; ``use_ema``: whether the state carries EMA params."""

    config: Any
    mesh: Mesh
    rules: Any
    task: Any
    use_ema: bool
    abstract: TrainState
    shardings: TrainState
    optimizer: Any

    def abstract_with_shardings(self) -> TrainState:
        """The abstract state with each leaf's sharding attached (for restoring and lowering)."""
        return with_shardings(self.abstract, self.shardings)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` s of ``tree`` (arrays or structs) carrying ``shardings``."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
                        tree, shardings)


def build_parts(config: Any, inference: bool = False) -> RunParts:
    """The mesh (``config.mesh``), rules (``config.logical_axis_rules``), task, abstract state,
    shardings and optimizer of a run config. ``inference=True`` builds the task for inference
    (it reads no training-only file). Reads no workdir and writes nothing."""
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    rules = sharding_lib.rules_from_config(config.get("logical_axis_rules"))
    task = get_task(config, inference=inference)
    use_ema = float(config.optimizer.get("ema_decay", 0.0)) > 0
    abstract, shardings, optimizer = abstract_and_shardings(
        task.init, lambda p: make_optimizer(config, p), use_ema, mesh, rules)
    return RunParts(config=config, mesh=mesh, rules=rules, task=task, use_ema=use_ema,
                    abstract=abstract, shardings=shardings, optimizer=optimizer)
