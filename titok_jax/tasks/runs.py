"""Reading a finished (or running) workdir back: its config and, through its own task, its model.

``restore_run(workdir)`` is the one loader of trained weights: the inference API
(``load_tokenizer`` / ``load_generator``), the frozen tokenizer of a generator, a stage-2 or
post-training run's ``init_from``, FlexTok's VAE workdir. The abstract param tree comes from the
run's task (``TASKS[config.task.name](config, inference=True).init``), so there is no second copy of
any family's init and no list of task names here. A workdir may also be an ``hf:ORG/NAME`` name: the
release in the local Hugging Face cache, converted once into a cached workdir
(:func:`titok_jax.convert.hub.resolve_workdir`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from titok_jax.tasks.base import Task, get_task


@dataclasses.dataclass
class Run:
    """A restored run: its task (built for inference), model params (EMA when kept and asked for),
    model state, config and checkpoint step."""

    task: Task
    params: Any
    model_state: Any
    config: Any
    step: int


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The ``config.json`` of a workdir; one-line FileNotFoundError / ValueError."""
    workdir = os.fspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a titok_jax workdir (no config.json); train one first")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        return ml_collections.ConfigDict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid config: {e}") from None


def run_task(workdir: str | os.PathLike, kind: str | None = None, config: Any = None,
             expect_task: str | None = None) -> Task:
    """The task of a workdir's run, built for inference. ``kind`` ("tokenizer" / "generator")
    checks that the run can be used as one; ``expect_task`` checks the task's name (for
    ``init_from``). One-line ValueError otherwise."""
    workdir = os.fspath(workdir)
    config = read_run_config(workdir) if config is None else config
    if expect_task is not None:
        name = config.get("task", {}).get("name") if hasattr(config.get("task", {}), "get") else None
        if name != expect_task:
            raise ValueError(f"{workdir} is a {name!r} run, not {expect_task}")
    try:
        task = get_task(config, inference=True)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{workdir}/config.json does not describe a run this version can build: {msg}") from None
    if kind is not None and task.inference_refusal:
        raise ValueError(f"{workdir} is {task.inference_refusal}")
    if kind is not None and task.kind != kind:
        hint = {"tokenizer": "", "generator": " (train configs/maskgit.py or configs/ar.py)"}.get(kind, "")
        raise ValueError(f"{workdir} holds a {config.task.name!r} run, not a {kind}{hint}")
    return task


def restore_run(workdir: str | os.PathLike, *, kind: str | None = None, expect_task: str | None = None,
                step: int | None = None, ema: bool | None = None, device: Any = None,
                host: bool = False) -> Run:
    """The run of ``workdir`` (a directory, or ``hf:ORG/NAME`` from the local Hugging Face cache) at
    its latest checkpoint (or ``step``): model params (the EMA when the run kept one, unless
    ``ema=False``) and model state on ``device`` (default: the first), or as host numpy arrays
    (``host=True``). FileNotFoundError for a missing workdir / checkpoint / cached repository,
    ValueError for anything that cannot be read; all one line."""
    import flax.linen as nn
    import jax
    import numpy as np

    from titok_jax.checkpoint import CheckpointError, checkpoint_dir, restore_model
    from titok_jax.convert.hub import resolve_workdir

    workdir = os.fspath(resolve_workdir(workdir))
    config = read_run_config(workdir)
    task = run_task(workdir, kind, config, expect_task)
    try:
        params_abs, state_abs = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    except Exception as e:  # a config that names a model it cannot build
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{workdir}/config.json does not describe a buildable model: {msg}") from None
    sh = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    to_abs = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree)
    use_ema = float(config.get("optimizer", {}).get("ema_decay", 0.0) or 0.0) > 0 and ema is not False
    ckdir = checkpoint_dir(workdir)
    if not os.path.isdir(ckdir) or not any(n.isdigit() for n in os.listdir(ckdir)):
        raise FileNotFoundError(f"no checkpoint in {ckdir}")
    try:
        params, state, step = restore_model(workdir, to_abs(params_abs["model"]),
                                            to_abs(state_abs["model"]), use_ema=use_ema, step=step)
    except CheckpointError as e:
        if str(e).startswith("no checkpoint"):
            raise FileNotFoundError(str(e)) from None
        raise ValueError(str(e)) from None
    if host:
        params, state = jax.tree.map(np.asarray, (params, state))
    return Run(task=task, params=params, model_state=state, config=config, step=step)
