"""Import NVIDIA Warp without its "CUDA driver" notice on machines that have no GPU.

Warp's native library prints ``Warp CUDA warning: Could not find or load the NVIDIA CUDA driver``
straight to file descriptor 2 when it initialises on a machine without ``libcuda`` — expected on a
CPU machine, alarming to a user. :func:`import_warp_quietly` imports Warp, sets
``warp.config.quiet`` / ``log_level`` (no banner) and initialises it with that one line filtered
out of stderr (anything else Warp prints is passed on). Call it before the first import of
``nvalchemiops`` or ``torch_sim``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from types import ModuleType

_NOTICE = b"Could not find or load the NVIDIA CUDA driver"
_done = False


def _cuda_driver_present() -> bool:
    for name in ("libcuda.so", "libcuda.so.1", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def import_warp_quietly() -> ModuleType | None:
    """Import and initialise Warp quietly (idempotent); None when Warp is not installed."""
    global _done
    try:
        import warp
    except ImportError:
        return None
    if _done:
        return warp
    warp.config.quiet = True  # Warp < 1.10
    if hasattr(warp, "LOG_WARNING"):  # Warp >= 1.10: no start-up banner
        warp.config.log_level = max(int(getattr(warp.config, "log_level", 0)), int(warp.LOG_WARNING))
    if _cuda_driver_present():
        warp.init()
        _done = True
        return warp
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        try:
            os.dup2(captured.fileno(), 2)
            warp.init()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        rest = [line for line in captured.read().splitlines(keepends=True) if _NOTICE not in line]
    if rest:
        sys.stderr.buffer.write(b"".join(rest)) if hasattr(sys.stderr, "buffer") else \
            sys.stderr.write(b"".join(rest).decode(errors="replace"))
        sys.stderr.flush()
    _done = True
    return warp


__all__ = ["import_warp_quietly"]
