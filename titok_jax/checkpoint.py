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

import contextlib
import json
import logging
import os
import shutil
import sys
from typing import Any, Iterator, Mapping

import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from titok_jax.trees import check_tree_matches

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
    try:
        check_tree_matches(restored, abstract, source=f"checkpoint {step} in {directory}", what="array")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Orbax's absl warnings off (ERROR and above only) for the duration."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _drop_failed_reads() -> None:
    """A failed restore leaves orbax's per-array read coroutines pending in its event loop; when they
    are destroyed (at the latest when the process exits) each would print a long tensorstore
    traceback (or asyncio logs "Task exception was never retrieved"). The error has been reported
    as one line already, so silence those reports."""
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
    with _quiet_absl():  # orbax warns that a read-only manager is read-only
        manager = ocp.CheckpointManager(directory, options=options)
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


def restore_model(workdir: str, params: Any, model_state: Any, *, use_ema: bool,
                  step: int | None = None) -> tuple[Any, Any, int]:
    """The inference view of a saved train state: ``(model params, model state, step)``.

    ``params`` / ``model_state`` are the abstract trees (``jax.ShapeDtypeStruct`` with ``sharding``)
    of ``state.params["model"]`` and ``state.model_state["model"]``; ``use_ema`` reads
    ``state.ema_params`` instead of the raw params. This function is the one place outside the
    trainer that knows the train state's layout. Raises ``CheckpointError`` (one line)."""
    abstract: dict = {"model_state": {"model": model_state}}
    if use_ema:
        abstract["ema_params"] = params
    else:
        abstract["params"] = {"model": params}
    restored, step = restore_params(workdir, abstract, step)
    chosen = restored["ema_params"] if use_ema else restored["params"]["model"]
    return chosen, restored["model_state"]["model"], step


# ----------------------------------------------------------------------------- writing a workdir
CONFIG_FILE = "config.json"


def write_config(workdir: str, config: Mapping[str, Any]) -> str:
    """Write the run config as ``workdir/config.json`` (atomic; the directory is created).
    Returns the file's path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    write_json(path, dict(config))
    return path


def check_new_workdir(workdir: str, hint: str = "nothing is ever overwritten") -> None:
    """One-line ``FileExistsError`` unless ``workdir`` does not exist or is an empty directory."""
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise FileExistsError(f"output {workdir} already exists and is not an empty directory; {hint}")


INFERENCE_KEYS = ("step", "params", "model_state")


def inference_state(params: Any, model_state: Any = None, step: int = 0) -> dict[str, Any]:
    """The parts of a train state that inference reads (:func:`restore_model`, without EMA):
    ``{"step", "params": {"model": params}, "model_state": {"model": model_state}}``. Written by
    :func:`write_workdir` for a model that was imported rather than trained; ``Checkpointer.restore``
    turns it back into a full train state (integer optimizer counters and the rng start at zero)."""
    return {"step": np.asarray(step, np.int32), "params": {"model": params},
            "model_state": {"model": model_state or {}}}


def write_workdir(workdir: str, config: Mapping[str, Any], state: Any, step: int = 0) -> str:
    """A complete workdir in one call: a synchronous checkpoint of ``state`` at ``step`` (with the
    config saved beside it, as the trainer does) and ``config.json``. ``workdir`` must not exist or
    be empty (:func:`check_new_workdir`); on failure only what this call wrote is removed. Returns
    the checkpoint's path. ``state`` is a train state, or :func:`inference_state` for an import."""
    workdir = os.path.abspath(workdir)
    check_new_workdir(workdir)
    config = dict(config)
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        ck = Checkpointer(workdir, every_steps=1, keep=1, async_save=False)
        ck.save(int(step), state, config=config, force=True)
        ck.close()
        write_config(workdir, config)
    except BaseException:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # it was empty: everything in it is ours
            for name in os.listdir(workdir):
                p = os.path.join(workdir, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        raise
    return os.path.join(checkpoint_dir(workdir), f"{int(step):09d}")
