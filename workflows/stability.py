"""High-throughput stability screening: relax → energies → (MP2020) → convex hull → metrics.

The workflow behind ``geodite-sim screen`` (see ``docs/screening.md``)::

    from geodite_sim.workflows.stability import screen
    res = screen(["candidates/"], references="mp_entries.json.gz", out="screen_out")
    res.rows[0]["e_above_hull"]

1. **Candidates** (files, directories, multi-frame files, ASE Atoms, pymatgen Structures,
   ``{id: structure}`` mappings or any lazy iterable) get a stable id and are checked
   before any model time is spent on them: unreadable input, elements the model does not
   support and compositions outside the reference chemical space are reported with their
   reason and skipped.
2. The rest are relaxed with :func:`geodite_sim.relax_many` (``stream=True``). Each
   finished relaxation is appended to ``<out>/relaxations.jsonl`` (flushed and fsynced),
   so a killed run resumes where it stopped: re-running the same command skips every
   structure already in the log.
3. **References** are either a file of pymatgen ``ComputedEntry`` /
   ``ComputedStructureEntry`` objects (e.g. an MP export) or *self-consistent*: structures
   of the elements and known compounds relaxed with the same model in the same run.
4. Optionally the Materials Project 2020 compatibility scheme is applied to references
   and candidates (``mp2020``; automatic when the reference entries carry MP-style
   ``parameters``).
5. Per candidate, formation energy and distance to the convex hull come from pymatgen's
   ``PhaseDiagram`` built **from the references only** (one per chemical system,
   ``get_decomp_and_e_above_hull(allow_negative=True)``): candidates never change each
   other's hull distance, and a candidate below the hull gets a negative value.
6. Results go to ``results.csv`` / ``results.json`` (one row per candidate, input order),
   ``references.csv``, ``relaxed.extxyz``, ``hull_<chemsys>.png`` (binary/ternary systems),
   ``run.json`` (settings, warnings, timings) and, when DFT labels are given,
   ``metrics.json`` (precision, recall, F1, accuracy, DAF, MAE/RMSE/R², RMSD).

Metric functions return NaN (``null`` in JSON) where a quantity is undefined (for example
precision when nothing is predicted stable) and list the reason under ``notes``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from geodite_sim.store import HEADER as STORE_HEADER
from geodite_sim.store import ResultStore, StoreError

log = logging.getLogger(__name__)

#: Stable <=> E_above_hull <= threshold (eV/atom), as Matbench Discovery ...
STABILITY_THRESHOLD = 0.0
#: ... + a tolerance (eV/atom), by default tied to the relaxation's convergence: fmax² / (2 x 1 eV/Å²), at least
#: 1e-5 (1.25 meV/atom at fmax 0.05; :func:`geodite_sim.workflows.known_phases.convergence_tolerance`), so that
#: relaxation noise cannot flip a call on the hull. None = that default.
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


# =============================================================================== references
def load_reference_entries(path: str | os.PathLike) -> list:
    """pymatgen entries from a monty JSON file (list, ``{id: entry}`` or ``{"entries": [...]}``).

    Accepts ComputedEntry, ComputedStructureEntry, PDEntry (and their dicts, as written by
    ``monty.serialization.dumpfn`` or an MP API export). Entries without ``entry_id`` get
    ``ref-<i>``. Raises :class:`ScreenError` when the file holds no entries.
    """
    from monty.serialization import loadfn
    from pymatgen.analysis.phase_diagram import PDEntry
    from pymatgen.entries import Entry
    from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

    data = loadfn(str(path))
    if isinstance(data, Mapping) and "entries" in data:
        data = data["entries"]
    if isinstance(data, Mapping):
        items = list(data.items())
    else:
        items = [(None, v) for v in (data if isinstance(data, (list, tuple)) else [data])]
    entries = []
    for i, (key, v) in enumerate(items):
        if isinstance(v, dict) and "@class" in v:
            cls = {"ComputedStructureEntry": ComputedStructureEntry, "ComputedEntry": ComputedEntry,
                   "PDEntry": PDEntry}.get(v["@class"])
            v = cls.from_dict(v) if cls else v
        if not isinstance(v, Entry):
            raise ScreenError(f"{path}: item {key if key is not None else i} is a {type(v).__name__}, "
                              "not a pymatgen entry (ComputedEntry/ComputedStructureEntry/PDEntry)")
        if getattr(v, "entry_id", None) in (None, ""):
            v.entry_id = str(key) if key is not None else f"ref-{i}"
        entries.append(v)
    if not entries:
        raise ScreenError(f"{path}: no reference entries found")
    return entries


def is_entries_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a JSON file that :func:`load_reference_entries` can read."""
    if not str(path).lower().endswith(JSON_SUFFIXES) or not Path(path).is_file():
        return False
    try:
        load_reference_entries(path)
        return True
    except Exception:
        return False


def entries_are_mp_style(entries: Sequence) -> bool:
    """True when every entry carries MP-style ``parameters`` (``run_type`` or ``hubbards``)."""
    if not entries:
        return False
    for e in entries:
        params = getattr(e, "parameters", None) or {}
        if "run_type" not in params and "hubbards" not in params:
            return False
    return True


def mp_style_parameters(composition: Any, compat: Any = None) -> dict:
    """The DFT settings MP would have used for ``composition`` (for MP2020 on model energies).

    MP runs GGA+U, with the MP2020 U values, when the most electronegative element is O or F
    and a U element (Co, Cr, Fe, Mn, Mo, Ni, V, W) is present, plain GGA otherwise. A model
    trained on MP/MPtrj reproduces those mixed GGA/GGA+U energies, so candidates are tagged
    the same way. ``software`` is not "vasp", which skips the POTCAR check.
    """
    from pymatgen.core import Composition

    compat = compat or _mp2020()
    comp = Composition(composition)
    elements = sorted((el for el in comp.elements if comp[el] > 0), key=lambda el: el.X)
    u = compat.u_settings.get(elements[-1].symbol, {}) if elements else {}
    hubbards = {el.symbol: float(u[el.symbol]) for el in elements if el.symbol in u}
    return {"run_type": "GGA+U" if hubbards else "GGA", "hubbards": hubbards, "software": "geodite-sim"}


def _mp2020():
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    # check_potcar=False: model entries have no POTCARs; MP exports are MP's own (valid) calculations.
    return MaterialsProject2020Compatibility(check_potcar=False)


def apply_mp2020(entries: Sequence, infer_parameters: bool = False) -> tuple[list, dict[str, str]]:
    """Apply MP2020 corrections in place; return (compatible entries, {entry_id: reason rejected}).

    With ``infer_parameters`` each entry first gets :func:`mp_style_parameters` (model
    energies); otherwise the entries' own ``parameters`` are used (an MP export).
    """
    from pymatgen.entries.compatibility import CompatibilityError

    compat = _mp2020()
    kept, rejected = [], {}
    for e in entries:
        if infer_parameters:
            e.parameters = {**(e.parameters or {}), **mp_style_parameters(e.composition, compat)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = compat.process_entries([e], clean=True, inplace=True, on_error="raise")
        except (CompatibilityError, ValueError) as exc:
            rejected[str(e.entry_id)] = f"MP2020 compatibility: {exc}"
            continue
        if out:
            kept.append(out[0])
        else:
            rejected[str(e.entry_id)] = "MP2020 compatibility: entry rejected"
    return kept, rejected


# =============================================================================== convex hull
@dataclass
class HullResult:
    """Formation energy and hull distance of one entry (eV/atom), or the reason they are missing."""

    e_form_per_atom: float = math.nan
    e_above_hull: float = math.nan
    decomposition: str = ""
    chemsys: str = ""
    error: str | None = None


def chemsys_of(composition: Any) -> str:
    from pymatgen.core import Composition

    return "-".join(sorted(el.symbol for el in Composition(composition).elements))


class ReferenceHull:
    """Convex hulls of a fixed set of reference entries, one ``PhaseDiagram`` per chemical system.

    ``analyse(entry)`` places any entry (a candidate) against the hull of the references whose
    elements lie in the entry's chemical system; the candidate is never added to the hull, so
    candidates do not influence each other. The hull distance restricted to a chemical
    (sub)system equals the one of a phase diagram over all references, only cheaper.
    """

    def __init__(self, references: Sequence):
        from pymatgen.core import Element

        self.references = [e for e in references if math.isfinite(float(e.energy))]
        self.elements = {el.symbol for e in self.references for el in e.composition.elements}
        self.elemental = {
            next(iter(e.composition.elements)).symbol for e in self.references if len(e.composition.elements) == 1
        }
        self._pd: dict[str, Any] = {}
        self._pd_errors: dict[str, str] = {}
        self._Element = Element

    def missing_elements(self, composition: Any) -> list[str]:
        from pymatgen.core import Composition

        return sorted(el.symbol for el in Composition(composition).elements if el.symbol not in self.elements)

    def phase_diagram(self, chemsys: str):
        """The PhaseDiagram of the references within ``chemsys`` ("A-B-C"); ScreenError if impossible."""
        if chemsys in self._pd:
            return self._pd[chemsys]
        if chemsys in self._pd_errors:
            raise ScreenError(self._pd_errors[chemsys])
        from pymatgen.analysis.phase_diagram import PhaseDiagram

        els = set(chemsys.split("-"))
        try:
            outside = sorted(els - self.elements)
            if outside:
                raise ScreenError(f"outside the reference chemical space: no reference contains {', '.join(outside)}")
            missing = sorted(els - self.elemental)
            if missing:
                raise ScreenError(f"no elemental reference for {', '.join(missing)} (needed for the {chemsys} hull)")
            subset = [e for e in self.references if {el.symbol for el in e.composition.elements} <= els]
            pd = PhaseDiagram(subset, elements=[self._Element(s) for s in sorted(els)])
        except ScreenError as exc:
            self._pd_errors[chemsys] = str(exc)
            raise
        except Exception as exc:
            self._pd_errors[chemsys] = f"could not build the {chemsys} hull: {_exc_text(exc)}"
            raise ScreenError(self._pd_errors[chemsys]) from exc
        self._pd[chemsys] = pd
        return pd

    @property
    def phase_diagrams(self) -> dict[str, Any]:
        return dict(self._pd)

    def analyse(self, entry: Any) -> HullResult:
        cs = chemsys_of(entry.composition)
        res = HullResult(chemsys=cs)
        try:
            pd = self.phase_diagram(cs)
            decomp, e_hull = pd.get_decomp_and_e_above_hull(entry, allow_negative=True, check_stable=False)
            res.e_form_per_atom = float(pd.get_form_energy_per_atom(entry))
        except ScreenError as exc:
            res.error = str(exc)
            return res
        except Exception as exc:
            res.error = f"hull analysis failed: {_exc_text(exc)}"
            return res
        res.e_above_hull = float(e_hull)
        res.decomposition = " + ".join(
            _entry_label(e) for e, _ in sorted(decomp.items(), key=lambda kv: (-round(kv[1], 9), _entry_label(kv[0])))
        )
        return res


def _entry_label(e: Any) -> str:
    """``formula`` or ``formula (id)`` of a reference entry."""
    formula = e.composition.reduced_formula
    eid = getattr(e, "entry_id", None)
    return f"{formula} ({eid})" if eid not in (None, "", formula) else formula


def hull_distances(candidates: Sequence, references: Sequence) -> list[HullResult]:
    """Hull analysis of each candidate entry against the references (see :class:`ReferenceHull`)."""
    hull = ReferenceHull(references)
    return [hull.analyse(c) for c in candidates]


# =============================================================================== metrics
def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating,)):
        return _nan_to_none(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def _pairs(true: Sequence[float], pred: Sequence[float]) -> tuple[np.ndarray, np.ndarray, int]:
    t = np.asarray(true, dtype=float).ravel()
    p = np.asarray(pred, dtype=float).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and predicted values differ in length ({t.size} vs {p.size})")
    ok = np.isfinite(t) & np.isfinite(p)
    return t[ok], p[ok], int((~ok).sum())


def classification_metrics(
    e_above_hull_true: Sequence[float],
    e_above_hull_pred: Sequence[float],
    threshold: float = STABILITY_THRESHOLD,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Stability classification metrics (Matbench Discovery conventions).

    Stable <=> E_above_hull <= ``threshold + tolerance`` for both DFT (true) and model (predicted).
    Pairs where either value is NaN are dropped (counted in ``n_dropped``).
    Returns counts ``tp, fp, tn, fn, n``, ``precision = tp/(tp+fp)``, ``recall = tp/(tp+fn)``,
    ``f1`` (harmonic mean; 0 when precision = recall = 0), ``accuracy = (tp+tn)/n``,
    ``prevalence = (tp+fn)/n`` (fraction of truly stable materials) and
    ``daf = precision / prevalence`` (discovery acceleration factor). A ratio whose
    denominator is 0 is NaN, never a silent 0, and ``notes`` says which and why.
    """
    t, p, dropped = _pairs(e_above_hull_true, e_above_hull_pred)
    true_pos, pred_pos = t <= threshold + tolerance, p <= threshold + tolerance
    tp = int(np.sum(true_pos & pred_pos))
    fp = int(np.sum(~true_pos & pred_pos))
    tn = int(np.sum(~true_pos & ~pred_pos))
    fn = int(np.sum(true_pos & ~pred_pos))
    n = tp + fp + tn + fn
    notes: list[str] = []
    nan = math.nan
    if n == 0:
        notes.append("no candidate with both a DFT label and a prediction: every metric is undefined")
    precision = tp / (tp + fp) if tp + fp else nan
    if n and tp + fp == 0:
        notes.append("precision undefined (NaN): no candidate is predicted stable")
    recall = tp / (tp + fn) if tp + fn else nan
    if n and tp + fn == 0:
        notes.append("recall undefined (NaN): no stable material in the labelled set")
    if math.isnan(precision) or math.isnan(recall):
        f1 = nan
        if n:
            notes.append("F1 undefined (NaN): precision or recall undefined")
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    accuracy = (tp + tn) / n if n else nan
    prevalence = (tp + fn) / n if n else nan
    if n and prevalence == 0:
        daf = nan
        notes.append("DAF undefined (NaN): prevalence of stable materials is 0")
    elif math.isnan(precision) or math.isnan(prevalence):
        daf = nan
        if n:
            notes.append("DAF undefined (NaN): precision undefined")
    else:
        daf = precision / prevalence
    return {
        "threshold": threshold, "tolerance": tolerance, "n": n, "n_dropped": dropped,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy,
        "prevalence": prevalence, "daf": daf, "notes": notes,
    }


def regression_metrics(true: Sequence[float], pred: Sequence[float]) -> dict[str, Any]:
    """MAE, RMSE and R² (= 1 - SS_res/SS_tot) of predicted vs true values; NaN pairs dropped.

    R² is NaN when fewer than two values or when the true values are all equal (SS_tot = 0).
    """
    t, p, dropped = _pairs(true, pred)
    notes: list[str] = []
    n = int(t.size)
    if n == 0:
        notes.append("no pairs: MAE/RMSE/R² undefined")
        return {"n": 0, "n_dropped": dropped, "mae": math.nan, "rmse": math.nan, "r2": math.nan, "notes": notes}
    err = p - t
    mae = float(np.mean(np.abs(err)))
    rmse = float(np.sqrt(np.mean(err**2)))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if n < 2 or ss_tot == 0:
        r2 = math.nan
        notes.append("R² undefined (NaN): the true values have zero variance")
    else:
        r2 = 1.0 - float(np.sum(err**2)) / ss_tot
    return {"n": n, "n_dropped": dropped, "mae": mae, "rmse": rmse, "r2": r2, "notes": notes}


def structure_rmsd(pairs: Mapping[str, tuple[Any, Any]], matcher: Any = None) -> dict[str, Any]:
    """RMSD between relaxed and reference structures with pymatgen's ``StructureMatcher.get_rms_dist``.

    ``pairs``: ``{id: (predicted, reference)}`` (pymatgen Structures or ASE Atoms). The RMS
    displacement is normalised by ``(V/N)^(1/3)`` (pymatgen's convention); pairs the matcher
    cannot map onto each other are counted in ``n_unmatched`` and left out of the mean.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    matcher = matcher or StructureMatcher()
    per_id: dict[str, float] = {}
    unmatched: list[str] = []
    for key, (pred, ref) in pairs.items():
        pred = AseAtomsAdaptor.get_structure(pred) if isinstance(pred, Atoms) else pred
        ref = AseAtomsAdaptor.get_structure(ref) if isinstance(ref, Atoms) else ref
        try:
            out = matcher.get_rms_dist(pred, ref)
        except Exception:
            out = None
        if out is None:
            unmatched.append(key)
            per_id[key] = math.nan
        else:
            per_id[key] = float(out[0])
    vals = [v for v in per_id.values() if math.isfinite(v)]
    notes = [] if vals else ["RMSD undefined (NaN): no structure pair matched"]
    return {
        "n": len(pairs), "n_matched": len(vals), "n_unmatched": len(unmatched),
        "rmsd": float(np.mean(vals)) if vals else math.nan, "unmatched": unmatched,
        "per_id": per_id, "notes": notes,
    }


LABEL_ID_COLUMNS = ("id", "material_id", "candidate_id", "candidate", "name", "entry_id")
LABEL_VALUE_COLUMNS = ("e_above_hull", "e_above_hull_dft", "e_hull", "energy_above_hull",
                       "e_above_hull_mp2020_corrected_ppd_mp", "e_above_hull_dft_mp2020")


def load_labels(path: str | os.PathLike) -> dict[str, float]:
    """DFT E_above_hull labels (eV/atom): CSV with an id and an E_above_hull column, or JSON.

    CSV id columns: ``id``, ``material_id``, ``candidate_id``, ``candidate``, ``name``,
    ``entry_id``; value columns: ``e_above_hull``, ``e_above_hull_dft``, ``e_hull``,
    ``energy_above_hull`` or Matbench Discovery's ``e_above_hull_mp2020_corrected_ppd_mp``
    (a two-column CSV is read as id, value). JSON: ``{id: value}``, ``{id: {"e_above_hull": v}}``
    or a list of records with those columns.
    """
    path = Path(path)

    def pick(record: Mapping, names: Sequence[str]) -> Any:
        lower = {str(k).strip().lower(): v for k, v in record.items()}
        for n in names:
            if n in lower:
                return lower[n]
        return None

    out: dict[str, float] = {}
    if path.name.lower().endswith(JSON_SUFFIXES):
        from monty.serialization import loadfn

        data = loadfn(str(path))
        if isinstance(data, Mapping):
            for k, v in data.items():
                out[str(k)] = float(pick(v, LABEL_VALUE_COLUMNS) if isinstance(v, Mapping) else v)
        else:
            for rec in data:
                out[str(pick(rec, LABEL_ID_COLUMNS))] = float(pick(rec, LABEL_VALUE_COLUMNS))
        return out
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        id_col = next((c for c in LABEL_ID_COLUMNS if c in cols), None)
        val_col = next((c for c in LABEL_VALUE_COLUMNS if c in cols), None)
        if (id_col is None or val_col is None) and len(cols) == 2:
            id_col, val_col = cols
        if id_col is None or val_col is None:
            raise ScreenError(f"{path}: need an id column ({', '.join(LABEL_ID_COLUMNS)}) and an E_above_hull "
                              f"column ({', '.join(LABEL_VALUE_COLUMNS)}); found {cols}")
        for rec in reader:
            rec = {str(k).strip().lower(): v for k, v in rec.items()}
            v = rec.get(val_col)
            out[str(rec[id_col]).strip()] = float(v) if v not in (None, "") else math.nan
    return out


def load_reference_structures(path: str | os.PathLike) -> dict[str, Any]:
    """DFT-relaxed structures by candidate id: a directory (``<id>.<ext>``), a monty JSON
    (``{id: Structure}``, list of ComputedStructureEntry) or a multi-frame file with ``id`` in
    each frame's info."""
    return {item.id: item.atoms for item in iter_items(path) if item.atoms is not None}


def stability_metrics(
    rows: Sequence[Mapping[str, Any]],
    labels: Mapping[str, float],
    threshold: float = STABILITY_THRESHOLD,
    relaxed: Mapping[str, Any] | None = None,
    reference_structures: Mapping[str, Any] | None = None,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """All metrics of a screen against DFT labels (rows as in ``results.json``); stable <=> E_above_hull <=
    ``threshold + tolerance``.

    Candidates with a label but no prediction (any error) are left out of the metrics and
    counted in ``n_missing_prediction`` (listed in ``missing_prediction``); labels of ids
    that are not candidates are counted in ``n_unused_labels``.
    """
    ids = [r["id"] for r in rows]
    pred = {r["id"]: r.get("e_above_hull") for r in rows}
    labelled = [i for i in ids if i in labels and labels[i] is not None and math.isfinite(float(labels[i]))]
    have = [i for i in labelled if pred.get(i) is not None and math.isfinite(float(pred[i]))]
    missing = [i for i in labelled if i not in have]
    t = [float(labels[i]) for i in have]
    p = [float(pred[i]) for i in have]
    out: dict[str, Any] = {
        "threshold": threshold,
        "tolerance": tolerance,
        "n_candidates": len(ids),
        "n_labelled": len(labelled),
        "n_evaluated": len(have),
        "n_missing_prediction": len(missing),
        "missing_prediction": missing,
        "n_unused_labels": len(set(labels) - set(ids)),
        "classification": classification_metrics(t, p, threshold, tolerance),
        "e_above_hull": regression_metrics(t, p),
    }
    if reference_structures:
        relaxed = relaxed or {}
        pairs = {i: (relaxed[i], reference_structures[i]) for i in ids if i in relaxed and i in reference_structures}
        out["structure"] = structure_rmsd(pairs)
    c, r = out["classification"], out["e_above_hull"]
    out["summary"] = {
        "precision": c["precision"], "recall": c["recall"], "f1": c["f1"], "accuracy": c["accuracy"],
        "daf": c["daf"], "prevalence": c["prevalence"], "mae": r["mae"], "rmse": r["rmse"], "r2": r["r2"],
        "rmsd": out["structure"]["rmsd"] if "structure" in out else math.nan,
    }
    return out


# =============================================================================== relaxation records
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
    from geodite_sim.store import write_atomic

    write_atomic(path, text)


def _csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})
    return buf.getvalue()


# ------------------------------------------------------------------------------- stage 0: inputs and admission
@dataclass
class ReferenceInputs:
    """The references: given entries (``mode = "entries"``) or structures to relax (``"structures"``)."""

    mode: str
    entries: list
    items: list[Item]
    elements: set[str]


def reference_inputs(references: Any, allowed: set[int] | None) -> ReferenceInputs:
    """Resolve the references; reference structures get ids and their admission checks (unsupported, duplicate)."""
    import copy

    mode, entries, ref_inputs = _resolve_references(references)
    if mode == "entries":
        named = []
        for i, e in enumerate(entries):  # every reference needs an id (copies: the caller's entries stay as given)
            if getattr(e, "entry_id", None) in (None, ""):
                e = copy.copy(e)
                e.entry_id = f"ref-{i}"
            named.append(e)
        return ReferenceInputs(mode, named, [], {el.symbol for e in named for el in e.composition.elements})
    items: list[Item] = []
    seen: set[str] = set()
    for it in iter_items(ref_inputs):
        if it.id in seen:
            it.error, it.status, it.atoms = f"duplicate reference id {it.id!r}", DUPLICATE, None
        seen.add(it.id)
        if it.atoms is not None:
            msg = unsupported_message(it.atoms, allowed)
            if msg:
                it.error, it.status, it.atoms = msg, UNSUPPORTED, None
        items.append(it)
    if not items:
        raise ScreenError("no reference structures given")
    elements = {s for it in items if it.atoms is not None for s in it.atoms.get_chemical_symbols()}
    return ReferenceInputs(mode, [], items, elements)


@dataclass
class CandidateInputs:
    """Candidates seen so far: ``meta`` (id -> first item with that id, input order) and ``refused``
    (items refused before relaxation: unreadable, unsupported, outside the references, duplicate ids)."""

    meta: dict[str, Item] = field(default_factory=dict)
    refused: dict[str, Item] = field(default_factory=dict)


def admit_candidates(candidates: Any, allowed: set[int] | None, ref_elements: set[str],
                     seen: CandidateInputs) -> Iterator[Item]:
    """The candidates worth relaxing, lazily; the others are recorded in ``seen.refused`` with the reason."""
    for it in iter_items(candidates):
        if it.id in seen.meta:
            seen.refused[f"{it.id}#{it.order}"] = Item(
                it.id, it.order, it.source, None,
                f"duplicate candidate id {it.id!r} (first used by {seen.meta[it.id].source})", DUPLICATE)
            continue
        seen.meta[it.id] = it
        if it.atoms is None:
            seen.refused[it.id] = it
            continue
        msg = unsupported_message(it.atoms, allowed)
        if msg:
            it.error, it.status = msg, UNSUPPORTED
            seen.refused[it.id] = it
            continue
        outside = sorted(set(it.atoms.get_chemical_symbols()) - ref_elements)
        if outside:
            it.error = (f"outside the reference chemical space: no reference contains {', '.join(outside)} "
                        f"(references cover {', '.join(sorted(ref_elements)) or 'nothing'})")
            it.status = OUTSIDE
            seen.refused[it.id] = it
            continue
        yield it


# ------------------------------------------------------------------------------- stage 1: relaxation
@dataclass
class Relaxations:
    """Every relaxation of the screen by ``(kind, index)``: records, relaxed structures, counts, seconds."""

    records: dict[tuple[str, int], RelaxationRecord] = field(default_factory=dict)
    structures: dict[tuple[str, int], Atoms] = field(default_factory=dict)
    n_relaxed: int = 0
    n_resumed: int = 0
    seconds: float = 0.0

    def get(self, kind: str, item: Item) -> RelaxationRecord | None:
        return self.records.get((kind, item.order))


def relax_stage(jobs: Iterable[tuple[str, Item]], store: ResultStore | None, relax_fn: Callable[..., Iterable],
                relax_args: Mapping[str, Any]) -> Relaxations:
    """Relax every job ``(kind, item)`` not in the store, storing each result as it arrives; resume = skip.

    The inputs are read first, so that the progress bar knows its total (and shows an ETA)."""
    out = Relaxations()
    pending: dict[int, tuple[str, Item]] = {}
    jobs = list(jobs)
    total = sum(1 for kind, it in jobs if store is None or store.get(kind, it.order) is None)

    def stream() -> Iterator[Atoms]:
        for kind, it in jobs:
            rec = store.get(kind, it.order) if store is not None else None
            if rec is not None:
                if rec.id != it.id:
                    raise ScreenError(f"{kind} #{it.order} is {it.id!r} but {store.directory} holds {rec.id!r} "
                                      "there: the inputs changed. Use another --out directory, or --restart.")
                out.records[(kind, it.order)] = rec
                atoms = store.structure(kind, it.order) if rec.error is None else None
                if atoms is not None:
                    out.structures[(kind, it.order)] = atoms
                out.n_resumed += 1
                continue
            pending[len(pending) + out.n_relaxed] = (kind, it)
            yield it.atoms

    t0 = time.perf_counter()
    for res in relax_fn(stream(), stream=True, total=total, **relax_args):
        kind, it = pending.pop(res.index)
        rec, atoms = _record_of(it, res)
        out.records[(kind, it.order)] = rec
        if atoms is not None:
            out.structures[(kind, it.order)] = atoms
        if store is not None:
            store.put(rec, kind, atoms)
        out.n_relaxed += 1
    out.seconds = time.perf_counter() - t0
    if pending:
        raise ScreenError(f"the relaxation engine returned no result for {len(pending)} structure(s)")
    return out


# ------------------------------------------------------------------------------- stage 2: references and hull
@dataclass
class ReferenceSet:
    """The reference entries the hulls are built from, their table rows and the MP2020 decision."""

    mode: str
    entries: list
    rows: list[dict]
    hull: ReferenceHull
    mp2020: bool
    mp2020_reason: str


def _entry_of(rec: RelaxationRecord, atoms: Atoms, model_label: str):
    from pymatgen.entries.computed_entries import ComputedStructureEntry
    from pymatgen.io.ase import AseAtomsAdaptor

    return ComputedStructureEntry(AseAtomsAdaptor.get_structure(atoms), rec.energy, entry_id=rec.id,
                                  parameters={"software": "geodite-sim", "model": model_label})


def _relaxed_reference_entries(refs: ReferenceInputs, relaxed: Relaxations, model_label: str,
                               warn: list[str]) -> tuple[list, list[dict]]:
    """Entries and rows of self-consistent references (relaxed with the model)."""
    entries, rows = [], []
    for it in refs.items:
        rec = relaxed.get("reference", it)
        row = {"id": it.id, "source": it.source, "status": SCREENED, "error": None,
               "formula": it.atoms.get_chemical_formula() if it.atoms is not None else "",
               "n_atoms": len(it.atoms) if it.atoms is not None else 0}
        if rec is None:
            row.update(status=it.status or INPUT_ERROR, error=it.error)
            warn.append(f"reference {it.id} not used: {it.error}")
        elif rec.error is not None:
            row.update(status=RELAX_FAILED, error=rec.error, converged=False, n_steps=rec.n_steps)
            warn.append(f"reference {it.id} not used: relaxation failed: {rec.error}")
        else:
            row.update(energy_per_atom=rec.energy_per_atom, converged=rec.converged, n_steps=rec.n_steps)
            if not rec.converged:
                warn.append(f"reference {it.id} did not converge in {rec.n_steps} steps (its last energy is used)")
            entries.append(_entry_of(rec, relaxed.structures[("reference", it.order)], model_label))
        rows.append(row)
    return entries, rows


def _given_reference_entries(refs: ReferenceInputs, cands: CandidateInputs) -> tuple[list, list[dict]]:
    """Given entries inside the candidates' chemical (sub)systems (an MP export holds ~10^5 entries)."""
    from itertools import combinations

    subsystems: set[frozenset] = set()
    for it in cands.meta.values():
        if it.atoms is not None and it.id not in cands.refused:
            els = sorted(set(it.atoms.get_chemical_symbols()))
            for k in range(1, len(els) + 1):
                subsystems.update(frozenset(c) for c in combinations(els, k))
    entries = [e for e in refs.entries if frozenset(el.symbol for el in e.composition.elements) in subsystems]
    rows = [{"id": str(getattr(e, "entry_id", "")), "source": "entries", "status": SCREENED, "error": None,
             "formula": e.composition.formula, "n_atoms": e.composition.num_atoms,
             "energy_per_atom": getattr(e, "uncorrected_energy_per_atom", e.energy_per_atom)} for e in entries]
    return entries, rows


def model_energy_convention(model) -> str | None:
    """``"corrected"`` when the model's energies already include MP2020 corrections (e.g. CHGNet's targets),
    ``"uncorrected"`` when they are raw MPtrj energies (e.g. SevenNet-0), None when its card does not say."""
    card = getattr(model, "card", None)
    text = str((card or {}).get("energy_convention", "")).lower()
    if "uncorrected" in text:
        return "uncorrected"
    if "correction" in text:
        return "corrected"
    return None


def reference_stage(refs: ReferenceInputs, relaxed: Relaxations, cands: CandidateInputs, mp2020: bool | None,
                    model_label: str, warn: list[str], energy_convention: str | None = None) -> ReferenceSet:
    """Reference entries (relaxed or given), MP2020 on them when asked or automatic, and their hulls.

    A model whose energies already include MP2020 corrections (``energy_convention == "corrected"``, from its
    model card) never gets them a second time.
    """
    import copy

    if refs.mode == "structures":
        entries, rows = _relaxed_reference_entries(refs, relaxed, model_label, warn)
    else:
        entries, rows = _given_reference_entries(refs, cands)
    if mp2020 is None:  # auto: only when the given entries are MP-style
        use = refs.mode == "entries" and entries_are_mp_style(entries)
        reason = ("auto: reference entries carry MP-style parameters (run_type/hubbards)" if use else
                  "auto: references are not MP-style entries" if refs.mode == "entries" else
                  "auto: self-consistent references (model energies on both sides)")
    else:
        use, reason = bool(mp2020), "requested" if mp2020 else "disabled"
    if use and energy_convention == "corrected":
        use, reason = False, "the model's energies already include MP2020 corrections (model card): not applied twice"
        warn.append(f"MP2020 not applied: {reason}")
    if not use and refs.mode == "entries" and any(abs(getattr(e, "correction", 0.0)) > 0 for e in entries):
        warn.append("reference entries carry energy corrections but MP2020 is off: candidates are not corrected, "
                    "so hull distances mix corrected references with uncorrected model energies (use --mp2020)")
    if use:
        entries = copy.deepcopy(entries) if refs.mode == "entries" else entries
        entries, rejected = apply_mp2020(entries, infer_parameters=(refs.mode == "structures"))
        for rid, why in rejected.items():
            warn.append(f"reference {rid} dropped: {why}")
            for row in rows:
                if row["id"] == rid:
                    row.update(status=COMPAT_ERROR, error=why)
    return ReferenceSet(refs.mode, entries, rows, ReferenceHull(entries), use, reason)


def candidate_rows(cands: CandidateInputs, relaxed: Relaxations, require_converged: bool) -> list[dict]:
    """One row per candidate in input order (``_order``), with its relaxation outcome or why it was refused."""
    rows = []
    for cid, it in cands.meta.items():
        row = {"id": cid, "source": it.source, "n_atoms": len(it.atoms) if it.atoms is not None else None,
               "formula": it.atoms.get_chemical_formula() if it.atoms is not None else "", "status": SCREENED,
               "error": None, "_order": it.order}
        if it.atoms is not None:
            from pymatgen.core import Composition

            comp = Composition(it.atoms.get_chemical_formula())
            row.update(reduced_formula=comp.reduced_formula, chemsys=chemsys_of(comp))
        rec = relaxed.get("candidate", it)
        if cid in cands.refused:
            row.update(status=cands.refused[cid].status or INPUT_ERROR, error=cands.refused[cid].error)
        elif rec is None:
            row.update(status=INPUT_ERROR, error="no relaxation result")
        else:
            row.update(converged=rec.converged, n_steps=rec.n_steps, fmax=rec.fmax)
            if rec.error is not None:  # no energy reported for a failed relaxation
                row.update(status=RELAX_FAILED, error=f"relaxation failed: {rec.error}")
            else:
                row.update(energy=rec.energy, energy_per_atom=rec.energy_per_atom)
                if require_converged and not rec.converged:
                    row.update(status=NOT_CONVERGED, error=f"relaxation did not converge in {rec.n_steps} steps")
        rows.append(row)
    for key, it in cands.refused.items():  # duplicates (kept under a suffixed key)
        if key not in cands.meta:
            rows.append({"id": it.id, "source": it.source, "status": it.status, "error": it.error,
                         "formula": "", "_order": it.order})
    return rows


def hull_stage(rows: list[dict], cands: CandidateInputs, relaxed: Relaxations, refset: ReferenceSet,
               threshold: float, tolerance: float, model_label: str) -> dict[str, Atoms]:
    """Formation energy, E above hull and the stable call (``E_hull <= threshold + tolerance``) of every
    screened row, in place; returns the relaxed structures of the screened candidates by id."""
    atoms_of: dict[str, Atoms] = {}
    entries: dict[str, Any] = {}
    for row in rows:
        it = cands.meta.get(row["id"])
        if row["status"] != SCREENED or it is None or it.order != row["_order"]:
            continue
        rec = relaxed.get("candidate", it)
        atoms_of[row["id"]] = relaxed.structures[("candidate", it.order)]
        entries[row["id"]] = _entry_of(rec, atoms_of[row["id"]], model_label)
    if refset.mp2020 and entries:
        _, rejected = apply_mp2020(list(entries.values()), infer_parameters=True)
        for cid, why in rejected.items():
            entries.pop(cid, None)
            for row in rows:
                if row["id"] == cid and row["status"] == SCREENED:
                    row.update(status=COMPAT_ERROR, error=why)
    for row in rows:
        entry = entries.get(row["id"]) if row["status"] == SCREENED else None
        if entry is None:
            continue
        n = entry.composition.num_atoms
        row["correction_per_atom"] = float(entry.correction) / n
        row["corrected_energy_per_atom"] = float(entry.energy_per_atom)
        h = refset.hull.analyse(entry)
        if h.error:
            row.update(status=OUTSIDE if h.error.startswith("outside") else HULL_ERROR, error=h.error)
            continue
        row.update(e_form_per_atom=h.e_form_per_atom, e_above_hull=h.e_above_hull, decomposition=h.decomposition,
                   stable=bool(h.e_above_hull <= threshold + tolerance))
    rows.sort(key=lambda r: r["_order"])
    for r in rows:
        r.pop("_order", None)
    return atoms_of


def reference_rows(refset: ReferenceSet, tolerance: float) -> list[dict]:
    """Rows of the references with their hull position (``on_hull``: E_hull <= tolerance)."""
    hull = refset.hull
    placed: dict[str, tuple[float, float]] = {}
    for pd in hull.phase_diagrams.values():
        for e in pd.all_entries:
            rid = str(getattr(e, "entry_id", ""))
            if rid not in placed:
                placed[rid] = (float(pd.get_form_energy_per_atom(e)), float(pd.get_e_above_hull(e)))
    rows = refset.rows
    if refset.mode == "structures":  # self-consistent references: also those no candidate needed
        for e in refset.entries:
            rid = str(e.entry_id)
            if rid in placed:
                continue
            try:
                pd = hull.phase_diagram(chemsys_of(e.composition))
                placed[rid] = (float(pd.get_form_energy_per_atom(e)), float(pd.get_e_above_hull(e)))
            except ScreenError as exc:
                for row in rows:
                    if row["id"] == rid:
                        row.update(status=HULL_ERROR, error=str(exc))
    by_id = {str(e.entry_id): e for e in refset.entries}
    for row in rows:
        e = by_id.get(row["id"])
        if e is not None:
            row.update(reduced_formula=e.composition.reduced_formula, chemsys=chemsys_of(e.composition),
                       corrected_energy_per_atom=float(e.energy_per_atom))
        if row["id"] in placed:
            ef, eh = placed[row["id"]]
            row.update(e_form_per_atom=ef, e_above_hull=eh, on_hull=bool(eh <= tolerance))
    if refset.mode == "entries":  # keep only references inside the screened chemical systems
        rows = [r for r in rows if r["id"] in placed or r["status"] != SCREENED]
    return rows


# ------------------------------------------------------------------------------- stage 3: metrics and report
def metrics_stage(rows: list[dict], labels: Any, dft_structures: Any, threshold: float, tolerance: float,
                  relaxed_atoms: Mapping[str, Atoms], warn: list[str]) -> dict | None:
    """DFT labels onto the rows (``e_above_hull_dft``, ``stable_dft``) and :func:`stability_metrics`."""
    if labels is None:
        if dft_structures is not None:
            warn.append("dft_structures given without labels: RMSD is computed only together with labels")
        return None
    label_map = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else dict(labels)
    ref_structs = None
    if dft_structures is not None:
        ref_structs = (load_reference_structures(dft_structures)
                       if isinstance(dft_structures, (str, os.PathLike)) else dict(dft_structures))
    for row in rows:
        v = label_map.get(row["id"])
        if v is not None and math.isfinite(float(v)):
            row["e_above_hull_dft"] = float(v)
            row["stable_dft"] = bool(float(v) <= threshold + tolerance)
    return stability_metrics(rows, label_map, threshold, relaxed_atoms, ref_structs, tolerance=tolerance)


def report_stage(result: ScreenResult, relaxed_atoms: Mapping[str, Atoms], plots: bool, max_plots: int,
                 hull: ReferenceHull) -> None:
    """Hull plots, results.csv/json, references.csv, relaxed.extxyz, metrics.json and run.json under ``out``."""
    t0 = time.perf_counter()
    if result.out is not None and plots:
        result.plots = plot_hulls(hull, result.rows, result.out, max_plots=max_plots, warn=result.warnings)
    result.timings["plot_s"] = time.perf_counter() - t0
    if result.out is None:
        return
    write_outputs(result, relaxed_atoms)
    _write_atomic(result.out / "run.json", json.dumps(_nan_to_none(
        {"settings": result.settings, "timings": result.timings, "warnings": result.warnings,
         "plots": result.plots}), indent=2))


def screen(
    candidates: Any,
    references: Any,
    out: str | os.PathLike | None = None,
    model: Any = None,
    *,
    fmax: float = 0.05,
    max_steps: int = 500,
    relax_cell: bool = True,
    optimizer: str = "fire",
    threshold: float = STABILITY_THRESHOLD,
    stable_tolerance: float | None = STABLE_TOLERANCE,
    mp2020: bool | None = None,
    labels: str | os.PathLike | Mapping[str, float] | None = None,
    dft_structures: str | os.PathLike | Mapping[str, Any] | None = None,
    require_converged: bool = False,
    plots: bool = True,
    max_plots: int = 50,
    restart: bool = False,
    progress: bool = True,
    relax_kwargs: Mapping[str, Any] | None = None,
    relax_fn: Callable[..., Iterable] | None = None,
    executor: Any = None,
) -> ScreenResult:
    """Screen candidates for thermodynamic stability against a convex hull of references.

    Stages: admission (:func:`reference_inputs`, :func:`admit_candidates`) -> :func:`relax_stage` (over the
    result store in ``out``) -> :func:`reference_stage` -> :func:`candidate_rows` + :func:`hull_stage` ->
    :func:`metrics_stage` -> :func:`report_stage`.

    Args:
        candidates: structures to screen (see :func:`iter_items`): paths, directories,
            multi-frame files, Atoms, Structures, ``{id: structure}``, lazy iterables.
        references: a monty JSON file (or list) of pymatgen entries, e.g. an MP export, or
            structures of the elements and known phases to relax with ``model``
            (self-consistent references; same input forms as ``candidates``).
        out: output directory (results, plots, result store); None keeps everything in memory.
        model: a loaded model (default ``geodite_sim.load_model()``).
        fmax, max_steps, relax_cell: relaxation settings (:func:`geodite_sim.relax_many`);
            the same for candidates and self-consistent references.
        optimizer: ``"fire"`` (default), ``"lbfgs"`` or ``"bfgs"`` (``relax_many``'s; docs/optimizers.md).
        threshold: stable <=> E_above_hull <= threshold + stable_tolerance (eV/atom).
        stable_tolerance: eV/atom added to the threshold so that relaxation noise of a candidate sitting on the
            hull cannot decide its call; None (default) ties it to ``fmax``:
            :func:`~geodite_sim.workflows.known_phases.convergence_tolerance` (1.25 meV/atom at fmax 0.05).
            Recorded in ``run.json``. A candidate whose relaxed structure matches a reference structure
            (``StructureMatcher``) is placed on that reference (``matches_reference``; docs/screening.md).
        mp2020: apply MP2020 corrections; None = only when every reference entry carries
            MP-style ``parameters`` (``run_type``/``hubbards``).
        labels: DFT E_above_hull per candidate id (file for :func:`load_labels` or mapping).
        dft_structures: DFT-relaxed structures per candidate id, for the RMSD.
        require_converged: report candidates whose relaxation hit ``max_steps`` as
            ``not_converged`` instead of screening their last energy (the default screens
            them and flags ``converged = False``, as Matbench Discovery does).
        plots: write ``hull_<chemsys>.png`` for binary/ternary systems (at most ``max_plots``).
        restart: discard the result store in ``out`` and relax everything again.
        relax_kwargs: extra keyword arguments of ``relax_many`` (``max_atoms``, ...).
        relax_fn: replaces ``relax_many`` (same signature; for tests and other engines).
        executor: where the relaxations run (:mod:`geodite_sim.executors`; default this process).
    """
    from geodite_sim.workflows.known_phases import convergence_tolerance, match_known_phases

    import geodite_sim

    t_start = time.perf_counter()
    if stable_tolerance is None:
        stable_tolerance = convergence_tolerance(fmax)
    relax_kwargs = dict(relax_kwargs or {})
    if optimizer != "fire":  # a relax_many option (so in the resume settings); FIRE's settings stay as before
        if relax_kwargs.setdefault("optimizer", optimizer) != optimizer:
            raise ValueError(f"optimizer={optimizer!r} but relax_kwargs has optimizer={relax_kwargs['optimizer']!r}")
    if relax_fn is None:
        relax_fn = executor.relax_many if executor is not None else geodite_sim.relax_many
    if model is None:
        model = geodite_sim.load_model()
    warn: list[str] = []
    out_dir = Path(out) if out is not None else None
    settings = _settings(model, fmax, max_steps, relax_cell, relax_kwargs)
    store = open_relax_store(out_dir, settings, model, restart) if out_dir is not None else None
    allowed = supported_elements(model)
    try:
        refs = reference_inputs(references, allowed)
        cands = CandidateInputs()
        jobs = itertools.chain((("reference", it) for it in refs.items if it.atoms is not None),
                               (("candidate", it) for it in admit_candidates(candidates, allowed, refs.elements,
                                                                             cands)))
        relaxed = relax_stage(jobs, store, relax_fn, {"model": model, "fmax": fmax, "max_steps": max_steps,
                                                      "relax_cell": relax_cell, "progress": progress,
                                                      **relax_kwargs})
    finally:
        if store is not None:
            store.close()
    t0 = time.perf_counter()
    refset = reference_stage(refs, relaxed, cands, mp2020, settings["model"], warn, model_energy_convention(model))
    rows = candidate_rows(cands, relaxed, require_converged)
    relaxed_atoms = hull_stage(rows, cands, relaxed, refset, threshold, stable_tolerance, settings["model"])
    n_matched = match_known_phases(rows, relaxed_atoms, refset, threshold, stable_tolerance)
    ref_rows = reference_rows(refset, stable_tolerance)
    t_hull = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = metrics_stage(rows, labels, dft_structures, threshold, stable_tolerance, relaxed_atoms, warn)
    t_metrics = time.perf_counter() - t0
    n, t_relax = relaxed.n_relaxed, relaxed.seconds
    timings = {
        "relax_s": t_relax, "hull_s": t_hull, "metrics_s": t_metrics, "plot_s": 0.0,
        "n_relaxed_this_run": n, "n_resumed": relaxed.n_resumed,
        "relaxations_per_hour": (n / t_relax * 3600.0) if t_relax > 0 and n else math.nan,
        # end to end (reading, relaxing references and candidates, hull): meaningful for a fresh run
        "candidates_per_hour": (len(rows) / (time.perf_counter() - t_start) * 3600.0)
        if not relaxed.n_resumed else math.nan,
    }
    settings = {**settings, "threshold": threshold, "stable_tolerance": stable_tolerance, "mp2020": refset.mp2020,
                "mp2020_reason": refset.mp2020_reason, "reference_mode": refs.mode,
                "require_converged": require_converged, "n_references": len(refset.entries),
                "n_candidates": len(rows), "n_screened": sum(r["status"] == SCREENED for r in rows),
                "n_stable": sum(bool(r.get("stable")) for r in rows if r["status"] == SCREENED),
                "n_matching_references": n_matched,
                "executor": executor.describe() if executor is not None else "local (one process)"}
    result = ScreenResult(rows=rows, references=ref_rows, metrics=metrics, settings=settings, timings=timings,
                          warnings=warn, out=out_dir)
    result.timings["total_s"] = time.perf_counter() - t_start
    report_stage(result, relaxed_atoms, plots, max_plots, refset.hull)
    result.timings["total_s"] = time.perf_counter() - t_start
    return result


def write_outputs(result: ScreenResult, relaxed_atoms: Mapping[str, Atoms]) -> None:
    """results.csv/json, references.csv, relaxed.extxyz and metrics.json under ``result.out``."""
    out = result.out
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.csv", _csv_text(result.rows, RESULT_COLUMNS))
    _write_atomic(out / "results.json", json.dumps(_nan_to_none(
        [{k: r.get(k) for k in RESULT_COLUMNS if k in r or not k.endswith("_dft")} for r in result.rows]), indent=1))
    _write_atomic(out / "references.csv", _csv_text(result.references, REFERENCE_COLUMNS))
    if result.metrics is not None:
        _write_atomic(out / "metrics.json", json.dumps(_nan_to_none(result.metrics), indent=2))
    frames = []
    for r in result.rows:
        a = relaxed_atoms.get(r["id"])
        if a is None:
            continue
        a = a.copy()
        a.info = {"id": r["id"], "energy_per_atom": r.get("energy_per_atom"), "e_above_hull": r.get("e_above_hull")}
        a.info = {k: v for k, v in a.info.items() if v is not None}
        frames.append(a)
    if frames:
        import ase.io

        buf = io.StringIO()
        ase.io.write(buf, frames, format="extxyz")
        _write_atomic(out / "relaxed.extxyz", buf.getvalue())


# =============================================================================== plots
def plot_hulls(hull: ReferenceHull, rows: Sequence[Mapping], out_dir: str | os.PathLike,
               max_plots: int = 50, warn: list[str] | None = None) -> list[str]:
    """One ``hull_<chemsys>.png`` per binary/ternary chemical system of the screened candidates.

    pymatgen's ``PDPlotter`` (matplotlib backend) draws the reference hull; the candidates are
    overlaid at their composition (binary: formation energy vs fraction; ternary: Gibbs
    triangle), green if predicted stable, red otherwise.
    """
    out_dir = Path(out_dir)
    mpl_log = logging.getLogger("matplotlib")
    level = mpl_log.level
    mpl_log.setLevel(logging.ERROR)  # "Ignoring fixed y limits..." from PDPlotter's equal-aspect ternary axes
    try:
        return _plot_hulls(hull, rows, out_dir, max_plots, warn)
    finally:
        mpl_log.setLevel(level)


def _plot_hulls(hull: ReferenceHull, rows: Sequence[Mapping], out_dir: Path, max_plots: int,
                warn: list[str] | None) -> list[str]:
    import matplotlib.pyplot as plt
    from pymatgen.analysis.phase_diagram import PDPlotter, triangular_coord
    from pymatgen.core import Composition

    by_sys: dict[str, list[Mapping]] = {}
    for r in rows:
        if r.get("status") == SCREENED and r.get("chemsys") and 2 <= len(r["chemsys"].split("-")) <= 3:
            by_sys.setdefault(r["chemsys"], []).append(r)
    paths: list[str] = []
    for k, (cs, members) in enumerate(sorted(by_sys.items())):
        if k >= max_plots:
            if warn is not None:
                warn.append(f"only the first {max_plots} of {len(by_sys)} hull plots were drawn")
            break
        try:
            pd = hull.phase_diagram(cs)
            fig, ax = plt.subplots(figsize=(8, 6))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                PDPlotter(pd, show_unstable=0.2, backend="matplotlib").get_plot(ax=ax)
            els = pd.elements
            ys = []
            for r in members:
                comp = Composition(r["reduced_formula"])
                x = np.array([comp.get_atomic_fraction(el) for el in els[1:]])
                stable = bool(r.get("stable"))
                style = {"marker": "*" if stable else "x", "color": "tab:green" if stable else "tab:red",
                         "s": 160 if stable else 80, "zorder": 5}
                if len(els) == 2:
                    xy = (x[0], r["e_form_per_atom"])
                    ys.append(r["e_form_per_atom"])
                else:
                    xy = tuple(triangular_coord(x))
                ax.scatter([xy[0]], [xy[1]], **style)
                ax.annotate(f"{r['id']} ({r['e_above_hull']:+.3f})", xy, fontsize=7,
                            xytext=(4, -10), textcoords="offset points", color=style["color"])
            if len(els) == 2 and ys:
                lo, hi = ax.get_ylim()
                lo, hi = min(lo, min(ys) - 0.05), max(hi, max(ys) + 0.05)
                ax.set_ylim(lo, hi)
                ax.set_xlabel(f"fraction {els[1].symbol}", fontsize=12)
                ax.set_ylabel("formation energy (eV/atom)", fontsize=12)
            ax.set_title(f"{cs}: reference hull + {len(members)} candidate(s) "
                         f"(green = predicted stable; label: E_above_hull eV/atom)", fontsize=10)
            path = out_dir / f"hull_{cs}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            paths.append(str(path))
        except Exception as exc:  # a plot must never sink the screen
            if warn is not None:
                warn.append(f"hull plot for {cs} failed: {_exc_text(exc)}")
        finally:
            plt.close("all")
    return paths


__all__ = [
    "HullResult", "Item", "ReferenceHull", "RelaxationRecord", "ScreenError", "ScreenResult", "STABILITY_THRESHOLD",
    "STABLE_TOLERANCE", "admit_candidates", "candidate_rows", "hull_stage", "metrics_stage", "reference_inputs",
    "reference_rows", "reference_stage", "relax_stage", "report_stage",
    "apply_mp2020", "classification_metrics", "entries_are_mp_style", "hull_distances", "iter_items",
    "load_labels", "load_reference_entries", "load_reference_structures", "model_fingerprint",
    "mp_style_parameters", "plot_hulls", "regression_metrics", "screen", "stability_metrics",
    "structure_rmsd", "supported_elements", "unsupported_message",
]
