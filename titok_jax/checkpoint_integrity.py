"""Whether a workdir's checkpoints can be resumed: content hashes of checkpoint steps (written when
a step is saved, checked before it is restored), what to do with a corrupt step (name the newest
intact one, or move the corrupt ones aside), and the config keys a resumed run may not change
(:func:`config_differences`). No Orbax here: these read the files.

``DIR/checkpoints/<step>/content_hash.json`` lists every file of the step (relative path -> size
and SHA-256 of its bytes), except the hash file itself and Orbax's top-level bookkeeping
(``_CHECKPOINT_METADATA``, ``commit_success.txt``, which Orbax may rewrite after the save). The
trainer writes it while the step is still Orbax's temporary directory (in Orbax's background
thread for async saves), so a committed step carries its hash from the moment it appears.

:func:`verify` says ``"ok"``, ``"unverified"`` (no hash file: a step saved before hashes existed)
or ``"corrupt"`` with the first file that differs (missing, another size, other bytes). Files
present but not listed are ignored. Results are cached per process while no file of the step
changes (size or modification time), so checking a step twice costs one read.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import uuid
import warnings
from typing import Any, Mapping, Sequence

from titok_jax.errors import CheckpointWarning, CorruptCheckpointError

HASH_FILE = "content_hash.json"
ALGORITHM = "sha256"
# Orbax's top-level step files that are not data and may be rewritten after the save.
_SKIPPED_TOP = ("_CHECKPOINT_METADATA", "commit_success.txt")
_CHUNK = 1 << 22
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step being written
CORRUPT_DIR = "checkpoints.corrupt"   # where --resume_from_intact moves corrupt steps


def checkpoint_dir(workdir: str) -> str:
    """``<workdir>/checkpoints`` (absolute): the Orbax directory of a workdir."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def step_dir(directory: str, step: int) -> str:
    """``directory/<step, 9 digits>``: a step of a checkpoint directory."""
    return os.path.join(directory, f"{int(step):09d}")


def steps_on_disk(directory: str) -> list[int]:
    """The committed steps of a checkpoint directory, ascending (no Orbax needed)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _listing(step_dir: str) -> list[str]:
    """The relative paths of the files that the hash covers, sorted."""
    out = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if rel == HASH_FILE or rel in _SKIPPED_TOP or name.startswith(f".{HASH_FILE}."):
                continue
            out.append(rel)
    return sorted(out)


def _digest(path: str) -> str:
    h = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digests(step_dir: str, rels: list[str]) -> list[str]:
    """SHA-256 of each file (hashlib releases the GIL on large buffers: threads read in parallel)."""
    paths = [os.path.join(step_dir, r) for r in rels]
    if len(paths) < 2:
        return [_digest(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(8, len(paths))) as pool:
        return list(pool.map(_digest, paths))


def write_hash(step_dir: str) -> str:
    """Hash every file of ``step_dir`` and write ``HASH_FILE`` into it (temp file + rename).
    Returns the hash file's path."""
    rels = _listing(step_dir)
    files = {r: [os.path.getsize(os.path.join(step_dir, r)), d]
             for r, d in zip(rels, _digests(step_dir, rels))}
    path = os.path.join(step_dir, HASH_FILE)
    tmp = os.path.join(step_dir, f".{HASH_FILE}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": 1, "algorithm": ALGORITHM, "files": files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


_VERIFIED: dict[str, Any] = {}  # step_dir -> the stat signature it last verified "ok" with


def _signature(step_dir: str, rels: list[str]) -> tuple:
    sig = []
    for r in [HASH_FILE, *rels]:
        try:
            st = os.stat(os.path.join(step_dir, r))
            sig.append((r, st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((r, None, None))
    return tuple(sig)


def verify(step_dir: str) -> tuple[str, str]:
    """``(status, detail)``: ``("ok", "")``, ``("unverified", "no hash file")`` or
    ``("corrupt", what differs)`` for the files of ``step_dir`` against its ``HASH_FILE``."""
    path = os.path.join(step_dir, HASH_FILE)
    if not os.path.isfile(path):
        return "unverified", "no hash file"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError("unknown layout")
        expected = {str(r): (int(v[0]), str(v[1])) for r, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "corrupt", f"its {HASH_FILE} is unreadable"
    rels = sorted(expected)
    sig = _signature(step_dir, rels)
    if _VERIFIED.get(step_dir) == sig:
        return "ok", ""
    for rel in rels:
        p = os.path.join(step_dir, rel)
        if not os.path.isfile(p):
            return "corrupt", f"{rel} is missing"
        size = os.path.getsize(p)
        if size != expected[rel][0]:
            return "corrupt", f"{rel} has {size} bytes, {expected[rel][0]} when saved"
    try:
        digests = _digests(step_dir, rels)
    except OSError as e:
        return "corrupt", f"cannot be read ({e.strerror or e})"
    for rel, got in zip(rels, digests):
        if got != expected[rel][1]:
            return "corrupt", f"{rel} differs from its {ALGORITHM} when saved"
    _VERIFIED[step_dir] = sig
    return "ok", ""


def find_intact(directory: str, below: int) -> tuple[int, str] | None:
    """``(step, status)`` of the newest step before ``below`` that is not corrupt (``status``
    ``"ok"``, or ``"unverified"`` when it has no hash), or None."""
    for s in reversed([s for s in steps_on_disk(directory) if s < below]):
        status, _ = verify(step_dir(directory, s))
        if status != "corrupt":
            return s, status
    return None


def check_step(directory: str, step: int, *, from_intact: bool = False,
               hint: str = "rerun with --resume_from_intact to resume from it") -> int:
    """``step`` when its files match its content hash (or it has none). Otherwise a one-line
    ``CorruptCheckpointError`` naming it, what differs and the newest older intact step (with
    ``hint``, what to do about it; ``{intact}`` in it is that step); with ``from_intact`` the
    corrupt steps after the intact one are moved to ``<workdir>/checkpoints.corrupt/`` instead
    (a ``CheckpointWarning`` says so) and the intact step is returned."""
    status, detail = verify(step_dir(directory, step))
    if status != "corrupt":
        return int(step)
    found = find_intact(directory, step)
    where = f"checkpoint step {step} in {directory} is corrupt and cannot be restored ({detail})"
    if found is None:
        older = "no older step is intact" if any(s < step for s in steps_on_disk(directory)) \
            else "there is no older step"
        raise CorruptCheckpointError(f"{where}; {older}: start a new --workdir", step, None, detail)
    intact, how = found
    said = f"step {intact} is intact" if how == "ok" else f"step {intact} has no hash (not verified)"
    if not from_intact:
        raise CorruptCheckpointError(f"{where}; {said}: {hint.format(intact=intact)}", step, intact, detail)
    moved = set_aside(directory, [s for s in steps_on_disk(directory) if s > intact])
    state = "intact" if how == "ok" else "no hash, not verified"
    warnings.warn(CheckpointWarning(
        f"checkpoint step {step} in {directory} is corrupt ({detail}); resuming from step {intact} "
        f"({state}); moved step(s) {', '.join(map(str, moved))} to "
        f"{os.path.join(os.path.dirname(directory), CORRUPT_DIR)}"), stacklevel=2)
    return int(intact)


def set_aside(directory: str, steps: Sequence[int]) -> list[int]:
    """Move ``steps`` of ``directory`` (whole step folders, bytes untouched) to the sibling
    ``checkpoints.corrupt/`` (process 0; the others wait). Returns the steps moved."""
    import jax
    target = os.path.join(os.path.dirname(directory), CORRUPT_DIR)
    if jax.process_index() == 0:
        os.makedirs(target, exist_ok=True)
        for s in steps:
            name = f"{int(s):09d}"
            dest, n = os.path.join(target, name), 1
            while os.path.exists(dest):
                dest, n = os.path.join(target, f"{name}.{n}"), n + 1
            os.replace(step_dir(directory, s), dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("titok_jax_set_aside_corrupt_checkpoints")
    return [int(s) for s in steps]


def check_resume(workdir: str, from_intact: bool = False) -> int | None:
    """Before a run resumes from ``workdir``: the step it will resume from (None if the workdir
    has no checkpoint). A corrupt latest step is a one-line ``CorruptCheckpointError`` naming the
    newest older intact one, unless ``from_intact`` (then the corrupt steps are moved aside, see
    :func:`check_step`, and the intact step is returned)."""
    directory = checkpoint_dir(workdir)
    steps = steps_on_disk(directory)
    if not steps:
        return None
    return check_step(directory, steps[-1], from_intact=from_intact)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                       keys: Sequence[str] = ("family", "task.name", "model")) -> list[str]:
    """``"model.encoder_width 128 vs 64"`` (``old`` vs ``new``) for every leaf under ``keys``
    (dotted) whose value differs; keys present on one side only are left out (a field added or
    removed between versions; a real shape difference still fails the restore). Values are
    compared as JSON (tuples are lists)."""
    old, new = _as_json(old), _as_json(new)
    out: list[str] = []
    for key in keys:
        a, b = old, new
        for part in key.split("."):
            a = a.get(part, _ABSENT) if isinstance(a, dict) else _ABSENT
            b = b.get(part, _ABSENT) if isinstance(b, dict) else _ABSENT
        _diff(a, b, key, out)
    return out


_ABSENT = object()


def _as_json(tree: Any) -> Any:
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    return json.loads(json.dumps(tree, default=str))


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if a is _ABSENT or b is _ABSENT:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{path}.{k}", out)
    elif a != b:
        out.append(f"{path} {json.dumps(a)} vs {json.dumps(b)}")
