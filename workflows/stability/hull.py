"""References and convex hulls: entries files, the MP2020 scheme, one pymatgen PhaseDiagram per chemical system."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geodite_sim.workflows.stability.inputs import JSON_SUFFIXES, ScreenError, _exc_text


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


