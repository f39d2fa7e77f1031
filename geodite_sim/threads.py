"""CPU thread policy of every entry point (``threads=`` in the Python API, ``--threads`` on the command line).

Policy (README "CPU threads"):

- ``threads=N`` runs the call with N torch intra-op threads (and N BLAS/OpenMP threads where
  threadpoolctl is installed), restored afterwards;
- ``threads=None`` (the default) leaves torch's own setting: ``OMP_NUM_THREADS`` when it is set, otherwise one
  thread per core (torch's default), or whatever the program set with ``torch.set_num_threads``;
- either way, the first call of a process that finds the machine oversubscribed (the 1-minute load average
  plus this call's threads exceed the cores) warns once: on a busy machine, spinning threads wait for each
  other, and one thread is often many times faster (README, ``docs/performance.md``).

The number of threads can change float round-off (reduction order), not results beyond it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

_WARNED = False


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), None where the platform has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def check_threads(threads: int | str | None) -> int | None:
    """``threads`` as a positive int (None stays None); ValueError for anything else."""
    if threads is None:
        return None
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}") from None
    if n < 1 or (isinstance(threads, float) and threads != n):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return n


def oversubscription_message(threads: int, cores: int, load: float | None) -> str | None:
    """Why ``threads`` torch threads are too many for ``cores`` cores at ``load`` (None when they are not)."""
    if load is None or threads <= 1 or load + threads <= cores + 0.5:
        return None
    return (f"geodite_sim: {threads} CPU threads on {cores} cores with a load average of {load:.1f} (other work "
            f"is running): the threads will wait for each other, often many times slower; use --threads 1 "
            f"(threads=1 in Python, or OMP_NUM_THREADS=1) on a busy machine (README, 'CPU threads')")


def warn_if_oversubscribed(threads: int | None = None) -> str | None:
    """Warn (a RuntimeWarning, once per process) when the machine is oversubscribed; returns the message."""
    global _WARNED
    if _WARNED:
        return None
    n = threads if threads is not None else default_threads()
    msg = oversubscription_message(n, available_cores(), load_average())
    if msg is not None:
        _WARNED = True
        package = os.path.dirname(os.path.abspath(__file__))  # attributed to the caller's code, not ours
        warnings.warn(msg, RuntimeWarning, skip_file_prefixes=(package, os.path.dirname(contextlib.__file__)))
    return msg


@contextlib.contextmanager
def thread_limit(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch (and BLAS) threads, or torch's current setting for None; yields the
    number in use. Warns once per process when the machine is oversubscribed."""
    import torch

    n = check_threads(threads)
    before = torch.get_num_threads()
    warn_if_oversubscribed(n if n is not None else before)
    if n is None or n == before:
        yield before
        return
    torch.set_num_threads(n)
    limits = contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(n)
    except ImportError:
        pass
    try:
        with limits:
            yield n
    finally:
        torch.set_num_threads(before)


def default_threads() -> int:
    """Threads of the default policy: ``OMP_NUM_THREADS`` when set, else torch's (one per core); read without
    importing torch when it is not loaded yet."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return available_cores()


def set_threads(threads: int | None) -> int:
    """Apply ``threads`` for the rest of the process (the command line's ``--threads``); None keeps the policy's
    default (torch is not even imported then). Returns the number of threads in use."""
    n = check_threads(threads)
    if n is None:
        used = default_threads()
    else:
        import torch

        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(n)
        except ImportError:
            pass
        used = n
    warn_if_oversubscribed(used)
    return used


__all__ = ["available_cores", "check_threads", "default_threads", "load_average", "oversubscription_message",
           "set_threads", "thread_limit", "warn_if_oversubscribed"]
