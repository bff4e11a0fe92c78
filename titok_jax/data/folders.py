"""What the folder sources share (``sources.FolderSource``: images, ``video_sources.
VideoFolderSource``: clips): the per-process log of skipped (unreadable) entries, the read that
falls through to the next usable entry, and labels from first-level sub-folders. NumPy only."""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def walk_folders(root: str) -> Iterator[tuple[str, list[os.DirEntry], list[str]]]:
    """Depth-first over ``root`` and the folders under it: yields ``(folder, entries, descend)``,
    ``entries`` its ``scandir`` entries less hidden ones (names starting with "."); the caller
    appends to ``descend`` the sub-folder paths to enter. Directory links are followed, each
    folder read once (no loops, no duplicates); an unreadable folder is passed over, as
    ``os.walk`` does."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        top = stack.pop()
        try:
            st = os.stat(top)
            with os.scandir(top) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue  # a link back to a folder already read
        seen.add((st.st_dev, st.st_ino))
        descend: list[str] = []
        yield top, entries, descend
        stack.extend(descend)


def folder_labels(files: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``(class_names, labels)``: the sorted first-level sub-folder names of ``files`` (relative
    paths) and each file's index among them, int32, -1 for a file directly in the root."""
    class_names = sorted({f.split(os.sep)[0] for f in files if os.sep in f})
    class_index = {c: i for i, c in enumerate(class_names)}
    labels = np.array([class_index[f.split(os.sep)[0]] if os.sep in f else -1 for f in files],
                      np.int32)
    return class_names, labels


class SkipLog:
    """Mixin for a source with ``root`` and ``files`` (paths relative to ``root``): which entries
    this process skipped, and why. ``num_skipped`` / ``skipped_files`` are per process (grain
    workers keep their own); the lock makes the log safe for grain's read threads and is
    re-made after unpickling. Call ``_init_skips()`` in ``__init__``. ``skip_warning`` (the
    category) and ``skip_noun`` word the one warning each newly skipped entry gets."""

    skip_warning: type[Warning] = UserWarning
    skip_noun = "entry"

    def _init_skips(self) -> None:
        self._skipped: dict[str, str] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def num_skipped(self) -> int:
        """How many distinct entries this process has skipped (construction + read time)."""
        return len(self._skipped)

    @property
    def skipped_files(self) -> dict[str, str]:
        """Relative path -> why it was skipped, for every skipped entry (this process)."""
        return dict(self._skipped)

    @staticmethod
    def _reason(error: BaseException) -> str:
        return f"{type(error).__name__}: {first_line(error)}"

    def _note_bad(self, f: str, error: BaseException, stacklevel: int = 3) -> None:
        """Log ``f`` as skipped for ``error``, warning the first time only (``stacklevel`` as for
        ``warnings.warn`` called by the caller of ``_note_bad``, plus one)."""
        with self._lock:
            new = f not in self._skipped
            if new:
                self._skipped[f] = self._reason(error)
        if new:
            warnings.warn(f"skipping {self.skip_noun} {os.path.join(self.root, f)}: "
                          f"{self._reason(error)}", self.skip_warning, stacklevel=stacklevel)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} records")
        return index

    def _read_usable(self, index: int, read: Callable[[str, int], Any],
                     fatal: tuple[type[BaseException], ...] = (),
                     stacklevel: int = 3) -> tuple[int, Any] | None:
        """``(j, read(files[j], j))`` for the first ``j`` of ``index, index + 1, ...`` (wrapping)
        whose read succeeds; entries skipped before are not retried, a failing one is logged
        (``_note_bad``) and passed over: deterministic, whatever the worker count. None when no
        entry reads; an error of a ``fatal`` type propagates. ``stacklevel``: as ``_note_bad``'s
        for the caller of ``_read_usable``."""
        index = self._check_index(index)
        n = len(self.files)
        for k in range(n):
            j = (index + k) % n
            f = self.files[j]
            if f in self._skipped:
                continue
            try:
                return j, read(f, j)
            except fatal:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means "unusable": skip it
                self._note_bad(f, e, stacklevel + 1)
        return None
