"""Sub-commands of the ``geodite-sim`` command line; each module defines ``add_parser(subparsers)``.

``add_parser`` registers its sub-parser and sets ``func(args) -> int`` as the default handler.
This module holds what every sub-command shares:

- argument types that refuse bad values with a usage message (``positive_int``, ``positive_float``,
  ``nonnegative_float``, ``device_arg``);
- :func:`resolve_device`: the one device default, ``"auto"`` = CUDA when available, else CPU;
- :data:`EXIT_CODES` / :func:`exit_code`: exit 0 when every input succeeded, 1 when at least one input
  failed (the others still ran and are reported), 2 for a usage error (nothing ran);
- :func:`print_status_table`: the per-input status table printed at the end of a run;
- :class:`RegistryNames`: the ``--ensemble`` / ``--optimizer`` choices, read from the runner's registry.

Modules here must not import torch, torch-sim, Warp, pymatgen, matplotlib or h5py at import time
(``geodite-sim --help`` starts in ~0.2 s); import them inside the handler.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence

from geodite_sim.devices import DeviceError, check_device
from geodite_sim.devices import resolve_device as resolve
from geodite_sim.status import Status

#: Exit status of a sub-command (documented in ``geodite-sim --help`` and README).
EXIT_CODES = {"ok": 0, "some_failed": 1, "usage": 2}

EXIT_HELP = ("exit status: 0 every input succeeded; 1 at least one input failed (the others ran and are "
             "reported, one status line per input); 2 bad arguments (nothing ran)")


class RegistryNames(Sequence[str]):
    """The names registered in :mod:`geodite_sim.runner.registry` of one kind (``"md"``: ensembles, ``"optimizer"``:
    relaxation methods), as argparse ``choices``: read when first needed (parsing that option, or printing its
    ``--help``), so that building the parser imports no torch. Give the argument a ``metavar`` (argparse would list
    the choices while building it otherwise). A new registry entry is a new choice: nothing to edit here."""

    def __init__(self, kind: str):
        self.kind = kind
        self._names: tuple[str, ...] | None = None

    def _load(self) -> tuple[str, ...]:
        if self._names is None:
            from geodite_sim.runner.registry import names  # imports torch: only when a value is checked or listed

            self._names = names(self.kind)
        return self._names

    def __getitem__(self, index):
        return self._load()[index]

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __repr__(self) -> str:
        return f"RegistryNames({self.kind!r})"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def device_arg(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a CUDA device must exist
    (:func:`geodite_sim.devices.check_device`, the Python API's rule too)."""
    try:
        return check_device(text)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("(use cpu or auto)", "(use --device cpu or auto)")) from None


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` with the shared default ``auto`` (CUDA when available, else CPU)."""
    parser.add_argument("--device", type=device_arg, default="auto",
                        help="auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N")


def resolve_device(device: str | None) -> str:
    """The device to run on: ``"auto"``/None -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    return resolve(device)


def exit_code(statuses: Iterable) -> int:
    """0 when every status is a success (``Status.ok``), else 1. Statuses may be Status or their values."""
    for s in statuses:
        try:
            if not Status(s).ok:
                return EXIT_CODES["some_failed"]
        except ValueError:  # an unknown status word (e.g. "failed") is a failure
            return EXIT_CODES["some_failed"]
    return EXIT_CODES["ok"]


def print_status_table(rows: Sequence[tuple[str, str, str]], file=None) -> None:
    """One line per input: label, status, detail (error message or numbers); then a count of failures."""
    out = file or sys.stdout
    width = min(48, max([len("input")] + [len(r[0]) for r in rows]))
    print(f"{'input':{width}s}  {'status':19s}  detail", file=out)
    n_bad = 0
    for label, status, detail in rows:
        try:
            ok = Status(status).ok
        except ValueError:
            ok = False
        n_bad += not ok
        shown = label if len(label) <= width else "…" + label[-(width - 1):]
        print(f"{shown:{width}s}  {status!s:19s}  {detail}", file=out)
    print(f"{len(rows)} input(s): {len(rows) - n_bad} succeeded, {n_bad} failed", file=out)


__all__ = [
    "EXIT_CODES", "EXIT_HELP", "add_device_argument", "device_arg", "exit_code", "nonnegative_float",
    "nonnegative_int", "positive_float", "positive_int", "print_status_table", "resolve_device",
]
