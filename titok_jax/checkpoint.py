"""Orbax checkpoints of a workdir: the train state, the data-iterator state and the config, saved
together (async) under ``DIR/checkpoints/<step>``; restore of the full state for resuming, or of the
params alone for inference.

Policies: a save every ``every_steps`` steps plus at preemption (SIGTERM through JAX's preemption
sync, or the trainer's own signal handler calling ``save(force=True)``); the latest ``keep``
checkpoints are preserved, and every ``keep_every_steps``-th too when set.

A checkpoint that cannot be read or does not match the config raises ``CheckpointError`` with one
line saying what and where; nothing is written or deleted in that case.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

STATE, DATA, CONFIG = "state", "data_iter", "config"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored (corrupt, incomplete, or from another config)."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the train state + data iterator + config."""

    def __init__(self, workdir: str, every_steps: int, keep: int = 3, keep_every_steps: int = 0,
                 async_save: bool = True, read_only: bool = False):
        preserve = [policies.LatestN(max(1, int(keep)))]
        if keep_every_steps:
            preserve.append(policies.EveryNSteps(int(keep_every_steps)))
        save_policy = policies.AnySavePolicy([
            policies.FixedIntervalPolicy(max(1, int(every_steps))),
            policies.PreemptionCheckpointingPolicy(),
        ])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_policy,
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=async_save, step_format_fixed_length=9,
            read_only=read_only, create=not read_only)
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_path(self, step: int | None = None) -> str | None:
        """The directory of checkpoint ``step`` (latest by default), or None if there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return os.path.join(self.directory, f"{int(step):09d}")

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        return bool(self.manager.reached_preemption(step))

    def save(self, step: int, state: Any, data_iter: Any = None, config: dict | None = None,
             force: bool = False) -> bool:
        """Save if the policy says so at ``step`` (or ``force``); returns whether it saved."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA] = _grain_save(data_iter)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config)
        return bool(self.manager.save(int(step), args=ocp.args.Composite(**items), force=force))

    def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None) -> tuple[Any, int]:
        """Restore ``(state, step)`` (latest step by default) into the shardings of
        ``abstract_state`` (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``); restores the data
        iterator in place when given."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items[DATA] = _grain_restore(data_iter)
        failure = None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types; all mean "cannot use this checkpoint"
            failure = _one_line(e)
        if failure is not None:
            _drop_failed_reads()
            raise CheckpointError(f"checkpoint {self.step_path(step)} cannot be restored for this "
                                  f"config: {failure}")
        _check_tree(abstract_state, restored[STATE], step, self.directory)
        return restored[STATE], int(step)

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG])
        except Exception as e:
            raise CheckpointError(f"cannot read the config of checkpoint {step} in {self.directory}: "
                                  f"{_one_line(e)}") from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _grain_save(it: Any) -> Any:
    import grain
    return grain.checkpoint.CheckpointSave(it)


def _grain_restore(it: Any) -> Any:
    import grain
    return grain.checkpoint.CheckpointRestore(it)


def _check_tree(abstract: Any, restored: Any, step: int, directory: str) -> None:
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got = jax.tree_util.tree_flatten_with_path(restored)[0]
    if len(want) != len(got):
        raise CheckpointError(f"checkpoint {step} in {directory} has {len(got)} arrays, the config "
                              f"needs {len(want)}")
    for (path, w), (_, g) in zip(want, got):
        if tuple(w.shape) != tuple(g.shape):
            raise CheckpointError(f"checkpoint {step} in {directory}: {jax.tree_util.keystr(path)} has "
                                  f"shape {tuple(g.shape)}, the config needs {tuple(w.shape)}")


def _drop_failed_reads() -> None:
    """A failed restore leaves orbax's per-array read coroutines pending in its event loop; when they
    are destroyed (at the latest when the process exits) each would print a long tensorstore
    traceback (or asyncio logs "Task exception was never retrieved"). The error has been reported
    as one line already, so silence those reports."""
    import logging
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:400]


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def restore_params(workdir: str, abstract: dict, step: int | None = None) -> tuple[dict, int]:
    """Restore only the parts of the saved train state named in ``abstract`` (for inference), e.g.
    ``{"params": {"model": ...}, "ema_params": ..., "model_state": ...}`` of
    ``jax.ShapeDtypeStruct`` (with ``sharding``); nothing else (optimizer state, rng) is read.

    Opens the checkpoint directory read-only; raises ``CheckpointError`` (one line) when there is
    no checkpoint or it cannot be read into ``abstract``. Returns ``(restored, step)``."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint in {directory}")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, step_format_fixed_length=9,
                                           save_interval_steps=0)
    import logging
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that a read-only manager is read-only
    try:
        manager = ocp.CheckpointManager(directory, options=options)
    finally:
        absl_logger.setLevel(level)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        path = os.path.join(directory, f"{int(step):09d}")
        failure = None
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.PyTreeRestore(
                    abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True)}))
        except Exception as e:  # orbax raises many types; all mean "cannot use this checkpoint"
            failure = _one_line(e)
        if failure is not None:
            _drop_failed_reads()
            raise CheckpointError(f"checkpoint {path} cannot be restored for this config: {failure}")
        _check_tree(abstract, restored[STATE], step, directory)
        return restored[STATE], int(step)
    finally:
        manager.close()
