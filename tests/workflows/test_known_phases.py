"""Screening calls that relaxation noise cannot decide (issue 27, item 4): the default tolerance follows the
relaxation's convergence, and candidates that are a reference phase (``StructureMatcher``) are placed on it."""

from __future__ import annotations

import pytest
from ase.build import bulk
from conftest import tiny_geodite
from geodite_sim.workflows import stability as st
from geodite_sim.workflows.stability.known_phases import convergence_tolerance

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_relax(relax_args_seen: list):
    """relax_many stand-in: each structure 'relaxes' to itself with the energy per atom in ``atoms.info["e"]``."""
    from types import SimpleNamespace

    def relax(structures, stream=False, **kw):
        relax_args_seen.append(kw)
        for i, atoms in enumerate(structures):
            e = float(atoms.info["e"])
            yield SimpleNamespace(structure=atoms, energy=e * len(atoms), energy_per_atom=e, forces=None, stress=None,
                                  n_steps=3, converged=True, error=None, index=i, fmax=0.01)

    return relax


def with_energy(atoms, e):
    atoms = atoms.copy()
    atoms.info["e"] = e
    return atoms


def test_convergence_tolerance():
    assert convergence_tolerance(0.05) == pytest.approx(1.25e-3)
    assert convergence_tolerance(0.01) == pytest.approx(5e-5)
    assert convergence_tolerance(0.001) == 1e-5  # the round-off floor


def test_reference_phase_among_candidates_is_on_the_hull(tmp_path):
    """Li2O screened against itself: a copy 0.3 meV/atom above its reference (fmax 0.05 noise) is stable under the
    default tolerance; one 5 meV/atom above is the reference phase by structure, so it is placed on it; another
    structure 5 meV/atom above is not stable (was: 'not stable' for all three, or a flip between copies)."""
    li2o = bulk("Li2O", "fluorite", 4.62)
    e_ref = -4.0
    refs = {"Li": with_energy(bulk("Li", "bcc", 3.44), -1.9), "O": with_energy(bulk("O", "sc", 2.0), -4.9),
            "Li2O": with_energy(li2o, e_ref)}
    other = bulk("Li2O", "fluorite", 4.62, cubic=True)
    other.rattle(0.4, seed=1)  # another Li2O structure: distorted beyond StructureMatcher's tolerances
    moved = li2o.copy()
    moved.rattle(0.02, seed=2)  # the same phase, relaxed a little differently
    cands = {"copy_noise": with_energy(li2o, e_ref + 3e-4), "copy_far": with_energy(moved, e_ref + 5e-3),
             "other_far": with_energy(other, e_ref + 5e-3), "other_noise": with_energy(other, e_ref + 3e-4)}
    seen: list = []
    res = st.screen(cands, refs, out=tmp_path / "o", model=tiny_geodite(), plots=False, progress=False,
                    relax_fn=fake_relax(seen), fmax=0.05)
    assert res.settings["stable_tolerance"] == pytest.approx(1.25e-3)
    assert res.row("copy_noise")["stable"] and res.row("other_noise")["stable"]
    far = res.row("copy_far")
    assert far["matches_reference"] == "Li2O" and far["stable"]
    assert far["e_above_hull"] == pytest.approx(0.0, abs=1e-9) and far["e_above_hull_raw"] == pytest.approx(5e-3)
    assert not res.row("other_far")["stable"] and not res.row("other_far").get("matches_reference")
    assert res.settings["n_matching_references"] == 2  # copy_noise and copy_far
    assert seen and seen[0]["total"] == len(refs) + len(cands)  # the progress bar knows its total
    strict = st.screen(cands, refs, model=tiny_geodite(), plots=False, progress=False, relax_fn=fake_relax([]),
                       fmax=0.01)
    assert strict.settings["stable_tolerance"] == pytest.approx(5e-5)
    assert not strict.row("other_noise")["stable"] and strict.row("copy_noise")["stable"]  # matched: on the hull
