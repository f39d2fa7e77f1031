"""Input conversion: ASE Atoms, pymatgen structures and file paths to ASE Atoms, and the error that names why not.

The lowest layer of :mod:`geodite_sim.io`: :mod:`~geodite_sim.io.admission` (the checks) builds on it, and
:mod:`~geodite_sim.io.structures` (the input stream) on both; the names are re-exported there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ase import Atoms

from geodite_sim.status import Status


class StructureError(ValueError):
    """A structure that cannot be simulated; the message says why, ``status`` classifies it."""

    def __init__(self, message: str, status: Status = Status.INVALID_STRUCTURE):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Labeled:
    """A structure with the name its messages and results carry instead of ``index:formula`` (e.g. the file
    and frame it was read from: ``Labeled(atoms, "CuI.extxyz@2")``); results come back as ``structure``'s type."""

    structure: Any
    label: str


def is_pymatgen(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod.startswith("pymatgen")


def to_atoms(obj: Any) -> Atoms:
    """Convert an ASE Atoms, pymatgen Structure/Molecule or file path to ASE Atoms (a copy).

    A file path is read with ``ase.io.read`` (last frame); anything ASE can read works.
    Raises :class:`StructureError` with the reason when the input cannot be converted.
    """
    if isinstance(obj, Atoms):
        return obj.copy()
    if isinstance(obj, Labeled):
        return to_atoms(obj.structure)
    if isinstance(obj, (str, os.PathLike)):
        from ase.io import read

        path = Path(obj)
        if not path.exists():
            raise StructureError(f"file not found: {path}", Status.UNREADABLE)
        try:
            atoms = read(str(path))
        except Exception as exc:  # ASE raises many kinds of errors for bad files
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else \
                f"ASE's reader raised {type(exc).__name__} with no message (not a valid file of its format?)"
            raise StructureError(f"could not read {path}: {detail}", Status.UNREADABLE) from exc
        if isinstance(atoms, list):  # defensive: read() returns one Atoms for the default index
            atoms = atoms[-1]
        return atoms
    if is_pymatgen(obj):
        from pymatgen.io.ase import AseAtomsAdaptor

        try:
            return AseAtomsAdaptor.get_atoms(obj)
        except Exception as exc:
            raise StructureError(f"could not convert pymatgen object: {exc}", Status.UNREADABLE) from exc
    raise StructureError(
        f"unsupported input type {type(obj).__name__}: pass ASE Atoms, a pymatgen "
        "Structure/Molecule or a file path",
        Status.UNREADABLE,
    )


__all__ = ["Labeled", "StructureError", "is_pymatgen", "to_atoms"]
