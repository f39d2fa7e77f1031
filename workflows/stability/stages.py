"""Screening stages 0-2: admission of references and candidates, relaxation into the store, references and hulls."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from ase import Atoms
from geodite_sim.workflows.stability.hull import ReferenceHull, apply_mp2020, chemsys_of, entries_are_mp_style
from geodite_sim.workflows.stability.inputs import (
    COMPAT_ERROR,
    DUPLICATE,
    HULL_ERROR,
    INPUT_ERROR,
    NOT_CONVERGED,
    OUTSIDE,
    RELAX_FAILED,
    SCREENED,
    UNSUPPORTED,
    Item,
    ScreenError,
    iter_items,
    unsupported_message,
)
from geodite_sim.workflows.stability.records import RelaxationRecord, _record_of, _resolve_references

from geodite_sim.store import ResultStore


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


