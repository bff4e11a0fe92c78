"""What every command shares: absl flag parsing into a private ``FlagValues``, one readable line
for a bad flag or config key, and ``run_command`` (user errors -> one line on stderr + exit status;
bugs -> the traceback and a line saying so).

Every flag of :data:`WORKDIR_FLAGS` (``--workdir``, ``generate``'s ``--tokenizer``) also takes
``hf:ORG/NAME[@REVISION][/FILE]``: :func:`parse` replaces it with the workdir converted once from
that release in the local Hugging Face cache (:mod:`titok_jax.convert.hub`; never a download), so
every command that reads a workdir accepts one. ``train``, which writes its workdir, refuses it.

Nothing here imports JAX: a usage error is reported before any model code is loaded.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import sys
import traceback
import warnings
from typing import Any, Callable, Sequence

from titok_jax.errors import UserError

# Exit statuses of run_command.
EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 70, 130  # 70: EX_SOFTWARE (sysexits.h)

# Flags naming a workdir a command reads: an ``hf:`` name there is resolved by ``parse``.
WORKDIR_FLAGS = ("workdir", "tokenizer")
# Commands (their ``prog``) whose --workdir is written: an ``hf:`` name there is a usage error.
WRITES_WORKDIR = ("titok-jax train",)
HF_PREFIXES = ("hf:", "hf://")  # titok_jax.convert.hub.PREFIXES, without importing it


class UsageError(UserError):
    """Bad command-line input; the message is shown as one line (exit status 2)."""


def parse(prog: str, argv: Sequence[str], define: Callable[[Any], None]) -> Any:
    """Parse ``argv`` with the flags ``define(flag_values)`` declares; ``--some-flag`` is accepted
    for a flag ``some_flag``. A bad flag raises :class:`UsageError` with one line."""
    from absl import flags
    fv = flags.FlagValues()
    define(fv)
    argv = [_underscored(arg, fv) for arg in argv]
    try:
        fv([prog, *argv])
    except Exception as e:  # absl flags.Error, config-file errors, unknown --config.KEY
        raise UsageError(flag_error(e, argv)) from e
    resolve_hf_flags(prog, fv)
    return fv


def resolve_hf_flags(prog: str, fv: Any) -> None:
    """Replace an ``hf:ORG/NAME`` value of a :data:`WORKDIR_FLAGS` flag by its cached workdir
    (converted on first use); :class:`UsageError` for one where ``prog`` writes the workdir."""
    for flag in WORKDIR_FLAGS:
        value = getattr(fv, flag) if flag in fv else None
        if not (isinstance(value, str) and value.startswith(HF_PREFIXES)):
            continue
        if prog in WRITES_WORKDIR:
            raise UsageError(f"--{flag} {value}: {prog.split()[-1]} writes its workdir, and an hf: name "
                             "is a release read from the Hugging Face cache; choose a directory")
        from titok_jax.convert.hub import resolve_workdir
        setattr(fv, flag, resolve_workdir(value))


def _underscored(arg: str, fv: Any) -> str:
    """``--class-id=3`` -> ``--class_id=3`` when ``class_id`` (or, for ``--no-x``, ``x``) is a flag."""
    if not arg.startswith("--") or "-" not in arg[2:].split("=", 1)[0]:
        return arg
    name, sep, value = arg[2:].partition("=")
    fixed = name.replace("-", "_")
    if fixed.startswith("no_") and fixed not in fv and fixed[3:] in fv:
        fixed = "no" + fixed[3:]  # --no-save-images -> --nosave_images
    known = fixed in fv or (fixed.startswith("no") and fixed[2:] in fv)
    return f"--{fixed}{sep}{value}" if known else arg


def require(fv: Any, names: Sequence[str], what: str, usage: str) -> None:
    """:class:`UsageError` "``what`` needs --a --b (usage: titok-jax ``usage``)" naming every flag
    of ``names`` left unset."""
    missing = [f"--{k}" for k in names if not getattr(fv, k)]
    if missing:
        raise UsageError(f"{what} needs {' '.join(missing)} (usage: titok-jax {usage})")


def flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """One readable line for a flag-parsing failure."""
    spec = config_spec(argv)
    if spec:
        path = spec.split(":", 1)[0]
        if not os.path.isfile(path):
            return missing_config_file(path)
        try:
            from ml_collections import config_flags  # load without the overrides to name a bad key
            base = config_flags.config_flags._LoadConfigModule("check_config", path).get_config(
                *([spec.split(":", 1)[1]] if ":" in spec else []))
        except Exception as inner:  # the config itself fails (e.g. unknown variant)
            return message(inner)
        for arg in argv:
            if arg.startswith("--config."):
                key = arg[len("--config."):].split("=", 1)[0]
                missing = missing_key(base, key)
                if missing:
                    return missing
    return message(e)


def missing_config_file(path: str) -> str:
    return f"config file {path!r} not found (expected configs/<family>.py:<variant>)"


def load_config(spec: str) -> Any:
    """``configs/<family>.py[:<variant>[,key=value...]]`` -> the ConfigDict its ``get_config``
    returns, as ``train --config`` loads it. One-line FileNotFoundError / ValueError."""
    path, colon, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_config_file(path))
    from ml_collections import config_flags
    try:
        module = config_flags.config_flags._LoadConfigModule("titok_jax_config", path)
        return module.get_config(*([arg] if colon else []))
    except Exception as e:  # noqa: BLE001 - an unknown variant, a bad ,key=value, a broken file
        raise ValueError(f"config {spec!r}: {message(e)}") from None


def override_config(config: Any, overrides: Any) -> Any:
    """Set ``{"dotted.key": value}`` in ``config`` (what ``--config.KEY=VALUE`` does); a one-line
    ``ConfigError`` for a key the config lacks or a value of the wrong type. Returns ``config``."""
    from titok_jax.errors import ConfigError
    for key, value in dict(overrides or {}).items():
        missing = missing_key(config, key)
        if missing:
            raise ConfigError(missing)
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        try:
            node[leaf] = value
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"config {key} = {value!r}: {message(e)}") from None
    return config


def config_spec(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in ``argv``, if any."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _moved_quantizer_key(node: Any, done: list[str], part: str) -> str | None:
    """The ``model.quantizer`` name of an old flat quantizer key (``model.codebook_size``), or None."""
    if done != ["model"] or not hasattr(node.get("quantizer") if hasattr(node, "get") else None, "keys"):
        return None
    from titok_jax.models.registry import LEGACY_QUANTIZER_KEYS
    return {k: v for keys in LEGACY_QUANTIZER_KEYS.values() for k, v in keys.items()}.get(part)


def missing_key(config: Any, dotted: str) -> str | None:
    """A line naming the first part of ``dotted`` that ``config`` lacks (with a close match), or None."""
    node, done = config, []
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean {'.'.join(done + close)!r}?)" if close else ""
            moved = _moved_quantizer_key(node, done, part)
            if moved:
                hint = f" (quantizer settings live in model.quantizer now: model.quantizer.{moved})"
            return f"unknown config key {dotted!r}: {'.'.join(done) or 'the config'} has no field {part!r}{hint}"
        node, done = node[part], done + [part]
    return None


def message(e: BaseException) -> str:
    """The first non-empty line of an exception's text, without a ``ValueError: `` style prefix."""
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    text = lines[0] if lines else type(e).__name__
    for prefix in ("ValueError: ", "KeyError: ", "OSError: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def check_workdir(workdir: str) -> None:
    """:class:`UsageError` unless ``workdir`` holds a ``config.json``."""
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise UsageError(f"{workdir} is not a titok_jax workdir (no config.json); train one first")


def check_output_dir(path: str, why: str = "expected an output directory") -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"--output {path} is a file; {why}")


def load_run_config(workdir: str) -> Any:
    """``workdir/config.json`` as a ConfigDict (``tasks.runs.read_run_config``; a missing one is a
    :class:`UsageError`, a broken one a one-line ValueError)."""
    from titok_jax.tasks.runs import read_run_config
    check_workdir(workdir)
    return read_run_config(workdir)


def check_npz_input(path: str, flag: str = "input") -> None:
    """A one-line ValueError unless ``path`` (an existing file named ``*.npz``) is a zip archive,
    as every ``.npz`` is: a ``.npy`` renamed, or other bytes, are refused before any reader
    (``np.load`` would hand back an array, or a pickle error that does not name the file)."""
    if not str(path).endswith(".npz") or not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise ValueError(f"--{flag} {path} cannot be read: {e.strerror or e}") from None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first entry, or an empty zip
        return
    what = ("a .npy array file renamed to .npz (np.save writes .npy; .npz comes from np.savez)"
            if head == b"\x93NUMPY" else "not an .npz archive (its first bytes are not a zip header)")
    raise ValueError(f"--{flag} {path} is {what}")


# Warnings a command shows as one line ("titok-jax: warning: ...") instead of Python's two-line
# "file:line: Category: text" form: input files skipped on the way (unreadable images, FIFOs),
# checkpoint notices (a step saved without its hash, corrupt steps moved aside), outputs that
# could not be written while the result stands (eval on a read-only workdir).
ONE_LINE_WARNINGS = ("CorruptImageWarning", "CheckpointWarning", "WriteWarning")


@contextlib.contextmanager
def one_line_warnings():
    """Within the block, the ``ONE_LINE_WARNINGS`` categories print as one line on stderr."""
    with warnings.catch_warnings():
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if any(c.__name__ in ONE_LINE_WARNINGS for c in category.__mro__):
                print(f"titok-jax: warning: {message}", file=sys.stderr)
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def run_command(handler: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    """Run a command. A user error - :class:`titok_jax.errors.UserError` (``UsageError``: exit 2),
    ``ValueError``, ``OSError`` (``FileNotFoundError``, ``FileExistsError``, a full disk), running
    out of device or host memory - prints one line on stderr and exits 1; Ctrl-C exits 130. Any
    other exception is a bug: its traceback, then a line saying so, exit 70."""
    with one_line_warnings():
        return _run_command(handler, argv)


def _run_command(handler: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    if os.environ.get("TITOK_DEBUG") == "1":  # full tracebacks for developers
        return int(handler(argv) or 0)
    try:
        return int(handler(argv) or 0)
    except UsageError as e:
        print(f"titok-jax: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("titok-jax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if is_user_error(e):
            print(f"titok-jax: error: {message(e)}", file=sys.stderr)
            return EXIT_ERROR
        traceback.print_exc(file=sys.stderr)
        print(f"titok-jax: internal error (a bug in titok_jax; please report it with the traceback "
              f"above): {type(e).__name__}: {message(e)}", file=sys.stderr)
        return EXIT_BUG


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is the user's to fix (shown as one line) rather than a bug in titok_jax."""
    if isinstance(e, (UserError, ValueError, OSError, MemoryError)):  # TrainingError is a UserError
        return True
    # XLA's out-of-memory (jaxlib's XlaRuntimeError is a RuntimeError): a batch too large for the device
    return type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(e)
