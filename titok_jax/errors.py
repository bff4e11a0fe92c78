"""The errors a user can cause, as opposed to bugs.

The command line (``titok_jax.commands.common.run_command``) shows a :class:`UserError` as one line
on stderr (exit status 1), as it does ``ValueError`` and ``OSError`` (``FileNotFoundError``,
``FileExistsError``, ...); any other exception is a bug and is shown with its traceback (exit
status 70). Raise a :class:`UserError` (or one of its subclasses, which also derive from the
built-in type a caller may catch) for bad input whose natural Python type is not one of those.

This module imports nothing, so every floor of the package may use it, and the command line can
report an error without importing JAX.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a flag, a config value, a workdir): the message is one line for the user."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (``log_every_steps=0``, heads that do not divide a width)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be restored (corrupt, incomplete, or from another config)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint step whose files differ from the content hash written when it was saved.

    ``step``: the corrupt step; ``intact``: the newest older step that is intact (or has no hash
    to check), or None; ``detail``: which file differs and how."""

    def __init__(self, message: str, step: int, intact: int | None = None, detail: str = ""):
        super().__init__(message)
        self.step, self.intact, self.detail = step, intact, detail


class CheckpointSaveError(CheckpointError, OSError):
    """A checkpoint save that failed on I/O (a full disk, a lost mount): the partial step was
    removed and the earlier checkpoints are as they were. ``errno`` is the original one."""

    def __init__(self, message: str, errno: int | None = None, step: int | None = None):
        super().__init__(message)
        self.errno, self.step = errno, step

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigMismatchError(CheckpointError):
    """Resuming a workdir with a config whose model differs from the one its checkpoints hold."""


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (a non-finite loss or train state, bad data); nothing of it was
    saved. Raised by the trainer (``titok_jax.train.loop``, which re-exports it)."""


class CheckpointWarning(UserWarning):
    """Something about a checkpoint the user should know that does not stop the run (a step saved
    without its content hash, corrupt steps moved aside); the command line shows it as one line."""


class WriteWarning(UserWarning):
    """An output the run could not write (a read-only or full workdir) while its result is still
    good, e.g. ``eval``'s sample grid or ``eval.jsonl``; the command line shows it as one line."""
