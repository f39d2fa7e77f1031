"""The screen's store: one RelaxationRecord per relaxed reference or candidate, resume settings, table writers."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase import Atoms
from geodite_sim.workflows.stability.hull import load_reference_entries
from geodite_sim.workflows.stability.inputs import (
    JSON_SUFFIXES,
    Item,
    ScreenError,
    _exc_text,
    _to_atoms,
    model_fingerprint,
)

from geodite_sim.store import HEADER as STORE_HEADER
from geodite_sim.store import ResultStore, StoreError, write_atomic


@dataclass
class RelaxationRecord:
    """One relaxed reference or candidate: a line of ``relaxations.jsonl`` (store kind "reference"/"candidate").

    ``index`` is the input position among the references (or candidates), ``id`` its id (checked on resume).
    ``energy`` eV, ``energy_per_atom`` eV/atom (None when the relaxation failed), ``fmax`` eV/Å. The relaxed
    structure is stored with it (``relaxations.extxyz``, 8 decimals) unless the relaxation failed.
    """

    index: int
    id: str
    source: str
    formula: str
    n_atoms: int
    energy: float | None
    energy_per_atom: float | None
    n_steps: int
    converged: bool
    fmax: float | None
    error: str | None


#: Store files of a screen (inside ``out``).
RELAX_LOG = "relaxations.jsonl"
RELAXED_STRUCTURES = "relaxations.extxyz"


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _record_of(item: Item, res: Any) -> tuple[RelaxationRecord, Atoms | None]:
    """The record of one relaxation result and its relaxed structure (plain Atoms; None when it failed)."""
    atoms = res.structure if isinstance(res.structure, Atoms) else None
    if atoms is None and res.structure is not None and not isinstance(res.structure, (str, os.PathLike)):
        try:
            atoms = _to_atoms(res.structure)
        except Exception:
            atoms = None
    energy = _finite(res.energy)
    error = res.error
    label = getattr(res, "label", "") or ""
    if error and label and error.startswith(label):  # the engine's label holds its stream position: name the id
        error = item.id + error[len(label):]
    if error is None and energy is None:
        error = "relaxation returned a non-finite energy"
    rec = RelaxationRecord(
        index=item.order, id=item.id, source=item.source,
        formula=item.atoms.get_chemical_formula() if item.atoms is not None else "",
        n_atoms=len(item.atoms) if item.atoms is not None else 0, energy=energy,
        energy_per_atom=_finite(res.energy_per_atom), n_steps=int(res.n_steps), converged=bool(res.converged),
        fmax=_finite(getattr(res, "fmax", None)), error=error)
    plain = None
    if atoms is not None and error is None:
        plain = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell[:], pbc=atoms.pbc)
    return rec, plain


def open_relax_store(out: Path, settings: Mapping, model: Any, restart: bool) -> ResultStore:
    """The screen's result store in ``out`` (``restart`` discards it first); other settings are refused."""
    if restart:
        for name in (RELAX_LOG, RELAXED_STRUCTURES, STORE_HEADER):
            if (out / name).exists():
                (out / name).unlink()
    store_settings = {k: v for k, v in settings.items() if k not in ("model", "model_fingerprint")}
    try:
        return ResultStore(out, RelaxationRecord, store_settings, model, records_name=RELAX_LOG,
                           structures_name=RELAXED_STRUCTURES, job="screen")
    except StoreError as exc:
        raise ScreenError(f"{exc} (or --restart to discard them)") from exc


# =============================================================================== the workflow
@dataclass
class ScreenResult:
    """What :func:`screen` produced (also written under ``out`` when given)."""

    rows: list[dict]
    references: list[dict]
    metrics: dict | None
    settings: dict
    timings: dict
    warnings: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    out: Path | None = None

    def row(self, cid: str) -> dict:
        for r in self.rows:
            if r["id"] == cid:
                return r
        raise KeyError(cid)


def _resolve_references(references: Any) -> tuple[str, list | None, Any]:
    """("entries", entries, None) or ("structures", None, structure inputs)."""
    from pymatgen.entries import Entry

    refs = references
    if isinstance(refs, (str, os.PathLike)):
        refs = [refs]
    if isinstance(refs, (list, tuple)) and refs and all(isinstance(r, Entry) for r in refs):
        return "entries", list(refs), None
    if isinstance(refs, (list, tuple)) and len(refs) == 1 and isinstance(refs[0], (str, os.PathLike)) \
            and str(refs[0]).lower().endswith(JSON_SUFFIXES) and Path(refs[0]).is_file():
        try:
            return "entries", load_reference_entries(refs[0]), None
        except ScreenError:
            pass  # a JSON of structures: self-consistent references
        except Exception as exc:
            raise ScreenError(f"could not read reference file {refs[0]}: {_exc_text(exc)}") from exc
    return "structures", None, refs


#: relax_many options that do not change results (batch capacity, display): not checked on resume.
_NO_RESULT_EFFECT = ("progress", "total", "max_atoms", "max_systems", "check_interval")


def _settings(model: Any, fmax: float, max_steps: int, relax_cell: bool, relax_kwargs: Mapping) -> dict:
    from geodite_sim.model.contract import contract_attribute, model_name

    return {
        "model": model_name(model),
        "model_fingerprint": model_fingerprint(model),
        "dtype": str(contract_attribute(model, "dtype")),
        "fmax": float(fmax), "max_steps": int(max_steps), "relax_cell": bool(relax_cell),
        "relax_kwargs": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                         for k, v in sorted(relax_kwargs.items()) if k not in _NO_RESULT_EFFECT},
    }


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


def _csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})
    return buf.getvalue()


