"""Orbax checkpoints of a workdir: the train state, the data-iterator state and the config, saved
together (async) under ``DIR/checkpoints/<step>``; restore of the full state for resuming, or of the
params alone for inference.

Policies: a save every ``every_steps`` steps plus at preemption (SIGTERM through JAX's preemption
sync, or the trainer's own signal handler calling ``save(force=True)``); the latest ``keep``
checkpoints are preserved, and every ``keep_every_steps``-th too when set.

Integrity: every saved step carries a content hash of its files (``titok_jax.checkpoint_integrity``),
written before the step is committed (in Orbax's background thread for async saves), and checked
before the step is restored. A corrupt step is a ``CorruptCheckpointError`` naming it and the
newest older step that is intact; ``restore(..., from_intact=True)`` (``train
--resume_from_intact``) moves the corrupt steps to ``DIR/checkpoints.corrupt/`` and resumes from
that one. Steps without a hash (older workdirs) load unverified.

A checkpoint that cannot be read or does not match the config raises ``CheckpointError`` with one
line saying what and where; nothing is written or deleted in that case. A save that fails on I/O
(a full disk) raises ``CheckpointSaveError`` (an ``OSError``) with one line, after removing the
partial step; the earlier steps are untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

# Re-exported: the integrity checks and the errors are part of this module's interface.
from titok_jax.checkpoint_integrity import (CORRUPT_DIR, HASH_FILE, TMP_SUFFIX, check_resume,  # noqa: F401
                                            check_step, checkpoint_dir, config_differences,
                                            step_dir, steps_on_disk, verify, write_hash)
from titok_jax.checkpoint_quiet import (drop_failed_reads, join_orbax_threads, quiet_absl,
                                        quiet_orbax_errors, silence_orbax_threads)
from titok_jax.errors import (CheckpointError, CheckpointSaveError, CheckpointWarning,  # noqa: F401
                              ConfigMismatchError, CorruptCheckpointError)
from titok_jax.trees import check_tree_matches

STATE, DATA, CONFIG = "state", "data_iter", "config"


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
        self._async = bool(async_save) and not read_only
        self._hashing: int | None = None   # the step the async finaliser hashes
        self._pending: int | None = None   # an async save not waited for yet
        self._hash_failure: str | None = None
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_policy,
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=self._async, step_format_fixed_length=9,
            async_options=(ocp.AsyncOptions(post_finalization_callback=self._hash_in_background)
                           if self._async else None),
            read_only=read_only, create=not read_only)
        self.directory = checkpoint_dir(workdir)
        quiet_orbax_errors()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_path(self, step: int | None = None) -> str | None:
        """The directory of checkpoint ``step`` (latest by default), or None if there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return step_dir(self.directory, step)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        return bool(self.manager.reached_preemption(step))

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, data_iter: Any = None, config: dict | None = None,
             force: bool = False) -> bool:
        """Save if the policy says so at ``step`` (or ``force``); returns whether it saved. The
        step's content hash is written before it is committed. An I/O failure (this save's, or
        the previous async save's) is a one-line ``CheckpointSaveError`` after the partial step
        is removed."""
        self._finish_pending()
        step = int(step)
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA] = _grain_save(data_iter)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config)
        self._hashing = step
        try:
            saved = bool(self.manager.save(step, args=ocp.args.Composite(**items), force=force))
        except Exception as e:  # noqa: BLE001 - sorted out by _save_failed
            self._hashing = None
            self._save_failed(step, e)
        if not saved:
            self._hashing = None
        elif self._async:
            self._pending = step
        else:
            self._hashing = None
            if jax.process_index() == 0:
                self._write_hash(step_dir(self.directory, step), step)
                self._warn_hash_failure()
        return saved

    def _hash_in_background(self) -> None:
        """Orbax's post-finalisation callback (its save thread, before the step is renamed into
        place): hash the step's files. Never raises: a failure leaves the step unverified."""
        step = self._hashing
        if step is None or jax.process_index() != 0:
            return
        final = step_dir(self.directory, step)
        self._write_hash(final + TMP_SUFFIX if os.path.isdir(final + TMP_SUFFIX) else final, step)

    def _write_hash(self, path: str, step: int) -> None:
        try:
            write_hash(path)
        except Exception as e:  # noqa: BLE001 - the data are saved; only the check is lost
            self._hash_failure = (f"could not write the content hash of checkpoint step {step} "
                                  f"({_one_line(e)}); it will load unverified")

    def _warn_hash_failure(self) -> None:
        if self._hash_failure:
            text, self._hash_failure = self._hash_failure, None
            warnings.warn(CheckpointWarning(text), stacklevel=3)

    def _finish_pending(self) -> None:
        """Wait for the async save in flight; its I/O failure is raised here (one line)."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._hashing = None
            self._save_failed(step, e)
        self._hashing = None
        self._warn_hash_failure()

    def _save_failed(self, step: int | None, e: BaseException) -> None:
        """Remove the partial step ``step`` and raise: ``CheckpointSaveError`` (one line) for an
        I/O failure, the original exception otherwise."""
        silence_orbax_threads()
        join_orbax_threads()  # the save's other writers finish (or fail) before the partial step goes
        if step is not None and jax.process_index() == 0:
            shutil.rmtree(step_dir(self.directory, step) + TMP_SUFFIX, ignore_errors=True)
        with contextlib.suppress(Exception):
            self.manager.reload()
        if not _is_io_error(e):
            raise e
        earlier = [s for s in steps_on_disk(self.directory) if step is None or s < step]
        kept = (f"the earlier checkpoint (step {earlier[-1]}) is as it was" if earlier
                else "no earlier checkpoint exists")
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        raise CheckpointSaveError(
            f"could not save {what} in {self.directory}: {_io_reason(e)}; the partial step was "
            f"removed and {kept}", errno=getattr(e, "errno", None), step=step) from None

    # ----------------------------------------------------------------- restoring
    def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None,
                from_intact: bool = False) -> tuple[Any, int]:
        """Restore ``(state, step)`` (latest step by default) into the shardings of
        ``abstract_state`` (a tree of ``jax.ShapeDtypeStruct`` with ``sharding``); restores the data
        iterator in place when given. The step's content hash is checked first: a corrupt step is
        a ``CorruptCheckpointError`` naming the newest older intact step, or, with
        ``from_intact``, the corrupt steps are moved aside and that step is restored."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        intact = check_step(self.directory, step, from_intact=from_intact)
        if intact != step:
            self.manager.reload()
            step = intact
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items[DATA] = _grain_restore(data_iter)
        failure = None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types; all mean "cannot use this checkpoint"
            failure = _one_line(e)
        if failure is not None:
            drop_failed_reads()
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
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        except BaseException:
            with contextlib.suppress(Exception):
                self.manager.close()
            raise
        self.manager.close()


def _grain_save(it: Any) -> Any:
    import grain
    return grain.checkpoint.CheckpointSave(it)


def _grain_restore(it: Any) -> Any:
    import grain
    return grain.checkpoint.CheckpointRestore(it)


def _check_tree(abstract: Any, restored: Any, step: int, directory: str) -> None:
    """Every leaf of ``abstract`` came back as an array of its shape: a partial restore hands back
    the abstract leaf itself for a name the checkpoint lacks (e.g. a scanned ``layers`` stack asked
    of a checkpoint written unrolled), which is a ``CheckpointError`` naming the first one."""
    try:
        check_tree_matches(restored, abstract, source=f"checkpoint {step} in {directory}", what="array")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    missing = [path for path, leaf in jax.tree_util.tree_leaves_with_path(restored)
               if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:
        name = jax.tree_util.keystr(missing[0], simple=True, separator="/")
        raise CheckpointError(f"checkpoint {step} in {directory} holds no {name} ({len(missing)} arrays "
                              f"missing): it was written with another parameter layout than this "
                              f"config's (model.scan_layers or the model's sizes differ)")


_IO_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
             "Input/output error", "Permission denied", "RESOURCE_EXHAUSTED")


def _is_io_error(e: BaseException) -> bool:
    """Whether a failure while saving is the file system's (``OSError``, or tensorstore's text)."""
    return isinstance(e, OSError) or any(w in str(e) for w in _IO_WORDS)


def _io_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return next((w for w in _IO_WORDS if w in str(e)), _one_line(e))


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
    with quiet_absl():  # orbax warns that a read-only manager is read-only
        manager = ocp.CheckpointManager(directory, options=options)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        path = step_dir(directory, step)
        check_step(directory, step, hint="`titok-jax train --resume_from_intact` resumes from it "
                                         "(load_tokenizer(workdir, step={intact}) reads it)")
        failure = None
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.PyTreeRestore(
                    abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True)}))
        except Exception as e:  # orbax raises many types; all mean "cannot use this checkpoint"
            failure = _one_line(e)
        if failure is not None:
            drop_failed_reads()
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
