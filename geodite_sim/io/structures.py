"""Turn user input (ASE Atoms, pymatgen structures, file paths) into validated ASE Atoms.

Every structure entering the engine passes through :func:`to_atoms` and
:func:`validate_atoms`, so that a broken input is reported with a reason naming
the problem instead of failing somewhere deep inside a batched step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ase import Atoms

from geodite_sim.io.admission import admit
from geodite_sim.io.readers import Labeled, StructureError, is_pymatgen, to_atoms
from geodite_sim.status import Status

__all__ = ["MAX_SUPPORTED_Z", "InputItem", "Labeled", "StructureError", "iter_inputs", "like_input", "to_atoms",
           "validate_atoms"]  # Labeled, StructureError, to_atoms: re-exported from geodite_sim.io.readers

#: Highest atomic number the Geodite embedding supports (it has 100 rows, row 0 is padding).
MAX_SUPPORTED_Z = 99


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
    #: why it was rejected (None when admitted); ``error`` holds the message
    status: Status | None = None
    #: non-fatal admission notes (e.g. an unsupported element allowed on request)
    warnings: list[str] = field(default_factory=list)


def validate_atoms(
    atoms: Atoms,
    *,
    supported_elements: Iterable[int] | None = range(1, MAX_SUPPORTED_Z + 1),
    min_distance_factor: float | None = None,
    model_name: str | None = None,
) -> None:
    """Raise :class:`StructureError` (with ``.status``) if ``atoms`` cannot be evaluated by Geodite.

    Runs :func:`geodite_sim.io.admission.admit`: at least one atom, atomic numbers within
    ``supported_elements`` (default 1..99, the Geodite embedding), finite positions, cell and momenta,
    a non-singular cell along the periodic axes, and (when ``min_distance_factor`` is given) no two
    atoms closer than that fraction of their covalent-radius sum.
    """
    adm = admit(atoms, supported_elements=supported_elements, min_distance_factor=min_distance_factor,
                label="", model_name=model_name)
    if not adm.ok:
        raise StructureError(adm.message or "invalid structure", adm.status or Status.INVALID_STRUCTURE)


def iter_inputs(
    structures: Any,
    *,
    supported_elements: Iterable[int] | None = range(1, MAX_SUPPORTED_Z + 1),
    allow_unsupported_elements: bool = False,
    min_distance_factor: float | None = 0.5,
    model_name: str | None = None,
) -> Iterator[InputItem]:
    """Lazily convert and admit an input stream, one :class:`InputItem` per input.

    ``structures`` may be a single structure/path or any iterable of them; it is
    consumed one element at a time, so generators of any length work; a :class:`Labeled` input carries its
    own label (the file a command line read it from). A bad input
    yields an item with ``atoms=None``, ``status`` and ``error`` ("<label>: <problem>") set;
    it never stops the stream. The keyword arguments go to :func:`~geodite_sim.io.admission.admit`
    (pass ``model_elements(model)`` for a model's own elements).
    """
    if isinstance(structures, (Atoms, str, os.PathLike, Labeled)) or is_pymatgen(structures):
        structures = [structures]
    if not isinstance(structures, Iterable):
        raise TypeError(f"expected a structure or an iterable of structures, got {type(structures).__name__}")
    for index, obj in enumerate(structures):
        label = None
        if isinstance(obj, Labeled):
            obj, label = obj.structure, obj.label
        adm = admit(obj, supported_elements=supported_elements, allow_unsupported_elements=allow_unsupported_elements,
                    min_distance_factor=min_distance_factor, index=index, model_name=model_name, label=label)
        if adm.ok:
            yield InputItem(index, adm.label, obj, adm.atoms, None, None, adm.warnings)
        else:
            yield InputItem(index, adm.label, obj, None, adm.message, adm.status, adm.warnings)


def like_input(original: Any, atoms: Atoms) -> Any:
    """Return ``atoms`` as the same kind of object the user passed (pymatgen in, pymatgen out)."""
    if is_pymatgen(original):
        from pymatgen.core import Molecule, Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        if isinstance(original, Molecule):
            return AseAtomsAdaptor.get_molecule(atoms)
        if isinstance(original, Structure):
            return AseAtomsAdaptor.get_structure(atoms)
    return atoms
