"""Property workflows (phonons, EOS, elastic, diatomics): batched results vs one-at-a-time references.

References are independent of the workflow code: phonopy driven by an ASE calculator one supercell
at a time, ``ase.eos`` on calculator energies, ASE's FIRE relaxing each strained cell, and the
diatomic metrics counted by hand on analytic Morse curves. Float64 throughout.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.data import covalent_radii
from ase.eos import EquationOfState
from ase.optimize import FIRE
from conftest import tiny_geodite
from geodite_sim.workflows.properties import (
    diatomic_metrics,
    run_diatomics,
    run_elastic,
    run_eos,
    run_phonons,
)
from phonopy import Phonopy
from phonopy.structure.atoms import PhonopyAtoms
from scipy.stats import spearmanr

from geodite_sim import GeoditeCalculator
from geodite_sim.pair_potential import MorsePotential

GPA = 160.21766208
R_GAS = 8.314462618


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_geodite(torch.float64)


@pytest.fixture(scope="module")
def cu_morse():
    return MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)


def _calc(model):
    return model.ase_calculator() if isinstance(model, MorsePotential) else GeoditeCalculator(model)


# ---------------------------------------------------------------------------------------------- phonons
def reference_phonopy(atoms: Atoms, calc, supercell, mesh) -> Phonopy:
    """phonopy driven by an ASE calculator, one displaced supercell at a time."""
    unit = PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell[:],
                        scaled_positions=atoms.get_scaled_positions(wrap=False), masses=atoms.get_masses())
    ph = Phonopy(unit, supercell_matrix=np.diag(supercell), primitive_matrix="P")
    ph.generate_displacements(distance=0.01)
    forces = []
    for sc in ph.supercells_with_displacements:
        a = Atoms(sc.symbols, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        a.calc = calc
        forces.append(a.get_forces())
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    ph.run_mesh(mesh, is_gamma_center=True)
    return ph


def assert_same_frequencies(a: np.ndarray, b: np.ndarray) -> None:
    """≤ 1e-6 THz where |ω| > 0.01 THz; near 0 compare signed ω² (sqrt amplifies round-off there)."""
    a, b = np.asarray(a), np.asarray(b)
    away = np.abs(b) > 0.01
    np.testing.assert_allclose(a[away], b[away], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.sign(a) * a**2, np.sign(b) * b**2, rtol=0, atol=1e-9)


def test_phonons_batched_equal_phonopy_one_at_a_time(tiny):
    structures = [bulk("Si", "diamond", 5.43), bulk("NaCl", "rocksalt", 5.64)]
    res = run_phonons(structures, tiny, supercell=(2, 2, 2), relax=False, mesh=(6, 6, 6))
    calc = GeoditeCalculator(tiny)
    for r, atoms in zip(res, structures, strict=True):
        assert r.status == "done" and r.error is None and r.n_displacements >= 1
        ref = reference_phonopy(atoms, calc, (2, 2, 2), [6, 6, 6])
        assert_same_frequencies(r.phonopy.mesh.frequencies, ref.mesh.frequencies)
        assert r.omega_max_THz == pytest.approx(ref.mesh.frequencies.max(), abs=1e-6)
        ref.run_thermal_properties(temperatures=[300.0], exclude_gamma_acoustic=True)  # as the workflow (docs)
        assert r.entropy_J_per_K_mol == pytest.approx(ref.thermal_properties.entropy[0], abs=1e-6)
        assert r.cv_J_per_K_mol == pytest.approx(ref.thermal_properties.heat_capacity[0], abs=1e-6)
        assert r.free_energy_kJ_per_mol == pytest.approx(ref.thermal_properties.free_energy[0], abs=1e-6)
        # acoustic sum rule: three modes at Γ vanish (energy-gradient forces sum to zero)
        assert np.sort(np.abs(r.gamma_frequencies_THz))[:3].max() < 1e-3


def test_phonons_relaxed_morse_physics(cu_morse, tmp_path):
    """Relax then phonons (fcc Cu, Morse): equal to phonopy + ASE calculator on the relaxed cell; Γ; C_v -> 3R."""
    atoms = bulk("Cu", "fcc", 3.7)  # off equilibrium: the relaxation matters
    r = run_phonons([atoms], cu_morse, supercell=(3, 3, 3), relax=True, mesh=(8, 8, 8), out_dir=tmp_path)[0]
    assert r.status == "done" and r.relax_converged
    assert abs(r.structure.get_volume() - atoms.get_volume()) > 0.5  # the cell relaxed
    ref = reference_phonopy(r.structure, cu_morse.ase_calculator(), (3, 3, 3), [8, 8, 8])
    assert_same_frequencies(r.phonopy.mesh.frequencies, ref.mesh.frequencies)
    assert max(abs(f) for f in r.gamma_frequencies_THz) < 1e-4
    assert not r.imaginary_modes and r.min_frequency_THz > -1e-4
    r.phonopy.run_thermal_properties(temperatures=[3000.0])
    assert r.phonopy.thermal_properties.heat_capacity[0] == pytest.approx(3 * R_GAS * len(atoms), rel=2e-3)
    saved = json.loads((tmp_path / "0_Cu.json").read_text())
    assert saved["omega_max_THz"] == pytest.approx(r.omega_max_THz)
    for key in ("dos_png", "bands_png", "phonopy_yaml"):
        assert (tmp_path / r.files[key].split("/")[-1]).stat().st_size > 1000


def test_phonons_conventional_cell_is_phonopys_primitive(cu_morse):
    """A conventional (4-atom) fcc cell stays phonopy's primitive cell: 12 bands, C_v per mole of that cell."""
    r = run_phonons([bulk("Cu", "fcc", 3.606, cubic=True)], cu_morse, supercell=(2, 2, 2), relax=False,
                    mesh=(8, 8, 8))[0]  # (phonopy drops the 3 Γ acoustic modes: 3 of 12 x 8³ modes, 0.05 %)
    assert r.status == "done" and len(r.gamma_frequencies_THz) == 12
    r.phonopy.run_thermal_properties(temperatures=[3000.0])
    assert r.phonopy.thermal_properties.heat_capacity[0] == pytest.approx(3 * R_GAS * 4, rel=2e-3)


# ---------------------------------------------------------------------------------------------- EOS
def _ase_eos(atoms: Atoms, calc, strains, relax_ions: bool, fmax: float = 1e-4):
    vols, energies = [], []
    for s in strains:
        a = atoms.copy()
        a.set_cell(atoms.cell[:] * (1 + s) ** (1 / 3), scale_atoms=True)
        a.calc = calc
        if relax_ions:
            FIRE(a, logfile=None).run(fmax=fmax, steps=2000)
        vols.append(a.get_volume())
        energies.append(a.get_potential_energy())
    fit = EquationOfState(vols, energies, eos="birchmurnaghan")
    v0, e0, b = fit.fit()
    return v0, e0, b * GPA, fit.eos_parameters[2], energies


def test_eos_clamped_equals_ase(tiny, cu_morse):
    strains = np.linspace(-0.08, 0.08, 9)
    for model, atoms in ((tiny, bulk("Si", "diamond", 5.43)), (cu_morse, bulk("Cu", "fcc", 3.61))):
        r = run_eos([atoms], model, relax=False, relax_ions=False, strains=strains)[0]
        v0, e0, b0, bp, energies = _ase_eos(atoms, _calc(model), strains, relax_ions=False)
        np.testing.assert_allclose(r.energies_eV, energies, rtol=0, atol=1e-9)
        assert r.v0_A3 == pytest.approx(v0, rel=1e-7)
        assert r.e0_eV == pytest.approx(e0, abs=1e-7)
        assert r.b0_GPa == pytest.approx(b0, rel=1e-6)
        assert r.b0_prime == pytest.approx(bp, rel=1e-5)


def test_eos_relaxed_ions_equals_ase_fire(cu_morse):
    atoms = bulk("Cu", "fcc", 3.61) * (2, 1, 1)
    atoms.rattle(0.03, seed=3)  # internal coordinates to relax at every volume
    strains = np.linspace(-0.06, 0.06, 7)
    r = run_eos([atoms], cu_morse, relax=False, relax_ions=True, strains=strains, fmax=1e-3, max_steps=2000)[0]
    assert r.status == "done" and r.ions_converged
    v0, e0, b0, bp, energies = _ase_eos(atoms, cu_morse.ase_calculator(), strains, relax_ions=True, fmax=1e-3)
    np.testing.assert_allclose(r.energies_eV, energies, rtol=0, atol=1e-6)
    assert r.v0_A3 == pytest.approx(v0, rel=1e-6) and r.b0_GPa == pytest.approx(b0, rel=1e-4)
    assert r.b0_prime == pytest.approx(bp, rel=1e-3)


# ---------------------------------------------------------------------------------------------- elastic
def _fd_elastic(atoms: Atoms, calc, strains, relax_ions: bool, fmax: float = 1e-5) -> np.ndarray:
    """C (GPa) by finite differences, each strained cell relaxed by ASE's FIRE with the ASE calculator."""
    pairs = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    c = np.zeros((6, 6))
    for j, (p, q) in enumerate(pairs):
        sig = []
        for e in strains:
            eps = np.zeros((3, 3))
            eps[p, q] += e / (1 if p == q else 2)
            eps[q, p] = eps[p, q]
            a = atoms.copy()
            a.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
            a.calc = calc
            if relax_ions:
                FIRE(a, logfile=None).run(fmax=fmax, steps=3000)
            sig.append(a.get_stress(voigt=True))
        c[:, j] = np.polyfit(strains, np.array(sig), 1)[0] * GPA
    return 0.5 * (c + c.T)


def test_elastic_equals_fire_finite_difference_reference(tiny):
    """Relaxed-ion and clamped-ion tensors of diamond Si (internal relaxation under shear) vs ASE + FIRE."""
    atoms = bulk("Si", "diamond", 5.43)
    strains = [-0.01, 0.01]
    r = run_elastic([atoms], tiny, strains=strains, relax=False, relax_ions=True, fmax=1e-3, max_steps=3000)[0]
    assert r.status == "done" and r.ions_converged
    calc = GeoditeCalculator(tiny)
    c_relaxed = _fd_elastic(atoms, calc, strains, relax_ions=True, fmax=1e-3)
    c_clamped = _fd_elastic(atoms, calc, strains, relax_ions=False)
    np.testing.assert_allclose(np.array(r.C_GPa), c_relaxed, rtol=0, atol=0.1)
    np.testing.assert_allclose(np.array(r.C_clamped_GPa), c_clamped, rtol=0, atol=1e-6)
    # the ionic relaxation is exercised: it changes C44 (Kleinman internal strain)
    assert abs(r.C_GPa[3][3] - r.C_clamped_GPa[3][3]) > 1.0


def test_elastic_cubic_morse_and_eos_bulk_modulus(cu_morse):
    atoms = bulk("Cu", "fcc", 3.65)
    el = run_elastic([atoms], cu_morse, relax=True, fmax=1e-5, max_steps=1000)[0]
    eos = run_eos([atoms], cu_morse, relax=True, fmax=1e-5, max_steps=1000)[0]
    c = np.array(el.C_GPa)
    assert el.status == "done" and eos.status == "done"
    assert c[0, 0] > 100
    np.testing.assert_allclose(np.diag(c)[:3], c[0, 0], rtol=1e-6)
    np.testing.assert_allclose([c[0, 1], c[0, 2], c[1, 2]], c[0, 1], rtol=1e-6)
    np.testing.assert_allclose(np.diag(c)[3:], c[3, 3], rtol=1e-6)
    assert np.abs(c[:3, 3:]).max() < 1e-6 * c[0, 0]
    assert np.abs(c[3:, 3:] - np.diag(np.diag(c)[3:])).max() < 1e-6 * c[0, 0]
    # central pair potential at zero pressure: Cauchy relation C12 = C44
    assert c[0, 1] == pytest.approx(c[3, 3], rel=2e-3)
    assert el.born_stable and all(el.cubic_born.values())
    # cubic: K_V = K_R = (C11 + 2 C12)/3, and the EOS B0 agrees (finite-strain vs tangent modulus: a few %)
    assert el.bulk_voigt_GPa == pytest.approx((c[0, 0] + 2 * c[0, 1]) / 3, rel=1e-9)
    assert el.bulk_reuss_GPa == pytest.approx(el.bulk_voigt_GPa, rel=1e-6)
    assert eos.b0_GPa == pytest.approx(el.bulk_hill_GPa, rel=0.03)


# ---------------------------------------------------------------------------------------------- diatomics
def _morse(r, d=1.0, a=1.5, re=1.2):
    x = np.exp(-a * (r - re))
    return d * (x * x - 2 * x), 2 * a * d * (x * x - x)  # energy, bond force = -dE/dr


def test_diatomic_metrics_smooth_morse_by_hand():
    r = np.linspace(0.01, 6.1, 200)
    e, f = _morse(r)
    m = diatomic_metrics(r, e, f, r_min=0.3)
    keep = (r >= 0.3) & (r <= 6.0)
    rr, ee, ff = r[keep], e[keep], f[keep]
    # one smooth well: one force sign change, one sign change of ΔE, tortuosity 1, monotone branches
    assert m["force_flips"] == 1 and m["energy_diff_flips"] == 1
    assert m["tortuosity"] == pytest.approx(1.0, abs=1e-12)
    assert m["spearman_repulsion_energy"] == pytest.approx(-1.0, abs=1e-12)
    assert m["spearman_attraction_energy"] == pytest.approx(1.0, abs=1e-12)
    assert m["spearman_descending_force"] == pytest.approx(-1.0, abs=1e-12)
    assert m["spearman_ascending_force"] == pytest.approx(1.0, abs=1e-12)
    # energy jump by hand (ascending r): the two retained |ΔE| ≥ 1 meV around the well's one flip
    de = np.diff(ee)
    big = de[np.abs(de) >= 1e-3]
    k = next(i for i in range(len(big) - 1) if big[i] < 0 < big[i + 1])
    assert m["energy_jump_arena"] == pytest.approx(abs(big[k]) + abs(big[k + 1]), rel=1e-12)
    assert m["energy_jump"] == pytest.approx(2 * (abs(big[k]) + abs(big[k + 1])), rel=1e-12)
    # conservation: analytic force vs finite-difference gradient of the energy
    assert m["conservation_deviation"] == pytest.approx(np.mean(np.abs(ff + np.gradient(ee, rr))), rel=1e-12)
    assert m["r_energy_min_A"] == pytest.approx(1.2, abs=0.031)


def test_diatomic_metrics_count_a_step_by_hand():
    """A 50 meV step at r = 3 Å in the attractive branch: two extra ΔE flips, tortuosity > 1, jumps."""
    r = np.linspace(0.01, 6.1, 200)
    e, f = _morse(r)
    e = e - 0.05 * (r > 3.0)
    f = f.copy()
    f[(r > 3.0) & (r < 3.1)] = -0.5  # and a force spike of the opposite sign there
    m = diatomic_metrics(r, e, f, r_min=0.3)
    assert m["energy_diff_flips"] == 3
    keep = (r >= 0.3) & (r <= 6.0)
    ee = e[keep]
    etv = np.abs(np.diff(ee)).sum()
    assert m["tortuosity"] == pytest.approx(etv / ((ee[0] - ee.min()) + (ee[-1] - ee.min())), rel=1e-12)
    assert m["tortuosity"] > 1.005  # the denominator is dominated by the repulsive wall
    # the step interval's |ΔE| ≈ 0.05 enters two flips, each with a neighbour: arena jump ≥ 2 x 0.05
    assert m["energy_jump_arena"] > 0.1 and m["energy_jump"] == pytest.approx(2 * m["energy_jump_arena"])
    assert m["force_flips"] == 1  # the spike is attractive like its surroundings: no extra sign change
    assert m["force_jump"] > 1.0


def test_run_diatomics_morse_model_equals_analytic_curve(cu_morse, tmp_path):
    rep = run_diatomics(cu_morse, elements=["Cu", "Si"], n=200, out_dir=tmp_path)
    r = np.linspace(0.01, 6.1, 200)
    eps, rho, r0, rc1, rc2 = 0.35, 4.5, 2.55, 1.6 * 2.55, 2.2 * 2.55
    x = np.exp(-rho * (r / r0 - 1))
    s = np.clip(1 - (r - rc1) / (rc2 - rc1), 0, 1)
    fc = np.where(s >= 1, 1.0, 6 * s**5 - 15 * s**4 + 10 * s**3)
    dfc = np.where((s > 0) & (s < 1), (30 * s**4 - 60 * s**3 + 30 * s**2) * (-1 / (rc2 - rc1)), 0.0)
    v = eps * (x * x - 2 * x)
    dv = eps * (-2 * rho / r0 * x * x + 2 * rho / r0 * x)
    energy, force = v * fc, -(dv * fc + v * dfc)
    for res in rep.results:
        assert res.status == "done"
        np.testing.assert_allclose(res.energy_eV, energy, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(res.force_eV_per_A, force, rtol=1e-8, atol=1e-9)
        z = 29 if res.element == "Cu" else 14
        assert res.r_min_A == pytest.approx(0.5 * covalent_radii[z])
        keep = (r >= res.r_min_A) & (r <= 6.0)
        # hand counts on the analytic curve: one force flip, one ΔE flip, tortuosity 1
        fr = np.where(np.abs(force[keep]) < 1e-2, 0, np.sign(force[keep]))
        fr = fr[fr != 0]
        assert res.force_flips == np.count_nonzero(fr[1:] != fr[:-1]) == 1
        assert res.energy_diff_flips == 1 and res.tortuosity == pytest.approx(1.0, abs=1e-9)
        ek = energy[keep]
        imin = int(np.argmin(ek))
        assert res.spearman_repulsion_energy == pytest.approx(spearmanr(r[keep][: imin + 1], ek[: imin + 1])[0])
    assert rep.means["force_flips"] == 1.0 and rep.means["n_elements"] == 2
    assert (tmp_path / "diatomics.png").stat().st_size > 1000 and (tmp_path / "Cu.json").exists()
    assert "| **mean** |" in (tmp_path / "diatomics.md").read_text()


def test_diatomic_metrics_skip_non_finite_points():
    """A distance the model failed on (NaN) is left out; the metrics equal those of the curve without it."""
    r = np.linspace(0.01, 6.1, 200)
    e, f = _morse(r)
    e_nan = e.copy()
    e_nan[50] = np.nan
    keep = np.arange(200) != 50
    a = diatomic_metrics(r, e_nan, f, r_min=0.3)
    b = diatomic_metrics(r[keep], e[keep], f[keep], r_min=0.3)
    assert a == b and a["force_flips"] == 1 and a["n_points_used"] == b["n_points_used"]


def test_diatomics_unknown_element_is_its_own_error(cu_morse):
    rep = run_diatomics(cu_morse, elements=["Cu", "Xx"], n=40)
    assert [r.status for r in rep.results] == ["done", "failed"]
    assert "Xx" in rep.results[1].error and rep.means["n_elements"] == 1


# ---------------------------------------------------------------------------------------------- error contract
def _bad_inputs(tmp_path):
    nan = bulk("Cu", "fcc", 3.61)
    nan.positions[0, 0] = np.nan
    molecule = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])
    return [str(tmp_path / "missing.cif"), nan, molecule]


@pytest.mark.parametrize("workflow", ["phonons", "eos", "elastic"])
def test_bad_structures_get_their_own_error_others_unchanged(workflow, cu_morse, tmp_path):
    # (Morse bcc Cu is Born-unstable: its elastic moduli are NaN by design, so elastic takes a second fcc cell)
    good = [bulk("Cu", "fcc", 3.61), bulk("Cu", "bcc", 2.87) if workflow != "elastic" else bulk("Cu", "fcc", 3.55,
                                                                                                 cubic=True)]
    bad = _bad_inputs(tmp_path)
    mixed = [bad[0], good[0], bad[1], bad[2], good[1]]
    run = {"phonons": lambda s: run_phonons(s, cu_morse, supercell=(2, 2, 2), mesh=(4, 4, 4), relax=False),
           "eos": lambda s: run_eos(s, cu_morse, relax=False, relax_ions=False),
           "elastic": lambda s: run_elastic(s, cu_morse, relax=False, relax_ions=True, max_steps=50)}[workflow]
    res, alone = run(mixed), run(good)
    assert [r.index for r in res] == list(range(5))
    assert [r.status for r in res] == ["failed", "done", "failed", "failed", "done"]
    assert "missing.cif" in res[0].error and "NaN" in res[2].error and "periodic" in res[3].error
    key = {"phonons": "omega_max_THz", "eos": "b0_GPa", "elastic": "bulk_hill_GPa"}[workflow]
    for r, a in zip((res[1], res[4]), alone, strict=True):
        assert getattr(r, key) == pytest.approx(getattr(a, key), rel=1e-10)
        assert math.isfinite(getattr(r, key))


# ---------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    from ase.io import write

    from geodite_sim.model import save_checkpoint

    d = tmp_path_factory.mktemp("cli")
    save_checkpoint(tiny_geodite(torch.float32), d / "tiny.ckpt")
    write(d / "Si.extxyz", bulk("Si", "diamond", 5.43))
    write(d / "NaCl.extxyz", bulk("NaCl", "rocksalt", 5.64))
    (d / "broken.cif").write_text("not a cif\n")
    return d


@pytest.mark.parametrize("workflow,extra", [
    ("phonons", ["--supercell", "1", "1", "1", "--mesh", "4", "4", "4", "--no-plots"]),
    ("eos", ["--points", "7", "--no-plots"]),
    ("elastic", ["--strain", "0.01", "--fmax", "0.01"]),
])
def test_cli_workflow_and_resume(workflow, extra, cli_inputs, tmp_path, capsys):
    from geodite_sim.cli import main

    d = cli_inputs
    out = tmp_path / workflow
    argv = [workflow, str(d / "Si.extxyz"), str(d / "NaCl.extxyz"), str(d / "broken.cif"), "--out", str(out),
            "--model", str(d / "tiny.ckpt"), "--max-steps", "5", "--no-progress", "--device", "cpu", *extra]
    assert main(argv) == 1  # one input failed, the others ran
    text = capsys.readouterr().out
    assert f"{workflow}: 3 new input(s)" in text and "2 succeeded, 1 failed" in text
    recs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "summary.json"}
    assert set(recs) == {"Si", "NaCl", "broken"}
    assert recs["Si"]["status"] == "done" and recs["broken"]["status"] == "failed"
    assert (out / "summary.md").exists()
    mtime = (out / "Si.json").stat().st_mtime_ns
    assert main(argv) == 1
    text = capsys.readouterr().out
    assert f"{workflow}: 0 new input(s), skipped 3 already done" in text
    assert (out / "Si.json").stat().st_mtime_ns == mtime


def test_cli_diatomics_and_resume(cli_inputs, tmp_path, capsys):
    from geodite_sim.cli import main

    out = tmp_path / "dia"
    base = ["diatomics", "--out", str(out), "--model", str(cli_inputs / "tiny.ckpt"), "--points", "40",
            "--no-progress", "--device", "cpu"]
    assert main([*base[:1], "H", "Li", *base[1:]]) == 0
    text = capsys.readouterr().out
    assert "diatomics: 2 new element(s)" in text and "means over 2 elements" in text
    assert main([*base[:1], "H", "Li", "O", *base[1:]]) == 0
    text = capsys.readouterr().out
    assert "1 new element(s), skipped 2 already done" in text and "means over 3 elements" in text
    summary = json.loads((out / "diatomics.json").read_text())
    assert [e["element"] for e in summary["elements"]] == ["H", "Li", "O"]
    assert (out / "diatomics.png").exists()
