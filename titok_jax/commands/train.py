"""``titok-jax train`` and ``titok-jax eval``: a config (or a workdir's config) -> the trainer."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from titok_jax.commands.common import (UsageError, config_spec, load_run_config, missing_config_file,
                                       parse)


def train(argv: Sequence[str]) -> int:
    """Train from ``--config`` into ``--workdir`` (resuming from its latest checkpoint)."""
    from absl import flags
    from ml_collections import config_flags

    def define(fv: Any) -> None:
        config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<variant>",
                                        flag_values=fv, lock_config=True,
                                        sys_argv=["titok-jax train", *argv])
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)", flag_values=fv)
        flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)

    spec = config_spec(argv)
    if spec and not os.path.isfile(spec.split(":", 1)[0]):
        raise UsageError(missing_config_file(spec.split(":", 1)[0]))
    fv = parse("titok-jax train", argv, define)
    if fv.config is None or not fv.workdir:
        raise UsageError("train needs --config configs/<family>.py:<variant> and --workdir DIR")
    from titok_jax.train.distributed import maybe_init_distributed
    maybe_init_distributed()
    from titok_jax.train.loop import eval_summary, train as run
    summary = run(fv.config, fv.workdir, progress=fv.progress)
    print(f"trained to step {summary['step']}")
    if summary.get("last_metrics"):  # printed by every process: multi-host runs can be compared
        print(f"last loss:  {summary['last_metrics']['loss']:.8g}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics:    {summary['metrics']}")
    if summary.get("last_eval"):
        print(f"eval:       {summary['eval']} ({eval_summary(summary['last_eval'])})")
    if summary.get("grid"):
        print(f"grid:       {summary['grid']}")
    return 0


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
    config = load_run_config(fv.workdir)
    if fv.split:
        config.data.eval_split = fv.split
    if fv.data:
        config.data.source = fv.data
    if fv.data_dir:
        config.data.data_dir = fv.data_dir
    if fv.num_images is not None:
        if fv.num_images < 1:
            raise UsageError(f"--num_images must be >= 1, got {fv.num_images}")
        config.data.eval_num_images = fv.num_images
    if fv.inception_weights or fv.fid_reference:
        import ml_collections
        if "eval" not in config:
            config.eval = ml_collections.ConfigDict()
        if fv.inception_weights:
            config.eval.inception_weights = fv.inception_weights
        if fv.fid_reference:
            config.eval.fid_reference = fv.fid_reference
    from titok_jax.train.distributed import maybe_init_distributed
    maybe_init_distributed()
    from titok_jax.train.loop import Trainer
    t = Trainer(config, fv.workdir, inference=True)
    if t.checkpointer.latest_step() is None:
        raise UsageError(f"no checkpoint in {t.checkpointer.directory}")
    step, metrics, _ = t.evaluate_checkpoint()
    t.writer.close()
    print(json.dumps({"step": step, **metrics}))
    return 0
