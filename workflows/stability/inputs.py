"""Screening inputs: candidate ids and readers (files, folders, JSON, mappings, iterables), table statuses,
element support."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ase import Atoms

#: Stable <=> E_above_hull <= threshold (eV/atom), as Matbench Discovery ...
STABILITY_THRESHOLD = 0.0
#: ... + a tolerance (eV/atom), by default tied to the relaxation's convergence: fmax² / (2 x 1 eV/Å²), at least
#: 1e-5 (1.25 meV/atom at fmax 0.05; :func:`geodite_sim.workflows.stability.known_phases.convergence_tolerance`),
#: so that relaxation noise cannot flip a call on the hull. None = that default.
STABLE_TOLERANCE = None

#: ``Atoms.info`` / ``Structure.properties`` keys read as a candidate's id, in this order.
ID_KEYS = ("id", "material_id", "entry_id", "candidate_id", "name")

#: Files with these suffixes are tried as pymatgen/monty JSON before ASE.
JSON_SUFFIXES = (".json", ".json.gz", ".json.bz2", ".json.xz")

#: Row statuses of the results table.
SCREENED = "screened"
INPUT_ERROR = "input_error"
UNSUPPORTED = "unsupported_element"
OUTSIDE = "outside_references"
DUPLICATE = "duplicate_id"
RELAX_FAILED = "relax_failed"
NOT_CONVERGED = "not_converged"
COMPAT_ERROR = "compatibility_error"
HULL_ERROR = "hull_error"

#: Column order of ``results.csv``.
RESULT_COLUMNS = [
    "id", "formula", "reduced_formula", "chemsys", "n_atoms", "status", "error",
    "energy", "energy_per_atom", "correction_per_atom", "corrected_energy_per_atom",
    "e_form_per_atom", "e_above_hull", "stable", "matches_reference", "e_above_hull_raw", "decomposition",
    "converged", "n_steps", "fmax", "source",
    "e_above_hull_dft", "stable_dft",
]

REFERENCE_COLUMNS = [
    "id", "formula", "reduced_formula", "chemsys", "n_atoms", "status", "error",
    "energy_per_atom", "corrected_energy_per_atom", "e_form_per_atom", "e_above_hull", "on_hull",
    "converged", "n_steps", "source",
]



class ScreenError(RuntimeError):
    """The screen cannot run as asked (bad references, resume with other settings...)."""


# =============================================================================== inputs
@dataclass
class Item:
    """One candidate or reference structure from the input, before relaxation.

    ``order`` is its position among all inputs of its kind, ``source`` where it came
    from (file path, ``path@frame``, ``<memory>``), ``atoms`` the structure or None when
    it could not be read (``error`` then says why).
    """

    id: str
    order: int
    source: str
    atoms: Atoms | None = None
    error: str | None = None
    status: str | None = None


def _exc_text(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _id_from_obj(obj: Any) -> str | None:
    info = getattr(obj, "info", None)
    if info is None:
        info = getattr(obj, "properties", None)
    if isinstance(info, Mapping):
        for key in ID_KEYS:
            value = info.get(key)
            if value not in (None, ""):
                return str(value)
    return None


def _to_atoms(obj: Any) -> Atoms:
    from geodite_sim.io.structures import to_atoms

    return to_atoms(obj)


def _read_json_structures(path: Path) -> list[tuple[str | None, Any]] | None:
    """Structures stored with monty (Structure, list, {id: Structure}, ComputedStructureEntry).

    Returns None when the file holds no structures (it is then tried with ASE)."""
    from monty.serialization import loadfn
    from pymatgen.core import Structure
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    data = loadfn(str(path))

    def one(key: str | None, v: Any) -> tuple[str | None, Any] | None:
        if isinstance(v, dict) and "@class" not in v and "lattice" in v and "sites" in v:
            v = Structure.from_dict(v)
        if isinstance(v, ComputedStructureEntry):
            return (key or (str(v.entry_id) if v.entry_id else None), v.structure)
        if isinstance(v, Structure):
            return (key or _id_from_obj(v), v)
        return None

    if isinstance(data, Mapping):
        out = [one(str(k), v) for k, v in data.items()]
    elif isinstance(data, (list, tuple)):
        out = [one(None, v) for v in data]
    else:
        out = [one(None, data)]
    if not out or any(o is None for o in out):
        return None
    return out  # type: ignore[return-value]


def _iter_file(path: Path) -> Iterator[tuple[str, str, Atoms | None, str | None]]:
    """(id, source, atoms, error) for each structure in a file (several for multi-frame files)."""
    name = path.name
    for suffix in (".gz", ".bz2", ".xz"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    stem = Path(name).stem or name
    if not path.exists():
        yield stem, str(path), None, f"file not found: {path}"
        return
    if path.name.lower().endswith(JSON_SUFFIXES):
        try:
            found = _read_json_structures(path)
        except Exception:
            found = None
        if found is not None:
            single = len(found) == 1
            for i, (key, s) in enumerate(found):
                sid = key or (stem if single else f"{stem}-{i}")
                source = str(path) if single else f"{path}@{i}"
                try:
                    yield sid, source, _to_atoms(s), None
                except Exception as exc:
                    yield sid, source, None, _exc_text(exc)
            return
    import ase.io

    try:
        frames = ase.io.iread(str(path), index=":")
        first = next(frames, None)
        if first is None:
            yield stem, str(path), None, f"could not read {path}: no structure found"
            return
        second = next(frames, None)
    except Exception as exc:  # ASE raises many kinds of errors for bad files
        yield stem, str(path), None, f"could not read {path}: {_exc_text(exc)}"
        return
    if second is None:
        yield _id_from_obj(first) or stem, str(path), first, None
        return
    i = 0
    try:
        for atoms in _chain(first, second, frames):
            yield _id_from_obj(atoms) or f"{stem}-{i}", f"{path}@{i}", atoms, None
            i += 1
    except Exception as exc:
        yield f"{stem}-{i}", f"{path}@{i}", None, f"could not read frame {i} of {path}: {_exc_text(exc)}"


def _chain(a: Any, b: Any, rest: Iterator) -> Iterator:
    yield a
    yield b
    yield from rest


def _is_structure(obj: Any) -> bool:
    return isinstance(obj, Atoms) or type(obj).__module__.startswith("pymatgen")


def iter_items(inputs: Any, default_prefix: str = "") -> Iterator[Item]:
    """Lazily turn user input into :class:`Item` objects with stable ids.

    ``inputs``: a path (file or directory), an ASE Atoms / pymatgen Structure, a mapping
    ``{id: structure}``, or an iterable of any of these or of ``(id, structure)`` pairs.
    Ids come from the mapping key / pair, then ``atoms.info`` or ``structure.properties``
    (``id``, ``material_id``, ``entry_id``, ``candidate_id``, ``name``), then the file name
    (``stem`` for a one-structure file, ``stem-i`` for frame i of a multi-frame file), else
    ``<order>:<formula>``. A directory contributes its files (sorted, not recursive).
    """
    order = 0

    def from_obj(key: str | None, obj: Any) -> Iterator[Item]:
        nonlocal order
        if isinstance(obj, (str, os.PathLike)):
            path = Path(obj)
            if path.is_dir():
                for child in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
                    yield from from_obj(None, child)
                return
            for j, (sid, source, atoms, error) in enumerate(_iter_file(path)):
                if key is not None:  # a given id names the file; frames of a multi-frame file get -<j>
                    sid = key if source == str(path) else f"{key}-{j}"
                yield Item(f"{default_prefix}{sid}", order, source, atoms, error, INPUT_ERROR if error else None)
                order += 1
            return
        sid = key if key is not None else _id_from_obj(obj)
        try:
            atoms = _to_atoms(obj)
            error = None
        except Exception as exc:
            atoms, error = None, _exc_text(exc)
        if sid is None:
            sid = f"{order}:{atoms.get_chemical_formula() if atoms is not None else type(obj).__name__}"
        yield Item(f"{default_prefix}{sid}", order, "<memory>", atoms, error, INPUT_ERROR if error else None)
        order += 1

    if isinstance(inputs, (str, os.PathLike)) or _is_structure(inputs):
        inputs = [inputs]
    if isinstance(inputs, Mapping):
        for k, v in inputs.items():
            yield from from_obj(str(k), v)
        return
    for obj in inputs:
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str):
            yield from from_obj(obj[0], obj[1])
        else:
            yield from from_obj(None, obj)


# =============================================================================== model support
def supported_elements(model: Any) -> set[int] | None:
    """Atomic numbers the model can evaluate: its declared ``supported_elements`` (model contract) within 1..99.

    A Geodite model declares its checkpoint's training elements, or else the elements its reference energy
    table E0 covers (the official MPtrj-style checkpoints leave Po-Ra and Am-Es at 0); a model that declares
    nothing is allowed every Z in 1..99 (the embedding size).
    """
    from geodite_sim.io.structures import MAX_SUPPORTED_Z
    from geodite_sim.model.contract import supported_elements as declared

    allowed = set(range(1, MAX_SUPPORTED_Z + 1))
    elements = declared(model)
    return allowed if elements is None else allowed & set(elements)


def unsupported_message(atoms: Atoms, allowed: set[int] | None) -> str | None:
    """Why the model cannot screen ``atoms`` (invalid structure or element), or None."""
    from ase.data import chemical_symbols

    from geodite_sim.io.structures import StructureError, validate_atoms

    if allowed is not None:
        bad = sorted({int(z) for z in atoms.numbers if int(z) not in allowed})
        if bad:
            names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in bad)
            return f"unsupported element(s) {names}: not among the model's supported elements (its training set)"
    try:
        validate_atoms(atoms)
    except StructureError as exc:
        return str(exc)
    return None


def model_fingerprint(model: Any) -> str:
    """The model's identity for resume checks: :func:`geodite_sim.model.contract.model_fingerprint`."""
    from geodite_sim.model.contract import model_fingerprint as fingerprint

    return fingerprint(model)


