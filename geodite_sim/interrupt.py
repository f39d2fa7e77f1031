"""Ctrl-C (SIGINT) handling of long jobs and of the command line.

- :func:`deferred_interrupt`: inside a job's loop the first Ctrl-C only sets ``stop.requested``; the job stops at
  its next consistent point (an MD check: it writes its checkpoint and marks its systems ``interrupted`` first)
  and raises :class:`Interrupted`. A second Ctrl-C raises ``KeyboardInterrupt`` at once.
- :func:`interrupt_message`: the one line the command line prints (exit status 130), e.g.
  ``interrupted after 12 of 40 structures; re-run the same command to resume``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

#: Exit status of an interrupted command (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130

#: The hint of commands whose results are stored as they arrive.
RESUME_HINT = "re-run the same command to resume"


class Interrupted(KeyboardInterrupt):
    """A job stopped on Ctrl-C at a consistent point (its checkpoint, if it has one, is written)."""


@dataclass
class StopRequest:
    """Set by the first Ctrl-C inside :func:`deferred_interrupt`."""

    requested: bool = False


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[StopRequest]:
    """Defer the first SIGINT of the block to ``stop.requested`` (checked by the job); a second one raises
    ``KeyboardInterrupt`` immediately. Outside the main thread (signals cannot be handled there) nothing is
    deferred."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # pragma: no cover - no signal support
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def interrupt_message(done: int | None = None, total: int | None = None, unit: str = "",
                      hint: str | None = None) -> str:
    """``interrupted after <done> of <total> <unit>s; <hint>`` (parts left out when unknown)."""
    where = ""
    if done is not None:
        units = unit if done == 1 and total is None else unit + "s"
        of = f" of {total:,}" if total is not None else ""
        where = f" after {done:,}{of} {units}".rstrip()
    return f"interrupted{where}" + (f"; {hint}" if hint else "")


__all__ = ["EXIT_INTERRUPTED", "RESUME_HINT", "Interrupted", "StopRequest", "deferred_interrupt",
           "interrupt_message"]
