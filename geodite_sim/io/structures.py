"""Turn user input (ASE Atoms, pymatgen structures, file paths) into validated ASE Atoms.

Every structure entering the engine passes through :func:`to_atoms` and
:func:`validate_atoms`, so that a broken input is reported with a reason naming
the problem instead of failing somewhere deep inside a batched step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

#: Highest atomic number the Geodite embedding supports (it has 100 rows, row 0 is padding).
MAX_SUPPORTED_Z = 99


class StructureError(ValueError):
    """A structure that cannot be simulated; the message says why."""


@dataclass
class InputItem:
    """One structure from the input stream, or the reason it could not be read.

    ``index`` is its position in the input stream, ``label`` a human-readable
    name (file path, formula), ``original`` the object the user passed (used to
    return results of the same type), ``atoms`` the converted structure or None.
    """

    index: int
    label: str
    original: Any
    atoms: Atoms | None
    error: str | None = None


def _is_pymatgen(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod.startswith("pymatgen")


def to_atoms(obj: Any) -> Atoms:
    """Convert an ASE Atoms, pymatgen Structure/Molecule or file path to ASE Atoms (a copy).

    A file path is read with ``ase.io.read`` (last frame); anything ASE can read works.
    Raises :class:`StructureError` with the reason when the input cannot be converted.
    """
    if isinstance(obj, Atoms):
        return obj.copy()
    if isinstance(obj, (str, os.PathLike)):
        from ase.io import read

        path = Path(obj)
        if not path.exists():
            raise StructureError(f"file not found: {path}")
        try:
            atoms = read(str(path))
        except Exception as exc:  # ASE raises many kinds of errors for bad files
            raise StructureError(f"could not read {path}: {type(exc).__name__}: {exc}") from exc
        if isinstance(atoms, list):  # defensive: read() returns one Atoms for the default index
            atoms = atoms[-1]
        return atoms
    if _is_pymatgen(obj):
        from pymatgen.io.ase import AseAtomsAdaptor

        try:
            return AseAtomsAdaptor.get_atoms(obj)
        except Exception as exc:
            raise StructureError(f"could not convert pymatgen object: {exc}") from exc
    raise StructureError(
        f"unsupported input type {type(obj).__name__}: pass ASE Atoms, a pymatgen "
        "Structure/Molecule or a file path"
    )


def validate_atoms(atoms: Atoms) -> None:
    """Raise :class:`StructureError` if ``atoms`` cannot be evaluated by Geodite.

    Checks: at least one atom, atomic numbers in 1..99, finite positions and cell,
    and a non-singular cell along the periodic axes.
    """
    n = len(atoms)
    if n == 0:
        raise StructureError("empty structure (0 atoms)")
    z = atoms.numbers
    bad = (z < 1) | (z > MAX_SUPPORTED_Z)
    if bad.any():
        from ase.data import chemical_symbols

        names = sorted({chemical_symbols[int(v)] if 0 <= v < len(chemical_symbols) else str(v) for v in z[bad]})
        raise StructureError(
            f"unsupported element(s) {', '.join(names)}: the model supports Z = 1..{MAX_SUPPORTED_Z}"
        )
    pos = atoms.positions
    if not np.isfinite(pos).all():
        raise StructureError("positions contain NaN or Inf")
    cell = np.asarray(atoms.cell[:], dtype=float)
    if not np.isfinite(cell).all():
        raise StructureError("cell contains NaN or Inf")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        periodic = cell[pbc]
        # The periodic lattice vectors must be linearly independent and non-zero.
        sv = np.linalg.svd(periodic, compute_uv=False)
        if sv.size == 0 or sv.min() < 1e-6 * max(1.0, sv.max()):
            raise StructureError(
                f"singular cell along periodic axes {pbc.tolist()}: lattice vectors {periodic.tolist()}"
            )
        if pbc.all() and abs(np.linalg.det(cell)) < 1e-6:
            raise StructureError("singular cell (zero volume) on a periodic system")


def _label(obj: Any, atoms: Atoms | None, index: int) -> str:
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    if atoms is not None:
        return f"{index}:{atoms.get_chemical_formula()}"
    return f"{index}:{type(obj).__name__}"


def iter_inputs(structures: Any) -> Iterator[InputItem]:
    """Lazily convert and validate an input stream, one :class:`InputItem` per input.

    ``structures`` may be a single structure/path or any iterable of them; it is
    consumed one element at a time, so generators of any length work. A bad input
    yields an item with ``atoms=None`` and ``error`` set; it never stops the stream.
    """
    if isinstance(structures, (Atoms, str, os.PathLike)) or _is_pymatgen(structures):
        structures = [structures]
    if not isinstance(structures, Iterable):
        raise TypeError(f"expected a structure or an iterable of structures, got {type(structures).__name__}")
    for index, obj in enumerate(structures):
        atoms = None
        try:
            atoms = to_atoms(obj)
            validate_atoms(atoms)
        except StructureError as exc:
            yield InputItem(index, _label(obj, atoms, index), obj, None, str(exc))
            continue
        yield InputItem(index, _label(obj, atoms, index), obj, atoms)


def like_input(original: Any, atoms: Atoms) -> Any:
    """Return ``atoms`` as the same kind of object the user passed (pymatgen in, pymatgen out)."""
    if _is_pymatgen(original):
        from pymatgen.core import Molecule, Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        if isinstance(original, Molecule):
            return AseAtomsAdaptor.get_molecule(atoms)
        if isinstance(original, Structure):
            return AseAtomsAdaptor.get_structure(atoms)
    return atoms
