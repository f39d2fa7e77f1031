"""Stability calls that relaxation noise cannot decide: a tolerance tied to the relaxation's convergence, and
candidates that are a reference phase (pymatgen's ``StructureMatcher``) placed where that phase is.

Relaxing to ``fmax`` leaves each atom up to ``fmax`` (eV/Å) from its minimum; along a mode of stiffness k
(eV/Å²) that is an energy up to ``fmax² / (2 k)`` above it. A reference phase screened as a candidate lands a
little above (or below) its own reference: 2e-5 to 5e-4 eV/atom at fmax 0.05 with the packaged model, more than
the float round-off the old 1e-5 eV/atom tolerance covered. :func:`convergence_tolerance` takes the softest
stiffness that matters, 1 eV/Å²: 1.25 meV/atom at fmax 0.05, 50 µeV/atom at fmax 0.01 (never below 1e-5).

A candidate whose relaxed structure matches a reference entry's structure (same reduced formula,
``StructureMatcher()`` with pymatgen's default tolerances; both relaxations converged) *is* that phase: its
``e_above_hull`` is the reference's own (0 on the hull) and its call follows; the value computed from its own
relaxation is kept as ``e_above_hull_raw`` and the reference's id as ``matches_reference``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from geodite_sim.workflows.stability.hull import chemsys_of
from geodite_sim.workflows.stability.inputs import SCREENED, ScreenError

#: eV/Å²: the softest stiffness of a relaxed crystal that the tolerance covers (see the module docstring).
SOFT_STIFFNESS = 1.0
#: eV/atom: the floor of the tolerance (float32 round-off of a per-atom energy of a few eV).
ROUND_OFF = 1e-5


def convergence_tolerance(fmax: float, stiffness: float = SOFT_STIFFNESS) -> float:
    """eV/atom: the energy a relaxation converged to ``fmax`` (eV/Å) may sit above its minimum, ``fmax² / (2k)``,
    at least :data:`ROUND_OFF`."""
    return max(ROUND_OFF, float(fmax) ** 2 / (2.0 * float(stiffness)))


def match_known_phases(rows: list[dict], relaxed_atoms: Mapping[str, Any], refset: Any, threshold: float,
                       tolerance: float, matcher: Any = None) -> int:
    """Place screened candidates that match a reference structure on that reference (in place); returns how many
    matched. ``rows`` are the screen's result rows (``e_above_hull``, ``stable``), ``relaxed_atoms`` their relaxed
    structures by id."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.io.ase import AseAtomsAdaptor

    matcher = matcher or StructureMatcher()
    unconverged = {row["id"] for row in refset.rows if row.get("converged") is False}
    by_formula: dict[str, list[tuple[str, Any, float]]] = {}
    for e in refset.entries:
        structure = getattr(e, "structure", None)
        if structure is None or str(e.entry_id) in unconverged:  # an unfinished relaxation is no phase to match
            continue
        try:
            e_hull = float(refset.hull.phase_diagram(chemsys_of(e.composition)).get_e_above_hull(e))
        except ScreenError:
            continue
        by_formula.setdefault(e.composition.reduced_formula, []).append((str(e.entry_id), structure, e_hull))
    n = 0
    for row in rows:
        if row.get("status") != SCREENED or row.get("e_above_hull") is None or row["id"] not in relaxed_atoms \
                or not row.get("converged", True):
            continue
        refs = by_formula.get(row.get("reduced_formula") or "")
        if not refs or not math.isfinite(float(row["e_above_hull"])):
            continue
        structure = AseAtomsAdaptor.get_structure(relaxed_atoms[row["id"]])
        for rid, ref_structure, e_hull in refs:
            if matcher.fit(structure, ref_structure):
                row.update(e_above_hull_raw=row["e_above_hull"], e_above_hull=e_hull, matches_reference=rid,
                           stable=bool(e_hull <= threshold + tolerance))
                n += 1
                break
    return n


__all__ = ["ROUND_OFF", "SOFT_STIFFNESS", "convergence_tolerance", "match_known_phases"]
