"""Stability screening workflow: hull distances, metrics, error reporting, resume, CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from conftest import tiny_geodite
from geodite_sim.workflows import stability as st
from monty.serialization import dumpfn
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry
from pymatgen.io.ase import AseAtomsAdaptor

from geodite_sim.executors import LocalExecutor
from geodite_sim.store import read_records

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_geodite()


# ------------------------------------------------------------------------------------ helpers
def entry(formula: str, e_per_atom: float, eid: str) -> ComputedEntry:
    comp = Composition(formula)
    return ComputedEntry(comp, e_per_atom * comp.num_atoms, entry_id=eid)


def elemental(refs, symbol: str) -> float:
    return min(r.energy_per_atom for r in refs if [e.symbol for e in r.composition.elements] == [symbol])


def random_references(rng) -> list:
    refs = [entry(el, rng.uniform(-5, -2), el) for el in ("Li", "O", "Mg", "Si")]
    refs += [entry(el, refs[i].energy_per_atom + 0.2, f"{el}-hi") for i, el in enumerate(("Li", "O"))]
    for f in ("Li2O", "Li2O2", "LiO2", "MgO", "SiO2", "Mg2Si", "MgSiO3", "Mg2SiO4", "Li4SiO4", "Li2MgO2"):
        comp = Composition(f)
        mean = sum(comp.get_atomic_fraction(el) * elemental(refs, el.symbol) for el in comp.elements)
        refs.append(entry(f, mean + rng.uniform(-0.8, 0.2), f"ref-{f}"))
    return refs


def fake_relax(energy_of):
    """A relax_many stand-in: energy per atom from ``energy_of(atoms)``; ``None`` -> failure."""

    def relax(structures, model=None, fmax=0.05, max_steps=500, relax_cell=True, stream=False, progress=True, **kw):
        for i, atoms in enumerate(structures):
            e = energy_of(atoms)
            err = None if e is not None else "simulated failure"
            e = e if e is not None else math.nan
            yield SimpleNamespace(structure=atoms, energy=e * len(atoms), energy_per_atom=e, forces=None,
                                  stress=None, n_steps=3, converged=err is None, error=err, index=i, fmax=0.01)

    return relax


# ------------------------------------------------------------------------------------ hull
def test_hull_distances_equal_direct_pymatgen():
    rng = np.random.default_rng(1)
    refs = random_references(rng)
    formulas = ["Li2O", "LiO", "Li3O", "MgO", "Mg2SiO4", "MgSi2O5", "Li2SiO3", "Li", "O", "Li2MgSiO4", "MgSi"]
    cands = []
    for i, f in enumerate(formulas):
        comp = Composition(f)
        mean = sum(comp.get_atomic_fraction(el) * elemental(refs, el.symbol) for el in comp.elements)
        cands.append(entry(f, mean + rng.uniform(-1.0, 0.3), f"c{i}"))
    got = st.hull_distances(cands, refs)
    pd_all = PhaseDiagram(refs)  # one hull over every reference (4 elements)
    for c, h in zip(cands, got):
        assert h.error is None, h.error
        assert h.e_above_hull == pytest.approx(pd_all.get_e_above_hull(c, allow_negative=True), abs=1e-9)
        assert h.e_form_per_atom == pytest.approx(pd_all.get_form_energy_per_atom(c), abs=1e-9)
    assert any(h.e_above_hull < 0 for h in got), "the test should include candidates below the hull"
    # candidates do not change each other's hull distances
    alone = [st.hull_distances([c], refs)[0].e_above_hull for c in cands]
    assert alone == pytest.approx([h.e_above_hull for h in got], abs=1e-12)


def test_hull_by_hand_and_errors():
    refs = [entry("Li", -1.0, "Li"), entry("O", -3.0, "O"), entry("LiO", -3.0, "LiO")]  # E_form(LiO) = -1
    below = entry("LiO", -3.2, "new")
    above = entry("Li3O", -1.4, "above")  # hull at x_O=1/4: E_hull = -1.0 + ... computed below
    h = st.hull_distances([below, above, entry("LiF", -2.0, "f"), entry("Li", -1.1, "li")], refs)
    assert h[0].e_above_hull == pytest.approx(-0.2) and h[0].e_form_per_atom == pytest.approx(-1.2)
    # Li3O = 1/2 Li + 1/2 LiO (per atom): hull energy = 0.5 * -1 + 0.5 * -3 = -2.0
    assert h[1].e_above_hull == pytest.approx(-1.4 + 2.0)
    assert h[1].decomposition == "Li + Li2O2 (LiO)"  # equal amounts: sorted by label
    assert h[2].error.startswith("outside the reference chemical space") and "F" in h[2].error
    assert h[3].e_above_hull == pytest.approx(-0.1)
    h = st.hull_distances([entry("LiO", -3.0, "x")], [entry("Li", -1.0, "Li"), entry("LiO2", -3.0, "y")])
    assert "no elemental reference for O" in h[0].error


# ------------------------------------------------------------------------------------ metrics
def test_classification_metrics_hand_computed():
    true = [-0.10, 0.00, 0.05, 0.20, -0.30, 0.10, 0.02, -0.01]
    pred = [-0.05, 0.03, -0.01, 0.25, -0.20, -0.02, 0.00, 0.10]
    # stable true:  T T F F T F F T ; pred: T F T F T T T F
    # tp = {0, 4} = 2, fn = {1, 7} = 2, fp = {2, 5, 6} = 3, tn = {3} = 1
    m = st.classification_metrics(true, pred)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (2, 2, 3, 1, 8)
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["prevalence"] == pytest.approx(4 / 8)
    assert m["daf"] == pytest.approx((2 / 5) / (4 / 8))
    assert m["notes"] == []
    # a threshold moves the calls: stable <=> E_hull <= 0.05
    m = st.classification_metrics(true, pred, threshold=0.05)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (5, 1, 1, 1)  # true 0,1,2,4,6,7; pred 0,1,2,4,5,6


def test_classification_metrics_edge_cases():
    # no stable material in the labels: recall and DAF undefined, precision 0 (all predicted stable are wrong)
    m = st.classification_metrics([0.1, 0.2, 0.3], [-0.1, 0.5, 0.2])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 1, 2, 0)
    assert m["precision"] == 0.0 and math.isnan(m["recall"]) and math.isnan(m["f1"]) and math.isnan(m["daf"])
    assert m["prevalence"] == 0.0 and m["accuracy"] == pytest.approx(2 / 3)
    assert any("recall undefined" in n for n in m["notes"]) and any("DAF undefined" in n for n in m["notes"])
    # all stable: prevalence 1, DAF = precision
    m = st.classification_metrics([-0.1, 0.0, -0.2], [-0.1, 0.1, -0.3])
    assert (m["tp"], m["fn"]) == (2, 1) and m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3)
    assert m["prevalence"] == 1.0 and m["daf"] == pytest.approx(1.0)
    # nothing predicted stable: precision NaN (not 0), and said so
    m = st.classification_metrics([-0.1, 0.2], [0.1, 0.3])
    assert math.isnan(m["precision"]) and m["recall"] == 0.0 and math.isnan(m["daf"]) and math.isnan(m["f1"])
    assert any("precision undefined" in n and "no candidate is predicted stable" in n for n in m["notes"])
    # precision = recall = 0 (both defined): F1 = 0
    m = st.classification_metrics([-0.1, 0.2], [0.1, -0.3])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["daf"] == 0.0
    # empty, and NaN pairs dropped
    m = st.classification_metrics([], [])
    assert m["n"] == 0 and all(math.isnan(m[k]) for k in ("precision", "recall", "f1", "accuracy", "daf"))
    m = st.classification_metrics([-0.1, math.nan, 0.2], [-0.1, 0.0, math.nan])
    assert m["n"] == 1 and m["n_dropped"] == 2 and m["tp"] == 1


def test_regression_metrics():
    r = st.regression_metrics([0.0, 0.1, 0.2, 0.3], [0.1, 0.1, 0.1, 0.5])
    err = np.array([0.1, 0.0, -0.1, 0.2])
    assert r["mae"] == pytest.approx(np.abs(err).mean())
    assert r["rmse"] == pytest.approx(np.sqrt((err**2).mean()))
    assert r["r2"] == pytest.approx(1 - (err**2).sum() / 0.05)
    r = st.regression_metrics([0.1, 0.1], [0.0, 0.2])
    assert math.isnan(r["r2"]) and r["mae"] == pytest.approx(0.1) and r["notes"]
    r = st.regression_metrics([], [])
    assert r["n"] == 0 and math.isnan(r["mae"])


def test_structure_rmsd():
    s = Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    moved = s.copy()
    moved.translate_sites([1], [0.01, 0, 0])
    other = Structure(Lattice.cubic(4.2), ["Na", "Na"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    out = st.structure_rmsd({"same": (s, s), "moved": (moved, s), "no": (other, s)})
    assert out["per_id"]["same"] == pytest.approx(0.0, abs=1e-8)
    assert 0 < out["per_id"]["moved"] < 0.05
    assert out["n_matched"] == 2 and out["unmatched"] == ["no"] and math.isnan(out["per_id"]["no"])
    assert out["rmsd"] == pytest.approx(out["per_id"]["moved"] / 2)
    assert math.isnan(st.structure_rmsd({})["rmsd"])


def test_load_labels(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("material_id,formula,e_above_hull_mp2020_corrected_ppd_mp\na,NaCl,0.0\nb,KCl,0.125\n")
    assert st.load_labels(p) == {"a": 0.0, "b": 0.125}
    p = tmp_path / "l2.csv"
    p.write_text("cand,value\nx,0.5\n")
    assert st.load_labels(p) == {"x": 0.5}
    p = tmp_path / "l.json"
    p.write_text(json.dumps({"a": 0.1, "b": {"e_above_hull": 0.2}}))
    assert st.load_labels(p) == {"a": 0.1, "b": 0.2}


# ------------------------------------------------------------------------------------ MP2020
def test_mp2020_parameters_and_corrections():
    p = st.mp_style_parameters("Fe2O3")
    assert p["run_type"] == "GGA+U" and p["hubbards"] == {"Fe": 5.3}
    assert st.mp_style_parameters("FeS")["run_type"] == "GGA"  # U only for oxides/fluorides
    assert st.mp_style_parameters("Li2O") == {"run_type": "GGA", "hubbards": {}, "software": "geodite-sim"}
    s = Structure(Lattice.cubic(4.6), ["Li"] * 8 + ["O"] * 4,
                  [[0.25, 0.25, 0.25], [0.75, 0.75, 0.75], [0.25, 0.75, 0.75], [0.75, 0.25, 0.25],
                   [0.75, 0.75, 0.25], [0.25, 0.25, 0.75], [0.75, 0.25, 0.75], [0.25, 0.75, 0.25],
                   [0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    e = ComputedStructureEntry(s, -50.0, entry_id="li2o")
    kept, rejected = st.apply_mp2020([e], infer_parameters=True)
    assert not rejected and kept[0].correction == pytest.approx(-0.687 * 4)  # MP2020 oxide correction
    bad = ComputedEntry("Fe2O3", -40.0, entry_id="bad", parameters={"run_type": "GGA", "hubbards": {}})
    kept, rejected = st.apply_mp2020([bad])
    assert not kept and "MP2020" in rejected["bad"] and "U" in rejected["bad"]
    assert st.entries_are_mp_style([bad]) and not st.entries_are_mp_style([entry("Li", -1, "Li")])


def test_screen_mp_entries_file_auto_mp2020(tmp_path, tiny):
    """MP-style reference file: MP2020 applied automatically; hull = direct pymatgen on corrected energies."""
    params = {"run_type": "GGA", "hubbards": {}}
    refs = [ComputedEntry("Li", -1.9, entry_id="mp-Li", parameters=params),
            ComputedEntry("O2", -9.8, entry_id="mp-O2", parameters=params),
            ComputedEntry("Li2O", -14.3, entry_id="mp-Li2O", parameters=params),
            ComputedEntry("Na", -1.3, entry_id="mp-Na", parameters=params)]
    dumpfn(refs, tmp_path / "refs.json.gz")
    energies = {"Li2O": -4.9, "LiO": -4.6, "Li": -1.95, "NaO": -3.0}
    cands = {k: Atoms(k, cell=[4, 4, 4], pbc=True,
                      scaled_positions=np.random.default_rng(0).random((len(Atoms(k)), 3))) for k in energies}
    res = st.screen(cands, tmp_path / "refs.json.gz", out=tmp_path / "o", model=tiny, plots=False, progress=False,
                    relax_fn=fake_relax(lambda a: energies[a.get_chemical_formula(mode="reduce")]))
    assert res.settings["mp2020"] is True and res.settings["reference_mode"] == "entries"
    compat = st._mp2020()
    ref_c = compat.process_entries([ComputedEntry(e.composition, e.energy, entry_id=e.entry_id, parameters=params)
                                    for e in refs])
    pd = PhaseDiagram(ref_c)
    for row in res.rows:
        assert row["status"] == st.SCREENED, row
        f = row["id"]
        ce = ComputedStructureEntry(AseAtomsAdaptor.get_structure(cands[f]), energies[f] * len(cands[f]),
                                    parameters=st.mp_style_parameters(f))
        ce = compat.process_entries([ce])[0]
        assert row["corrected_energy_per_atom"] == pytest.approx(ce.energy_per_atom)
        assert row["e_above_hull"] == pytest.approx(pd.get_e_above_hull(ce, allow_negative=True), abs=1e-9)
    assert res.row("Li2O")["correction_per_atom"] == pytest.approx(-0.687 / 3)
    # explicit --no-mp2020 keeps raw energies (and warns if references carry corrections)
    res2 = st.screen(cands, tmp_path / "refs.json.gz", out=None, model=tiny, mp2020=False, plots=False,
                     progress=False, relax_fn=fake_relax(lambda a: energies[a.get_chemical_formula(mode="reduce")]))
    assert res2.settings["mp2020"] is False and res2.row("Li2O")["correction_per_atom"] == 0.0


# ------------------------------------------------------------------------------------ the workflow (tiny model)
def _refs():
    return {
        "Li": bulk("Li", "bcc", 3.45),
        "Na": bulk("Na", "bcc", 4.2),
        "O2": Atoms("O2", positions=[[0, 0, 0], [0, 0, 1.21]], cell=[4.5, 4.7, 4.9], pbc=True),
        "Cl2": Atoms("Cl2", positions=[[0, 0, 0], [0, 0, 2.0]], cell=[4.5, 4.7, 5.5], pbc=True),
        "Li2O": bulk("Li2O", "fluorite", 4.6),
        "NaCl": bulk("NaCl", "rocksalt", 5.6),
    }


def _candidates(tmp_path):
    bad = tmp_path / "broken.cif"
    bad.write_text("data_broken\n_cell_length_a oops\nthis is not a cif\n")
    return [
        ("LiO-rs", bulk("LiO", "rocksalt", 4.2)),
        ("Li2O-af", bulk("Li2O", "fluorite", 4.7)),
        ("NaCl-cs", bulk("NaCl", "cesiumchloride", 3.4)),
        ("NaO-zb", bulk("NaO", "zincblende", 5.2)),
        ("KCl", bulk("KCl", "rocksalt", 6.2)),  # K: outside the references
        ("Fm", Atoms("Fm", cell=[3, 3, 3], pbc=True)),  # Z = 100: not supported by the model
        ("close", Atoms("Li2", positions=[[0, 0, 0], [0, 0, 0.3]], cell=[4, 4, 4], pbc=True)),  # fails at once
        str(bad),  # unreadable
    ]


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_table(a: list[dict], b: list[dict], rel: float = 1e-9) -> None:
    """Same rows, same text fields, numbers equal to ``rel``: a resumed run relaxes the remaining structures in
    other batches, and a Geodite evaluation depends on its batch-mates at the last digits (matrix-product
    blocking), so the tables agree to round-off, not always bit for bit."""
    import math

    assert len(a) == len(b) and [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            x, y = ra[k], rb[k]
            try:
                fx, fy = float(x), float(y)
            except (TypeError, ValueError):
                assert x == y, (k, x, y)
                continue
            assert (math.isnan(fx) and math.isnan(fy)) or math.isclose(fx, fy, rel_tol=rel, abs_tol=1e-12), (k, x, y)


def test_screen_self_consistent_errors_and_hull(tmp_path, tiny):
    out = tmp_path / "out"
    res = st.screen(_candidates(tmp_path), _refs(), out=out, model=tiny, max_steps=6, progress=False)
    by = {r["id"]: r for r in res.rows}
    assert [r["id"] for r in res.rows] == ["LiO-rs", "Li2O-af", "NaCl-cs", "NaO-zb", "KCl", "Fm", "close", "broken"]
    assert by["KCl"]["status"] == st.OUTSIDE and "no reference contains K" in by["KCl"]["error"]
    assert by["Fm"]["status"] == st.UNSUPPORTED and "Fm" in by["Fm"]["error"]
    assert by["close"]["status"] == st.RELAX_FAILED and "too close" in by["close"]["error"]
    assert by["broken"]["status"] == st.INPUT_ERROR and "could not read" in by["broken"]["error"]
    screened = [r for r in res.rows if r["status"] == st.SCREENED]
    assert {r["id"] for r in screened} == {"LiO-rs", "Li2O-af", "NaCl-cs", "NaO-zb"}
    assert res.settings["mp2020"] is False and res.settings["reference_mode"] == "structures"
    # hull distances equal a direct pymatgen computation on the same energies
    refs = [PDEntry(Composition(r["formula"]), r["energy_per_atom"] * r["n_atoms"]) for r in res.references]
    pd = PhaseDiagram(refs)
    for r in screened:
        c = PDEntry(Composition(r["formula"]), r["energy_per_atom"] * r["n_atoms"])
        assert r["e_above_hull"] == pytest.approx(pd.get_e_above_hull(c, allow_negative=True), abs=1e-9)
        assert r["e_form_per_atom"] == pytest.approx(pd.get_form_energy_per_atom(c), abs=1e-9)
        assert r["stable"] == (r["e_above_hull"] <= res.settings["stable_tolerance"])
        assert r["n_steps"] <= 6
    # outputs
    for name in ("results.csv", "results.json", "references.csv", "relaxed.extxyz", "run.json", "relaxations.jsonl"):
        assert (out / name).exists(), name
    assert {Path(p).name for p in res.plots} == {"hull_Li-O.png", "hull_Cl-Na.png", "hull_Na-O.png"}
    table = _table(out / "results.csv")
    assert [t["status"] for t in table] == [r["status"] for r in res.rows]
    run = json.loads((out / "run.json").read_text())
    assert run["timings"]["relax_s"] > 0 and run["timings"]["n_relaxed_this_run"] == 6 + 5  # refs + relaxable cands
    # a second run resumes everything from the log: nothing relaxed, same table
    res2 = st.screen(_candidates(tmp_path), _refs(), out=out, model=tiny, max_steps=6, progress=False, plots=False)
    assert res2.timings["n_relaxed_this_run"] == 0 and res2.timings["n_resumed"] == 11
    assert _table(out / "results.csv") == table
    # other relaxation settings on the same output directory are refused
    with pytest.raises(st.ScreenError, match="other settings"):
        st.screen(_candidates(tmp_path), _refs(), out=out, model=tiny, max_steps=7, progress=False)


def test_resume_after_interruption_gives_same_table(tmp_path, tiny):
    """A run interrupted after a few relaxations, then resumed, ends with the uninterrupted run's table."""
    import geodite_sim as gs

    cands = {f"c{i}": a for i, a in enumerate([
        bulk("LiO", "rocksalt", 4.2), bulk("Li2O", "fluorite", 4.7), bulk("NaCl", "cesiumchloride", 3.4),
        bulk("NaO", "zincblende", 5.2), bulk("LiCl", "rocksalt", 5.1), bulk("Na2O", "fluorite", 5.5)])}
    kw = dict(model=tiny, max_steps=5, progress=False, plots=False, relax_kwargs={"max_atoms": 8})
    full = st.screen(cands, _refs(), out=tmp_path / "full", executor=LocalExecutor(), **kw)

    class Killed(BaseException):
        pass

    def dies_after(n):
        def relax(structures, **k):
            for i, res in enumerate(gs.relax_many(structures, **k)):
                if i == n:
                    raise Killed  # like a SIGKILL between two results: the log holds n records
                yield res

        return relax

    with pytest.raises(Killed):
        st.screen(cands, _refs(), out=tmp_path / "part", relax_fn=dies_after(7), **kw)
    log_lines = (tmp_path / "part" / st.RELAX_LOG).read_text().splitlines()
    assert len(log_lines) == 7
    with open(tmp_path / "part" / st.RELAX_LOG, "a") as f:
        f.write('{"kind": "candidate", "id": "c5", "ener')  # a record cut by the kill
    resumed = st.screen(cands, _refs(), out=tmp_path / "part", **kw)
    assert resumed.timings["n_resumed"] == 7 and resumed.timings["n_relaxed_this_run"] == 12 - 7
    # the finished screen re-run relaxes nothing and leaves the store as it is
    store_files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "part").iterdir()
                   if p.name.startswith(("relaxations.", "store.json"))}
    again = st.screen(cands, _refs(), out=tmp_path / "part", **kw)
    assert again.timings["n_relaxed_this_run"] == 0 and again.timings["n_resumed"] == 12
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in store_files} == store_files
    # candidates changed under a stored position are refused
    swapped = dict(reversed(list(cands.items())))
    with pytest.raises(st.ScreenError, match="inputs changed"):
        st.screen(swapped, _refs(), out=tmp_path / "part", **kw)
    a, b = _table(tmp_path / "full" / "results.csv"), _table(tmp_path / "part" / "results.csv")
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b):
        for k in st.RESULT_COLUMNS:
            if k not in ra:
                continue
            try:
                assert float(ra[k]) == pytest.approx(float(rb[k]), abs=1e-9), (ra["id"], k)
            except ValueError:
                assert ra[k] == rb[k], (ra["id"], k)
    assert full.settings["n_screened"] == resumed.settings["n_screened"] == 6


def test_metrics_written_with_labels(tmp_path, tiny):
    energies = {"Li": -2.0, "O": -4.0, "Li2O": -3.5, "LiO": -3.4, "Li3O": -2.6, "LiO2": -3.0}
    refs = [entry("Li", -2.0, "Li"), entry("O", -4.0, "O"), entry("Li2O", -3.5, "Li2O")]
    structs = {"a": bulk("Li2O", "fluorite", 4.6), "b": bulk("LiO", "rocksalt", 4.2),
               "c": Atoms("Li3O", cell=[4, 4, 4], pbc=True, scaled_positions=np.eye(4, 3) * 0.5),
               "d": Atoms("LiO2", cell=[4, 4, 4], pbc=True, scaled_positions=[[0, 0, 0], [0.3, 0, 0], [0, 0.3, 0]]),
               "e": bulk("Li", "bcc", 3.4)}
    # predicted E_hull: a = 0, b: hull at x=1/2 -> (2/3)(-3.5)... computed by pymatgen; labels chosen by hand
    labels = tmp_path / "labels.csv"
    labels.write_text("id,e_above_hull\na,0.0\nb,0.3\nc,-0.01\nd,0.05\nzz,0.0\n")
    dft = {"a": bulk("Li2O", "fluorite", 4.62)}
    res = st.screen(structs, refs, out=tmp_path / "o", model=tiny, labels=labels, dft_structures=dft,
                    relax_fn=fake_relax(lambda at: energies[at.get_chemical_formula(mode="reduce")]), progress=False)
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    pd = PhaseDiagram(refs)
    pred = {k: pd.get_e_above_hull(entry(s.get_chemical_formula(), energies[s.get_chemical_formula(mode="reduce")], k),
                                   allow_negative=True) for k, s in structs.items()}
    lab = {"a": 0.0, "b": 0.3, "c": -0.01, "d": 0.05}
    expect = st.classification_metrics([lab[k] for k in "abcd"], [pred[k] for k in "abcd"])
    for k in ("tp", "fp", "tn", "fn"):
        assert m["classification"][k] == expect[k]
    assert m["n_labelled"] == 4 and m["n_evaluated"] == 4 and m["n_unused_labels"] == 1
    assert m["e_above_hull"]["mae"] == pytest.approx(np.mean([abs(pred[k] - lab[k]) for k in "abcd"]))
    assert m["structure"]["n_matched"] == 1 and m["summary"]["rmsd"] == pytest.approx(0.0, abs=1e-6)  # same cell shape
    assert res.row("a")["e_above_hull_dft"] == 0.0 and "e_above_hull_dft" in _table(tmp_path / "o" / "results.csv")[0]


def test_iter_items_ids(tmp_path):
    from ase.io import write

    frames = [bulk("Cu", "fcc", 3.6), bulk("Al", "fcc", 4.05)]
    frames[1].info["material_id"] = "mp-134"
    write(tmp_path / "many.extxyz", frames)
    write(tmp_path / "one.cif", bulk("NaCl", "rocksalt", 5.6))
    items = list(st.iter_items([tmp_path / "many.extxyz", str(tmp_path / "one.cif"), bulk("Si"), ("given", bulk("C"))]))
    assert [i.id for i in items] == ["many-0", "mp-134", "one", "3:Si2", "given"]
    assert [i.order for i in items] == [0, 1, 2, 3, 4] and all(i.atoms is not None for i in items)
    # monty JSON of entries (ids from entry_id), and a mapping whose value is a multi-frame file
    s = AseAtomsAdaptor.get_structure(bulk("NaCl", "rocksalt", 5.6))
    dumpfn([ComputedStructureEntry(s, -6.0, entry_id="wbm-1"), ComputedStructureEntry(s, -6.1, entry_id="wbm-2")],
           tmp_path / "cands.json.gz")
    items = list(st.iter_items({"x": tmp_path / "many.extxyz", "y": tmp_path / "cands.json.gz"}))
    assert [i.id for i in items] == ["x-0", "x-1", "y-0", "y-1"]
    assert [i.id for i in st.iter_items(tmp_path / "cands.json.gz")] == ["wbm-1", "wbm-2"]


def test_plain_pdentries_as_references(tiny):
    refs = [PDEntry("Li", -2.0), PDEntry("O2", -8.0), PDEntry("Li2O", -12.0)]
    res = st.screen({"a": bulk("Li2O", "fluorite", 4.6)}, refs, model=tiny, progress=False,
                    relax_fn=fake_relax(lambda at: -4.1))
    assert res.settings["mp2020"] is False and "not MP-style" in res.settings["mp2020_reason"]
    assert res.row("a")["e_above_hull"] == pytest.approx(-0.1)
    assert res.row("a")["decomposition"] == "Li2O (ref-2)" and not hasattr(refs[0], "entry_id")


def test_stable_call_uses_the_stated_tolerance(tmp_path, tiny):
    """A candidate on the hull up to float32 round-off is stable; 10x the tolerance above it is not (an explicit
    tolerance; the default, tied to fmax, is tested in tests/workflows/test_known_phases.py)."""
    refs = [entry("Li", -2.0, "Li"), entry("O", -4.0, "O"), entry("Li2O", -3.5, "Li2O")]
    offsets = {"on": 3e-6, "ulp": 1e-7, "above": 1e-4}  # eV/atom above the Li2O reference
    structs = {k: bulk("Li2O", "fluorite", 4.6 + 0.01 * i) for i, k in enumerate(offsets)}
    fake = fake_relax(lambda at: -3.5 + offsets[next(k for k, s in structs.items() if s.cell[0, 1] == at.cell[0, 1])])
    res = st.screen(structs, refs, out=tmp_path / "o", model=tiny, plots=False, progress=False, relax_fn=fake,
                    stable_tolerance=1e-5)
    assert res.row("on")["e_above_hull"] == pytest.approx(3e-6, abs=1e-9) and res.row("on")["stable"]
    assert res.row("ulp")["stable"] and not res.row("above")["stable"]
    assert res.settings["stable_tolerance"] == 1e-5
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["settings"]["stable_tolerance"] == 1e-5 and run["settings"]["threshold"] == 0.0
    strict = st.screen(structs, refs, model=tiny, plots=False, progress=False, relax_fn=fake, stable_tolerance=0.0)
    assert not strict.row("on")["stable"] and not strict.row("ulp")["stable"]


def test_unsupported_elements_of_default_style_model(tiny):
    # a model whose E0 is zero for an element reports it as unsupported (as the packaged checkpoint does for Po)
    with torch.no_grad():
        e0 = tiny.decoder.e0.clone()
        tiny.decoder.e0[84] = 0.0
    try:
        allowed = st.supported_elements(tiny)
        assert 84 not in allowed and 8 in allowed
        assert "Po" in st.unsupported_message(Atoms("Po", cell=[3, 3, 3], pbc=True), allowed)
        assert st.unsupported_message(Atoms("O", cell=[3, 3, 3], pbc=True), allowed) is None
    finally:
        with torch.no_grad():
            tiny.decoder.e0.copy_(e0)


# ------------------------------------------------------------------------------------ command line
def _tiny_checkpoint(path: Path) -> Path:
    from geodite_sim.model import save_checkpoint

    save_checkpoint(tiny_geodite(torch.float32), path)
    return path


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    from ase.io import write

    cdir, rdir = tmp_path / "cands", tmp_path / "refs"
    cdir.mkdir()
    rdir.mkdir()
    for name, a in _refs().items():
        write(rdir / f"{name}.extxyz", a)
    for name, a in [("LiO-rs", bulk("LiO", "rocksalt", 4.2)), ("Li2O-af", bulk("Li2O", "fluorite", 4.7)),
                    ("NaCl-cs", bulk("NaCl", "cesiumchloride", 3.4)), ("NaO-zb", bulk("NaO", "zincblende", 5.2)),
                    ("LiCl-rs", bulk("LiCl", "rocksalt", 5.1)), ("Na2O-af", bulk("Na2O", "fluorite", 5.5))]:
        write(cdir / f"{name}.extxyz", a)
    return cdir, rdir


def test_cli_screen(tmp_path, capsys):
    from geodite_sim.cli import build_parser, main

    ckpt = _tiny_checkpoint(tmp_path / "tiny.ckpt")
    cdir, rdir = _write_inputs(tmp_path)
    help_text = build_parser()._subparsers._group_actions[0].choices["screen"].format_help()
    assert "--references" in help_text and "examples:" in help_text and "--mp2020" in help_text
    rc = main(["screen", str(cdir), "--references", str(rdir), "--out", str(tmp_path / "o"), "--model", str(ckpt),
               "--max-steps", "4", "--quiet", "--no-plots", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "6/6 candidates screened" in text and "LiO-rs" in text
    rows = _table(tmp_path / "o" / "results.csv")
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # directory order
    assert all(r["status"] == "screened" and r["e_above_hull"] != "" for r in rows)


@pytest.mark.slow
def test_cli_resume_after_sigkill(tmp_path, capsys):
    """Kill a running ``geodite-sim screen`` process with SIGKILL, re-run it: same table as an uninterrupted run.
    (The uninterrupted and the resuming runs go through ``cli.main`` in this process: one start-up, not three.)"""
    from geodite_sim.cli import main

    ckpt = _tiny_checkpoint(tmp_path / "tiny.ckpt")
    cdir, rdir = _write_inputs(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def cmd(out):
        return [sys.executable, "-m", "geodite_sim", "screen", str(cdir), "--references", str(rdir), "--out",
                str(out), "--model", str(ckpt), "--max-steps", "25", "--max-atoms", "4", "--quiet", "--no-plots",
                "--device", "cpu", "--dtype", "float64"]

    assert main(cmd(tmp_path / "full")[3:]) == 0
    log = tmp_path / "part" / st.RELAX_LOG
    proc = subprocess.Popen(cmd(tmp_path / "part"), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(read_records(log))  # complete records (a line cut by the kill is ignored)
    assert 4 <= n_before < 12
    capsys.readouterr()
    assert main(cmd(tmp_path / "part")[3:]) == 0
    assert f"({12 - n_before} relaxed, {n_before} resumed)" in capsys.readouterr().out
    _assert_same_table(_table(tmp_path / "full" / "results.csv"), _table(tmp_path / "part" / "results.csv"))


@pytest.mark.parametrize("convention", ["MPtrj uncorrected (apply MP2020 corrections once)",
                                        "MPtrj with MP2020 corrections included"])
def test_mp2020_applied_exactly_once_by_model_card(tmp_path, tiny, convention):
    """A model card saying the energies are uncorrected (SevenNet-0, the distilled default) gets MP2020 once;
    one saying they already include it (CHGNet, geodite-mini) never gets it a second time, even when asked."""
    import copy

    model = copy.deepcopy(tiny)
    model.card = {"energy_convention": convention}
    params = {"run_type": "GGA", "hubbards": {}}
    refs = [ComputedEntry("Li", -1.9, entry_id="mp-Li", parameters=params),
            ComputedEntry("O2", -9.8, entry_id="mp-O2", parameters=params),
            ComputedEntry("Li2O", -14.3, entry_id="mp-Li2O", parameters=params)]
    dumpfn(refs, tmp_path / "refs.json.gz")
    energies = {"Li2O": -4.9, "LiO": -4.6}
    cands = {k: Atoms(k, cell=[4, 4, 4], pbc=True,
                      scaled_positions=np.random.default_rng(0).random((len(Atoms(k)), 3))) for k in energies}
    for mp2020 in (None, True):
        res = st.screen(cands, tmp_path / "refs.json.gz", out=None, model=model, mp2020=mp2020, plots=False,
                        progress=False, relax_fn=fake_relax(lambda a: energies[a.get_chemical_formula(mode="reduce")]))
        row = res.row("Li2O")
        if "uncorrected" in convention:
            assert res.settings["mp2020"] is True
            assert row["correction_per_atom"] == pytest.approx(-0.687 / 3)  # the oxide correction, once
            assert row["corrected_energy_per_atom"] == pytest.approx(-4.9 - 0.687 / 3)
        else:
            assert res.settings["mp2020"] is False and "not applied twice" in res.settings["mp2020_reason"]
            assert row["correction_per_atom"] == 0.0 and row["corrected_energy_per_atom"] == pytest.approx(-4.9)


def test_packaged_default_declares_its_energy_convention():
    import geodite_sim as gs

    assert st.model_energy_convention(gs.load_model()) == "corrected"  # geodite-mini: CHGNet's corrected targets
