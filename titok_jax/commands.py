"""Implementations of the `titok-jax` commands (parsing with absl flags + ml_collections config
files). Each returns an exit status; user errors become one line on stderr."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence


class UsageError(Exception):
    """Bad command-line input; the message is shown as one line."""


def _parse(prog: str, argv: Sequence[str], define) -> Any:
    from absl import flags
    fv = flags.FlagValues()
    define(fv)
    try:
        fv([prog, *argv])
    except Exception as e:  # absl flags.Error, config-file errors, unknown --config.KEY
        raise UsageError(_flag_error(e, argv)) from e
    return fv


def _flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """One readable line for a flag-parsing failure."""
    spec = _config_spec(argv)
    if spec:
        path = spec.split(":", 1)[0]
        if not os.path.isfile(path):
            return f"config file {path!r} not found (expected configs/<family>.py:<variant>)"
        try:
            from ml_collections import config_flags  # load without the overrides to name a bad key
            base = config_flags.config_flags._LoadConfigModule("check_config", path).get_config(
                *([spec.split(":", 1)[1]] if ":" in spec else []))
        except Exception as inner:  # the config itself fails (e.g. unknown variant)
            return _message(inner)
        for arg in argv:
            if arg.startswith("--config."):
                key = arg[len("--config."):].split("=", 1)[0]
                missing = _missing_key(base, key)
                if missing:
                    return missing
    return _message(e)


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _missing_key(config: Any, dotted: str) -> str | None:
    import difflib
    node, done = config, []
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean {'.'.join(done + close)!r}?)" if close else ""
            return f"unknown config key {dotted!r}: {'.'.join(done) or 'the config'} has no field {part!r}{hint}"
        node, done = node[part], done + [part]
    return None


def _message(e: BaseException) -> str:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    text = lines[0] if lines else type(e).__name__
    for prefix in ("ValueError: ", "KeyError: ", "OSError: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _maybe_init_distributed() -> None:
    """Multi-host runs (launch/ sets TITOK_MULTIHOST=1): join the JAX cluster before any JAX op."""
    if os.environ.get("TITOK_MULTIHOST") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        import jax
        jax.distributed.initialize()


def _load_run_config(workdir: str):
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"{workdir} is not a titok_jax workdir (no config.json); train one first")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def train(argv: Sequence[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    def define(fv):
        config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<variant>",
                                        flag_values=fv, lock_config=True,
                                        sys_argv=["titok-jax train", *argv])
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)", flag_values=fv)
        flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)

    spec = _config_spec(argv)
    if spec and not os.path.isfile(spec.split(":", 1)[0]):
        raise UsageError(f"config file {spec.split(':', 1)[0]!r} not found (expected configs/<family>.py:<variant>)")
    fv = _parse("titok-jax train", argv, define)
    if fv.config is None or not fv.workdir:
        raise UsageError("train needs --config configs/<family>.py:<variant> and --workdir DIR")
    _maybe_init_distributed()
    from titok_jax.train.loop import train as run
    summary = run(fv.config, fv.workdir, progress=fv.progress)
    print(f"trained to step {summary['step']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics:    {summary['metrics']}")
    if summary.get("last_eval"):
        e = summary["last_eval"]
        print(f"eval:       {summary['eval']} (psnr {e['psnr']:.2f} dB, ssim {e['ssim']:.4f})")
    if summary.get("grid"):
        print(f"grid:       {summary['grid']}")
    return 0


def evaluate(argv: Sequence[str]) -> int:
    from absl import flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "a workdir written by train", flag_values=fv)
        flags.DEFINE_string("split", None, "held-out split name (default: the config's)", flag_values=fv)

    fv = _parse("titok-jax eval", argv, define)
    if not fv.workdir:
        raise UsageError("eval needs --workdir DIR")
    config = _load_run_config(fv.workdir)
    if fv.split:
        config.data.eval_split = fv.split
    _maybe_init_distributed()
    from titok_jax.train.loop import Trainer
    t = Trainer(config, fv.workdir)
    if t.checkpointer.latest_step() is None:
        raise UsageError(f"no checkpoint in {t.checkpointer.directory}")
    state, how = t.initial_state()
    step = int(state.step)
    metrics, _ = t.run_eval(state, step)
    t.writer.close()
    print(json.dumps({"step": step, **metrics}))
    return 0


def run_command(handler, argv: Sequence[str]) -> int:
    """Run a command; known failures print one line on stderr and exit non-zero."""
    from titok_jax.checkpoint import CheckpointError
    if os.environ.get("TITOK_DEBUG") == "1":  # full tracebacks for developers
        return int(handler(argv) or 0)
    try:
        return int(handler(argv) or 0)
    except UsageError as e:
        print(f"titok-jax: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError, KeyError) as e:
        print(f"titok-jax: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("titok-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from titok_jax.train.loop import TrainingError
        if isinstance(e, TrainingError):
            print(f"titok-jax: error: {e}", file=sys.stderr)
            return 1
        raise
