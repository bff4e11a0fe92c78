"""Paths taken from file contents, kept inside the directory the user named.

A name read from a file (``files`` of a tokens ``.npz``, a shard name in ``meta.json``) is never
trusted as a path: :func:`check_relative_name` refuses an empty or absolute name, a ``..`` component,
a NUL byte or a control character; :func:`check_names` also refuses two names that give the same
path (which would silently collapse rows) and a name that is also the directory of another;
:func:`paths_inside` joins the names to a root and refuses any whose real path (symlinks resolved)
leaves the root. :func:`is_regular_file` tells a file that can be read without blocking from a FIFO,
socket or device node. Every refusal is one ``ValueError`` line naming the file and the entry.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Sequence

_DRIVE = re.compile(r"^[A-Za-z]:")


def check_relative_name(name: str, what: str, where: str = "the output directory") -> str:
    """``name`` unchanged when it is a relative path that stays below the directory it is joined
    to; else a ValueError "``what`` = 'name' is absolute: it would lead outside ``where``".
    ``what`` says where the name came from (``"t.npz: files[3]"``)."""
    if not isinstance(name, str):
        raise ValueError(f"{what} = {name!r} is not a file name")
    parts = name.replace("\\", "/").split("/")
    bad = ("is empty" if not name.strip() else
           "holds a NUL or control character" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
           "is absolute" if os.path.isabs(name) or name.startswith(("/", "\\")) or _DRIVE.match(name) else
           "has a '..' component" if ".." in parts else None)
    if bad:
        raise ValueError(f"{what} = {name!r} {bad}: it would lead outside {where} (names read from "
                         "a file must be relative paths without '..')")
    return name


def check_names(names: Sequence[str], what: str, source: Sequence[str] | None = None,
                where: str = "the output directory") -> list[str]:
    """Every name of ``names`` checked (:func:`check_relative_name`, reported as
    ``what[i]``, showing ``source[i]`` when the names were derived from other ones), no two giving
    the same path, and none both a file and the directory of another file."""
    source = list(names) if source is None else list(source)
    short = what.rsplit(": ", 1)[-1]  # "t.npz: files" -> "files", for the second of a pair
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        check_relative_name(name, f"{what}[{i}]" + (f" (from {source[i]!r})" if source[i] != name else ""),
                            where)
        key = os.path.normpath(name.replace("\\", "/"))
        if key in seen:
            raise ValueError(f"{what}[{seen[key]}] and {short}[{i}] both give the output name {name!r} "
                             "(one would overwrite the other)")
        seen[key] = i
    for i, name in enumerate(names):
        key = os.path.normpath(name.replace("\\", "/"))
        parent = os.path.dirname(key)
        while parent:
            if parent in seen:
                raise ValueError(f"{what}[{seen[parent]}] = {names[seen[parent]]!r} is a file but "
                                 f"{short}[{i}] = {name!r} needs it to be a directory")
            parent = os.path.dirname(parent)
    return list(names)


def paths_inside(root: str, names: Sequence[str], what: str,
                 source: Sequence[str] | None = None) -> list[str]:
    """``root/name`` for every name (checked by :func:`check_names`), each refused unless its real
    path (existing symlinks resolved) lies inside ``root``'s real path."""
    check_names(names, what, source)
    real_root = os.path.realpath(root)
    out = []
    for i, name in enumerate(names):
        path = os.path.join(root, name)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root or real == real_root:
            raise ValueError(f"{what}[{i}] = {name!r} resolves to {real}, outside {root} "
                             "(through a symbolic link); refusing to write there")
        out.append(path)
    return out


def is_regular_file(path: str) -> bool:
    """True for a regular file (or a symlink to one); False for a directory, FIFO, socket, device
    node, broken link or a missing path. Never opens the file, so it cannot block."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def file_kind(path: str) -> str:
    """A word for what ``path`` is ("FIFO", "socket", "directory", ...), for messages."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "missing or unreadable path"
    for test, word in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return word
    return "special file"
