"""The one device rule of the Python API and the command line.

``"auto"`` (or None) is CUDA when torch sees a GPU, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"``
are taken as given, but a CUDA device that does not exist is refused with a message that says so (instead of
torch's own error deep inside a model load).
"""

from __future__ import annotations

import re
from typing import Any

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


class DeviceError(ValueError):
    """A device name that is unknown or names hardware this machine does not have."""


def check_device(device: Any) -> str:
    """The device as a lower-case string, after checking it; :class:`DeviceError` says what is wrong."""
    text = str(device)
    value = text.strip().lower()
    if not _DEVICE.match(value):
        raise DeviceError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N or mps")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(f"device {text!r} requested but CUDA is not available on this machine "
                              "(use cpu or auto)")
        if ":" in value and int(value.split(":")[1]) >= torch.cuda.device_count():
            raise DeviceError(f"device {text!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return value


def resolve_device(device: Any = "auto") -> str:
    """The device to run on: ``"auto"``/None -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; anything else
    checked by :func:`check_device` (a ``torch.device`` is accepted as well)."""
    if device is None:
        device = "auto"
    value = check_device(device)
    if value == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


__all__ = ["DeviceError", "check_device", "resolve_device"]
