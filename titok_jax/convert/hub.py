"""``hf:ORG/NAME``: a release in the local Hugging Face cache, converted once into a cached workdir.

A name ``hf:ORG/NAME[@REVISION][/FILE]`` (``hf://`` is the same; the form of ``huggingface_hub``'s
``HfFileSystem``) names a model repository the Hugging Face hub has already downloaded. Nothing is
ever downloaded: the cache is read in its documented layout (no ``huggingface_hub`` needed)::

    HUB/models--ORG--NAME/refs/REVISION                 the commit hash a branch or tag points to
    HUB/models--ORG--NAME/snapshots/COMMIT/<files>      symlinks into blobs/ (copies on Windows)
    HUB/models--ORG--NAME/blobs/<etag>

``HUB`` is ``$HF_HUB_CACHE`` (or the older ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. ``REVISION`` (default
``main``) is a ref (branch or tag; ``/`` in it written ``%2F``) or a 40-digit commit hash. ``FILE``
picks one weights file of a repository holding several (``hf:ksarge/FlowMo/flowmo_lo.pth``); the
importer then sees that file and the repository's ``config.json``.

:func:`resolve_workdir` converts the snapshot with ``import-torch``'s importer
(:func:`titok_jax.convert.workdir.import_torch`, which recognises TiTok, MaskGIT-VQGAN, TiTok
generators, FlexTok and FlowMo releases by their files) into
``CACHE/hf/ORG--NAME/COMMIT[--FILE]/`` and returns that workdir; ``CACHE`` is ``$TITOK_JAX_CACHE``,
else ``$XDG_CACHE_HOME/titok_jax``, else ``~/.cache/titok_jax``. The conversion is written in a
temporary directory beside it and renamed into place, with a marker file (:data:`MARKER`) that
records its source, so a finished one is reused as is (a new commit is a new directory) and an
interrupted or concurrent one never leaves a half workdir under the final name. Only the cache
directory is written; the Hugging Face cache is only read.

Errors are one line: a repository, revision or file missing from the cache is a
``FileNotFoundError`` saying how to get it on a machine with internet; a malformed name or a
repository whose files do not say what to import is a ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any
from urllib.parse import unquote

PREFIXES = ("hf://", "hf:")
MARKER = ".hf_source.json"   # written last into a converted workdir: its source, and that it is whole
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
MAIN_WEIGHTS = ("model.safetensors", "pytorch_model.bin")   # what the importer reads beside config.json
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")          # an ORG or a NAME of the hub
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
FORM = "hf:ORG/NAME[@REVISION][/FILE]"


@dataclasses.dataclass(frozen=True)
class HubName:
    """A parsed ``hf:`` name: ``repo`` (``ORG/NAME``), ``revision`` (None: ``main``), ``file`` (None:
    the whole repository) and ``text`` (the name as given)."""

    repo: str
    revision: str | None
    file: str | None
    text: str

    def download_hint(self) -> str:
        """The command that puts this name in a Hugging Face cache, on a machine with internet."""
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"huggingface-cli download {self.repo}{f' {self.file}' if self.file else ''}{rev}"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A repository's snapshot in the Hugging Face cache: ``path`` (``snapshots/COMMIT``), ``commit``
    and ``files`` (relative paths of the files present, sorted; dangling links left out)."""

    name: HubName
    path: str
    commit: str
    files: tuple[str, ...]


def is_hf_name(value: Any) -> bool:
    """Whether ``value`` is a string naming a repository of the Hugging Face cache (``hf:...``).
    Paths (``os.PathLike``) never are: ``./hf:x`` is a local directory."""
    return isinstance(value, str) and value.startswith(PREFIXES)


def parse_hf_name(value: str) -> HubName:
    """``hf:ORG/NAME[@REVISION][/FILE]`` -> :class:`HubName`; one-line ValueError otherwise."""
    body = value[len(next(p for p in PREFIXES if value.startswith(p))):]
    org, _, rest = body.partition("/")
    head, _, file = rest.partition("/")
    name, at, revision = head.partition("@")
    revision = unquote(revision) if at else None
    bad = (not _PART.match(org) or not _PART.match(name) or ".." in org + name
           or (at and not _safe_relative(revision)) or (file and not _safe_relative(file)))
    if bad:
        raise ValueError(f"{value!r} is not a Hugging Face repository name: expected {FORM} "
                         f"(e.g. hf:yucornetto/tokenizer_titok_l32_imagenet)")
    return HubName(repo=f"{org}/{name}", revision=revision, file=file or None, text=value)


def _safe_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) \
        and not any(ord(c) < 32 for c in path)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache directory (see the module docstring for the order)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(xdg), "huggingface", "hub")


def titok_cache_dir() -> str:
    """Where titok_jax caches converted workdirs: ``$TITOK_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/titok_jax``, else ``~/.cache/titok_jax``."""
    if os.environ.get("TITOK_JAX_CACHE"):
        return os.path.expanduser(os.environ["TITOK_JAX_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(xdg), "titok_jax")


def _missing(name: HubName, what: str, hub: str) -> FileNotFoundError:
    folder = "models--" + name.repo.replace("/", "--")
    return FileNotFoundError(
        f"{name.text}: {what} is not in the local Hugging Face cache {hub} (titok_jax never downloads); "
        f"on a machine with internet run `{name.download_hint()}` and copy the {folder} folder of "
        f"its cache into {hub}, or set HF_HUB_CACHE to a cache that holds it")


def find_snapshot(name: str | HubName) -> Snapshot:
    """The snapshot of the Hugging Face cache that ``name`` (``hf:...`` or a parsed
    :class:`HubName`) refers to. One-line FileNotFoundError for a repository, revision or file
    missing from the cache, ValueError for a malformed name."""
    name = parse_hf_name(name) if isinstance(name, str) else name
    hub = hub_cache_dir()
    repo_dir = os.path.join(hub, "models--" + name.repo.replace("/", "--"))
    snaps = os.path.join(repo_dir, "snapshots")
    if not os.path.isdir(snaps):
        raise _missing(name, f"repository {name.repo}", hub)
    present = sorted(n for n in os.listdir(snaps) if os.path.isdir(os.path.join(snaps, n)))
    revision = name.revision or "main"
    ref = os.path.join(repo_dir, "refs", *revision.split("/"))
    commit = None
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    elif _COMMIT.match(revision) and revision in present:
        commit = revision
    elif name.revision is None and len(present) == 1:  # a copied cache without refs/: its only snapshot
        commit = present[0]
    if commit is None or commit not in present:
        have = ", ".join(p[:12] for p in present[:3]) + (" ..." if len(present) > 3 else "") or "none"
        raise _missing(name, f"revision {revision!r} of {name.repo} (cached snapshots: {have})", hub)
    path = os.path.join(snaps, commit)
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for n in names:
            full = os.path.join(root, n)
            if os.path.isfile(full):   # follows the link into blobs/; a dangling one is not there
                files.append(os.path.relpath(full, path).replace(os.sep, "/"))
    snapshot = Snapshot(name=name, path=path, commit=commit, files=tuple(sorted(files)))
    if name.file is not None and name.file not in snapshot.files:
        raise _missing(name, f"file {name.file} of {name.repo}@{commit[:12]}", hub)
    if not _weights(snapshot):
        held = ", ".join(snapshot.files[:6]) + (" ..." if len(snapshot.files) > 6 else "")
        raise _missing(name, f"the weights of {name.repo}@{commit[:12]} (the snapshot holds only "
                             f"{held or 'no files'})", hub)
    return snapshot


def _weights(snapshot: Snapshot) -> list[str]:
    """The weights files the importer would see: the chosen ``FILE``, else every weights file."""
    if snapshot.name.file is not None:
        return [snapshot.name.file]
    return [f for f in snapshot.files if f.endswith(WEIGHT_SUFFIXES)]


def _check_weights(snapshot: Snapshot) -> None:
    """A repository of several weights files and no ``config.json`` or standard weights name (as
    ``fun-research/TiTok`` or ``ksarge/FlowMo``) must say which one it means: a ValueError naming
    the ``hf:ORG/NAME/FILE`` form."""
    name, weights = snapshot.name, _weights(snapshot)
    standard = "config.json" in snapshot.files or any(w in snapshot.files for w in MAIN_WEIGHTS)
    if name.file is None and len(weights) > 1 and not standard:
        listed = ", ".join(weights[:6]) + (" ..." if len(weights) > 6 else "")
        raise ValueError(f"{name.text} holds several weights files ({listed}); name the one to "
                         f"load: hf:{name.repo}{'@' + name.revision if name.revision else ''}"
                         f"/{weights[0]}")


def _stage_file(snapshot: Snapshot, scratch: str) -> str:
    """A directory in ``scratch`` of links to the chosen ``FILE`` and the repository's
    ``config.json`` (copies where links cannot be made): what the importer reads."""
    staged = os.path.join(scratch, "release")
    os.makedirs(staged)
    file = snapshot.name.file
    picked = [file] + (["config.json"] if "config.json" in snapshot.files and file != "config.json" else [])
    for rel in picked:
        target = os.path.realpath(os.path.join(snapshot.path, rel))
        try:
            os.symlink(target, os.path.join(staged, os.path.basename(rel)))
        except OSError:  # no symlinks here (Windows without the privilege): a copy
            shutil.copyfile(target, os.path.join(staged, os.path.basename(rel)))
    return staged


def import_snapshot(snapshot: Snapshot, output_dir: str, image_size: int | None = None,
                    scratch: str | None = None) -> dict[str, Any]:
    """Convert ``snapshot`` into the new workdir ``output_dir`` with the ``import-torch`` importer;
    its ``config.json`` names the source as ``hf:ORG/NAME@COMMIT[/FILE]``. ``scratch``: a directory
    for the links of a chosen ``FILE`` (default: a temporary one in the titok_jax cache, removed
    after). Returns the importer's summary."""
    from titok_jax.checkpoint import CONFIG_FILE, check_new_workdir, write_config
    from titok_jax.convert.workdir import import_torch

    check_new_workdir(os.path.abspath(output_dir), "import-torch never overwrites: choose a new --output")
    _check_weights(snapshot)
    own_scratch = scratch is None and snapshot.name.file is not None
    if own_scratch:
        root = os.path.join(titok_cache_dir(), "hf")
        os.makedirs(root, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".staging-", dir=root)
    try:
        input_dir = _stage_file(snapshot, scratch) if snapshot.name.file else snapshot.path
        try:
            summary = import_torch(input_dir, output_dir, image_size=image_size)
        except ImportError as e:  # a .bin / .pth without torch installed
            raise ValueError(f"{snapshot.name.text}: {_first_line(e)}") from None
        except (ValueError, FileNotFoundError) as e:
            kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
            raise kind(f"cannot import {snapshot.name.text} ({snapshot.path}): {_first_line(e)}") from None
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    with open(os.path.join(output_dir, CONFIG_FILE), encoding="utf-8") as f:
        config = json.load(f)
    config["source"] = source_name(snapshot)
    write_config(os.path.abspath(output_dir), config)
    return summary


def source_name(snapshot: Snapshot) -> str:
    """``hf:ORG/NAME@COMMIT[/FILE]``: the exact snapshot a workdir was converted from."""
    file = f"/{snapshot.name.file}" if snapshot.name.file else ""
    return f"hf:{snapshot.name.repo}@{snapshot.commit}{file}"


def cached_workdir(snapshot: Snapshot) -> str:
    """``CACHE/hf/ORG--NAME/COMMIT[--FILE]``: where ``snapshot`` is (or will be) converted."""
    leaf = snapshot.commit + (f"--{snapshot.name.file.replace('/', '--')}" if snapshot.name.file else "")
    return os.path.join(titok_cache_dir(), "hf", snapshot.name.repo.replace("/", "--"), leaf)


def resolve_workdir(workdir: str | os.PathLike) -> str | os.PathLike:
    """``workdir`` itself, or for an ``hf:`` name the workdir converted from its snapshot in the
    Hugging Face cache: converted on first use (one line on stderr says so), reused after."""
    if not is_hf_name(workdir):
        return workdir
    snapshot = find_snapshot(workdir)
    final = cached_workdir(snapshot)
    if os.path.isfile(os.path.join(final, MARKER)):
        return final
    if os.path.lexists(final) and (not os.path.isdir(final) or os.listdir(final)):
        raise FileExistsError(f"{final} is not a finished conversion of {workdir} (no {MARKER}); "
                              f"remove it to convert again")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    print(f"[titok_jax] converting {source_name(snapshot)} into {final} (once)", file=sys.stderr)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        out = os.path.join(scratch, "workdir")
        summary = import_snapshot(snapshot, out, scratch=scratch)
        marker = {"source": source_name(snapshot), "repo": snapshot.name.repo,
                  "revision": snapshot.name.revision or "main", "commit": snapshot.commit,
                  "file": snapshot.name.file, "snapshot": snapshot.path, "model": summary["model"],
                  "num_params": summary["num_params"]}
        with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
        try:
            os.rename(out, final)   # atomic: the workdir appears whole or not at all
        except OSError:
            if not os.path.isfile(os.path.join(final, MARKER)):  # not a concurrent twin that won
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
