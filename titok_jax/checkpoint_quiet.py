"""Orbax's noise after a failure it has already reported through an exception: its absl ERROR
records with tracebacks, its writer threads that fail again when the process exits, its pending
read coroutines. The command line shows the exception as one line; these keep stderr at that
line. ``TITOK_DEBUG=1`` keeps all of it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """Orbax's absl warnings off (ERROR and above only) for the duration."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def drop_failed_reads() -> None:
    """A failed restore leaves orbax's per-array read coroutines pending in its event loop; when they
    are destroyed (at the latest when the process exits) each would print a long tensorstore
    traceback (or asyncio logs "Task exception was never retrieved"). The error has been reported
    as one line already, so silence those reports."""
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


class _OrbaxErrorFilter(logging.Filter):
    """Drops Orbax's ERROR records (with their tracebacks) from the absl logger: every failure they
    describe reaches the caller as an exception, which the command line shows as one line. Also
    its "Waiting for previous save to complete took N seconds" WARNING (advice to checkpoint less
    often, printed whenever a save waits on the previous async one: on a loaded machine, between
    the status lines of a run whose checkpoint interval the user chose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno >= logging.ERROR:
            return False
        return not (record.levelno == logging.WARNING
                    and str(record.msg).startswith("Waiting for previous save to complete"))


_ORBAX_FILTER = _OrbaxErrorFilter()


def quiet_orbax_errors() -> None:
    """Install :class:`_OrbaxErrorFilter` once (not with ``TITOK_DEBUG=1``)."""
    logger = logging.getLogger("absl")
    if os.environ.get("TITOK_DEBUG") != "1" and _ORBAX_FILTER not in logger.filters:
        logger.addFilter(_ORBAX_FILTER)


def silence_orbax_threads() -> None:
    """After a failed save, Orbax's background threads of that save fail again as the process
    exits (their executors are gone) and print tracebacks; the failure has been reported already."""
    if os.environ.get("TITOK_DEBUG") == "1":
        return
    drop_failed_reads()
    previous = threading.excepthook
    threading.excepthook = lambda args: None if _from_orbax(args.exc_traceback) else previous(args)


def join_orbax_threads(timeout_s: float = 120.0) -> None:
    """Wait (at most ``timeout_s``) for Orbax's writer threads still running after a failure."""
    deadline = time.monotonic() + timeout_s
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
            t.join(max(0.0, deadline - time.monotonic()))


def _from_orbax(tb: Any) -> bool:
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False
