"""titok_jax: JAX/Flax image tokenizers, quantizers and generators.

Sub-packages (imports only go down): ``quantizers`` and ``nn`` are the floor every model stands on.

The Python API mirrors the command line (each function does what its command does, and returns
what the command prints)::

    import titok_jax
    summary = titok_jax.train("configs/titok.py:tiny", "runs/tiny")   # titok-jax train
    metrics = titok_jax.evaluate("runs/tiny", data="sample")          # titok-jax eval
    tok = titok_jax.load_tokenizer("runs/tiny")                        # or "hf:ORG/NAME"
    tok.reconstruct_files("photos/", "out/")                           # titok-jax reconstruct
    gen = titok_jax.load_generator(GEN_DIR)

Importing this package imports neither JAX nor NumPy (the command line reports a usage error
before loading them); each function loads what it needs when called.
"""
from __future__ import annotations

import os
import types
from typing import Any, Mapping

# The trainer package (its __init__ imports nothing): ``titok_jax.train`` stays that package, so
# ``titok_jax.train.loop`` and every ``import titok_jax.train....`` keep working, and calling it
# runs a training (see ``_CallableTrainPackage``).
from titok_jax import train as _trainer_package

__version__ = "0.1.0"


def load_tokenizer(*args, **kwargs):
    """The tokenizer of a workdir (or of ``"hf:ORG/NAME"`` in the local Hugging Face cache) at its
    latest checkpoint; see ``titok_jax.api.load_tokenizer``."""
    from titok_jax.api import load_tokenizer as load
    return load(*args, **kwargs)


def load_generator(*args, **kwargs):
    """The token generator of a workdir; see ``titok_jax.generation.load_generator``."""
    from titok_jax.generation import load_generator as load
    return load(*args, **kwargs)


def _train(config: Any, workdir: str | os.PathLike, *, overrides: Mapping[str, Any] | None = None,
           progress: bool = True, resume_from_intact: bool = False) -> dict:
    """``titok-jax train --config CONFIG --workdir WORKDIR [--config.KEY=VALUE ...]`` from Python:
    the same checks and the same loop (``titok_jax.train.loop.train``), resuming from the
    workdir's latest checkpoint.

    ``config``: a ConfigDict (or a plain dict; copied, never changed) or a config file with its
    variant as the command line takes it (``"configs/titok.py:tiny,quantizer=fsq"``, relative to
    the current directory); ``overrides``: ``{"dotted.key": value}`` set on it (as
    ``--config.KEY=VALUE``). Returns the loop's summary: ``step``, ``last_metrics`` (the last
    logged train metrics), ``last_eval`` (the last evaluation's metrics, or None), and the paths of
    the ``checkpoint``, ``metrics`` (metrics.jsonl), ``eval`` (eval.jsonl) and ``grid`` files.
    Errors are the command's one-line ones (``ConfigError``, ``ConfigMismatchError``,
    ``TrainingError``, ``FileNotFoundError`` ...)."""
    import copy

    import ml_collections

    from titok_jax.commands.common import load_config, override_config
    from titok_jax.commands.train import run_training
    from titok_jax.convert.hub import is_hf_name

    if isinstance(config, (str, os.PathLike)):
        cfg = load_config(os.fspath(config))
    elif isinstance(config, ml_collections.FrozenConfigDict):
        cfg = ml_collections.ConfigDict(config)
    elif isinstance(config, ml_collections.ConfigDict):
        cfg = copy.deepcopy(config)
    elif isinstance(config, Mapping):
        cfg = ml_collections.ConfigDict(copy.deepcopy(dict(config)))
    else:
        raise TypeError(f"config must be a ConfigDict, a dict or 'configs/<family>.py:<variant>', "
                        f"got {type(config).__name__}")
    if is_hf_name(workdir):
        raise ValueError(f"workdir {workdir}: train writes its workdir, and an hf: name is a release "
                         "read from the Hugging Face cache; choose a directory")
    workdir = os.fspath(workdir)
    override_config(cfg, overrides)
    return run_training(cfg, workdir, progress=progress, resume_from_intact=resume_from_intact)


class _CallableTrainPackage(types.ModuleType):
    """``titok_jax.train`` is the trainer package and, called, :func:`_train`: a function of that
    name here would be replaced by the package the first time any of its modules is imported."""

    def __call__(self, config: Any, workdir: str | os.PathLike, **kwargs: Any) -> dict:
        return _train(config, workdir, **kwargs)

    __call__.__doc__ = _train.__doc__


_trainer_package.__class__ = _CallableTrainPackage
train = _trainer_package


def evaluate(workdir: str | os.PathLike, data: str | None = None, *, split: str | None = None,
             data_dir: str | None = None, num_images: int | None = None,
             inception_weights: str | None = None, fid_reference: str | None = None) -> dict:
    """``titok-jax eval --workdir WORKDIR [--data SOURCE] ...`` from Python: evaluates the
    workdir's latest checkpoint on the held-out data of its config (or ``data``: ``sample``,
    ``folder:PATH``, ``tfds:NAME``; ``split``, ``data_dir``, at most ``num_images`` images; with
    ``inception_weights`` also rFID / IS against ``fid_reference``), appends the metrics to
    ``WORKDIR/eval.jsonl`` and writes the sample grid, as the command does. ``workdir`` may be
    ``hf:ORG/NAME`` (a release in the local Hugging Face cache, converted once). Returns the line
    the command prints, as a dict: ``{"step": int, "psnr": float, ...}``."""
    from titok_jax.commands.train import evaluate_workdir
    from titok_jax.convert.hub import resolve_workdir
    return evaluate_workdir(os.fspath(resolve_workdir(workdir)), data=data, split=split,
                            data_dir=data_dir, num_images=num_images,
                            inception_weights=inception_weights, fid_reference=fid_reference)


__all__ = ["load_tokenizer", "load_generator", "train", "evaluate", "__version__"]
