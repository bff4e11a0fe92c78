"""``titok-jax train`` and ``titok-jax eval``: a config (or a workdir's config) -> the trainer.

Before the trainer is built, ``train`` checks what would otherwise fail deep inside it: counts that
cannot work (``log_every_steps=0``), a workdir whose checkpoints were trained with another model
(:func:`titok_jax.checkpoint.config_differences` against its ``config.json``) and a corrupt latest
checkpoint (its content hash; ``--resume_from_intact`` resumes from the newest intact step).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from titok_jax.commands.common import (UsageError, check_npz_input, config_spec, load_run_config,
                                       missing_config_file, parse)
from titok_jax.errors import ConfigError, ConfigMismatchError

# (dotted key, smallest allowed value, what it is): checked before the trainer is built.
COUNTS = (("total_steps", 0, "the number of training steps"), ("batch_size", 1, "the global batch"),
          ("log_every_steps", 1, "the logging interval"),
          ("eval_every_steps", 0, "the evaluation interval (0 = never)"),
          ("checkpoint.every_steps", 1, "the checkpoint interval"),
          ("checkpoint.keep", 1, "how many checkpoints are kept"),
          ("checkpoint.keep_every_steps", 0, "the interval of checkpoints kept for good (0 = none)"),
          ("optimizer.accumulation_steps", 1, "micro-batches per step"))
# Model keys a resume may change: they change how the step computes (rematerialisation), not the
# param tree the checkpoints hold.
RESUMABLE_MODEL_KEYS = ("remat", "remat_policy")
# Model keys added after workdirs were first written, with the value an older config.json meant:
# its blocks unrolled (``transformer_{i}``, not one scanned ``layers`` node).
MODEL_KEY_DEFAULTS = {"scan_layers": False}


def dry_run(config: Any, workdir: str | None) -> int:
    """``train --dry_run``: the compiled step's report (``titok_jax.train.memory.dry_run``), one
    human line on stderr and, as the last line on stdout, one JSON object; nothing is written."""
    from titok_jax.train.distributed import maybe_init_distributed
    maybe_init_distributed()
    from titok_jax.train.memory import dry_run as report_of, report_line
    report = report_of(config, workdir)
    print(f"[titok_jax] {report_line(report)}", file=sys.stderr)
    print(json.dumps(report))
    return 0


def train(argv: Sequence[str]) -> int:
    """Train from ``--config`` into ``--workdir`` (resuming from its latest checkpoint)."""
    from absl import flags
    from ml_collections import config_flags

    # --simulate_devices N: the environment for N simulated CPU devices, before anything imports JAX
    # (parsing the flags loads the config file, which does)
    from titok_jax.train.simulate import simulate_devices, simulate_devices_arg
    try:
        simulated = simulate_devices_arg(argv)
        if simulated:
            simulate_devices(simulated)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None

    def define(fv: Any) -> None:
        config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<variant>",
                                        flag_values=fv, lock_config=True,
                                        sys_argv=["titok-jax train", *argv])
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)", flag_values=fv)
        flags.DEFINE_bool("dry_run", False, "build and AOT-compile the train step, print its per-device "
                          "memory / FLOPs / collectives report (the last line: one JSON object) and "
                          "exit; creates and writes nothing (no workdir, checkpoint or step)",
                          flag_values=fv)
        flags.DEFINE_integer("simulate_devices", 0, "run on N simulated CPU devices (XLA_FLAGS="
                             "--xla_force_host_platform_device_count=N, JAX_PLATFORMS=cpu, set before "
                             "JAX is imported): with --dry_run, sizes a pod's mesh on one host",
                             flag_values=fv)
        flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
        flags.DEFINE_bool("resume_from_intact", False, "when the latest checkpoint is corrupt (its "
                          "content hash differs), resume from the newest intact one; the corrupt "
                          "steps are moved to WORKDIR/checkpoints.corrupt/", flag_values=fv)

    spec = config_spec(argv)
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    if not spec or not given & {"workdir", "dry_run"}:  # before the config file is loaded (it imports JAX)
        raise UsageError("train needs --config configs/<family>.py:<variant> and --workdir DIR")
    if not os.path.isfile(spec.split(":", 1)[0]):
        raise UsageError(missing_config_file(spec.split(":", 1)[0]))
    fv = parse("titok-jax train", argv, define)
    if fv.config is None or not (fv.workdir or fv.dry_run):
        raise UsageError("train needs --config configs/<family>.py:<variant> and --workdir DIR")
    check_counts(fv.config)
    if fv.dry_run:
        return dry_run(fv.config, fv.workdir)
    summary = run_training(fv.config, fv.workdir, progress=fv.progress,
                           resume_from_intact=fv.resume_from_intact)
    from titok_jax.train.loop import eval_summary
    print(f"trained to step {summary['step']}")
    if summary.get("last_metrics"):  # printed by every process: multi-host runs can be compared
        print(f"last loss:  {summary['last_metrics']['loss']:.8g}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics:    {summary['metrics']}")
    if summary.get("last_eval"):
        print(f"eval:       {summary['eval']} ({eval_summary(summary['last_eval'])})")
    if summary.get("grid"):
        print(f"grid:       {summary['grid']}")
    for name, path in (summary.get("pictures") or {}).items():
        if path != summary.get("grid"):  # the grid is printed above
            print(f"{name + ':':<11} {path}")
    return 0


def run_training(config: Any, workdir: str, *, progress: bool = True,
                 resume_from_intact: bool = False) -> dict:
    """What ``train`` (the command and ``titok_jax.train``) does once the config is read: the
    checks (counts, the same model as the workdir's, an intact latest checkpoint), then the loop.
    Returns the loop's summary."""
    check_counts(config)
    check_same_model(workdir, config)
    from titok_jax.train.distributed import maybe_init_distributed
    maybe_init_distributed()
    from titok_jax.checkpoint import check_resume
    check_resume(workdir, from_intact=resume_from_intact)  # a corrupt latest step: one line
    from titok_jax.train.loop import train as run
    return run(config, workdir, progress=progress)


def check_counts(config: Any) -> None:
    """A one-line ``ConfigError`` for a count of :data:`COUNTS` that is not an integer at least
    its minimum (``log_every_steps=0`` would divide by zero at the first step)."""
    for key, least, what in COUNTS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            continue
        if isinstance(node, bool) or not isinstance(node, int) or node < least:
            raise ConfigError(f"config {key} = {node!r}: {what} must be an integer >= {least}")


def _resume_view(old: dict, new: dict) -> tuple[dict, dict]:
    """``(old, new)`` as :func:`check_same_model` compares them: the stored model section with
    :data:`MODEL_KEY_DEFAULTS` filled in where it lacks a key the new one has, and both without
    :data:`RESUMABLE_MODEL_KEYS`."""
    om, nm = old.get("model"), new.get("model")
    if not isinstance(om, dict) or not isinstance(nm, dict):
        return old, new
    om = {**{k: v for k, v in MODEL_KEY_DEFAULTS.items() if k in nm}, **om}
    om, nm = ({k: v for k, v in m.items() if k not in RESUMABLE_MODEL_KEYS} for m in (om, nm))
    return {**old, "model": om}, {**new, "model": nm}


def check_same_model(workdir: str, config: Any) -> None:
    """When ``workdir`` already holds checkpoints: a one-line ``ConfigMismatchError`` naming the
    keys of ``family``, ``task.name`` and ``model`` whose values differ between its
    ``config.json`` and ``config`` (the checkpoints cannot be resumed into another model). A stored
    model section without ``scan_layers`` (an older workdir) reads as unrolled (``false``);
    ``remat`` / ``remat_policy`` may change (:data:`RESUMABLE_MODEL_KEYS`)."""
    from titok_jax.checkpoint_integrity import checkpoint_dir, config_differences, steps_on_disk
    path = os.path.join(workdir, "config.json")
    if not steps_on_disk(checkpoint_dir(workdir)) or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a valid config: {e}") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} is not a valid config: not a JSON object")
    new = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    old, new = _resume_view(old, new)
    diffs = config_differences(old, new)
    if diffs and isinstance(old.get("model"), dict) and isinstance(new.get("model"), dict):
        from titok_jax.models.registry import translate_legacy_quantizer  # an older workdir's layout
        try:
            diffs = config_differences({**old, "model": translate_legacy_quantizer(old["model"])},
                                       {**new, "model": translate_legacy_quantizer(new["model"])})
        except ValueError:
            pass
    if diffs:
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise ConfigMismatchError(
            f"cannot resume {workdir}: its checkpoints were trained with another config "
            f"(workdir vs this run: {', '.join(diffs[:4])}{more}); use a new --workdir, or the "
            f"workdir's own settings")


def _eval_flags(fv: Any) -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "a workdir written by train", flag_values=fv)
    flags.DEFINE_string("split", None, "held-out split name (default: the config's)", flag_values=fv)
    flags.DEFINE_string("data", None, "evaluate on this data source instead of the run's "
                        "(sample, folder:PATH, tfds:NAME)", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir for --data", flag_values=fv)
    flags.DEFINE_integer("num_images", None, "evaluate at most this many images (default: all)",
                         flag_values=fv)
    flags.DEFINE_string("inception_weights", None, "InceptionV3 params file (titok-jax "
                        "convert-inception): adds rfid and inception_score", flag_values=fv)
    flags.DEFINE_string("fid_reference", None, "reference statistics .npz for rfid (default: the "
                        "evaluated images themselves)", flag_values=fv)


def evaluate(argv: Sequence[str]) -> int:
    """Evaluate a workdir's latest checkpoint: one JSON line, appended to ``eval.jsonl``."""
    fv = parse("titok-jax eval", argv, _eval_flags)
    if not fv.workdir:
        raise UsageError("eval needs --workdir DIR")
    if fv.num_images is not None and fv.num_images < 1:
        raise UsageError(f"--num_images must be >= 1, got {fv.num_images}")
    try:
        metrics = evaluate_workdir(fv.workdir, data=fv.data, split=fv.split, data_dir=fv.data_dir,
                                   num_images=fv.num_images, inception_weights=fv.inception_weights,
                                   fid_reference=fv.fid_reference)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(metrics))
    return 0


def evaluate_workdir(workdir: str, *, data: str | None = None, split: str | None = None,
                     data_dir: str | None = None, num_images: int | None = None,
                     inception_weights: str | None = None, fid_reference: str | None = None) -> dict:
    """What ``eval`` (the command and ``titok_jax.evaluate``) does: the workdir's latest checkpoint
    evaluated on its held-out data (or ``data`` / ``split`` / ``data_dir``, at most ``num_images``
    images; rFID / IS with ``inception_weights``), appended to ``eval.jsonl``. Returns
    ``{"step": ..., **metrics}``; a workdir without a checkpoint is a ``FileNotFoundError``."""
    check_npz_input(inception_weights, "inception_weights")
    check_npz_input(fid_reference, "fid_reference")
    config = load_run_config(workdir)
    if split:
        config.data.eval_split = split
    if data:
        config.data.source = data
    if data_dir:
        config.data.data_dir = data_dir
    if num_images is not None:
        if int(num_images) < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        config.data.eval_num_images = int(num_images)
    if inception_weights or fid_reference:
        import ml_collections
        if "eval" not in config:
            config.eval = ml_collections.ConfigDict()
        if inception_weights:
            config.eval.inception_weights = inception_weights
        if fid_reference:
            config.eval.fid_reference = fid_reference
    from titok_jax.train.distributed import maybe_init_distributed
    maybe_init_distributed()
    from titok_jax.train.loop import Trainer
    t = Trainer(config, workdir, inference=True)
    try:
        if t.checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {t.checkpointer.directory}")
        step, metrics, _ = t.evaluate_checkpoint()
    finally:
        t.checkpointer.close()
    for name, path in t.pictures.items():  # stderr: stdout stays one JSON line
        print(f"[titok_jax] {name}: {path}", file=sys.stderr)
    try:
        t.writer.close()
    except OSError as e:  # a read-only workdir: the metrics are what the user asked for
        import warnings

        from titok_jax.errors import WriteWarning
        warnings.warn(WriteWarning(f"could not write TensorBoard events in {workdir}: {e.strerror or e}"))
    return {"step": step, **metrics}
