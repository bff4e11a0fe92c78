"""Where the commands write: one check for every output file, before any work is done.

A command lists every file it will write, then :func:`check_new_outputs` refuses (one
``FileExistsError`` line, exit status 1 through ``run_command``) when one of them exists, unless
``--overwrite`` was given - the file-level twin of the check ``import-torch`` makes for a whole
workdir (:func:`titok_jax.checkpoint.check_new_workdir`, which never overwrites). A directory in
the place of an output file is refused even with ``--overwrite``. Files are written through
:func:`replacing` (one file) or :func:`staging` (many: a directory of PNGs) - a temporary name in
the target's folder, renamed over the target when the command's work is complete - so a failed run
leaves no half file and no partial set of files, and a file it was told to replace is intact until
the new one is whole.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Iterator, Sequence

OVERWRITE_HELP = "replace output files that already exist (default: refuse, nothing is written)"


def define_overwrite(fv: Any) -> None:
    """Declare ``--overwrite`` on a command's flags."""
    from absl import flags
    flags.DEFINE_bool("overwrite", False, OVERWRITE_HELP, flag_values=fv)


def check_new_outputs(paths: Sequence[str], overwrite: bool = False) -> None:
    """Refuse (``FileExistsError``, one line) if any of ``paths`` exists, unless ``overwrite``;
    an existing directory where a file goes is refused either way."""
    for p in paths:
        if os.path.isdir(p):
            raise FileExistsError(f"output {p} is a directory; expected a file path")
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more output file(s))" if len(existing) > 1 else ""
        raise FileExistsError(f"output {existing[0]} already exists{more}; not overwriting it "
                              "(pass --overwrite to replace it)")


def npz_path(path: str) -> str:
    """The file ``np.savez(path, ...)`` writes: ``path`` with ``.npz`` added when it lacks it."""
    return path if path.endswith(".npz") else path + ".npz"


class Staged:
    """Output files being written under temporary names (see :func:`staging`)."""

    def __init__(self):
        self._pending: list[tuple[str, str]] = []  # (temporary path, target)
        self._made: list[tuple[str, str]] = []     # (folder, the topmost folder made for it)

    def path(self, target: str) -> str:
        """A temporary path beside ``target`` with the same extension (writers that look at it -
        ``.npz``, ``.safetensors``, ``.png`` - still work), its folder created; write ``target``'s
        content there."""
        target = os.fspath(target)
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            made = parent
            while not os.path.isdir(os.path.dirname(made)):
                made = os.path.dirname(made)
            os.makedirs(parent, exist_ok=True)
            self._made.append((parent, made))
        base = os.path.basename(target)
        ext = ".safetensors" if base.endswith(".safetensors") else os.path.splitext(base)[1]
        tmp = os.path.join(parent, f".{base}.{uuid.uuid4().hex[:8]}.tmp{ext}")
        self._pending.append((tmp, target))
        return tmp

    def commit(self) -> None:
        """Rename every written temporary file over its target."""
        while self._pending:
            tmp, target = self._pending[0]
            if os.path.lexists(tmp):
                os.replace(tmp, target)
            self._pending.pop(0)
        self._made = []

    def discard(self) -> None:
        """Remove the temporary files not renamed yet, and the folders made for them if empty."""
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        for parent, made in reversed(self._made):
            remove_empty_dirs(parent, made)
        self._pending, self._made = [], []


@contextlib.contextmanager
def staging() -> Iterator[Staged]:
    """Write many output files as one: ``stage.path(target)`` gives the temporary name to write
    each target to; when the block ends normally every written file is renamed over its target,
    otherwise they are all removed (with the folders made for them), so a failed command leaves no
    partial output and every file it was to replace as it was."""
    stage = Staged()
    try:
        yield stage
        stage.commit()
    except BaseException:
        stage.discard()
        raise


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` with the same extension; when the block ends
    normally it is renamed over ``path`` in one step, otherwise it is removed (:func:`staging`
    for one file). Creates the parent folder (and removes it again on failure if this call made it
    and it is still empty)."""
    with staging() as stage:
        yield stage.path(path)


def remove_empty_dirs(leaf: str, top: str) -> None:
    """``rmdir`` ``leaf`` and its parents up to and including ``top`` while they are empty."""
    d = leaf
    while True:
        try:
            os.rmdir(d)
        except OSError:
            return
        if os.path.abspath(d) == os.path.abspath(top) or os.path.dirname(d) == d:
            return
        d = os.path.dirname(d)
