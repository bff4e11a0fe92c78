"""Where the commands write: one check for every output file, before any work is done.

A command lists every file it will write, then :func:`check_new_outputs` refuses (one
``FileExistsError`` line, exit status 1 through ``run_command``) when one of them exists, unless
``--overwrite`` was given - the file-level twin of the check ``import-torch`` makes for a whole
workdir (:func:`titok_jax.checkpoint.check_new_workdir`, which never overwrites). A directory in
the place of an output file is refused even with ``--overwrite``. Single files are written through
:func:`replacing` (a temporary name in the same folder, renamed over the target when complete), so
a failed run never leaves half a file, and a file it was told to replace is intact until the new
one is whole.
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


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path`` with the same extension (writers that look at it -
    ``.npz``, ``.safetensors``, ``.png`` - still work); when the block ends normally it is renamed
    over ``path`` in one step, otherwise it is removed. Creates the parent folder (and removes it
    again on failure if this call made it and it is still empty)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    made = None
    if not os.path.isdir(parent):
        made = parent
        while not os.path.isdir(os.path.dirname(made)):
            made = os.path.dirname(made)
        os.makedirs(parent, exist_ok=True)
    base = os.path.basename(path)
    ext = ".safetensors" if base.endswith(".safetensors") else os.path.splitext(base)[1]
    tmp = os.path.join(parent, f".{base}.{uuid.uuid4().hex[:8]}.tmp{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if made is not None:
            remove_empty_dirs(parent, made)
        raise


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
